//! Quantizing f32 rows into GGML blocks (in-situ quantization of weights).
//!
//! The legacy types round to nearest exactly as ggml's reference quantizers
//! do (same scale choice, same comparisons, same f32 arithmetic, and float
//! to int8 conversion as x86 performs C's cast), so their blocks equal
//! llama-quantize's bit for bit. The committed samples check ordinary
//! blocks; NaN, signed zeros and tiny blocks follow ggml's code paths too.
//!
//! The K-quants search scales as ggml's reference quantizers do (what
//! llama-quantize runs without an importance matrix): Q4_K and Q5_K fit a
//! scale and a minimum per 32 values by weighted least squares over a
//! sweep of candidate scales, Q6_K picks the best of 19 scales per 16
//! values; the sub-block scales are then rounded to 6 or 8 bits under one
//! f16 super-block scale. Where C compilers fuse multiply-adds our sums may
//! round differently, so a block can differ from llama-quantize's; its
//! weighted error is then no larger (tests/isq.rs checks both).
//!
//! With an importance per column ([`quantize_row_weighted`]: the mean
//! square of the activations each weight multiplies, measured on
//! calibration text, as llama.cpp's importance matrix), every block is
//! fitted to minimize its error weighted by that importance, as
//! llama-quantize does with `--imatrix`: Q4_0/Q5_0 search 19 scales,
//! Q4_1/Q5_1 and the sub-blocks of Q4_K/Q5_K fit a scale and a minimum over
//! 37 candidates, Q6_K weighs its 19-scale search by the importance alone.
//! Q8_0 ignores it. One difference from llama-quantize: the K-quants'
//! sub-block scales and minimums are still rounded under the largest one
//! (llama.cpp searches those roundings too, weighted).

use super::{GgmlType, QK, QK_K};
use half::f16;

/// The types [`quantize_row`] can produce.
pub const ISQ_TYPES: &[GgmlType] = &[
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// Refuses a type [`quantize_row`] cannot produce, naming those it can;
/// `what` says what was asked ("in-situ quantization", "quantizing").
pub fn ensure_isq_type(ty: GgmlType, what: &str) -> crate::Result<()> {
    if ISQ_TYPES.contains(&ty) {
        return Ok(());
    }
    let have: Vec<&str> = ISQ_TYPES.iter().map(|t| t.name()).collect();
    Err(crate::Error::NotImplemented(format!(
        "{what} to {} (available: {})",
        ty.name(),
        have.join(", ")
    )))
}

/// The type llama-quantize uses instead of `ty` for rows of `cols` values
/// that are not whole blocks of `ty` (the K-quants need multiples of 256):
/// Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0. `None` when no type fits.
pub fn fallback_type(ty: GgmlType, cols: usize) -> Option<GgmlType> {
    if cols.is_multiple_of(ty.block_size()) {
        return Some(ty);
    }
    let other = match ty {
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        GgmlType::Q6K => GgmlType::Q8_0,
        _ => return None,
    };
    cols.is_multiple_of(other.block_size()).then_some(other)
}

/// Quantizes `src` (a whole number of `ty` blocks) into `ty` blocks.
/// Returns `None` for a type it cannot produce or a length that is not
/// whole blocks.
pub fn quantize_row(ty: GgmlType, src: &[f32]) -> Option<Vec<u8>> {
    quantize_row_with(ty, src, None)
}

/// [`quantize_row`] with each block fitted to minimize its error weighted
/// by `importance`, one non-negative value per element of `src` (see the
/// module's notes). A block whose importance is all zero is quantized as
/// without. `None` also when `importance` is not as long as `src` or holds
/// a negative or non-finite value.
pub fn quantize_row_weighted(ty: GgmlType, src: &[f32], importance: &[f32]) -> Option<Vec<u8>> {
    if importance.len() != src.len() || importance.iter().any(|v| !(*v >= 0.0 && v.is_finite())) {
        return None;
    }
    quantize_row_with(ty, src, Some(importance))
}

fn quantize_row_with(ty: GgmlType, src: &[f32], importance: Option<&[f32]>) -> Option<Vec<u8>> {
    if !ISQ_TYPES.contains(&ty) || !src.len().is_multiple_of(ty.block_size()) {
        return None;
    }
    let bs = ty.block_size();
    // The legacy types weigh each value by its importance times its size
    // against the row's spread (llama.cpp's `qw · sqrt(σ² + x²)`).
    let sigma2 = src.iter().map(|v| v * v).sum::<f32>() / src.len().max(1) as f32;
    let mut out = Vec::with_capacity(src.len() / bs * ty.type_size());
    let mut w = [0f32; QK];
    for (bi, b) in src.chunks_exact(bs).enumerate() {
        let imp = importance
            .map(|imp| &imp[bi * bs..(bi + 1) * bs])
            .filter(|imp| imp.iter().any(|&v| v > 0.0));
        if let (Some(imp), true) = (imp, bs == QK) {
            for ((w, &i), &x) in w.iter_mut().zip(imp).zip(b) {
                *w = i * (sigma2 + x * x).sqrt();
            }
        }
        match (ty, imp) {
            (GgmlType::Q8_0, _) => q8_0(b, &mut out),
            (GgmlType::Q4_0, None) => q4_0(b, &mut out),
            (GgmlType::Q4_1, None) => q4_1(b, &mut out),
            (GgmlType::Q5_0, None) => q5_0(b, &mut out),
            (GgmlType::Q5_1, None) => q5_1(b, &mut out),
            (GgmlType::Q4_0 | GgmlType::Q5_0, Some(_)) => {
                let nmax = if ty == GgmlType::Q4_0 { 8 } else { 16 };
                let mut l = [0u8; QK];
                push_f16(&mut out, fit_symmetric(b, Some(&w), nmax, &mut l));
                if ty == GgmlType::Q5_0 {
                    push_high_bits(&mut out, &l);
                }
                push_nibbles(&mut out, &l);
            }
            (GgmlType::Q4_1 | GgmlType::Q5_1, Some(_)) => {
                let nmax = if ty == GgmlType::Q4_1 { 15 } else { 31 };
                let mut l = [0u8; QK];
                let (d, m) = fit_scale_min(b, &w, nmax, -0.9, 0.05, 36, &mut l);
                push_f16(&mut out, d);
                push_f16(&mut out, -m);
                if ty == GgmlType::Q5_1 {
                    push_high_bits(&mut out, &l);
                }
                push_nibbles(&mut out, &l);
            }
            (GgmlType::Q4K, imp) => q4_k(b, imp, &mut out),
            (GgmlType::Q5K, imp) => q5_k(b, imp, &mut out),
            (GgmlType::Q6K, imp) => q6_k(b, imp, &mut out),
            _ => unreachable!("checked against ISQ_TYPES"),
        }
    }
    Some(out)
}

fn push_f16(out: &mut Vec<u8>, v: f32) {
    out.extend_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// The value of largest magnitude, with its sign (the first one on ties).
fn signed_absmax(b: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in b {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// C's `(int8_t)` of a float as x86 compiles it: truncation to a 32-bit
/// integer (out of range and NaN give `INT_MIN`), then its low byte.
fn c_i8(v: f32) -> u8 {
    let i = if v.is_nan() || v.abs() >= 2_147_483_648.0 {
        i32::MIN
    } else {
        v as i32
    };
    i as u8
}

fn q8_0(b: &[f32], out: &mut Vec<u8>) {
    let (d, q) = q8_0_block(b);
    out.extend_from_slice(&d.to_le_bytes());
    out.extend(q.iter().map(|&v| v as u8));
}

/// One Q8_0 block of 32 values: its scale and quants, as ggml rounds them.
pub(crate) fn q8_0_block(b: &[f32]) -> (f16, [i8; QK]) {
    // ggml's MAX(a, b) is `a > b ? a : b`: a NaN is taken, then replaced
    // by the next value.
    let amax = b
        .iter()
        .fold(0f32, |a, &v| if a > v.abs() { a } else { v.abs() });
    let d = amax / 127.0;
    let id = inverse(d);
    let mut q = [0i8; QK];
    for (q, &v) in q.iter_mut().zip(b) {
        *q = c_i8((v * id).round()) as i8;
    }
    (f16::from_f32(d), q)
}

/// Symmetric 4 or 5 bits: the scale maps the signed extreme to -2^(bits-1),
/// values are offset by 2^(bits-1) and truncated after adding one half.
fn symmetric(b: &[f32], levels: f32) -> (f32, [u8; QK]) {
    let d = signed_absmax(b) / -levels;
    let id = inverse(d);
    let top = (2.0 * levels - 1.0) as u8;
    let mut q = [0u8; QK];
    for (q, &v) in q.iter_mut().zip(b) {
        // One addition of `levels + 0.5` (as the reference's `x0 + 8.5f`),
        // and `as i8` truncates toward zero, as the C cast does.
        *q = (c_i8(v * id + (levels + 0.5)) as i8).min(top as i8) as u8;
    }
    (d, q)
}

/// Asymmetric 4 or 5 bits: `x ≈ d·q + min`. ggml clamps Q4_1's levels to
/// `top` but not Q5_1's (`clamp`).
fn asymmetric(b: &[f32], top: f32, clamp: bool) -> (f32, f32, [u8; QK]) {
    // Strict comparisons, first value kept on ties (as ggml: signed zeros
    // and NaN come out the same).
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in b {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / top;
    let id = inverse(d);
    let mut q = [0u8; QK];
    for (q, &v) in q.iter_mut().zip(b) {
        let l = c_i8((v - min) * id + 0.5);
        *q = if clamp {
            (l as i8).min(top as i8) as u8
        } else {
            l
        };
    }
    (d, min, q)
}

/// Low nibbles: element j in byte j's low half, element j + 16 in its high half.
fn nibbles(q: &[u8; QK]) -> [u8; QK / 2] {
    std::array::from_fn(|j| (q[j] & 0xF) | ((q[j + QK / 2] & 0xF) << 4))
}

fn push_nibbles(out: &mut Vec<u8>, q: &[u8; QK]) {
    out.extend_from_slice(&nibbles(q));
}

/// Fifth bits: element j's in bit j of a little-endian u32.
fn push_high_bits(out: &mut Vec<u8>, q: &[u8; QK]) {
    let qh = q
        .iter()
        .enumerate()
        .fold(0u32, |h, (j, &v)| h | (((v as u32 >> 4) & 1) << j));
    out.extend_from_slice(&qh.to_le_bytes());
}

fn q4_0(b: &[f32], out: &mut Vec<u8>) {
    let (d, q) = q4_0_block(b);
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&q);
}

/// One Q4_0 block of 32 values: its scale and packed nibbles, as ggml
/// rounds them.
pub(crate) fn q4_0_block(b: &[f32]) -> (f16, [u8; QK / 2]) {
    let (d, q) = symmetric(b, 8.0);
    (f16::from_f32(d), nibbles(&q))
}

fn q5_0(b: &[f32], out: &mut Vec<u8>) {
    let (d, q) = symmetric(b, 16.0);
    push_f16(out, d);
    push_high_bits(out, &q);
    push_nibbles(out, &q);
}

fn q4_1(b: &[f32], out: &mut Vec<u8>) {
    let (d, m, q) = asymmetric(b, 15.0, true);
    push_f16(out, d);
    push_f16(out, m);
    push_nibbles(out, &q);
}

fn q5_1(b: &[f32], out: &mut Vec<u8>) {
    let (d, m, q) = asymmetric(b, 31.0, false);
    push_f16(out, d);
    push_f16(out, m);
    push_high_bits(out, &q);
    push_nibbles(out, &q);
}

/// ggml's `nearest_int`: round half to even through the float adder (valid
/// for magnitudes below 2^22, which every caller's values are).
fn nearest_int(v: f32) -> i32 {
    ((v + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// The weights Q4_K and Q5_K fit each 32 values with: the values' RMS plus
/// each one's magnitude (large values matter more).
fn k_weights(x: &[f32]) -> [f32; 32] {
    let sum_x2 = x.iter().fold(0f32, |s, v| s + v * v);
    let av = (sum_x2 / 32.0).sqrt();
    std::array::from_fn(|l| av + x[l].abs())
}

/// Weights of a super-block's values under an importance per value:
/// `importance · sqrt(σ² + x²)` with σ² twice the super-block's mean square
/// (llama.cpp's K-quant weighting with an importance matrix).
fn importance_weights(x: &[f32], importance: &[f32]) -> [f32; QK_K] {
    let sigma2 = 2.0 * x.iter().map(|v| v * v).sum::<f32>() / QK_K as f32;
    std::array::from_fn(|i| importance[i] * (sigma2 + x[i] * x[i]).sqrt())
}

/// `x ≈ scale · L - min` with `L` in `0..=nmax`, fitted by weighted least
/// squares: the plain range-based scale first, then `nstep + 1` candidate
/// scales `(nmax + rmin + rdelta·i) / range`, each rounded and refitted,
/// the best kept. Returns `(scale, min)` (min ≥ 0) and fills `l`.
fn fit_scale_min(
    x: &[f32],
    w: &[f32],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    l: &mut [u8],
) -> (f32, f32) {
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..x.len() {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..x.len()].fill(0);
        return (0.0, -min);
    }
    // The minimum moves as better fits are found, and later candidates
    // start from it (as ggml's search does).
    let quant = |iscale: f32, xi: f32, min: f32| nearest_int(iscale * (xi - min)).clamp(0, nmax);
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best = 0f32;
    for i in 0..x.len() {
        l[i] = quant(iscale, x[i], min) as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best += w[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for step in 0..=nstep {
        iscale = (rmin + rdelta * step as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..x.len() {
            let q = quant(iscale, x[i], min);
            aux[i] = q as u8;
            let q = q as f32;
            sum_l += w[i] * q;
            sum_l2 += w[i] * q * q;
            sum_xl += w[i] * q * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut err = 0f32;
            for i in 0..x.len() {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                err += w[i] * (diff * diff);
            }
            if err < best {
                l[..x.len()].copy_from_slice(&aux[..x.len()]);
                best = err;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Q4_K and Q5_K: eight sub-blocks of 32, each `x ≈ d·sc·q - dmin·m` with
/// 6-bit `sc` and `m`. Returns the f16 `d` and `dmin`, the packed 12 bytes
/// of scales and the levels (0..=nmax) of all 256 values.
fn k_scales_and_levels(
    x: &[f32],
    importance: Option<&[f32]>,
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> (f16, f16, [u8; 12], [u8; QK_K]) {
    let mut levels = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    let weighted = importance.map(|imp| importance_weights(x, imp));
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let own = weighted
            .as_ref()
            .map(|w| &w[32 * j..32 * j + 32])
            .filter(|w| w.iter().any(|&v| v > 0.0));
        let (sc, m) = match own {
            // llama.cpp's search with an importance matrix: more, finer steps.
            Some(w) => fit_scale_min(xs, w, nmax, -0.9, 0.05, 36, &mut levels[32 * j..]),
            None => {
                let w = k_weights(xs);
                fit_scale_min(xs, &w, nmax, rmin, 0.1, nstep, &mut levels[32 * j..])
            }
        };
        scales[j] = sc;
        mins[j] = m;
        max_scale = max_scale.max(sc);
        max_min = max_min.max(m);
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        // ggml stores the rounded value in a byte before clamping it.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    // Requantize every value under the rounded scales.
    for j in 0..8 {
        let (sc, m) = super::scale_min_k4(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for i in 0..32 {
            levels[32 * j + i] = nearest_int((x[32 * j + i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (d, dmin, packed, levels)
}

fn q4_k(x: &[f32], importance: Option<&[f32]>, out: &mut Vec<u8>) {
    let (d, dmin, scales, l) = k_scales_and_levels(x, importance, 15, -1.0, 20);
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&scales);
    // Each 64 values: the first 32 in low nibbles, the next 32 in high ones.
    for c in l.chunks_exact(64) {
        out.extend((0..32).map(|i| c[i] | (c[i + 32] << 4)));
    }
}

fn q5_k(x: &[f32], importance: Option<&[f32]>, out: &mut Vec<u8>) {
    let (d, dmin, scales, l) = k_scales_and_levels(x, importance, 31, -0.5, 15);
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&scales);
    // Fifth bits: value 64·n + i sets bit 2n of qh[i], value 64·n + 32 + i bit 2n + 1.
    let mut qh = [0u8; 32];
    for (n, c) in l.chunks_exact(64).enumerate() {
        for i in 0..32 {
            qh[i] |= ((c[i] >> 4) << (2 * n)) | ((c[i + 32] >> 4) << (2 * n + 1));
        }
    }
    out.extend_from_slice(&qh);
    for c in l.chunks_exact(64) {
        out.extend((0..32).map(|i| (c[i] & 0xF) | ((c[i + 32] & 0xF) << 4)));
    }
}

/// Below this magnitude a group counts as all zeros (ggml's GROUP_MAX_EPS).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Symmetric levels `-nmax..nmax` for `x`, weighted by `w` (default
/// `x²`): the scale mapping the signed extreme to `-nmax`, then 18 scales
/// around it, the one with the best least-squares fit kept. Returns the
/// scale and fills `l` with levels offset by `nmax`.
fn fit_symmetric(x: &[f32], w: Option<&[f32]>, nmax: i32, l: &mut [u8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l[..x.len()].fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for (i, &v) in x.iter().enumerate() {
            let q = level(iscale, v) as f32;
            let w = w.map_or(v * v, |w| w[i]);
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let mut iscale = -(nmax as f32) / max;
    for (q, &v) in l.iter_mut().zip(x) {
        *q = (level(iscale, v) + nmax) as u8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for step in (-9..=9).filter(|&s| s != 0) {
        iscale = -(nmax as f32 + 0.1 * step as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (q, &v) in l.iter_mut().zip(x) {
                *q = (level(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

fn q6_k(x: &[f32], importance: Option<&[f32]>, out: &mut Vec<u8>) {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs) = (0f32, 0f32);
    for (ib, s) in scales.iter_mut().enumerate() {
        // As llama.cpp's Q6_K: the importance itself weighs the search.
        let w = importance
            .map(|w| &w[16 * ib..16 * ib + 16])
            .filter(|w| w.iter().any(|&v| v > 0.0));
        *s = fit_symmetric(&x[16 * ib..16 * ib + 16], w, 32, &mut l[16 * ib..]);
        if s.abs() > max_abs {
            max_abs = s.abs();
            max_scale = *s;
        }
    }
    if max_abs < GROUP_MAX_EPS {
        out.extend(std::iter::repeat_n(0u8, GgmlType::Q6K.type_size()));
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let sc: [i8; 16] = std::array::from_fn(|ib| nearest_int(iscale * scales[ib]).min(127) as i8);
    for (j, &s) in sc.iter().enumerate() {
        let dj = d.to_f32() * s as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 0..16 {
            l[16 * j + i] = (nearest_int(x[16 * j + i] / dj).clamp(-32, 31) + 32) as u8;
        }
    }
    // Each 128 values: low nibbles of values i and 64 + i share ql[i], of
    // 32 + i and 96 + i ql[32 + i]; their top two bits share qh[i].
    let (mut ql, mut qh) = (Vec::with_capacity(128), Vec::with_capacity(64));
    for c in l.chunks_exact(128) {
        ql.extend((0..32).map(|i| (c[i] & 0xF) | ((c[i + 64] & 0xF) << 4)));
        ql.extend((0..32).map(|i| (c[i + 32] & 0xF) | ((c[i + 96] & 0xF) << 4)));
        qh.extend((0..32).map(|i| {
            (c[i] >> 4)
                | ((c[i + 32] >> 4) << 2)
                | ((c[i + 64] >> 4) << 4)
                | ((c[i + 96] >> 4) << 6)
        }));
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&d.to_le_bytes());
}
