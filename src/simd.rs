//! Which instruction set the kernels use, chosen once at run time.
//!
//! The binary is built for the target's baseline (plain x86-64: SSE2), so it
//! starts on any CPU of its architecture. The hot loops exist in one copy per
//! level and the copy is picked here from what the CPU reports:
//! AVX-512 VNNI for the integer matmul kernels, AVX2 + FMA + F16C for those
//! and the element-wise code, and a portable copy for everything else.
//!
//! `RUVLLM_SIMD=auto|avx512|avx2|portable` asks for a level (to test or
//! compare the paths on one machine); `RUVLLM_NO_SIMD=1` means `portable`.

use crate::error::{Error, Result};
use half::f16;
use std::sync::OnceLock;

/// A set of kernels, ordered from the most portable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Plain Rust, vectorised by the compiler for the target's baseline.
    Portable,
    /// AVX2, FMA and F16C (x86-64-v3).
    Avx2,
    /// AVX2 plus AVX-512 F/BW/VL and VNNI, for the integer matmul kernels.
    Avx512Vnni,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512Vnni => "avx512-vnni",
        }
    }

    /// A level by the name `RUVLLM_SIMD` takes.
    pub fn from_name(s: &str) -> Option<Level> {
        match s {
            "portable" => Some(Level::Portable),
            "avx2" => Some(Level::Avx2),
            "avx512" | "avx512-vnni" => Some(Level::Avx512Vnni),
            _ => None,
        }
    }
}

/// The best level this CPU supports.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let vnni = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        match (avx2, vnni) {
            (true, true) => Level::Avx512Vnni,
            (true, false) => Level::Avx2,
            _ => Level::Portable,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    Level::Portable
}

/// The level the environment asks for, checked against the CPU: an unknown
/// name, or a level the CPU lacks, is an error.
pub fn requested() -> Result<Level> {
    let best = detected();
    if std::env::var_os("RUVLLM_NO_SIMD").is_some() {
        return Ok(Level::Portable);
    }
    let Some(v) = std::env::var_os("RUVLLM_SIMD") else {
        return Ok(best);
    };
    let v = v.to_string_lossy();
    if v.is_empty() || v == "auto" {
        return Ok(best);
    }
    let want = Level::from_name(&v).ok_or_else(|| {
        Error::Unsupported(format!(
            "RUVLLM_SIMD={v} (use auto, avx512, avx2 or portable)"
        ))
    })?;
    if want > best {
        return Err(Error::Unsupported(format!(
            "RUVLLM_SIMD={v}: this CPU supports at most {}",
            best.name()
        )));
    }
    Ok(want)
}

/// The level every kernel uses in this process, fixed at first use. A bad
/// request falls back to the detected level with a warning; the command
/// line checks [`requested`] first and refuses it instead.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let l = requested().unwrap_or_else(|e| {
            tracing::warn!("{e}; using the detected kernels");
            detected()
        });
        tracing::debug!("kernels: {}", l.name());
        l
    })
}

/// A loop worth compiling once per instruction set. Implementations mark
/// `run` `#[inline(always)]`: [`dispatch`] then holds one copy of the whole
/// loop compiled for AVX2 and one for the baseline (a `#[target_feature]`
/// function called per element would not vectorise its caller).
pub trait Kernel {
    type Output;
    fn run<S: Simd>(self, s: S) -> Self::Output;
}

/// What a kernel copy may use beyond plain Rust. Tokens of levels above
/// [`Portable`] are made only by [`dispatch`] after detection, so holding
/// one proves the CPU has its instructions.
pub trait Simd: Copy {
    fn f16x8_to_f32(self, h: &[f16; 8]) -> [f32; 8];
    fn f32x8_to_f16(self, v: &[f32; 8]) -> [f16; 8];
    /// `a · b + c`, fused where that is one instruction (a library call
    /// otherwise, far slower than the two operations).
    fn mul_add(self, a: f32, b: f32, c: f32) -> f32;
}

/// The baseline copy.
#[derive(Clone, Copy, Debug)]
pub struct Portable;

impl Simd for Portable {
    #[inline(always)]
    fn f16x8_to_f32(self, h: &[f16; 8]) -> [f32; 8] {
        std::array::from_fn(|i| h[i].to_f32())
    }
    #[inline(always)]
    fn f32x8_to_f16(self, v: &[f32; 8]) -> [f16; 8] {
        std::array::from_fn(|i| f16::from_f32(v[i]))
    }
    #[inline(always)]
    fn mul_add(self, a: f32, b: f32, c: f32) -> f32 {
        if cfg!(any(target_arch = "aarch64", target_feature = "fma")) {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::Avx2;

/// Runs `k` in the copy for this process's [`level`].
#[inline]
pub fn dispatch<K: Kernel>(k: K) -> K::Output {
    // SAFETY: level() never exceeds detected().
    unsafe { run_at(level(), k) }
}

/// Runs `k` in the copy for `level` (AVX-512 shares the AVX2 copy). Tests
/// use this to compare the copies in one process.
///
/// # Panics
/// If the CPU lacks `level`.
pub fn dispatch_at<K: Kernel>(level: Level, k: K) -> K::Output {
    assert!(
        level <= detected(),
        "{} kernels asked for on a CPU without them",
        level.name()
    );
    // SAFETY: checked just above.
    unsafe { run_at(level, k) }
}

/// # Safety
/// The CPU must support `level`.
#[inline(always)]
unsafe fn run_at<K: Kernel>(level: Level, k: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    if level >= Level::Avx2 {
        // SAFETY: the caller guarantees AVX2, FMA and F16C.
        return unsafe { x86::run_avx2(k) };
    }
    let _ = level;
    k.run(Portable)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Kernel, Simd};
    use half::f16;
    use std::arch::x86_64::*;

    /// Proof that AVX2, FMA and F16C are present; only `run_avx2` makes one.
    #[derive(Clone, Copy, Debug)]
    pub struct Avx2(());

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn run_avx2<K: Kernel>(k: K) -> K::Output {
        k.run(Avx2(()))
    }

    impl Simd for Avx2 {
        #[inline(always)]
        fn f16x8_to_f32(self, h: &[f16; 8]) -> [f32; 8] {
            // SAFETY: a token exists only where F16C was detected; the load
            // reads exactly the 16 bytes of `h`.
            unsafe {
                let v = _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr() as *const __m128i));
                std::mem::transmute::<__m256, [f32; 8]>(v)
            }
        }
        #[inline(always)]
        fn f32x8_to_f16(self, v: &[f32; 8]) -> [f16; 8] {
            // SAFETY: as above; round to nearest even, as f16::from_f32 does.
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(v.as_ptr()));
                std::mem::transmute::<__m128i, [f16; 8]>(h)
            }
        }
        #[inline(always)]
        fn mul_add(self, a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Convert<'a>(&'a [f32]);
    impl Kernel for Convert<'_> {
        type Output = (Vec<f16>, Vec<f32>);
        #[inline(always)]
        fn run<S: Simd>(self, s: S) -> Self::Output {
            let mut h = Vec::new();
            let mut back = Vec::new();
            for c in self.0.chunks_exact(8) {
                let c16 = s.f32x8_to_f16(c.try_into().unwrap());
                h.extend_from_slice(&c16);
                back.extend_from_slice(&s.f16x8_to_f32(&c16));
            }
            (h, back)
        }
    }

    #[test]
    fn every_copy_converts_halves_like_the_half_crate() {
        // Ties, subnormals, overflow, signed zeros, NaN, infinities.
        let mut x = vec![
            0.0,
            -0.0,
            1.0,
            65504.0,
            65520.0,
            1e-8,
            6.0e-8,
            -2.9802322e-8,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            -3.1415925,
            1e5,
            0.1,
        ];
        x.extend((0..1024).map(|i| ((i * 7919) % 2003) as f32 * 0.1 - 100.0 + i as f32 * 1e-4));
        let want: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let levels = [Level::Portable, Level::Avx2];
        for l in levels.into_iter().filter(|&l| l <= detected()) {
            let (h, back) = dispatch_at(l, Convert(&x));
            for i in 0..x.len() {
                assert_eq!(h[i].to_bits(), want[i].to_bits(), "{l:?} {}", x[i]);
                assert_eq!(
                    back[i].to_bits(),
                    want[i].to_f32().to_bits(),
                    "{l:?} {}",
                    x[i]
                );
            }
        }
    }

    #[test]
    fn level_names_round_trip() {
        for l in [Level::Portable, Level::Avx2, Level::Avx512Vnni] {
            assert_eq!(Level::from_name(l.name()), Some(l));
        }
        assert_eq!(Level::from_name("avx512"), Some(Level::Avx512Vnni));
        assert_eq!(Level::from_name("sse9"), None);
    }
}
