//! Rotary position embeddings: the frequency scalings real checkpoints use
//! to reach past their pretraining context (linear, Llama 3, YaRN,
//! LongRoPE), resolved into one table of inverse frequencies, and the
//! cos/sin tables of a batch.
//!
//! The math follows transformers' `modeling_rope_utils` (the reference the
//! tests compare against); GGUF files carry the same parameters under
//! llama.cpp's names, read in `spec.rs` and `load.rs`.

use super::spec::RopeStyle;
use crate::error::{Error, Result};
use crate::simd::{dispatch, Kernel, Simd};

/// How a model stretches RoPE beyond the context it was pretrained on.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain `theta^(-2i/d)` frequencies.
    None,
    /// Every frequency divided by `factor` (position interpolation).
    Linear { factor: f32 },
    /// Llama 3.1: wavelengths longer than `original_context /
    /// low_freq_factor` are stretched by `factor`, those shorter than
    /// `original_context / high_freq_factor` kept, and the band between
    /// interpolated smoothly.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: usize,
    },
    /// Per-frequency divisors given as data: GGUF `rope_freqs`, which
    /// llama.cpp's converter precomputes from the Llama 3 rule.
    Divisors(Vec<f32>),
    /// YaRN: frequencies that turn fewer than `beta_slow` times within
    /// `original_context` are interpolated (divided by `factor`), those
    /// turning more than `beta_fast` times kept, with a linear ramp between;
    /// cos and sin are multiplied by `attention_factor`.
    Yarn {
        factor: f32,
        original_context: usize,
        beta_fast: f32,
        beta_slow: f32,
        /// Round the ramp's ends to whole dimensions (transformers'
        /// `truncate`, true unless the config says otherwise).
        truncate: bool,
        attention_factor: f32,
    },
    /// LongRoPE (Phi-3/3.5 long-context models): per-frequency divisors,
    /// `short` for a context within `original_context` and `long` beyond
    /// it; cos and sin are multiplied by `attention_factor` either way.
    LongRope {
        short: Vec<f32>,
        long: Vec<f32>,
        original_context: usize,
        attention_factor: f32,
    },
}

/// The RoPE of one kind of layer: base and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeParams {
    pub theta: f32,
    pub scaling: RopeScaling,
}

/// Resolved frequencies: pair `i` of a head turns by `p · inv_freq[i]` at
/// position `p`, and its cos and sin are multiplied by `mscale`.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFreqs {
    pub inv_freq: Vec<f32>,
    pub mscale: f32,
}

/// YaRN's magnitude correction for a context stretched `scale` times.
pub fn yarn_mscale(scale: f32, mscale: f32) -> f32 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

impl RopeParams {
    pub fn plain(theta: f32) -> Self {
        RopeParams {
            theta,
            scaling: RopeScaling::None,
        }
    }

    /// Checks the parameters for `rope_dim` rotated dimensions, so that
    /// [`RopeParams::frequencies`] cannot fail or produce non-finite angles.
    pub fn validate(&self, rope_dim: usize) -> Result<()> {
        let bad = |what: String| Err(Error::Config(format!("RoPE: {what}")));
        let positive = |x: f32| x.is_finite() && x > 0.0;
        if !positive(self.theta) {
            return bad(format!("base {} must be positive", self.theta));
        }
        let half = rope_dim / 2;
        let factors_ok = |name: &str, f: &[f32]| -> Result<()> {
            if f.len() != half {
                return bad(format!(
                    "{} {name} factors for {half} rotary frequencies",
                    f.len()
                ));
            }
            if !f.iter().all(|&x| positive(x)) {
                return bad(format!("{name} factors must be positive"));
            }
            Ok(())
        };
        match &self.scaling {
            RopeScaling::None => Ok(()),
            RopeScaling::Linear { factor } if !positive(*factor) => {
                bad(format!("linear factor {factor} must be positive"))
            }
            RopeScaling::Linear { .. } => Ok(()),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => {
                if !positive(*factor) || !positive(*low_freq_factor) || *original_context == 0 {
                    return bad(format!(
                        "llama3 factor {factor}, low_freq_factor {low_freq_factor} and \
                         original context {original_context} must be positive"
                    ));
                }
                if !(high_freq_factor.is_finite() && high_freq_factor > low_freq_factor) {
                    return bad(format!(
                        "llama3 high_freq_factor {high_freq_factor} must exceed low_freq_factor {low_freq_factor}"
                    ));
                }
                Ok(())
            }
            RopeScaling::Divisors(d) => factors_ok("rope_freqs", d),
            RopeScaling::Yarn {
                factor,
                original_context,
                beta_fast,
                beta_slow,
                attention_factor,
                ..
            } => {
                if !positive(*factor)
                    || *original_context == 0
                    || !positive(*beta_fast)
                    || !positive(*beta_slow)
                    || !positive(*attention_factor)
                {
                    return bad(format!(
                        "yarn factor {factor}, original context {original_context}, beta_fast \
                         {beta_fast}, beta_slow {beta_slow} and attention factor \
                         {attention_factor} must be positive"
                    ));
                }
                Ok(())
            }
            RopeScaling::LongRope {
                short,
                long,
                original_context,
                attention_factor,
            } => {
                factors_ok("short", short)?;
                factors_ok("long", long)?;
                if *original_context == 0 || !positive(*attention_factor) {
                    return bad(format!(
                        "longrope original context {original_context} and attention factor \
                         {attention_factor} must be positive"
                    ));
                }
                Ok(())
            }
        }
    }

    /// The frequencies for `rope_dim` rotated dimensions when sequences
    /// reach at most `context` tokens (which picks LongRoPE's factor set).
    pub fn frequencies(&self, rope_dim: usize, context: usize) -> RopeFreqs {
        let half = rope_dim / 2;
        // f32 as transformers computes it: base ** (2i / d), then 1 / that.
        let base: Vec<f32> = (0..half)
            .map(|i| 1.0 / self.theta.powf((2 * i) as f32 / rope_dim as f32))
            .collect();
        let divided = |d: &[f32]| base.iter().zip(d).map(|(f, d)| f / d).collect();
        let (inv_freq, mscale) = match &self.scaling {
            RopeScaling::None => (base, 1.0),
            RopeScaling::Linear { factor } => (base.iter().map(|f| f / factor).collect(), 1.0),
            RopeScaling::Divisors(d) => (divided(d), 1.0),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => {
                let old = *original_context as f32;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                let inv = base
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (inv, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_context,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor,
            } => {
                let (dim, theta) = (rope_dim as f64, self.theta as f64);
                // The dimension whose frequency turns `rotations` times
                // within the original context.
                let corr_dim = |rotations: f32| {
                    dim * (*original_context as f64
                        / (rotations as f64 * 2.0 * std::f64::consts::PI))
                        .ln()
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (corr_dim(*beta_fast), corr_dim(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, high) = (low.max(0.0) as f32, high.min(dim - 1.0) as f32);
                let span = if low == high { 0.001 } else { high - low };
                let inv = base
                    .iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f32 - low) / span).clamp(0.0, 1.0);
                        let keep = 1.0 - ramp;
                        f / factor * (1.0 - keep) + f * keep
                    })
                    .collect();
                (inv, *attention_factor)
            }
            RopeScaling::LongRope {
                short,
                long,
                original_context,
                attention_factor,
            } => {
                // transformers picks the set per forward call from that
                // call's length, which leaves a KV cache holding keys of
                // both kinds once a sequence crosses `original_context`;
                // like llama.cpp, the context decides once for every
                // position, so cached keys stay valid and a prefix reused
                // from the cache means what it meant.
                let set = if context > *original_context {
                    long
                } else {
                    short
                };
                (divided(set), *attention_factor)
            }
        };
        RopeFreqs { inv_freq, mscale }
    }
}

/// Rotary embedding tables for a set of positions: `cos`/`sin` of
/// `pos · inv_freq[i]` times `mscale`, `rope_dim / 2` values per position.
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    half: usize,
}

impl Rope {
    pub fn new(positions: &[usize], freqs: &RopeFreqs) -> Self {
        let half = freqs.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let p = p as f32;
            for &f in &freqs.inv_freq {
                let a = p * f;
                cos.push(a.cos() * freqs.mscale);
                sin.push(a.sin() * freqs.mscale);
            }
        }
        Rope { cos, sin, half }
    }

    /// The transposed rotation (the same tables with the sines negated):
    /// what carries a gradient back through [`Rope::apply`].
    pub fn transposed(&self) -> Rope {
        Rope {
            cos: self.cos.clone(),
            sin: self.sin.iter().map(|s| -s).collect(),
            half: self.half,
        }
    }

    /// Rotates the first `2·half` dims of every `head_dim`-wide head in `x`,
    /// which holds one `width`-wide row of heads per table row (token).
    pub fn apply(&self, style: RopeStyle, x: &mut [f32], width: usize, head_dim: usize) {
        dispatch(RopeRows {
            rope: self,
            style,
            x,
            width,
            head_dim,
        })
    }
}

struct RopeRows<'a> {
    rope: &'a Rope,
    style: RopeStyle,
    x: &'a mut [f32],
    width: usize,
    head_dim: usize,
}

impl Kernel for RopeRows<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self, _: S) {
        let half = self.rope.half;
        if half == 0 {
            return;
        }
        let tables = self
            .rope
            .cos
            .chunks_exact(half)
            .zip(self.rope.sin.chunks_exact(half));
        for (row, (c, s)) in self.x.chunks_exact_mut(self.width).zip(tables) {
            for head in row.chunks_exact_mut(self.head_dim) {
                match self.style {
                    RopeStyle::Neox => {
                        let (lo, hi) = head.split_at_mut(half);
                        for i in 0..half {
                            let (a, b) = (lo[i], hi[i]);
                            lo[i] = a * c[i] - b * s[i];
                            hi[i] = b * c[i] + a * s[i];
                        }
                    }
                    RopeStyle::Interleaved => {
                        for i in 0..half {
                            let (a, b) = (head[2 * i], head[2 * i + 1]);
                            head[2 * i] = a * c[i] - b * s[i];
                            head[2 * i + 1] = b * c[i] + a * s[i];
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's converter turns the Llama 3 rule into per-frequency
    /// divisors (`rope_freqs`); both routes must give the same frequencies.
    #[test]
    fn llama3_rule_matches_its_gguf_divisors() {
        let (theta, dim, factor, lo, hi, old) = (500000f32, 64usize, 8f32, 1f32, 4f32, 8192f32);
        let llama3 = RopeParams {
            theta,
            scaling: RopeScaling::Llama3 {
                factor,
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_context: old as usize,
            },
        };
        // convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, as
        // published: 1, factor, or 1 / ((1 - smooth) / factor + smooth).
        let divisors = (0..dim / 2)
            .map(|i| {
                let freq = 1.0 / (theta as f64).powf((2 * i) as f64 / dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < (old / hi) as f64 {
                    1.0
                } else if wavelen > (old / lo) as f64 {
                    factor
                } else {
                    let smooth = ((old as f64 / wavelen - lo as f64) / (hi - lo) as f64) as f32;
                    1.0 / ((1.0 - smooth) / factor + smooth)
                }
            })
            .collect();
        let gguf = RopeParams {
            theta,
            scaling: RopeScaling::Divisors(divisors),
        };
        let (a, b) = (llama3.frequencies(dim, 0), gguf.frequencies(dim, 0));
        // Some frequencies in each of the three bands.
        let base = RopeParams::plain(theta).frequencies(dim, 0).inv_freq;
        assert!(a.inv_freq.iter().zip(&base).any(|(x, y)| x == y));
        assert!(a
            .inv_freq
            .iter()
            .zip(&base)
            .any(|(x, y)| (x * factor - y).abs() < 1e-6 * y));
        assert!(a
            .inv_freq
            .iter()
            .zip(&base)
            .any(|(x, y)| x < y && x * factor > y * 1.01));
        for (x, y) in a.inv_freq.iter().zip(&b.inv_freq) {
            assert!((x - y).abs() <= 1e-6 * x.abs(), "{x} vs {y}");
        }
    }

    #[test]
    fn longrope_picks_factors_by_context() {
        let p = RopeParams {
            theta: 10000.0,
            scaling: RopeScaling::LongRope {
                short: vec![1.0, 2.0],
                long: vec![4.0, 8.0],
                original_context: 64,
                attention_factor: 1.5,
            },
        };
        let short = p.frequencies(4, 64);
        let long = p.frequencies(4, 65);
        assert_eq!(short.inv_freq, vec![1.0, 0.01 / 2.0]);
        assert_eq!(long.inv_freq, vec![0.25, 0.01 / 8.0]);
        assert_eq!((short.mscale, long.mscale), (1.5, 1.5));
    }

    #[test]
    fn bad_parameters_are_errors() {
        let with = |scaling| RopeParams {
            theta: 10000.0,
            scaling,
        };
        assert!(with(RopeScaling::Linear { factor: 0.0 })
            .validate(16)
            .is_err());
        assert!(with(RopeScaling::Divisors(vec![1.0; 7]))
            .validate(16)
            .is_err());
        assert!(with(RopeScaling::Divisors(vec![1.0; 8]))
            .validate(16)
            .is_ok());
        assert!(with(RopeScaling::LongRope {
            short: vec![1.0; 8],
            long: vec![f32::NAN; 8],
            original_context: 64,
            attention_factor: 1.0,
        })
        .validate(16)
        .is_err());
        assert!(with(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 4.0,
            high_freq_factor: 4.0,
            original_context: 64,
        })
        .validate(16)
        .is_err());
        assert!(RopeParams::plain(-1.0).validate(16).is_err());
    }
}
