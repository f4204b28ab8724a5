//! The public library API, with the names, signatures and defaults of the
//! original ruvllm `backends` module: [`LlmBackend`], [`ModelConfig`],
//! [`GenerateParams`], [`TokenStream`], [`AsyncTokenStream`] and friends.
//! [`create_backend`] returns the CPU backend; [`CandleBackend`] and
//! [`MistralBackend`] are the original's names for it (with X-LoRA adapters
//! mixed by the weights the caller gives; learned routing is not
//! implemented and says so), [`NoopBackend`] refuses everything.
//!
//! ```no_run
//! use ruvllm::backends::{create_backend, GenerateParams, ModelConfig, StreamEvent};
//! let mut backend = create_backend();
//! backend.load_model("models/SmolLM2-135M-Instruct.Q4_1.gguf", ModelConfig::default())?;
//! let text = backend.generate("The capital of France is", GenerateParams::default().with_max_tokens(16))?;
//! for event in backend.generate_stream_v2("Once upon a time", GenerateParams::default())? {
//!     if let StreamEvent::Token(t) = event? { print!("{}", t.text) }
//! }
//! # Ok::<(), ruvllm::Error>(())
//! ```

pub mod async_stream;
mod cpu;
mod mistral;
mod noop;
mod stream;

pub use async_stream::{AsyncTokenStream, LlmBackendAsync};
pub use cpu::{CandleBackend, CpuBackend};
pub use mistral::{
    IsqConfig, IsqMethod, MistralBackend, MistralBackendConfig, PagedAttentionConfigExt,
    XLoraConfig, XLoraManager, XLoraManagerStats, XLoraMixingMode,
};
pub use noop::NoopBackend;
pub use stream::TokenStream;

use crate::error::Result;
use crate::quant::GgmlType;
use crate::sampling::SamplingParams;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Model families. `Qwen` covers Qwen2; the others are as named.
///
/// ```
/// use ruvllm::backends::ModelArchitecture;
/// assert_eq!(ModelArchitecture::Mistral.config_name(), "mistral");
/// assert_eq!(ModelArchitecture::Phi3.config_name(), "phi3");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum ModelArchitecture {
    Mistral,
    #[default]
    Llama,
    /// Phi-1.5 / Phi-2.
    Phi,
    Phi3,
    /// Qwen2 and Qwen2.5.
    Qwen,
    Qwen3,
    Gemma,
    Gemma2,
    Gemma3,
}

impl ModelArchitecture {
    /// The `model_type` of a Hugging Face config.json.
    pub fn config_name(&self) -> &'static str {
        match self {
            Self::Mistral => "mistral",
            Self::Llama => "llama",
            Self::Phi => "phi",
            Self::Phi3 => "phi3",
            Self::Qwen => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma => "gemma",
            Self::Gemma2 => "gemma2",
            Self::Gemma3 => "gemma3_text",
        }
    }

    /// Guesses the family from a model id or file name.
    pub fn detect_from_model_id(model_id: &str) -> Option<Self> {
        let l = model_id.to_lowercase();
        let has = |s: &str| l.contains(s);
        Some(if has("phi-3") || has("phi3") {
            Self::Phi3
        } else if has("phi") {
            Self::Phi
        } else if has("gemma-3") || has("gemma3") {
            Self::Gemma3
        } else if has("gemma-2") || has("gemma2") {
            Self::Gemma2
        } else if has("gemma") {
            Self::Gemma
        } else if has("mistral") || has("codestral") {
            Self::Mistral
        } else if has("qwen3") {
            Self::Qwen3
        } else if has("qwen") {
            Self::Qwen
        } else if has("llama") || has("smollm") {
            Self::Llama
        } else {
            return None;
        })
    }

    /// Whether the family's usual checkpoints share KV heads between query
    /// heads (Phi-2 and Phi-3-mini do not).
    pub fn uses_gqa(&self) -> bool {
        !matches!(self, Self::Phi | Self::Phi3)
    }

    /// Whether the family uses sliding-window attention (in some or all layers).
    pub fn uses_sliding_window(&self) -> bool {
        self.default_sliding_window().is_some()
    }

    /// The window of the family's usual checkpoints; the model file's own
    /// value is what runs.
    pub fn default_sliding_window(&self) -> Option<usize> {
        match self {
            Self::Mistral | Self::Gemma2 => Some(4096),
            Self::Phi3 => Some(2048),
            // The Gemma 3 report's local window (the 270M and 1B use 512).
            Self::Gemma3 => Some(1024),
            _ => None,
        }
    }

    fn from_family(f: crate::model::Family) -> Self {
        use crate::model::Family as F;
        match f {
            F::Llama => Self::Llama,
            F::Mistral => Self::Mistral,
            F::Qwen2 => Self::Qwen,
            F::Qwen3 => Self::Qwen3,
            F::Phi3 => Self::Phi3,
            F::Phi2 => Self::Phi,
            F::Gemma => Self::Gemma,
            F::Gemma2 => Self::Gemma2,
            F::Gemma3 => Self::Gemma3,
        }
    }
}

/// Weight formats: one variant per GGML type this runtime reads.
///
/// ```
/// use ruvllm::backends::Quantization;
/// let quant = Quantization::Q4K;
/// assert_eq!(quant.bytes_per_weight(), 0.5625); // 4.5 bits: 4-bit values plus block scales
/// assert!(quant.is_gguf());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum Quantization {
    /// F32, unquantized.
    None,
    F16,
    Bf16,
    /// Q8_0.
    Q8,
    /// Q4_K.
    #[default]
    Q4K,
    /// Q4_0.
    Q4,
    /// Q2_K.
    Q2K,
    Q4_1,
    Q5_0,
    Q5_1,
    /// Q3_K.
    Q3K,
    /// Q5_K.
    Q5K,
    /// Q6_K.
    Q6K,
}

impl Quantization {
    /// Storage per weight, block scales included (Q4_0 and Q4_K: 4.5 bits).
    pub fn bytes_per_weight(&self) -> f32 {
        let t = self.ggml_type();
        t.type_size() as f32 / t.block_size() as f32
    }

    /// Whether this is one of GGUF's block-quantized formats.
    pub fn is_gguf(&self) -> bool {
        self.ggml_type().is_quantized()
    }

    pub(crate) fn ggml_type(self) -> GgmlType {
        match self {
            Self::None => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::Bf16 => GgmlType::BF16,
            Self::Q8 => GgmlType::Q8_0,
            Self::Q4K => GgmlType::Q4K,
            Self::Q4 => GgmlType::Q4_0,
            Self::Q2K => GgmlType::Q2K,
            Self::Q4_1 => GgmlType::Q4_1,
            Self::Q5_0 => GgmlType::Q5_0,
            Self::Q5_1 => GgmlType::Q5_1,
            Self::Q3K => GgmlType::Q3K,
            Self::Q5K => GgmlType::Q5K,
            Self::Q6K => GgmlType::Q6K,
        }
    }

    pub(crate) fn from_ggml_type(t: GgmlType) -> Self {
        match t {
            GgmlType::F32 => Self::None,
            GgmlType::F16 => Self::F16,
            GgmlType::BF16 => Self::Bf16,
            GgmlType::Q8_0 => Self::Q8,
            GgmlType::Q4K => Self::Q4K,
            GgmlType::Q4_0 => Self::Q4,
            GgmlType::Q2K => Self::Q2K,
            GgmlType::Q4_1 => Self::Q4_1,
            GgmlType::Q5_0 => Self::Q5_0,
            GgmlType::Q5_1 => Self::Q5_1,
            GgmlType::Q3K => Self::Q3K,
            GgmlType::Q5K => Self::Q5K,
            GgmlType::Q6K => Self::Q6K,
        }
    }
}

/// Where the model runs. This build runs on the CPU only; the others are
/// refused by `load_model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum DeviceType {
    #[default]
    Cpu,
    Metal,
    Cuda(usize),
}

/// How the KV cache stores keys and values (activations are f32 on the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum DType {
    /// Exact.
    F32,
    /// Half the memory; what llama.cpp and `ruvllm serve` use.
    #[default]
    F16,
    /// Not implemented: refused by `load_model`.
    Bf16,
}

/// How to load a model. Every field is honoured or refused by `load_model`
/// with an error saying why; none is ignored.
///
/// ```
/// use ruvllm::backends::{DType, DeviceType, ModelArchitecture, ModelConfig, Quantization};
/// let config = ModelConfig {
///     architecture: ModelArchitecture::Mistral,
///     quantization: Some(Quantization::Q4K),
///     use_flash_attention: true,
///     max_sequence_length: 8192,
///     device: DeviceType::Cpu,
///     dtype: DType::F16,
///     ..Default::default()
/// };
/// ```
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The family the caller expects. `Llama`, the default, accepts any
    /// family; another value must match the file's (`Mistral` also accepts
    /// files labelled llama, as Mistral GGUFs usually are).
    pub architecture: ModelArchitecture,
    /// The weight format to run. `None` keeps the weights as stored.
    /// `Some(q)` with `q` the file's (dominant) format is the same; asking
    /// for `Q8` from unquantized (F32/F16/BF16) weights quantizes them to
    /// Q8_0 at load (in-situ quantization, round-to-nearest as llama.cpp);
    /// any other conversion is refused as not implemented.
    pub quantization: Option<Quantization>,
    /// Attention here is always memory-efficient: per token and KV head over
    /// the paged cache, memory linear in the context, never its square. So
    /// `true` (the default) is what runs; `false` is refused.
    pub use_flash_attention: bool,
    /// Longest sequence (prompt + output) to reserve KV cache for; capped by
    /// the model's own context ([`ModelInfo::max_context_length`] says what
    /// was granted). Must be at least 1.
    pub max_sequence_length: usize,
    /// `num_kv_heads` to `sliding_window` describe the model: `Some(v)`
    /// asserts the file's value and a different one is refused (they cannot
    /// change a trained model).
    pub num_kv_heads: Option<usize>,
    pub hidden_size: Option<usize>,
    pub num_layers: Option<usize>,
    pub vocab_size: Option<usize>,
    pub rope_theta: Option<f64>,
    pub sliding_window: Option<usize>,
    /// Only [`DeviceType::Cpu`] runs in this build.
    pub device: DeviceType,
    /// The KV cache's element type: F16 (default) or F32; BF16 is refused.
    pub dtype: DType,
    /// Worker threads; None uses every core.
    pub num_threads: Option<usize>,
}

impl Default for ModelConfig {
    /// The original's defaults, except `quantization: None` (load the file
    /// as stored rather than demand Q4_K) and the CPU device.
    fn default() -> Self {
        ModelConfig {
            architecture: ModelArchitecture::default(),
            quantization: None,
            use_flash_attention: true,
            max_sequence_length: crate::engine::DEFAULT_MAX_CONTEXT,
            num_kv_heads: None,
            hidden_size: None,
            num_layers: None,
            vocab_size: None,
            rope_theta: None,
            sliding_window: None,
            device: DeviceType::default(),
            dtype: DType::default(),
            num_threads: None,
        }
    }
}

/// Sampling and stopping parameters, built with the `with_*` methods.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 0 disables.
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    /// Generation stops before any of these strings; they are not emitted.
    pub stop_sequences: Vec<String>,
    pub seed: Option<u64>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        let s = SamplingParams::default();
        GenerateParams {
            max_tokens: 256,
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            min_p: s.min_p,
            repetition_penalty: 1.1,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            stop_sequences: Vec::new(),
            seed: None,
        }
    }
}

impl GenerateParams {
    pub fn with_max_tokens(mut self, v: usize) -> Self {
        self.max_tokens = v;
        self
    }
    pub fn with_temperature(mut self, v: f32) -> Self {
        self.temperature = v;
        self
    }
    pub fn with_top_p(mut self, v: f32) -> Self {
        self.top_p = v;
        self
    }
    pub fn with_top_k(mut self, v: usize) -> Self {
        self.top_k = v;
        self
    }
    pub fn with_min_p(mut self, v: f32) -> Self {
        self.min_p = v;
        self
    }
    pub fn with_repetition_penalty(mut self, v: f32) -> Self {
        self.repetition_penalty = v;
        self
    }
    pub fn with_frequency_penalty(mut self, v: f32) -> Self {
        self.frequency_penalty = v;
        self
    }
    pub fn with_presence_penalty(mut self, v: f32) -> Self {
        self.presence_penalty = v;
        self
    }
    pub fn with_logit_bias(mut self, token: u32, bias: f32) -> Self {
        self.logit_bias.push((token, bias));
        self
    }
    pub fn with_stop_sequence(mut self, stop: impl Into<String>) -> Self {
        self.stop_sequences.push(stop.into());
        self
    }
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            logit_bias: self.logit_bias.clone(),
            seed: self.seed,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GeneratedToken {
    pub id: u32,
    /// Text this token completes (may be empty while a character or a
    /// possible stop string is pending).
    pub text: String,
    /// Natural log of the token's probability under the model (the softmax
    /// of its raw logits, before temperature and penalties). `None` only on
    /// the event that flushes held-back text after an end-of-sequence token.
    pub logprob: Option<f32>,
    /// A control token (BOS, EOS, end of turn...).
    pub is_special: bool,
}

#[derive(Debug, Clone)]
pub enum StreamEvent {
    Token(GeneratedToken),
    /// The generation ended (stop, length or end of sequence).
    Done {
        /// Tokens generated, an end-of-sequence token included.
        total_tokens: usize,
        /// From submission to the last token.
        duration_ms: u64,
        /// Decoding speed after the first token.
        tokens_per_second: f64,
    },
    Error(String),
}

/// Text ↔ token ids.
pub trait Tokenizer: Send + Sync {
    /// Encodes with the model's BOS/EOS rules; special-token text becomes special tokens.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Decodes, dropping control tokens.
    fn decode(&self, tokens: &[u32]) -> Result<String>;
    fn vocab_size(&self) -> usize;
    fn special_tokens(&self) -> SpecialTokens;
}

#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub unk_token_id: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: ModelArchitecture,
    pub num_parameters: usize,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    /// The longest sequence a request may reach: the model's context,
    /// capped by [`ModelConfig::max_sequence_length`] and the KV cache.
    pub max_context_length: usize,
    /// The format holding most of the weights, as stored or as quantized
    /// at load (`Some(Quantization::None)` for F32).
    pub quantization: Option<Quantization>,
    /// Bytes of weights (memory-mapped ones included).
    pub memory_usage: usize,
}

/// An inference backend.
pub trait LlmBackend: Send + Sync {
    /// Loads a GGUF file or a Hugging Face folder (config.json + safetensors).
    fn load_model(&mut self, model_id: &str, config: ModelConfig) -> Result<()>;
    /// Generates a completion of `prompt` (raw text, no chat template).
    fn generate(&self, prompt: &str, params: GenerateParams) -> Result<String>;
    /// Tokens as an iterator (each item arrives as it is produced).
    fn generate_stream(
        &self,
        prompt: &str,
        params: GenerateParams,
    ) -> Result<Box<dyn Iterator<Item = Result<GeneratedToken>> + Send + '_>>;
    /// Tokens as a [`TokenStream`] of [`StreamEvent`]s.
    fn generate_stream_v2(&self, prompt: &str, params: GenerateParams) -> Result<TokenStream>;
    /// Mean of the final-norm hidden states over the prompt's tokens,
    /// L2-normalised (length `hidden_size`).
    fn get_embeddings(&self, text: &str) -> Result<Vec<f32>>;
    fn tokenizer(&self) -> Option<&dyn Tokenizer>;
    fn is_model_loaded(&self) -> bool;
    fn model_info(&self) -> Option<ModelInfo>;
    fn unload_model(&mut self);
}

/// The best backend this build has: the CPU backend.
pub fn create_backend() -> Box<dyn LlmBackend> {
    Box::new(CpuBackend::new())
}

/// A backend shared between threads (every method but loading takes `&self`).
pub type SharedBackend = Arc<dyn LlmBackend>;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every weight type has its own name: Q5_0 is not Q4, Q6_K is not Q4_K.
    #[test]
    fn quantization_names_each_ggml_type() {
        use GgmlType as G;
        let all = [
            G::F32,
            G::F16,
            G::BF16,
            G::Q4_0,
            G::Q4_1,
            G::Q5_0,
            G::Q5_1,
            G::Q8_0,
            G::Q2K,
            G::Q3K,
            G::Q4K,
            G::Q5K,
            G::Q6K,
        ];
        for t in all {
            let q = Quantization::from_ggml_type(t);
            assert_eq!(q.ggml_type(), t, "{q:?}");
            assert_eq!(q.is_gguf(), t.is_quantized());
        }
    }
}
