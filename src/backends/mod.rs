//! The public library API, with the names of the original ruvllm `backends`
//! module: [`LlmBackend`], [`ModelConfig`], [`GenerateParams`],
//! [`TokenStream`] and friends. [`create_backend`] returns the CPU backend.
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

mod cpu;

pub use cpu::CpuBackend;

use crate::error::Result;
use crate::sampling::SamplingParams;
use futures::channel::mpsc;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Model families. `Qwen` covers Qwen2; the others are as named.
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

    /// Whether the family's usual checkpoints group query heads over fewer KV heads.
    pub fn uses_gqa(&self) -> bool {
        !matches!(self, Self::Phi)
    }

    /// Whether the family uses sliding-window attention (in some or all layers).
    pub fn uses_sliding_window(&self) -> bool {
        matches!(
            self,
            Self::Mistral | Self::Phi3 | Self::Gemma2 | Self::Gemma3
        )
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

/// Weight formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Quantization {
    None,
    F16,
    Bf16,
    /// 8-bit (Q8_0).
    Q8,
    /// 4-bit K-quants (Q4_K).
    Q4K,
    /// 4-bit legacy (Q4_0 / Q4_1).
    Q4,
    /// 2-bit K-quants.
    Q2K,
}

impl Quantization {
    pub fn bytes_per_weight(&self) -> f32 {
        match self {
            Self::None => 4.0,
            Self::F16 | Self::Bf16 => 2.0,
            Self::Q8 => 1.0625,
            Self::Q4K => 0.5625,
            Self::Q4 => 0.5625,
            Self::Q2K => 0.328125,
        }
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self, Self::Q8 | Self::Q4K | Self::Q4 | Self::Q2K)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeviceType {
    Cpu,
    Metal,
    Cuda(usize),
}

impl Default for DeviceType {
    /// The best device this build can run on: the CPU.
    fn default() -> Self {
        DeviceType::Cpu
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum DType {
    /// Activations are computed in f32 on the CPU.
    #[default]
    F32,
    F16,
    Bf16,
}

/// How to load a model. Fields describing the architecture are hints only:
/// the model file's own metadata wins.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: ModelArchitecture,
    /// In-situ quantization of unquantized (F32/F16/BF16) weights at load.
    /// Quantized GGUF weights are always used as stored. `None` keeps all
    /// weights as stored; only `Q8` is implemented.
    pub quantization: Option<Quantization>,
    pub use_flash_attention: bool,
    /// Tokens of context to reserve KV cache for (capped by the model's).
    pub max_sequence_length: usize,
    pub num_kv_heads: Option<usize>,
    pub hidden_size: Option<usize>,
    pub num_layers: Option<usize>,
    pub vocab_size: Option<usize>,
    pub rope_theta: Option<f64>,
    pub sliding_window: Option<usize>,
    pub device: DeviceType,
    pub dtype: DType,
    /// Worker threads; None uses every core.
    pub num_threads: Option<usize>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            architecture: ModelArchitecture::default(),
            quantization: None,
            use_flash_attention: false,
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
    pub logprob: Option<f32>,
    pub is_special: bool,
}

#[derive(Debug, Clone)]
pub enum StreamEvent {
    Token(GeneratedToken),
    Done {
        total_tokens: usize,
        duration_ms: u64,
        tokens_per_second: f64,
    },
    Error(String),
}

/// Tokens as they are produced. Use it as a blocking `Iterator` or as an
/// async `futures::Stream`; the stream's task is woken only when an event
/// arrives. Dropping the stream cancels the generation.
pub struct TokenStream {
    rx: mpsc::UnboundedReceiver<StreamEvent>,
    /// Cancels the generation when the stream is dropped.
    _guard: Option<crate::engine_loop::RequestGuard>,
    finished: bool,
    start: Instant,
    tokens: usize,
}

impl TokenStream {
    pub fn channel() -> (mpsc::UnboundedSender<StreamEvent>, Self) {
        let (tx, rx) = mpsc::unbounded();
        (
            tx,
            TokenStream {
                rx,
                _guard: None,
                finished: false,
                start: Instant::now(),
                tokens: 0,
            },
        )
    }

    /// Ties the generation's lifetime to the stream's.
    pub(crate) fn with_guard(mut self, guard: crate::engine_loop::RequestGuard) -> Self {
        self._guard = Some(guard);
        self
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }
    pub fn tokens_received(&self) -> usize {
        self.tokens
    }
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
    pub fn tokens_per_second(&self) -> f64 {
        let s = self.elapsed().as_secs_f64();
        if s > 0.0 {
            self.tokens as f64 / s
        } else {
            0.0
        }
    }

    fn note(&mut self, ev: Option<StreamEvent>) -> Option<Result<StreamEvent>> {
        match ev {
            Some(ev) => {
                match &ev {
                    StreamEvent::Token(_) => self.tokens += 1,
                    StreamEvent::Done { .. } | StreamEvent::Error(_) => self.finished = true,
                }
                Some(Ok(ev))
            }
            None => {
                self.finished = true;
                None
            }
        }
    }

    /// The next event if one is ready, without blocking.
    pub fn try_next(&mut self) -> Option<Result<StreamEvent>> {
        if self.finished {
            return None;
        }
        match self.rx.try_recv() {
            Ok(ev) => self.note(Some(ev)),
            Err(mpsc::TryRecvError::Closed) => self.note(None),
            Err(mpsc::TryRecvError::Empty) => None,
        }
    }
}

impl Iterator for TokenStream {
    type Item = Result<StreamEvent>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let ev = futures::executor::block_on(self.rx.next());
        self.note(ev)
    }
}

impl futures::Stream for TokenStream {
    type Item = Result<StreamEvent>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.rx.poll_next_unpin(cx) {
            Poll::Ready(ev) => Poll::Ready(self.note(ev)),
            Poll::Pending => Poll::Pending,
        }
    }
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
    pub max_context_length: usize,
    /// The dominant weight format, when the weights are quantized.
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
