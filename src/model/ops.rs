//! Element-wise layers shared by every architecture: norms, activations and
//! attention's inner loops (RoPE is in `rope.rs`).
//!
//! Each entry point dispatches once per call (per row range, never per
//! element) to a copy of its loop compiled for the CPU's level; the
//! `#[inline(always)]` bodies are what the copies are made of.

use super::spec::Activation;
use crate::kv::KvElem;
use crate::simd::{dispatch, Kernel, Simd};

/// A normalisation layer's parameters: RMSNorm when `bias` is None and
/// `layer_norm` is false, LayerNorm (mean-centred, with bias) otherwise.
#[derive(Clone)]
pub struct Norm {
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub layer_norm: bool,
    pub eps: f32,
}

impl Norm {
    /// Normalises each `weight.len()`-wide row of `x` into `out`.
    pub fn apply(&self, x: &[f32], out: &mut [f32]) {
        out.copy_from_slice(x);
        self.apply_in_place(out);
    }

    pub fn apply_in_place(&self, x: &mut [f32]) {
        dispatch(NormRows { norm: self, x })
    }

    /// The gradient of the loss with respect to the norm's input rows `x`,
    /// given its gradient `dy` with respect to the output; `dx += ` it.
    /// The weights and bias are frozen (no gradient of their own).
    pub fn backward(&self, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        let w = &self.weight;
        let n = w.len() as f32;
        let rows = x.chunks_exact(w.len()).zip(dy.chunks_exact(w.len()));
        let mut g = vec![0f32; w.len()];
        for ((x, dy), dx) in rows.zip(dx.chunks_exact_mut(w.len())) {
            let shift = if self.layer_norm {
                x.iter().sum::<f32>() / n
            } else {
                0.0
            };
            let var = x.iter().map(|v| (v - shift) * (v - shift)).sum::<f32>() / n;
            let inv = 1.0 / (var + self.eps).sqrt();
            // With x̂ = (x - shift)·inv and g = dy ⊙ w:
            // dx = inv · (g - x̂·mean(g ⊙ x̂) [- mean(g) for LayerNorm]).
            let mut dot = 0f32;
            let mut sum = 0f32;
            for i in 0..w.len() {
                g[i] = dy[i] * w[i];
                dot += g[i] * (x[i] - shift) * inv;
                sum += g[i];
            }
            let (dot, mean) = (dot / n, if self.layer_norm { sum / n } else { 0.0 });
            for i in 0..w.len() {
                let xh = (x[i] - shift) * inv;
                dx[i] += inv * (g[i] - mean - xh * dot);
            }
        }
    }
}

struct NormRows<'a> {
    norm: &'a Norm,
    x: &'a mut [f32],
}

impl Kernel for NormRows<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self, _: S) {
        let norm = self.norm;
        for row in self.x.chunks_exact_mut(norm.weight.len()) {
            let n = row.len() as f32;
            // LayerNorm centres on the mean; RMSNorm does not.
            let shift = if norm.layer_norm {
                row.iter().sum::<f32>() / n
            } else {
                0.0
            };
            let var = row.iter().map(|v| (v - shift) * (v - shift)).sum::<f32>() / n;
            let inv = 1.0 / (var + norm.eps).sqrt();
            for (v, w) in row.iter_mut().zip(&norm.weight) {
                *v = (*v - shift) * inv * w;
            }
            if let Some(b) = &norm.bias {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        }
    }
}

/// e^x to within 2 ulp, written without branches or calls so that loops
/// over it vectorise (libm's expf and tanhf do not).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.3, 88.7);
    let k = (x * LOG2E).round();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    // Taylor-derived minimax polynomial of e^r on [-ln2/2, ln2/2].
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_66
                    + r * (0.041_666_41 + r * (0.008_333_452 + r * 0.001_388_731)))));
    p * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    let y = C * (x + 0.044715 * x * x * x);
    // tanh(y) = 1 - 2 / (e^{2y} + 1)
    let t = 1.0 - 2.0 / (exp(2.0 * y) + 1.0);
    0.5 * x * (1.0 + t)
}

/// d gelu_tanh(x) / dx.
pub fn gelu_tanh_grad(x: f32) -> f32 {
    const C: f32 = 0.797_884_6;
    let y = C * (x + 0.044715 * x * x * x);
    let t = 1.0 - 2.0 / (exp(2.0 * y) + 1.0);
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044715 * x * x)
}

/// d silu(x) / dx = σ(x)·(1 + x·(1 - σ(x))).
pub fn silu_grad(x: f32) -> f32 {
    let s = 1.0 / (1.0 + exp(-x));
    s * (1.0 + x * (1.0 - s))
}

/// d act(x) / dx.
pub fn activate_grad(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Silu => silu_grad(x),
        Activation::GeluTanh => gelu_tanh_grad(x),
    }
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

#[inline(always)]
pub fn activate(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Silu => silu(x),
        Activation::GeluTanh => gelu_tanh(x),
    }
}

/// `u[i] = act(g[i]) · u[i]` (gated MLP), or `u[i] = act(u[i])` without a gate.
pub fn activate_slice(act: Activation, u: &mut [f32], gate: Option<&[f32]>) {
    dispatch(Activate { act, u, gate })
}

struct Activate<'a> {
    act: Activation,
    u: &'a mut [f32],
    gate: Option<&'a [f32]>,
}

impl Kernel for Activate<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self, _: S) {
        let act = self.act;
        // One loop per activation, so none holds a branch per element.
        macro_rules! apply {
            ($f:expr) => {
                match self.gate {
                    Some(g) => self.u.iter_mut().zip(g).for_each(|(u, g)| *u *= $f(*g)),
                    None => self.u.iter_mut().for_each(|u| *u = $f(*u)),
                }
            };
        }
        match act {
            Activation::Silu => apply!(silu),
            Activation::GeluTanh => apply!(gelu_tanh),
        }
    }
}

/// `x = cap · tanh(x / cap)`.
pub fn softcap(x: &mut [f32], cap: f32) {
    dispatch(Softcap { x, cap })
}

struct Softcap<'a> {
    x: &'a mut [f32],
    cap: f32,
}

impl Kernel for Softcap<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self, _: S) {
        softcap_in(self.x, self.cap)
    }
}

#[inline(always)]
pub fn softcap_in(x: &mut [f32], cap: f32) {
    for v in x {
        let t = 1.0 - 2.0 / (exp(2.0 * *v / cap) + 1.0);
        *v = t * cap;
    }
}

/// `out[i·stride] = dot(qs[i], k)` for the `M` vectors of `qs` (each
/// `k.len() · T::PER` long), reading `k` once: the compiler keeps `M × 8`
/// accumulators in registers.
#[inline(always)]
fn dots<S: Simd, T: KvElem, const M: usize>(
    s: S,
    qs: &[f32],
    k: &[T],
    out: &mut [f32],
    stride: usize,
) {
    let d = k.len() * T::PER;
    let mut acc = [[0f32; 8]; M];
    let full = d / 8 * 8;
    for c in (0..full).step_by(8) {
        let kc = T::load8(s, k, c);
        for (i, a) in acc.iter_mut().enumerate() {
            let q = &qs[i * d + c..i * d + c + 8];
            for l in 0..8 {
                a[l] += q[l] * kc[l];
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        let mut s: f32 = a.iter().sum();
        for j in full..d {
            s += qs[i * d + j] * T::get(k, j);
        }
        out[i * stride] = s;
    }
}

/// `out[i·stride] = dot(qs[i], k)` for the query vectors stored back to back
/// in `qs`. A body for kernels: call it from inside one.
#[inline(always)]
pub fn dot_multi<S: Simd, T: KvElem>(s: S, qs: &[f32], k: &[T], out: &mut [f32], stride: usize) {
    let d = k.len() * T::PER;
    for (c, chunk) in qs.chunks(4 * d).enumerate() {
        let out = &mut out[c * 4 * stride..];
        match chunk.len() / d {
            1 => dots::<S, T, 1>(s, chunk, k, out, stride),
            2 => dots::<S, T, 2>(s, chunk, k, out, stride),
            3 => dots::<S, T, 3>(s, chunk, k, out, stride),
            _ => dots::<S, T, 4>(s, chunk, k, out, stride),
        }
    }
}

/// `ys[i] = Σ_j w[i·n + j] · xs[j]` (n = `xs.len()`) for the `M` output
/// vectors of `ys`, eight dimensions at a time so the sums stay in registers.
#[inline(always)]
fn weighted_sums<S: Simd, T: KvElem, const M: usize>(s: S, ys: &mut [f32], w: &[f32], xs: &[&[T]]) {
    let (d, n) = (ys.len() / M, xs.len());
    let full = d / 8 * 8;
    // Four 8-wide chunks at once: 4·M independent sums per value row keep
    // the FMA units busy (one chunk's M sums would wait on add latency).
    // Every sum still runs over j in order, so results do not change.
    let wide = d / 32 * 32;
    for c in (0..wide).step_by(32) {
        let mut acc = [[[0f32; 8]; 4]; M];
        for (j, x) in xs.iter().enumerate() {
            let xc: [[f32; 8]; 4] = std::array::from_fn(|q| T::load8(s, x, c + 8 * q));
            for (i, a) in acc.iter_mut().enumerate() {
                let wi = w[i * n + j];
                for q in 0..4 {
                    for l in 0..8 {
                        a[q][l] += wi * xc[q][l];
                    }
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (q, aq) in a.iter().enumerate() {
                ys[i * d + c + 8 * q..i * d + c + 8 * q + 8].copy_from_slice(aq);
            }
        }
    }
    for c in (wide..full).step_by(8) {
        let mut acc = [[0f32; 8]; M];
        for (j, x) in xs.iter().enumerate() {
            let xc = T::load8(s, x, c);
            for (i, a) in acc.iter_mut().enumerate() {
                let wi = w[i * n + j];
                for l in 0..8 {
                    a[l] += wi * xc[l];
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            ys[i * d + c..i * d + c + 8].copy_from_slice(a);
        }
    }
    for c in full..d {
        for i in 0..M {
            ys[i * d + c] = xs
                .iter()
                .enumerate()
                .map(|(j, x)| w[i * n + j] * T::get(x, c))
                .sum();
        }
    }
}

/// `ys[i] = Σ_j w[i·n + j] · xs[j]` for the output vectors stored back to
/// back in `ys` (each `xs[j].len()` long; n = `xs.len()`). A body for
/// kernels: call it from inside one.
#[inline(always)]
pub fn weighted_sum_multi<S: Simd, T: KvElem>(s: S, ys: &mut [f32], w: &[f32], xs: &[&[T]]) {
    let (d, n) = (xs.first().map_or(1, |x| x.len() * T::PER), xs.len());
    for (ych, wch) in ys.chunks_mut(4 * d).zip(w.chunks(4 * n)) {
        match ych.len() / d {
            1 => weighted_sums::<S, T, 1>(s, ych, wch, xs),
            2 => weighted_sums::<S, T, 2>(s, ych, wch, xs),
            3 => weighted_sums::<S, T, 3>(s, ych, wch, xs),
            _ => weighted_sums::<S, T, 4>(s, ych, wch, xs),
        }
    }
}

/// Rotates each `n`-value chunk of `x` by the orthonormal Walsh-Hadamard
/// matrix of order `n` (a power of two; Sylvester's ordering,
/// `H[i][j] = (-1)^popcount(i & j) / √n`), in place. The matrix is
/// symmetric and orthonormal, so applying it twice restores `x`.
pub fn hadamard_rotate(x: &mut [f32], n: usize) {
    debug_assert!(n.is_power_of_two() && x.len().is_multiple_of(n));
    let scale = 1.0 / (n as f32).sqrt();
    for c in x.chunks_exact_mut(n) {
        let mut h = 1;
        while h < n {
            for i in (0..n).step_by(2 * h) {
                for j in i..i + h {
                    let (a, b) = (c[j], c[j + h]);
                    c[j] = a + b;
                    c[j + h] = a - b;
                }
            }
            h *= 2;
        }
        c.iter_mut().for_each(|v| *v *= scale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{BlockQ4_0, BlockQ8_0};
    use crate::simd::{dispatch, Kernel};

    /// Attention's two products over quantized keys and values, and over
    /// f32 copies of what those blocks hold.
    struct Products<'a, T> {
        qs: &'a [f32],
        rows: &'a [Vec<T>],
    }

    impl<T: KvElem> Kernel for Products<'_, T> {
        type Output = (Vec<f32>, Vec<f32>);
        fn run<S: Simd>(self, s: S) -> Self::Output {
            let n = self.rows.len();
            let m = self.qs.len() / (self.rows[0].len() * T::PER);
            let mut scores = vec![0f32; m * n];
            for (j, k) in self.rows.iter().enumerate() {
                dot_multi(s, self.qs, k, &mut scores[j..], n);
            }
            let mut out = vec![0f32; self.qs.len()];
            let xs: Vec<&[T]> = self.rows.iter().map(|r| &r[..]).collect();
            weighted_sum_multi(s, &mut out, &scores, &xs);
            (scores, out)
        }
    }

    fn same_as_dequantized<T: KvElem>(ty: crate::quant::GgmlType) {
        let hd = 64;
        let val = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 17.0;
        let floats: Vec<Vec<f32>> = (0..9)
            .map(|j| (0..hd).map(|i| val(i + 13 * j)).collect())
            .collect();
        let blocks: Vec<Vec<T>> = floats
            .iter()
            .map(|f| {
                let mut b = vec![T::default(); hd / T::PER];
                T::store(crate::simd::Portable, f, &mut b);
                b
            })
            .collect();
        let exact: Vec<Vec<f32>> = blocks
            .iter()
            .map(|b| (0..hd).map(|i| T::get(b, i)).collect())
            .collect();
        // Up to 4 query heads share a KV head (GQA); 5 covers two passes.
        for m in 1..=5 {
            let qs: Vec<f32> = (0..m * hd).map(|i| val(3 * i + 1) / 4.0).collect();
            let got = dispatch(Products {
                qs: &qs,
                rows: &blocks,
            });
            let want = dispatch(Products {
                qs: &qs,
                rows: &exact,
            });
            assert_eq!(got, want, "{ty:?}, {m} heads");
        }
    }

    #[test]
    fn hadamard_is_sylvesters_matrix_and_its_own_inverse() {
        for n in [1, 2, 8, 64, 256] {
            // Column j of the matrix is the rotation of the unit vector e_j.
            for j in 0..n {
                let mut e = vec![0f32; n];
                e[j] = 1.0;
                hadamard_rotate(&mut e, n);
                for (i, v) in e.iter().enumerate() {
                    let sign = if (i & j).count_ones() % 2 == 0 {
                        1.0
                    } else {
                        -1.0
                    };
                    assert!(
                        (v - sign / (n as f32).sqrt()).abs() < 1e-6,
                        "n {n} ({i}, {j})"
                    );
                }
            }
        }
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let mut y = x.clone();
        hadamard_rotate(&mut y, 64);
        assert!(y.iter().zip(&x).any(|(a, b)| (a - b).abs() > 0.1));
        hadamard_rotate(&mut y, 64);
        for (a, b) in y.iter().zip(&x) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn quantized_attention_reads_exactly_what_the_blocks_hold() {
        same_as_dequantized::<BlockQ8_0>(crate::quant::GgmlType::Q8_0);
        same_as_dequantized::<BlockQ4_0>(crate::quant::GgmlType::Q4_0);
    }
}
