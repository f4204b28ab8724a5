//! Architecture hyper-parameters, read from GGUF metadata or an HF config.json.

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
    pub rope_theta: f32,
    /// RoPE base of sliding-window layers, when it differs (gemma3).
    pub rope_theta_local: Option<f32>,
    /// Dimensions of each head that are rotated (partial rotary for phi2).
    pub rope_dim: usize,
    pub rope_style: RopeStyle,
    /// Linear RoPE scaling factor (positions are divided by it).
    pub rope_scale: f32,
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
            rope_theta: 10000.0,
            rope_theta_local: None,
            rope_dim: 0,
            rope_style: RopeStyle::Neox,
            rope_scale: 1.0,
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

    /// Reads the spec from GGUF metadata (`<arch>.*` keys).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
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
        s.rope_theta = float("rope.freq_base").unwrap_or(10000.0);
        if g.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) == Some("linear") {
            s.rope_scale = float("rope.scaling.factor").unwrap_or(1.0);
        }
        s.rope_style = if matches!(family, Family::Llama | Family::Mistral) {
            RopeStyle::Interleaved
        } else {
            RopeStyle::Neox
        };
        s.sliding_window = uint("attention.sliding_window")?.filter(|&w| w > 0);
        s.attn_softcap = float("attn_logit_softcapping").filter(|&c| c > 0.0);
        s.final_softcap = float("final_logit_softcapping").filter(|&c| c > 0.0);
        if family == Family::Gemma3 {
            s.rope_theta_local = Some(float("rope.freq_base_swa").unwrap_or(10000.0));
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
        let rope_params = cfg.get("rope_parameters");
        let theta_of =
            |p: Option<&Json>| p.and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64());
        s.rope_theta = float("rope_theta")
            .or_else(|| theta_of(rope_params).map(|v| v as f32))
            .or_else(|| {
                theta_of(rope_params.and_then(|p| p.get("full_attention"))).map(|v| v as f32)
            })
            .unwrap_or(10000.0);
        let partial = float("partial_rotary_factor").unwrap_or(1.0);
        s.rope_dim = ((s.head_dim as f32 * partial) as usize) & !1;
        if let Some(sc) = cfg.get("rope_scaling").filter(|v| !v.is_null()) {
            let ty = sc
                .get("rope_type")
                .or_else(|| sc.get("type"))
                .and_then(|v| v.as_str())
                .unwrap_or("");
            match ty {
                "linear" => {
                    s.rope_scale = sc.get("factor").and_then(|v| v.as_f64()).unwrap_or(1.0) as f32
                }
                "default" | "" => {}
                other => {
                    return Err(Error::Unsupported(format!("rope_scaling type '{other}'")));
                }
            }
        }
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
        if family == Family::Gemma3 {
            s.rope_theta_local = Some(
                float("rope_local_base_freq")
                    .or_else(|| {
                        theta_of(rope_params.and_then(|p| p.get("sliding_attention")))
                            .map(|v| v as f32)
                    })
                    .unwrap_or(10000.0),
            );
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
