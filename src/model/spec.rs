//! Architecture hyper-parameters, read from GGUF metadata or an HF config.json.

use super::rope::{yarn_mscale, RopeParams, RopeScaling};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use serde_json::Value as Json;

/// The model families the runtime implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
    Phi2,
    Gemma,
    Gemma2,
    Gemma3,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Phi3 => "phi3",
            Family::Phi2 => "phi2",
            Family::Gemma => "gemma",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
        }
    }

    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma | Family::Gemma2 | Family::Gemma3)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// tanh approximation (gelu_pytorch_tanh, gelu_new).
    GeluTanh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Rotate adjacent pairs (GGML "normal"); GGUF llama files permute Q/K rows for it.
    Interleaved,
    /// Rotate the two halves (HF rotate_half, GGML "neox").
    Neox,
}

/// Reads a named 1-D tensor as f32, `None` when the file has no such tensor.
pub type TensorReader<'a> = dyn Fn(&str) -> Result<Option<Vec<f32>>> + 'a;

#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub norm_eps: f32,
    /// LayerNorm with bias (phi2) instead of RMSNorm.
    pub layer_norm: bool,
    /// RoPE base and scaling of full-attention layers.
    pub rope: RopeParams,
    /// RoPE of sliding-window layers, when it differs (gemma3: its own
    /// base and no scaling).
    pub rope_local: Option<RopeParams>,
    /// Dimensions of each head that are rotated (partial rotary for phi2).
    pub rope_dim: usize,
    pub rope_style: RopeStyle,
    pub activation: Activation,
    pub sliding_window: Option<usize>,
    /// Which layers use the sliding window.
    pub sliding_layers: Vec<bool>,
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    pub attn_scale: f32,
    /// Embeddings are multiplied by this (gemma: sqrt(hidden)).
    pub embed_scale: Option<f32>,
    pub context_length: usize,
}

impl ModelSpec {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    fn finish(mut self, pattern: Option<Vec<bool>>) -> Result<Self> {
        if self.hidden == 0 || self.n_layers == 0 || self.n_heads == 0 || self.vocab_size == 0 {
            return Err(Error::Config(format!(
                "hidden size, layer, head and vocabulary counts must be positive: {self:?}"
            )));
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(Error::Config(format!(
                "{} attention heads cannot be grouped over {} KV heads",
                self.n_heads, self.n_kv_heads
            )));
        }
        if self.head_dim == 0 || self.rope_dim > self.head_dim || !self.rope_dim.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "bad head_dim {} / rotary dims {}",
                self.head_dim, self.rope_dim
            )));
        }
        if self.n_layers > 4096 || self.hidden > 1 << 20 || self.head_dim > 4096 {
            return Err(Error::Config("implausible model dimensions".into()));
        }
        self.rope.validate(self.rope_dim)?;
        if let Some(local) = &self.rope_local {
            local.validate(self.rope_dim)?;
        }
        self.sliding_layers = match (self.sliding_window, pattern) {
            (None, _) => vec![false; self.n_layers],
            (Some(_), Some(p)) if p.len() == self.n_layers => p,
            (Some(_), Some(p)) => {
                return Err(Error::Config(format!(
                    "sliding-window pattern has {} entries for {} layers",
                    p.len(),
                    self.n_layers
                )))
            }
            (Some(_), None) => match self.family {
                Family::Gemma2 => (0..self.n_layers).map(|i| i % 2 == 0).collect(),
                // llama.cpp's default for Gemma 3: five local layers, then a global one.
                Family::Gemma3 => (0..self.n_layers).map(|i| i % 6 < 5).collect(),
                _ => vec![true; self.n_layers],
            },
        };
        Ok(self)
    }

    fn base(family: Family) -> Self {
        ModelSpec {
            family,
            vocab_size: 0,
            hidden: 0,
            n_layers: 0,
            n_heads: 0,
            n_kv_heads: 0,
            head_dim: 0,
            ffn: 0,
            norm_eps: 1e-5,
            layer_norm: family == Family::Phi2,
            rope: RopeParams::plain(10000.0),
            rope_local: None,
            rope_dim: 0,
            rope_style: RopeStyle::Neox,
            activation: if family.is_gemma() || family == Family::Phi2 {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            sliding_window: None,
            sliding_layers: Vec::new(),
            attn_softcap: None,
            final_softcap: None,
            attn_scale: 0.0,
            embed_scale: None,
            context_length: 2048,
        }
    }

    /// Reads the spec from GGUF metadata (`<arch>.*` keys); `tensor` reads
    /// a 1-D tensor of the file as f32, for the RoPE factors stored as
    /// tensors.
    pub fn from_gguf(g: &GgufFile, tensor: &TensorReader) -> Result<Self> {
        let arch = g
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::Gguf("missing general.architecture".into()))?
            .to_string();
        let family = match arch.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "phi3" => Family::Phi3,
            "phi2" => Family::Phi2,
            "gemma" => Family::Gemma,
            "gemma2" => Family::Gemma2,
            "gemma3" => Family::Gemma3,
            other => {
                return Err(Error::Unsupported(format!(
                    "architecture '{other}' (supported: llama, mistral, qwen2, qwen3, phi3, phi2, gemma, gemma2, gemma3)"
                )))
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let uint = |k: &str| -> Result<Option<usize>> {
            match g.get(&key(k)) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|v| usize::try_from(v).ok())
                    .map(Some)
                    .ok_or_else(|| Error::Gguf(format!("{} is not an unsigned integer", key(k)))),
            }
        };
        let req = |k: &str| -> Result<usize> {
            uint(k)?.ok_or_else(|| Error::Gguf(format!("missing {}", key(k))))
        };
        let float = |k: &str| g.get(&key(k)).and_then(|v| v.as_f64()).map(|v| v as f32);

        let mut s = Self::base(family);
        s.hidden = req("embedding_length")?;
        s.n_layers = req("block_count")?;
        s.n_heads = req("attention.head_count")?;
        s.n_kv_heads = uint("attention.head_count_kv")?.unwrap_or(s.n_heads);
        s.ffn = req("feed_forward_length")?;
        s.head_dim = match uint("attention.key_length")? {
            Some(d) => d,
            None if s.n_heads > 0 => s.hidden / s.n_heads,
            None => 0,
        };
        s.rope_dim = uint("rope.dimension_count")?.unwrap_or(s.head_dim);
        s.context_length = uint("context_length")?.unwrap_or(2048);
        s.vocab_size = match uint("vocab_size")? {
            Some(v) => v,
            None => g
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .unwrap_or(0),
        };
        s.norm_eps = float("attention.layer_norm_rms_epsilon")
            .or_else(|| float("attention.layer_norm_epsilon"))
            .unwrap_or(1e-5);
        s.rope = RopeParams {
            theta: float("rope.freq_base").unwrap_or(10000.0),
            scaling: gguf_rope_scaling(g, &arch, s.context_length, tensor)?,
        };
        s.rope_style = if matches!(family, Family::Llama | Family::Mistral) {
            RopeStyle::Interleaved
        } else {
            RopeStyle::Neox
        };
        s.sliding_window = uint("attention.sliding_window")?.filter(|&w| w > 0);
        s.attn_softcap = float("attn_logit_softcapping").filter(|&c| c > 0.0);
        s.final_softcap = float("final_logit_softcapping").filter(|&c| c > 0.0);
        if family == Family::Gemma3 {
            // llama.cpp's Gemma 3: sliding layers use their own base and
            // never the file's scaling.
            s.rope_local = Some(RopeParams::plain(
                float("rope.freq_base_swa").unwrap_or(10000.0),
            ));
        }
        let pattern = match g.get(&key("attention.sliding_window_pattern")) {
            Some(v) => match v.as_array() {
                Some(a) => Some(
                    a.iter()
                        .map(|b| b.as_bool())
                        .collect::<Option<Vec<bool>>>()
                        .ok_or_else(|| Error::Gguf("bad sliding_window_pattern".into()))?,
                ),
                None => {
                    let p = v.as_u64().unwrap_or(0) as usize;
                    (p > 0).then(|| (0..s.n_layers).map(|i| i % p < p - 1).collect())
                }
            },
            None => None,
        };
        s.attn_scale = 1.0 / (s.head_dim as f32).sqrt();
        if family.is_gemma() {
            s.embed_scale = Some((s.hidden as f32).sqrt());
        }
        s.finish(pattern)
    }

    /// Reads the spec from a Hugging Face config.json.
    pub fn from_hf_config(cfg: &Json) -> Result<Self> {
        let model_type = cfg
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::Config("config.json has no model_type".into()))?;
        let family = match model_type {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "phi3" => Family::Phi3,
            "phi" => Family::Phi2,
            "gemma" => Family::Gemma,
            "gemma2" => Family::Gemma2,
            "gemma3_text" | "gemma3" => Family::Gemma3,
            other => return Err(Error::Unsupported(format!("model_type '{other}'"))),
        };
        let uint = |k: &str| cfg.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
        let float = |k: &str| cfg.get(k).and_then(|v| v.as_f64()).map(|v| v as f32);
        let req =
            |k: &str| uint(k).ok_or_else(|| Error::Config(format!("config.json: missing {k}")));

        let mut s = Self::base(family);
        s.hidden = req("hidden_size")?;
        s.n_layers = req("num_hidden_layers")?;
        s.n_heads = req("num_attention_heads")?;
        s.n_kv_heads = uint("num_key_value_heads").unwrap_or(s.n_heads);
        s.ffn = req("intermediate_size")?;
        s.vocab_size = req("vocab_size")?;
        s.head_dim = uint("head_dim").unwrap_or(s.hidden.checked_div(s.n_heads).unwrap_or(0));
        s.context_length = uint("max_position_embeddings").unwrap_or(2048);
        s.norm_eps = float("rms_norm_eps")
            .or_else(|| float("layer_norm_eps"))
            .unwrap_or(1e-5);
        let (rope, rope_local, partial) = hf_rope(cfg, family, s.context_length)?;
        s.rope = rope;
        s.rope_local = rope_local;
        s.rope_dim = ((s.head_dim as f32 * partial) as usize) & !1;
        s.sliding_window = uint("sliding_window").filter(|&w| w > 0);
        if family == Family::Qwen2 && cfg.get("use_sliding_window") != Some(&Json::Bool(true)) {
            // Qwen2 configs name a window that the model only uses when enabled.
            s.sliding_window = None;
        }
        s.attn_softcap = float("attn_logit_softcapping").filter(|&c| c > 0.0);
        s.final_softcap = float("final_logit_softcapping").filter(|&c| c > 0.0);
        let qpas = float("query_pre_attn_scalar").unwrap_or(s.head_dim as f32);
        s.attn_scale = 1.0 / qpas.sqrt();
        if family.is_gemma() {
            s.embed_scale = Some((s.hidden as f32).sqrt());
        }
        let pattern = match cfg.get("layer_types").and_then(|v| v.as_array()) {
            Some(types) => Some(
                types
                    .iter()
                    .map(|t| t.as_str() == Some("sliding_attention"))
                    .collect(),
            ),
            None => uint("sliding_window_pattern")
                .filter(|&p| p > 0)
                .map(|p| (0..s.n_layers).map(|i| i % p < p - 1).collect()),
        };
        s.finish(pattern)
    }
}

/// The RoPE scaling of a GGUF file, as llama.cpp reads it: `<arch>.rope.scaling.*`
/// keys plus the `rope_freqs` (Llama 3) and `rope_factors_long/short`
/// (LongRoPE) tensors its converter writes.
fn gguf_rope_scaling(
    g: &GgufFile,
    arch: &str,
    context_length: usize,
    tensor: &TensorReader,
) -> Result<RopeScaling> {
    let key = |k: &str| format!("{arch}.rope.scaling.{k}");
    let float = |k: &str| -> Result<Option<f32>> {
        match g.get(&key(k)) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|v| Some(v as f32))
                .ok_or_else(|| Error::Gguf(format!("{} is not a number", key(k)))),
        }
    };
    let ty = match g.get(&key("type")) {
        None => None,
        Some(v) => Some(
            v.as_str()
                .ok_or_else(|| Error::Gguf(format!("{} is not a string", key("type"))))?,
        ),
    };
    // llama.cpp: a factor of 0 (or none) means 1, under the old key too.
    let factor = match float("factor")? {
        Some(f) => Some(f),
        None => g
            .get(&format!("{arch}.rope.scale_linear"))
            .and_then(|v| v.as_f64())
            .map(|v| v as f32),
    }
    .filter(|&f| f != 0.0)
    .unwrap_or(1.0);
    let original_context = match g.get(&key("original_context_length")) {
        None => context_length,
        Some(v) => v
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| {
                Error::Gguf(format!(
                    "{} is not an unsigned integer",
                    key("original_context_length")
                ))
            })?,
    };
    // Multiplies cos and sin whatever the type (llama.cpp's rope_attn_factor).
    let attn_factor = float("attn_factor")?.unwrap_or(1.0);
    let divisors = tensor("rope_freqs.weight")?;
    let (long, short) = (
        tensor("rope_factors_long.weight")?,
        tensor("rope_factors_short.weight")?,
    );
    let named = ty.unwrap_or("linear");
    // llama.cpp uses LongRoPE factor tensors whenever they are there; its
    // Phi-3 converter writes them without a scaling type.
    let has_factors = long.is_some() || short.is_some();
    let named = match named {
        "none" | "linear" if has_factors && factor == 1.0 => "longrope",
        n => n,
    };
    let only_divisors = |scaling: RopeScaling| -> Result<RopeScaling> {
        if has_factors {
            return Err(Error::Unsupported(format!(
                "rope_factors_long/short tensors with RoPE scaling type '{named}'"
            )));
        }
        if attn_factor != 1.0 {
            return Err(Error::Unsupported(format!(
                "{} = {attn_factor} with RoPE scaling type '{named}'",
                key("attn_factor")
            )));
        }
        match (divisors.clone(), &scaling) {
            (None, _) => Ok(scaling),
            (Some(d), RopeScaling::None) => Ok(RopeScaling::Divisors(d)),
            (Some(_), _) => Err(Error::Unsupported(format!(
                "rope_freqs.weight together with RoPE scaling type '{named}'"
            ))),
        }
    };
    match named {
        "none" => only_divisors(RopeScaling::None),
        "linear" if factor == 1.0 => only_divisors(RopeScaling::None),
        "linear" => only_divisors(RopeScaling::Linear { factor }),
        "yarn" => {
            if divisors.is_some() || has_factors {
                return Err(Error::Unsupported(
                    "RoPE factor tensors together with YaRN".into(),
                ));
            }
            if float("yarn_log_multiplier")?.is_some_and(|m| m != 0.0) {
                return Err(Error::Unsupported(
                    "YaRN with yarn_log_multiplier (DeepSeek-style mscale)".into(),
                ));
            }
            if float("yarn_ext_factor")?.is_some_and(|e| e != 1.0) {
                return Err(Error::Unsupported(
                    "YaRN with an extrapolation factor other than 1".into(),
                ));
            }
            // The converter copies transformers' explicit attention_factor
            // into yarn_attn_factor and its beta_fast/beta_slow into their
            // keys; read them as transformers uses them (llama.cpp itself
            // reads them for Grok only).
            let attention_factor = float("yarn_attn_factor")?
                .unwrap_or_else(|| yarn_mscale(factor, 1.0))
                * attn_factor;
            Ok(RopeScaling::Yarn {
                factor,
                original_context,
                beta_fast: float("yarn_beta_fast")?.unwrap_or(32.0),
                beta_slow: float("yarn_beta_slow")?.unwrap_or(1.0),
                truncate: true,
                attention_factor,
            })
        }
        "longrope" if factor != 1.0 => Err(Error::Unsupported(format!(
            "LongRoPE with {} = {factor}",
            key("factor")
        ))),
        "longrope" => match (short, long) {
            (Some(short), Some(long)) if divisors.is_none() => Ok(RopeScaling::LongRope {
                short,
                long,
                original_context,
                attention_factor: attn_factor,
            }),
            (Some(_), Some(_)) => Err(Error::Unsupported(
                "rope_freqs.weight together with LongRoPE factors".into(),
            )),
            _ => Err(Error::Gguf(
                "LongRoPE scaling needs both rope_factors_long.weight and rope_factors_short.weight"
                    .into(),
            )),
        },
        other => Err(Error::Unsupported(format!(
            "RoPE scaling type '{other}' ({})",
            key("type")
        ))),
    }
}

/// The RoPE of full-attention layers, of sliding layers when it differs,
/// and the rotary fraction of each head, from a config.json: transformers
/// 5's `rope_parameters` (flat, or per layer type) or 4.x's `rope_scaling`
/// with top-level `rope_theta` (and gemma3's `rope_local_base_freq`).
fn hf_rope(
    cfg: &Json,
    family: Family,
    max_positions: usize,
) -> Result<(RopeParams, Option<RopeParams>, f32)> {
    let object = |k: &str| cfg.get(k).filter(|v| v.is_object());
    let (params, legacy) = (object("rope_parameters"), object("rope_scaling"));
    let nested = params
        .filter(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
    // As transformers 5 reads them: a legacy `rope_scaling` replaces flat
    // parameters and updates the full-attention entry of nested ones.
    let global = match nested {
        Some(p) => {
            let mut g = p
                .get("full_attention")
                .filter(|v| v.is_object())
                .cloned()
                .unwrap_or_else(|| Json::Object(Default::default()));
            if let (Some(g), Some(Json::Object(l))) = (g.as_object_mut(), legacy) {
                g.extend(l.clone());
            }
            g
        }
        None => legacy
            .or(params)
            .cloned()
            .unwrap_or_else(|| Json::Object(Default::default())),
    };
    let top = |k: &str| cfg.get(k).and_then(|v| v.as_f64()).map(|v| v as f32);
    let top_original = cfg
        .get("original_max_position_embeddings")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .filter(|_| nested.is_none());
    let theta = |p: &Json| {
        p.get("rope_theta")
            .and_then(|v| v.as_f64())
            .map(|v| v as f32)
    };
    let default_theta = if family == Family::Gemma3 {
        1_000_000.0
    } else {
        10000.0
    };
    let rope = RopeParams {
        theta: theta(&global)
            .or_else(|| top("rope_theta"))
            .unwrap_or(default_theta),
        scaling: hf_rope_scaling(&global, max_positions, top_original)?,
    };
    let local = nested
        .and_then(|p| p.get("sliding_attention"))
        .filter(|v| v.is_object());
    let rope_local = match local {
        Some(l) => Some(RopeParams {
            theta: theta(l)
                .or_else(|| top("rope_local_base_freq"))
                .unwrap_or(10000.0),
            scaling: hf_rope_scaling(l, max_positions, None)?,
        }),
        // 4.x Gemma 3: the scaling is the global layers' alone.
        None if family == Family::Gemma3 => Some(RopeParams::plain(
            top("rope_local_base_freq").unwrap_or(10000.0),
        )),
        None => None,
    };
    let partial = top("partial_rotary_factor")
        .or_else(|| {
            global
                .get("partial_rotary_factor")
                .and_then(|v| v.as_f64())
                .map(|v| v as f32)
        })
        .unwrap_or(1.0);
    Ok((rope, rope_local, partial))
}

/// One RoPE parameter dictionary of a config.json, with the defaults of
/// transformers' `modeling_rope_utils`.
///
/// `top_original` is a top-level `original_max_position_embeddings`
/// (Phi-3 keeps it there), which transformers prefers for flat parameters.
fn hf_rope_scaling(
    p: &Json,
    max_positions: usize,
    top_original: Option<usize>,
) -> Result<RopeScaling> {
    let ty = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let float = |k: &str| p.get(k).and_then(|v| v.as_f64()).map(|v| v as f32);
    let req = |k: &str| {
        float(k).ok_or_else(|| Error::Config(format!("config.json: RoPE type '{ty}' needs {k}")))
    };
    let uint = |v: Option<&Json>| v.and_then(|v| v.as_u64()).map(|v| v as usize);
    let original = top_original
        .or_else(|| uint(p.get("original_max_position_embeddings")))
        .unwrap_or(max_positions);
    let factors = |k: &str| -> Result<Vec<f32>> {
        p.get(k)
            .and_then(|v| v.as_array())
            .and_then(|a| {
                a.iter()
                    .map(|x| x.as_f64().map(|x| x as f32))
                    .collect::<Option<Vec<f32>>>()
            })
            .ok_or_else(|| {
                Error::Config(format!(
                    "config.json: RoPE type '{ty}' needs a list of numbers {k}"
                ))
            })
    };
    // Where no factor is given, the stretch from the original context.
    let implied = |original: usize| max_positions as f32 / original.max(1) as f32;
    Ok(match ty {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: req("factor")?,
        },
        // Dynamic NTK leaves the frequencies alone up to
        // max_position_embeddings, and the context never goes further.
        "dynamic" => {
            req("factor")?;
            RopeScaling::None
        }
        "llama3" => RopeScaling::Llama3 {
            factor: req("factor")?,
            low_freq_factor: req("low_freq_factor")?,
            high_freq_factor: req("high_freq_factor")?,
            original_context: original,
        },
        "yarn" => {
            let factor = float("factor").unwrap_or_else(|| implied(original));
            let nonzero = |k: &str| float(k).filter(|&v| v != 0.0);
            let mscales = (nonzero("mscale"), nonzero("mscale_all_dim"));
            let attention_factor = match (float("attention_factor"), mscales) {
                (Some(a), _) => a,
                (None, (Some(m), Some(all))) => yarn_mscale(factor, m) / yarn_mscale(factor, all),
                _ => yarn_mscale(factor, 1.0),
            };
            RopeScaling::Yarn {
                factor,
                original_context: original,
                beta_fast: nonzero("beta_fast").unwrap_or(32.0),
                beta_slow: nonzero("beta_slow").unwrap_or(1.0),
                truncate: p.get("truncate").and_then(|v| v.as_bool()).unwrap_or(true),
                attention_factor,
            }
        }
        "longrope" | "su" => {
            let factor = float("factor").unwrap_or_else(|| implied(original));
            let attention_factor = float("attention_factor").unwrap_or_else(|| {
                if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (original as f32).ln()).sqrt()
                }
            });
            RopeScaling::LongRope {
                short: factors("short_factor")?,
                long: factors("long_factor")?,
                original_context: original,
                attention_factor,
            }
        }
        other => {
            return Err(Error::Unsupported(format!(
                "RoPE scaling type '{other}' in config.json \
                 (supported: default, linear, dynamic, llama3, yarn, longrope)"
            )))
        }
    })
}
