//! Dot-product kernels between one weight row (any GGML type) and rows of
//! activations.
//!
//! Quantized weights meet activations quantized on the fly to 8 bits, as
//! llama.cpp does: 32-element blocks for the legacy types (Q4_0 … Q8_0) and
//! 256-element blocks for the K-quants. The integer products run on AVX-512
//! VNNI or AVX2, whichever [`crate::simd::level`] picked; the portable path
//! dequantizes the row and multiplies in f32.
//!
//! Every kernel computes each (weight row, activation row) pair with the same
//! sequence of operations whatever the number of activation rows processed
//! together, so a token's result does not depend on what it is batched with.

use super::{Dequantize, GgmlType, QK, QK_K};
use crate::simd::{dispatch, level, Kernel, Level, Simd};
use crate::threadpool::{SyncPtr, ThreadPool};

/// Activations prepared for one weight type: either plain f32 or 8-bit blocks.
/// The fields are private: the kernels read them through raw pointers, and
/// their sizes are what makes that sound.
pub struct Acts<'a> {
    kind: ActKind,
    k: usize,
    n: usize,
    f32s: &'a [f32],
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

impl ActKind {
    /// Elements per quantized activation block.
    fn block(self) -> usize {
        match self {
            ActKind::F32 => 1,
            ActKind::Q8Legacy => QK,
            ActKind::Q8K => QK_K,
        }
    }
}

/// Which kernel family serves a weight type on this CPU.
pub fn act_kind(ty: GgmlType) -> ActKind {
    if level() == Level::Portable {
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

/// Where one chunk of blocks writes its quantized activations.
#[derive(Clone, Copy)]
struct QuantOut {
    kind: ActKind,
    qs: SyncPtr<i8>,
    d: SyncPtr<f32>,
    isum: SyncPtr<f32>,
    dsum: SyncPtr<f32>,
    bsums: SyncPtr<i16>,
}

impl<'a> Acts<'a> {
    /// Prepares `n` rows of `k` activations (`x`, row-major) for weights of
    /// kind `kind`, quantizing blocks in parallel over `pool`.
    ///
    /// # Panics
    /// If `x` is not `n × k` values, or a quantized kind's rows are not whole
    /// blocks.
    pub fn new(kind: ActKind, x: &'a [f32], n: usize, k: usize, pool: &ThreadPool) -> Self {
        assert_eq!(
            Some(x.len()),
            n.checked_mul(k),
            "Acts::new: {} values are not {n} rows of {k}",
            x.len()
        );
        let block = kind.block();
        assert!(
            k.is_multiple_of(block),
            "Acts::new: rows of {k} are not whole {block}-element blocks"
        );
        let mut a = Acts {
            kind,
            k,
            n,
            f32s: x,
            qs: Vec::new(),
            d: Vec::new(),
            isum: Vec::new(),
            dsum: Vec::new(),
            bsums: Vec::new(),
        };
        if kind == ActKind::F32 {
            return a;
        }
        let nb = n * k / block;
        a.qs = vec![0; n * k];
        a.d = vec![0.0; nb];
        if kind == ActKind::Q8Legacy {
            a.isum = vec![0.0; nb];
            a.dsum = vec![0.0; nb];
        } else {
            a.bsums = vec![0; nb * block / 16];
        }
        let out = QuantOut {
            kind,
            qs: SyncPtr(a.qs.as_mut_ptr()),
            d: SyncPtr(a.d.as_mut_ptr()),
            isum: SyncPtr(a.isum.as_mut_ptr()),
            dsum: SyncPtr(a.dsum.as_mut_ptr()),
            bsums: SyncPtr(a.bsums.as_mut_ptr()),
        };
        pool.for_each_chunk(nb, (4096 / block).max(1), &|blocks| {
            // SAFETY: `out` was sized above for the `nb` blocks of `x`, and
            // for_each_chunk hands out disjoint ranges below `nb`, so each
            // block's outputs are written by one task alone.
            unsafe {
                #[cfg(target_arch = "x86_64")]
                match level() {
                    // SAFETY (features): level() only reports what was detected.
                    Level::Avx512Vnni => return x86::quantize_avx512(x, blocks, out),
                    Level::Avx2 => return x86::quantize_avx2(x, blocks, out),
                    Level::Portable => {}
                }
                quantize_blocks(x, blocks, out, round_portable);
            }
        });
        a
    }

    pub fn kind(&self) -> ActKind {
        self.kind
    }

    /// Values per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Rows.
    pub fn n(&self) -> usize {
        self.n
    }
}

/// Symmetric 8-bit quantization of blocks `blocks` of `x` (round half to
/// even, as llama.cpp's SIMD code does). `round16(x, q, id)` rounds 16
/// values times `id` into `q` and returns their sum.
///
/// # Safety
/// `out` must have room for every block in `blocks` of `x` (sized as
/// [`Acts::new`] sizes it), and no other thread may write those blocks.
#[inline(always)]
unsafe fn quantize_blocks(
    x: &[f32],
    blocks: std::ops::Range<usize>,
    out: QuantOut,
    round16: impl Fn(&[f32], &mut [i8], f32) -> i32,
) {
    let block = out.kind.block();
    for b in blocks {
        let xb = &x[b * block..(b + 1) * block];
        // SAFETY: block b owns qs[b*block..][..block] and, for K blocks,
        // bsums[b*block/16..][..block/16] (the caller's contract). Legacy
        // blocks have no bsums: that Vec is empty, so no offset is taken
        // from its dangling pointer.
        let q = unsafe { std::slice::from_raw_parts_mut(out.qs.get().add(b * block), block) };
        let bsums: &mut [i16] = if out.kind == ActKind::Q8K {
            unsafe {
                std::slice::from_raw_parts_mut(out.bsums.get().add(b * block / 16), block / 16)
            }
        } else {
            &mut []
        };
        // The largest |x| through the bit patterns: for non-negative floats
        // they order as the values do, an integer max vectorises, and NaN
        // and infinity (which f32::max would drop or keep silently) land
        // above every finite value. Such a block gets a NaN scale, so its
        // outputs are not finite, as on the f32 path, instead of integers
        // from an undefined conversion.
        let amax_bits = xb
            .iter()
            .fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
        let finite = amax_bits < 0x7f80_0000;
        let amax = f32::from_bits(amax_bits);
        let (db, sum) = if !finite {
            q.fill(0);
            bsums.fill(0);
            (f32::NAN, 0)
        } else if amax == 0.0 {
            q.fill(0);
            bsums.fill(0);
            (0.0, 0)
        } else {
            let id = 127.0 / amax;
            let mut sum = 0;
            for (c, (x16, q16)) in xb.chunks_exact(16).zip(q.chunks_exact_mut(16)).enumerate() {
                let s = round16(x16, q16, id);
                if let Some(bs) = bsums.get_mut(c) {
                    *bs = s as i16;
                }
                sum += s;
            }
            (amax / 127.0, sum)
        };
        // SAFETY: block b owns d[b], isum[b] and dsum[b].
        unsafe {
            if out.kind == ActKind::Q8Legacy {
                // llama.cpp keeps these scales as f16; doing the same keeps
                // our rounding noise the same as the reference's.
                *out.d.get().add(b) = half::f16::from_f32(db).to_f32();
                *out.isum.get().add(b) = sum as f32;
                *out.dsum.get().add(b) = half::f16::from_f32(db * sum as f32).to_f32();
            } else {
                *out.d.get().add(b) = db;
            }
        }
    }
}

#[inline(always)]
fn round_portable(x: &[f32], q: &mut [i8], id: f32) -> i32 {
    let mut sum = 0;
    for (qv, &v) in q.iter_mut().zip(x) {
        let r = (v * id).round_ties_even().clamp(-127.0, 127.0) as i32;
        *qv = r as i8;
        sum += r;
    }
    sum
}

/// Activation rows one kernel call handles at most: each weight block is
/// expanded once and used for all of them.
pub const MAX_ROWS: usize = 8;

/// Computes `out[r] = dot(weight row, activation row rows.start + r)` for up
/// to `MAX_ROWS` activation rows. `scratch` holds a dequantized row on the
/// portable path.
///
/// # Panics
/// If `rows` is empty, longer than `MAX_ROWS` or beyond `a`'s rows, if `out`
/// is not `rows.len()` long, if `w` is not one row of `a.k()` elements of
/// `ty`, or if `a` was prepared for another kind than `ty` needs. These
/// checks run once per call and are what keep the kernels' unchecked reads
/// inside the buffers.
pub fn dot_rows(
    ty: GgmlType,
    w: &[u8],
    a: &Acts,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let nr = rows.len();
    assert!(
        (1..=MAX_ROWS).contains(&nr) && rows.end <= a.n,
        "dot_rows: rows {rows:?} are not 1 to {MAX_ROWS} of the {} activation rows",
        a.n
    );
    assert_eq!(out.len(), nr, "dot_rows: output is not one value per row");
    assert_eq!(
        Some(w.len()),
        ty.row_bytes(a.k),
        "dot_rows: weight row is not {} {} values",
        a.k,
        ty.name()
    );
    assert_eq!(
        a.kind,
        act_kind(ty),
        "dot_rows: activations prepared for other weights than {}",
        ty.name()
    );
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! by_rows {
            ($f:ident) => {
                match nr {
                    1 => x86::$f::<1>(ty, w, a, rows.start, out, scratch),
                    2 => x86::$f::<2>(ty, w, a, rows.start, out, scratch),
                    3 => x86::$f::<3>(ty, w, a, rows.start, out, scratch),
                    4 => x86::$f::<4>(ty, w, a, rows.start, out, scratch),
                    5 => x86::$f::<5>(ty, w, a, rows.start, out, scratch),
                    6 => x86::$f::<6>(ty, w, a, rows.start, out, scratch),
                    7 => x86::$f::<7>(ty, w, a, rows.start, out, scratch),
                    _ => x86::$f::<8>(ty, w, a, rows.start, out, scratch),
                }
            };
        }
        // SAFETY: level() only reports features that were detected; the
        // asserts above keep every block the kernels read inside `w` and `a`.
        match level() {
            Level::Avx512Vnni => return unsafe { by_rows!(dot_avx512) },
            Level::Avx2 => return unsafe { by_rows!(dot_avx2) },
            Level::Portable => {}
        }
    }
    portable_dot(ty, w, a, rows, out, scratch);
}

/// Dequantizes the row, then multiplies in f32: the path for types without
/// integer kernels, and for every type on the portable level.
fn portable_dot(
    ty: GgmlType,
    w: &[u8],
    a: &Acts,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    dispatch(PortableDot {
        ty,
        w,
        a,
        rows,
        out,
        scratch,
    })
}

struct PortableDot<'a, 'b> {
    ty: GgmlType,
    w: &'a [u8],
    a: &'a Acts<'b>,
    rows: std::ops::Range<usize>,
    out: &'a mut [f32],
    scratch: &'a mut Vec<f32>,
}

impl Kernel for PortableDot<'_, '_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let k = self.a.k;
        let wf: &[f32] = if self.ty == GgmlType::F32 {
            bytemuck_f32(self.w)
        } else {
            self.scratch.resize(k, 0.0);
            Dequantize {
                ty: self.ty,
                src: self.w,
                dst: &mut self.scratch[..],
            }
            .run(s);
            &self.scratch[..]
        };
        for (o, r) in self.out.iter_mut().zip(self.rows) {
            *o = dot_f32(s, wf, &self.a.f32s[r * k..(r + 1) * k]);
        }
    }
}

/// Dot product summed in sixteen interleaved lanes.
#[inline(always)]
fn dot_f32<S: Simd>(s: S, w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut wc = w.chunks_exact(16);
    let mut xc = x.chunks_exact(16);
    for (wc, xc) in (&mut wc).zip(&mut xc) {
        for i in 0..16 {
            acc[i] = s.mul_add(wc[i], xc[i], acc[i]);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (w, x) in wc.remainder().iter().zip(xc.remainder()) {
        sum += w * x;
    }
    sum
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
    //! The integer kernels in two copies: `VNNI` selects AVX-512 VNNI's
    //! `vpdpbusd` and masked loads, otherwise AVX2 does the same sums with
    //! `vpmaddubsw` + `vpmaddwd`. Helpers are `#[inline(always)]` so that
    //! they are compiled into each entry point with its features.

    use super::*;
    use crate::quant::scale_min_k4;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI, and the
    /// shapes must be those `dot_rows` checks.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn dot_avx512<const NR: usize>(
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
                dot_f32_512::<NR>(
                    |i| _mm512_loadu_ps(wf.as_ptr().add(i)),
                    |i| wf[i],
                    a,
                    r0,
                    out,
                )
            }
            GgmlType::F16 => dot_f32_512::<NR>(
                |i| _mm512_cvtph_ps(_mm256_loadu_si256(w.as_ptr().add(2 * i) as *const __m256i)),
                |i| half::f16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32(),
                a,
                r0,
                out,
            ),
            GgmlType::BF16 => dot_f32_512::<NR>(
                |i| {
                    let h = _mm256_loadu_si256(w.as_ptr().add(2 * i) as *const __m256i);
                    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                },
                |i| half::bf16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32(),
                a,
                r0,
                out,
            ),
            GgmlType::Q4_0 => dot_legacy::<NR, 0, true>(w, a, r0, out),
            GgmlType::Q4_1 => dot_legacy::<NR, 1, true>(w, a, r0, out),
            GgmlType::Q5_0 => dot_legacy::<NR, 2, true>(w, a, r0, out),
            GgmlType::Q5_1 => dot_legacy::<NR, 3, true>(w, a, r0, out),
            GgmlType::Q8_0 => dot_legacy::<NR, 4, true>(w, a, r0, out),
            GgmlType::Q4K => dot_q4k::<NR>(w, a, r0, out),
            GgmlType::Q6K => dot_q6k::<NR>(w, a, r0, out),
            _ => portable_dot(ty, w, a, r0..r0 + NR, out, scratch),
        }
    }

    /// # Safety
    /// The CPU must have AVX2, FMA and F16C, and the shapes must be those
    /// `dot_rows` checks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_avx2<const NR: usize>(
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
                dot_f32_256::<NR>(
                    |i| _mm256_loadu_ps(wf.as_ptr().add(i)),
                    |i| wf[i],
                    a,
                    r0,
                    out,
                )
            }
            GgmlType::F16 => dot_f32_256::<NR>(
                |i| _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(2 * i) as *const __m128i)),
                |i| half::f16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32(),
                a,
                r0,
                out,
            ),
            GgmlType::BF16 => dot_f32_256::<NR>(
                |i| {
                    let h = _mm_loadu_si128(w.as_ptr().add(2 * i) as *const __m128i);
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                },
                |i| half::bf16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32(),
                a,
                r0,
                out,
            ),
            GgmlType::Q4_0 => dot_legacy::<NR, 0, false>(w, a, r0, out),
            GgmlType::Q4_1 => dot_legacy::<NR, 1, false>(w, a, r0, out),
            GgmlType::Q5_0 => dot_legacy::<NR, 2, false>(w, a, r0, out),
            GgmlType::Q5_1 => dot_legacy::<NR, 3, false>(w, a, r0, out),
            GgmlType::Q8_0 => dot_legacy::<NR, 4, false>(w, a, r0, out),
            GgmlType::Q4K => dot_q4k::<NR>(w, a, r0, out),
            GgmlType::Q6K => dot_q6k::<NR>(w, a, r0, out),
            _ => portable_dot(ty, w, a, r0..r0 + NR, out, scratch),
        }
    }

    /// # Safety
    /// As for `quantize_blocks`, on a CPU with AVX-512 F/BW/VL/VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn quantize_avx512(x: &[f32], blocks: std::ops::Range<usize>, out: QuantOut) {
        quantize_blocks(x, blocks, out, |x, q, id| {
            let v = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr()), _mm512_set1_ps(id));
            let i = _mm512_cvtps_epi32(v);
            _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(i));
            _mm512_reduce_add_epi32(i)
        })
    }

    /// # Safety
    /// As for `quantize_blocks`, on a CPU with AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize_avx2(x: &[f32], blocks: std::ops::Range<usize>, out: QuantOut) {
        quantize_blocks(x, blocks, out, |x, q, id| {
            let idv = _mm256_set1_ps(id);
            // Rounds to nearest even (the default MXCSR mode), as the
            // portable path's round_ties_even.
            let i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x.as_ptr()), idv));
            let i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(8)), idv));
            // Packing works within 128-bit lanes; the permute puts the four
            // groups of four back in order.
            let p16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0b11_01_10_00);
            let p8 = _mm_packs_epi16(
                _mm256_castsi256_si128(p16),
                _mm256_extracti128_si256(p16, 1),
            );
            _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, p8);
            hsum_i32(_mm256_add_epi32(i0, i1))
        })
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

    /// f32 products of a weight row in a float format (`load_w(i)`: sixteen
    /// weights from element i; `w_at(i)`: one) with NR activation rows.
    #[inline(always)]
    unsafe fn dot_f32_512<const NR: usize>(
        load_w: impl Fn(usize) -> __m512,
        w_at: impl Fn(usize) -> f32,
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
            // Tails only occur for odd shapes; a vector load there would
            // read past the row.
            for j in full..k {
                s += w_at(j) * a.f32s[(r0 + r) * k + j];
            }
            out[r] = s;
        }
    }

    /// As `dot_f32_512`, eight lanes at a time.
    #[inline(always)]
    unsafe fn dot_f32_256<const NR: usize>(
        load_w: impl Fn(usize) -> __m256,
        w_at: impl Fn(usize) -> f32,
        a: &Acts,
        r0: usize,
        out: &mut [f32],
    ) {
        let k = a.k;
        let mut acc = [_mm256_setzero_ps(); NR];
        let full = k / 8 * 8;
        let mut i = 0;
        while i < full {
            let wv = load_w(i);
            for r in 0..NR {
                let x = _mm256_loadu_ps(a.f32s.as_ptr().add((r0 + r) * k + i));
                acc[r] = _mm256_fmadd_ps(wv, x, acc[r]);
            }
            i += 8;
        }
        for r in 0..NR {
            let mut s = hsum256(acc[r]);
            for j in full..k {
                s += w_at(j) * a.f32s[(r0 + r) * k + j];
            }
            out[r] = s;
        }
    }

    /// Per 32-bit lane, the sum of four adjacent products of unsigned bytes
    /// `u` with signed bytes `s`. Without VNNI the pairwise 16-bit sums
    /// cannot saturate: callers keep `u` below 128 (at most 2·127·127).
    #[inline(always)]
    unsafe fn dot_u8i8<const VNNI: bool>(u: __m256i, s: __m256i) -> __m256i {
        if VNNI {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    }

    /// Eight floats from `p`, of which the first `g` exist; the rest read as 0.
    #[inline(always)]
    unsafe fn load_first<const VNNI: bool>(p: *const f32, g: usize) -> __m256 {
        if VNNI {
            _mm256_maskz_loadu_ps(((1u32 << g) - 1) as __mmask8, p)
        } else {
            let mut buf = [0f32; 8];
            std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), g);
            _mm256_loadu_ps(buf.as_ptr())
        }
    }

    /// 0xFF in byte i where bit i of `bits` is set.
    #[inline(always)]
    unsafe fn bytes_from_bits<const VNNI: bool>(bits: u32) -> __m256i {
        if VNNI {
            _mm256_movm_epi8(bits)
        } else {
            // Byte i gets byte i/8 of `bits`, then every bit but bit i%8 is
            // set, so the byte is all ones exactly when that bit was.
            let shuf = _mm256_set_epi64x(
                0x0303030303030303,
                0x0202020202020202,
                0x0101010101010101,
                0,
            );
            let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), shuf);
            let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
            _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
        }
    }

    /// Legacy 32-element blocks. T: 0 Q4_0, 1 Q4_1, 2 Q5_0, 3 Q5_1, 4 Q8_0.
    /// Weights are brought to unsigned bytes (VNNI's Q8_0 by flipping the
    /// sign bit), multiplied with the signed activations, and the offset this
    /// introduces is removed through the activation block sums. Without VNNI,
    /// Q8_0 moves the weights' signs onto the activations instead, which
    /// needs no offset.
    #[inline(always)]
    unsafe fn dot_legacy<const NR: usize, const T: u8, const VNNI: bool>(
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
        let signed_q8 = T == 4 && !VNNI;
        // Blocks go in groups of eight so that their scales convert, multiply
        // and enter the offset correction as one vector each.
        let mut b0 = 0;
        while b0 < nb {
            let g = (nb - b0).min(8);
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
                let ddv = _mm256_mul_ps(dwv, load_first::<VNNI>(d_base[r].add(b0), g));
                _mm256_storeu_ps(dd[r].as_mut_ptr(), ddv);
                if signed_q8 {
                    continue;
                }
                let sv = load_first::<VNNI>(s_base[r].add(b0), g);
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
                        let high =
                            _mm256_and_si256(bytes_from_bits::<VNNI>(qh), _mm256_set1_epi8(0x10));
                        _mm256_or_si256(_mm256_set_m128i(hi, lo), high)
                    }
                    _ => {
                        let raw = _mm256_loadu_si256(p.add(2) as *const __m256i);
                        if VNNI {
                            _mm256_xor_si256(raw, _mm256_set1_epi8(-128))
                        } else {
                            raw
                        }
                    }
                };
                for r in 0..NR {
                    let av = _mm256_loadu_si256(qs_base[r].add(b * QK) as *const __m256i);
                    let dot = if signed_q8 {
                        // |q| · (a with q's sign): |q| ≤ 128 and |a| ≤ 127, so
                        // the pairwise sums stay below 2^15.
                        dot_u8i8::<false>(_mm256_sign_epi8(q, q), _mm256_sign_epi8(av, q))
                    } else {
                        dot_u8i8::<VNNI>(q, av)
                    };
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
