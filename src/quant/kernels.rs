//! Dot-product kernels between one weight row (any GGML type) and rows of
//! activations.
//!
//! Quantized weights meet activations quantized on the fly to 8 bits, as
//! llama.cpp does: 32-element blocks for the legacy types (Q4_0 … Q8_0) and
//! 256-element blocks for the K-quants. The integer products run on AVX-512
//! VNNI where the CPU has it; otherwise a portable path dequantizes the row.
//!
//! Every kernel computes each (weight row, activation row) pair with the same
//! sequence of operations whatever the number of activation rows processed
//! together, so a token's result does not depend on what it is batched with.

use super::{dequantize, scale_min_k4, GgmlType, QK, QK_K};
use crate::threadpool::{SyncPtr, ThreadPool};

/// Activations prepared for one weight type: either plain f32 or 8-bit blocks.
pub struct Acts<'a> {
    pub k: usize,
    pub n: usize,
    pub f32s: &'a [f32],
    /// i8 values, `n * k`.
    qs: Vec<i8>,
    /// Per-block scale (32- or 256-element blocks, by kind).
    d: Vec<f32>,
    /// Legacy blocks: sum of the block's ints.
    isum: Vec<f32>,
    /// Legacy blocks: scale × sum, rounded to f16 as llama.cpp's Q8_1 stores it.
    dsum: Vec<f32>,
    /// K blocks: sums of each 16 ints.
    bsums: Vec<i16>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ActKind {
    F32,
    Q8Legacy,
    Q8K,
}

/// Which kernel family serves a weight type on this CPU.
pub fn act_kind(ty: GgmlType) -> ActKind {
    if !simd_available() {
        return ActKind::F32;
    }
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
            ActKind::Q8Legacy
        }
        GgmlType::Q4K | GgmlType::Q6K => ActKind::Q8K,
        _ => ActKind::F32,
    }
}

pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("RUVLLM_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

impl<'a> Acts<'a> {
    /// Prepares `n` rows of `k` activations for weights of kind `kind`,
    /// quantizing blocks in parallel over `pool`.
    pub fn new(kind: ActKind, x: &'a [f32], n: usize, k: usize, pool: &ThreadPool) -> Self {
        debug_assert_eq!(x.len(), n * k);
        let mut a = Acts {
            k,
            n,
            f32s: x,
            qs: Vec::new(),
            d: Vec::new(),
            isum: Vec::new(),
            dsum: Vec::new(),
            bsums: Vec::new(),
        };
        let block = match kind {
            ActKind::F32 => return a,
            ActKind::Q8Legacy => QK,
            ActKind::Q8K => QK_K,
        };
        let nb = n * k / block;
        a.qs = vec![0; n * k];
        a.d = vec![0.0; nb];
        if kind == ActKind::Q8Legacy {
            a.isum = vec![0.0; nb];
            a.dsum = vec![0.0; nb];
        } else {
            a.bsums = vec![0; nb * block / 16];
        }
        let (qs, d, isum, dsum, bsums) = (
            SyncPtr(a.qs.as_mut_ptr()),
            SyncPtr(a.d.as_mut_ptr()),
            SyncPtr(a.isum.as_mut_ptr()),
            SyncPtr(a.dsum.as_mut_ptr()),
            SyncPtr(a.bsums.as_mut_ptr()),
        );
        pool.for_each_chunk(nb, (4096 / block).max(1), &|blocks| {
            for b in blocks {
                // SAFETY: block b owns qs[b*block..], d[b], isum[b], dsum[b]
                // and bsums[b*block/16..]; blocks are disjoint across tasks.
                let (q, bs) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(qs.get().add(b * block), block),
                        std::slice::from_raw_parts_mut(
                            bsums.get().add(b * block / 16),
                            if kind == ActKind::Q8K { block / 16 } else { 0 },
                        ),
                    )
                };
                let (db, sum) = quantize_block_i8(&x[b * block..(b + 1) * block], q, bs);
                unsafe {
                    if kind == ActKind::Q8Legacy {
                        // llama.cpp keeps these scales as f16; doing the same keeps
                        // our rounding noise the same as the reference's.
                        *d.get().add(b) = half::f16::from_f32(db).to_f32();
                        *isum.get().add(b) = sum as f32;
                        *dsum.get().add(b) = half::f16::from_f32(db * sum as f32).to_f32();
                    } else {
                        *d.get().add(b) = db;
                    }
                }
            }
        });
        a
    }
}

/// Symmetric 8-bit quantization of one block (round half to even, as
/// llama.cpp's SIMD code does); returns (scale, sum of ints) and fills the
/// per-16 sums when `bsums` is not empty.
fn quantize_block_i8(x: &[f32], q: &mut [i8], bsums: &mut [i16]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        q.fill(0);
        bsums.fill(0);
        return (0.0, 0);
    }
    let id = 127.0 / amax;
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: features detected; lengths are whole multiples of 16.
        let sum = unsafe { x86::quantize(x, q, bsums, id) };
        return (amax / 127.0, sum);
    }
    let mut sum = 0;
    for (qv, &v) in q.iter_mut().zip(x) {
        let r = (v * id).round_ties_even().clamp(-127.0, 127.0) as i32;
        *qv = r as i8;
        sum += r;
    }
    for (b, q16) in bsums.iter_mut().zip(q.chunks_exact(16)) {
        *b = q16.iter().map(|&v| v as i16).sum();
    }
    (amax / 127.0, sum)
}

/// Activation rows one kernel call handles at most: each weight block is
/// expanded once and used for all of them.
pub const MAX_ROWS: usize = 8;

/// Computes `out[r] = dot(weight row, activation row rows.start + r)` for up to
/// `MAX_ROWS` activation rows. `scratch` holds a dequantized row on the portable path.
pub fn dot_rows(
    ty: GgmlType,
    w: &[u8],
    a: &Acts,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let nr = rows.len();
    debug_assert!((1..=MAX_ROWS).contains(&nr));
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: the CPU features these kernels are compiled for were detected
        // above; block counts follow from `a.k`, which the weight row matches.
        unsafe {
            match nr {
                1 => return x86::dot::<1>(ty, w, a, rows.start, out, scratch),
                2 => return x86::dot::<2>(ty, w, a, rows.start, out, scratch),
                3 => return x86::dot::<3>(ty, w, a, rows.start, out, scratch),
                4 => return x86::dot::<4>(ty, w, a, rows.start, out, scratch),
                5 => return x86::dot::<5>(ty, w, a, rows.start, out, scratch),
                6 => return x86::dot::<6>(ty, w, a, rows.start, out, scratch),
                7 => return x86::dot::<7>(ty, w, a, rows.start, out, scratch),
                _ => return x86::dot::<8>(ty, w, a, rows.start, out, scratch),
            }
        }
    }
    portable_dot(ty, w, a, rows, out, scratch);
}

fn portable_dot(
    ty: GgmlType,
    w: &[u8],
    a: &Acts,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let k = a.k;
    let wf: &[f32] = if ty == GgmlType::F32 {
        bytemuck_f32(w)
    } else {
        scratch.resize(k, 0.0);
        dequantize(ty, w, scratch);
        scratch
    };
    for (o, r) in out.iter_mut().zip(rows) {
        let x = &a.f32s[r * k..(r + 1) * k];
        *o = dot_f32_portable(wf, x);
    }
}

/// Dot product summed in eight interleaved lanes (as the SIMD path does).
fn dot_f32_portable(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = w.len() / 16 * 16;
    for (wc, xc) in w[..chunks]
        .chunks_exact(16)
        .zip(x[..chunks].chunks_exact(16))
    {
        for i in 0..16 {
            acc[i] = wc[i].mul_add(xc[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks..w.len() {
        s += w[i] * x[i];
    }
    s
}

/// Views little-endian f32 bytes as f32s. GGUF tensor data is 32-byte aligned
/// within a page-aligned map and owned buffers are allocated as f32, so a
/// misaligned slice is a bug.
pub fn bytemuck_f32(b: &[u8]) -> &[f32] {
    // SAFETY: any bit pattern is a valid f32; align_to only yields the aligned middle part.
    let (pre, mid, post) = unsafe { b.align_to::<f32>() };
    assert!(
        pre.is_empty() && post.is_empty(),
        "misaligned f32 tensor data"
    );
    mid
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // fixed-size register arrays indexed in lockstep
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot<const NR: usize>(
        ty: GgmlType,
        w: &[u8],
        a: &Acts,
        r0: usize,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) {
        match ty {
            GgmlType::F32 => {
                let wf = bytemuck_f32(w);
                dot_f32::<NR>(|i| _mm512_loadu_ps(wf.as_ptr().add(i)), a, r0, out)
            }
            GgmlType::F16 => dot_f32::<NR>(
                |i| _mm512_cvtph_ps(_mm256_loadu_si256(w.as_ptr().add(2 * i) as *const __m256i)),
                a,
                r0,
                out,
            ),
            GgmlType::BF16 => dot_f32::<NR>(
                |i| {
                    let h = _mm256_loadu_si256(w.as_ptr().add(2 * i) as *const __m256i);
                    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                },
                a,
                r0,
                out,
            ),
            GgmlType::Q4_0 => dot_legacy::<NR, 0>(w, a, r0, out),
            GgmlType::Q4_1 => dot_legacy::<NR, 1>(w, a, r0, out),
            GgmlType::Q5_0 => dot_legacy::<NR, 2>(w, a, r0, out),
            GgmlType::Q5_1 => dot_legacy::<NR, 3>(w, a, r0, out),
            GgmlType::Q8_0 => dot_legacy::<NR, 4>(w, a, r0, out),
            GgmlType::Q4K => dot_q4k::<NR>(w, a, r0, out),
            GgmlType::Q6K => dot_q6k::<NR>(w, a, r0, out),
            _ => portable_dot(ty, w, a, r0..r0 + NR, out, scratch),
        }
    }

    /// Rounds `x · id` to i8 (to nearest even) 16 at a time; returns the sum
    /// and writes per-16 sums to `bsums` when it is not empty.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn quantize(x: &[f32], q: &mut [i8], bsums: &mut [i16], id: f32) -> i32 {
        let idv = _mm512_set1_ps(id);
        let mut sum = 0;
        for (c, (xc, qc)) in x.chunks_exact(16).zip(q.chunks_exact_mut(16)).enumerate() {
            let v = _mm512_mul_ps(_mm512_loadu_ps(xc.as_ptr()), idv);
            let i = _mm512_cvtps_epi32(v);
            _mm_storeu_si128(qc.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(i));
            let s = _mm512_reduce_add_epi32(i);
            if let Some(b) = bsums.get_mut(c) {
                *b = s as i16;
            }
            sum += s;
        }
        sum
    }

    #[inline(always)]
    unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn f16(p: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            (p as *const u16).read_unaligned() as i32,
        )))
    }

    #[inline(always)]
    unsafe fn dot_f32<const NR: usize>(
        load_w: impl Fn(usize) -> __m512,
        a: &Acts,
        r0: usize,
        out: &mut [f32],
    ) {
        let k = a.k;
        let mut acc = [_mm512_setzero_ps(); NR];
        let full = k / 16 * 16;
        let mut i = 0;
        while i < full {
            let wv = load_w(i);
            for r in 0..NR {
                let x = _mm512_loadu_ps(a.f32s.as_ptr().add((r0 + r) * k + i));
                acc[r] = _mm512_fmadd_ps(wv, x, acc[r]);
            }
            i += 16;
        }
        for r in 0..NR {
            let mut s = _mm512_reduce_add_ps(acc[r]);
            if full < k {
                // Tails only occur for odd shapes; go scalar there.
                let mut tmp = [0f32; 16];
                _mm512_storeu_ps(tmp.as_mut_ptr(), load_w(full));
                for (j, t) in tmp.iter().enumerate().take(k - full) {
                    s += t * a.f32s[(r0 + r) * k + full + j];
                }
            }
            out[r] = s;
        }
    }

    /// Legacy 32-element blocks. T: 0 Q4_0, 1 Q4_1, 2 Q5_0, 3 Q5_1, 4 Q8_0.
    /// Weights are brought to unsigned bytes (Q8_0 by flipping the sign bit),
    /// multiplied with the signed activations by VNNI, and the offset this
    /// introduces is removed through the activation block sums.
    #[inline(always)]
    unsafe fn dot_legacy<const NR: usize, const T: u8>(
        w: &[u8],
        a: &Acts,
        r0: usize,
        out: &mut [f32],
    ) {
        let ts = match T {
            0 => 18,
            1 => 20,
            2 => 22,
            3 => 24,
            _ => 34,
        };
        let nb = a.k / QK;
        let m4 = _mm_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); NR];
        let qs_base: [*const i8; NR] = std::array::from_fn(|r| a.qs.as_ptr().add((r0 + r) * a.k));
        let d_base: [*const f32; NR] = std::array::from_fn(|r| a.d.as_ptr().add((r0 + r) * nb));
        // Q*_1 types add min × (f16) block sum; the others subtract their
        // zero point × block sum of ints, exactly.
        let s_base: [*const f32; NR] = std::array::from_fn(|r| {
            let v = if T == 1 || T == 3 { &a.dsum } else { &a.isum };
            v.as_ptr().add((r0 + r) * nb)
        });
        let mut corr = [_mm256_setzero_ps(); NR];
        let one_minus = T == 1 || T == 3;
        // Blocks go in groups of eight so that their scales convert, multiply
        // and enter the offset correction as one vector each.
        let mut b0 = 0;
        while b0 < nb {
            let g = (nb - b0).min(8);
            let mask: __mmask8 = ((1u32 << g) - 1) as __mmask8;
            let mut dbits = [0u16; 8];
            let mut mbits = [0u16; 8];
            for i in 0..g {
                let p = w.as_ptr().add((b0 + i) * ts);
                dbits[i] = (p as *const u16).read_unaligned();
                if one_minus {
                    mbits[i] = (p.add(2) as *const u16).read_unaligned();
                }
            }
            let dwv = _mm256_cvtph_ps(_mm_loadu_si128(dbits.as_ptr() as *const __m128i));
            let mwv = _mm256_cvtph_ps(_mm_loadu_si128(mbits.as_ptr() as *const __m128i));
            let offset = _mm256_set1_ps(match T {
                0 => -8.0,
                2 => -16.0,
                _ => -128.0,
            });
            let mut dd = [[0f32; 8]; NR];
            for r in 0..NR {
                let ddv = _mm256_mul_ps(dwv, _mm256_maskz_loadu_ps(mask, d_base[r].add(b0)));
                _mm256_storeu_ps(dd[r].as_mut_ptr(), ddv);
                let sv = _mm256_maskz_loadu_ps(mask, s_base[r].add(b0));
                corr[r] = if one_minus {
                    _mm256_fmadd_ps(mwv, sv, corr[r])
                } else {
                    _mm256_fmadd_ps(ddv, _mm256_mul_ps(offset, sv), corr[r])
                };
            }
            for i in 0..g {
                let b = b0 + i;
                let p = w.as_ptr().add(b * ts);
                let q = match T {
                    0 | 1 => {
                        let raw =
                            _mm_loadu_si128(p.add(if T == 0 { 2 } else { 4 }) as *const __m128i);
                        let lo = _mm_and_si128(raw, m4);
                        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
                        _mm256_set_m128i(hi, lo)
                    }
                    2 | 3 => {
                        let o = if T == 2 { 2 } else { 4 };
                        let qh = (p.add(o) as *const u32).read_unaligned();
                        let raw = _mm_loadu_si128(p.add(o + 4) as *const __m128i);
                        let lo = _mm_and_si128(raw, m4);
                        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
                        let high = _mm256_and_si256(_mm256_movm_epi8(qh), _mm256_set1_epi8(0x10));
                        _mm256_or_si256(_mm256_set_m128i(hi, lo), high)
                    }
                    _ => {
                        let raw = _mm256_loadu_si256(p.add(2) as *const __m256i);
                        _mm256_xor_si256(raw, _mm256_set1_epi8(-128))
                    }
                };
                for r in 0..NR {
                    let av = _mm256_loadu_si256(qs_base[r].add(b * QK) as *const __m256i);
                    let dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, av);
                    acc[r] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dd[r][i]), acc[r]);
                }
            }
            b0 += g;
        }
        for r in 0..NR {
            out[r] = hsum256(acc[r]) + hsum256(corr[r]);
        }
    }

    /// The per-row half of a K-quant super-block: eight 32-element chunks of
    /// unsigned weights `q` with 16-bit scales `scv`, scaled by `d`, plus
    /// `corr_scale` × (per-16 activation sums · `corr_w`).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn k_block_rows<const NR: usize>(
        q: &[__m256i; 8],
        scv: &[__m256i; 8],
        d: f32,
        corr_w: __m256i,
        corr_scale: f32,
        a: &Acts,
        r0: usize,
        b: usize,
        acc: &mut [__m256; NR],
        corr: &mut [f32; NR],
    ) {
        let nb = a.k / QK_K;
        for r in 0..NR {
            let row = r0 + r;
            let aq = a.qs.as_ptr().add(row * a.k + b * QK_K);
            let mut sumi = _mm256_setzero_si256();
            for c in 0..8 {
                let av = _mm256_loadu_si256(aq.add(32 * c) as *const __m256i);
                let p16 = _mm256_maddubs_epi16(q[c], av);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p16, scv[c]));
            }
            let da = *a.d.get_unchecked(row * nb + b);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(d * da), acc[r]);
            let bs =
                _mm256_loadu_si256(a.bsums.as_ptr().add((row * nb + b) * 16) as *const __m256i);
            corr[r] += corr_scale * da * hsum_i32(_mm256_madd_epi16(bs, corr_w)) as f32;
        }
    }

    #[inline(always)]
    unsafe fn dot_q4k<const NR: usize>(w: &[u8], a: &Acts, r0: usize, out: &mut [f32]) {
        let nb = a.k / QK_K;
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); NR];
        let mut corr = [0f32; NR];
        for b in 0..nb {
            let p = w.as_ptr().add(b * 144);
            let (d, dmin) = (f16(p), f16(p.add(2)));
            let scales = std::slice::from_raw_parts(p.add(4), 12);
            let mut scv = [_mm256_setzero_si256(); 8];
            // Each sub-block's min, once per 16-element half, to meet bsums.
            let mut mn = [0i16; 16];
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, scales);
                scv[j] = _mm256_set1_epi16(s as i16);
                mn[2 * j] = m as i16;
                mn[2 * j + 1] = m as i16;
            }
            let mut q = [_mm256_setzero_si256(); 8];
            for j in 0..4 {
                let raw = _mm256_loadu_si256(p.add(16 + 32 * j) as *const __m256i);
                q[2 * j] = _mm256_and_si256(raw, m4);
                q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            }
            let mnv = _mm256_loadu_si256(mn.as_ptr() as *const __m256i);
            k_block_rows::<NR>(&q, &scv, d, mnv, -dmin, a, r0, b, &mut acc, &mut corr);
        }
        for r in 0..NR {
            out[r] = hsum256(acc[r]) + corr[r];
        }
    }

    #[inline(always)]
    unsafe fn dot_q6k<const NR: usize>(w: &[u8], a: &Acts, r0: usize, out: &mut [f32]) {
        let nb = a.k / QK_K;
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(0x03);
        let mut acc = [_mm256_setzero_ps(); NR];
        let mut corr = [0f32; NR];
        for b in 0..nb {
            let p = w.as_ptr().add(b * 210);
            let d = f16(p.add(208));
            let sc = std::slice::from_raw_parts(p.add(192) as *const i8, 16);
            // q[c] holds elements 32c..32c+32 as unsigned 0..63 (value + 32).
            let mut q = [_mm256_setzero_si256(); 8];
            let mut scv = [_mm256_setzero_si256(); 8];
            for n in 0..2 {
                let ql0 = _mm256_loadu_si256(p.add(64 * n) as *const __m256i);
                let ql1 = _mm256_loadu_si256(p.add(64 * n + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(p.add(128 + 32 * n) as *const __m256i);
                let h = |s: i32| -> __m256i {
                    let v = match s {
                        0 => qh,
                        2 => _mm256_srli_epi16(qh, 2),
                        4 => _mm256_srli_epi16(qh, 4),
                        _ => _mm256_srli_epi16(qh, 6),
                    };
                    _mm256_slli_epi16(_mm256_and_si256(v, m2), 4)
                };
                q[4 * n] = _mm256_or_si256(_mm256_and_si256(ql0, m4), h(0));
                q[4 * n + 1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), h(2));
                q[4 * n + 2] =
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), h(4));
                q[4 * n + 3] =
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), h(6));
                for c in 0..4 {
                    let s0 = sc[8 * n + 2 * c] as i16;
                    let s1 = sc[8 * n + 2 * c + 1] as i16;
                    scv[4 * n + c] = _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0));
                }
            }
            // The +32 offset comes back out through the activation sums.
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192) as *const __m128i));
            k_block_rows::<NR>(&q, &scv, d, sc16, -32.0 * d, a, r0, b, &mut acc, &mut corr);
        }
        for r in 0..NR {
            out[r] = hsum256(acc[r]) + corr[r];
        }
    }
}
