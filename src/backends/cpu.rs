//! The CPU backend: the serving engine loop behind the `LlmBackend` API.
//! Every call is a request to the same loop, so concurrent callers are
//! batched together.

use super::*;
use crate::engine::{Engine, EngineOptions};
use crate::engine_loop::{EngineHandle, LoopOptions};
use crate::error::Error;
use crate::kv::KvDtype;
use crate::model::{Family, ModelSpec};
use crate::quant::quantize::ISQ_TYPES;
use crate::request::{GenerationRequest, SeqEvent};
use std::path::Path;

/// The paged KV cache's shape, when the caller sets it
/// ([`MistralBackendConfig::paged_attention`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Paging {
    pub block_size: usize,
    pub blocks: usize,
}

#[derive(Default)]
pub struct CpuBackend {
    engine: Option<EngineHandle>,
    paging: Option<Paging>,
    /// Named adapters (with weights) applied to every request; set through
    /// [`MistralBackend::set_xlora_adapters`].
    mix: std::sync::Mutex<Vec<(String, f32)>>,
    /// Generation is refused while the mix is empty (X-LoRA configured with
    /// learned routing, and neither a checkpoint loaded nor weights given).
    needs_mix: bool,
    /// Requests that ran with adapters, and how often each was used.
    usage: std::sync::Mutex<(u64, std::collections::HashMap<String, u64>)>,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn with_paging(paging: Option<Paging>) -> Self {
        CpuBackend {
            engine: None,
            paging,
            ..Default::default()
        }
    }

    /// Refuse generation until adapter weights are set (see `needs_mix`).
    pub(crate) fn needing_mix(mut self) -> Self {
        self.needs_mix = true;
        self
    }

    /// Requests that ran with adapters, and the uses of each adapter.
    pub(crate) fn usage(&self) -> (u64, std::collections::HashMap<String, u64>) {
        self.usage.lock().map(|u| u.clone()).unwrap_or_default()
    }

    /// The mix for one more request, counted.
    fn mix_for_request(&self) -> Result<Vec<(String, f32)>> {
        let mix = self.mix();
        if mix.is_empty() && self.needs_mix {
            return Err(Error::InvalidRequest(
                "learned X-LoRA routing needs an X-LoRA checkpoint: load one with \
                 load_xlora_adapter(name, folder), or give the adapters' weights with \
                 set_xlora_adapters"
                    .into(),
            ));
        }
        if !mix.is_empty() {
            if let Ok(mut u) = self.usage.lock() {
                u.0 += 1;
                for (n, _) in &mix {
                    *u.1.entry(n.clone()).or_default() += 1;
                }
            }
        }
        Ok(mix)
    }

    /// Loads a LoRA adapter under `name` (see [`EngineHandle::load_adapter`]).
    pub(crate) fn load_adapter(&self, name: &str, path: &Path) -> Result<()> {
        self.engine()?.load_adapter(name, path, 1.0)
    }

    /// The loaded adapters every later request mixes, with their weights.
    pub(crate) fn set_mix(&self, mix: Vec<(String, f32)>) -> Result<()> {
        let loaded = self.engine()?.adapters();
        for (name, w) in &mix {
            if !loaded.contains(name) {
                return Err(Error::NotFound(format!(
                    "no LoRA adapter named '{name}' is loaded"
                )));
            }
            if !w.is_finite() || w.abs() > crate::adapter_registry::MAX_ADAPTER_WEIGHT {
                return Err(Error::InvalidRequest(format!(
                    "adapter weight {w} of '{name}' is not a finite number within ±1000"
                )));
            }
        }
        *self.lock_mix() = mix;
        Ok(())
    }

    pub(crate) fn mix(&self) -> Vec<(String, f32)> {
        self.lock_mix().clone()
    }

    /// Names of the loaded adapters.
    pub(crate) fn adapters(&self) -> Vec<String> {
        self.engine
            .as_ref()
            .map(|e| e.adapters())
            .unwrap_or_default()
    }

    fn lock_mix(&self) -> std::sync::MutexGuard<'_, Vec<(String, f32)>> {
        self.mix.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn engine(&self) -> Result<&EngineHandle> {
        self.engine.as_ref().ok_or(Error::NoModel)
    }

    /// Submits one request and blocks until its terminal event.
    fn run_blocking(&self, req: GenerationRequest) -> Result<SeqEvent> {
        let (tx, rx) = std::sync::mpsc::channel();
        let _guard = self.engine()?.submit(
            vec![req],
            vec![Box::new(move |ev| match ev {
                SeqEvent::Token(_) => true,
                ev => tx.send(ev).is_ok(),
            })],
        )?;
        match rx.recv() {
            Ok(SeqEvent::Failed(e)) => Err(e),
            Ok(ev) => Ok(ev),
            Err(_) => Err(Error::Internal("the engine stopped".into())),
        }
    }
}

fn request(
    engine: &EngineHandle,
    prompt: &str,
    params: &GenerateParams,
    adapters: Vec<(String, f32)>,
) -> Result<GenerationRequest> {
    Ok(GenerationRequest {
        adapters,
        prompt: engine.tokenizer.encode(prompt, true)?,
        sampling: params.sampling(),
        max_tokens: params.max_tokens,
        stop: params.stop_sequences.clone(),
        // The chosen token's log-probability, for GeneratedToken::logprob.
        logprobs: Some(0),
        ..Default::default()
    })
}

/// The engine options `config` asks for, or why they cannot be had.
fn engine_options(config: &ModelConfig, paging: Option<Paging>) -> Result<EngineOptions> {
    if config.device != DeviceType::Cpu {
        return Err(Error::NotImplemented(format!(
            "device {:?}: this build runs on the CPU only",
            config.device
        )));
    }
    if !config.use_flash_attention {
        return Err(Error::NotImplemented(
            "use_flash_attention = false: the only attention kernel here is the \
             memory-efficient one (linear in the context)"
                .into(),
        ));
    }
    if config.max_sequence_length == 0 {
        return Err(Error::InvalidRequest(
            "max_sequence_length must be at least 1".into(),
        ));
    }
    let kv_dtype = match config.dtype {
        DType::F32 => KvDtype::F32,
        DType::F16 => KvDtype::F16,
        DType::Bf16 => {
            return Err(Error::NotImplemented(
                "dtype Bf16: the KV cache stores F16 or F32".into(),
            ))
        }
    };
    let mut opts = EngineOptions {
        threads: config
            .num_threads
            .unwrap_or_else(crate::engine::default_threads),
        context: Some(config.max_sequence_length),
        kv_dtype,
        ..Default::default()
    };
    if let Some(p) = paging {
        opts.block_size = p.block_size;
        opts.kv_blocks = Some(p.blocks);
    }
    Ok(opts)
}

/// Refuses a model whose description contradicts `config`'s.
fn check_description(config: &ModelConfig, spec: &ModelSpec) -> Result<()> {
    let family = ModelArchitecture::from_family(spec.family);
    let arch_ok = match config.architecture {
        ModelArchitecture::Llama => true,
        ModelArchitecture::Mistral => matches!(spec.family, Family::Mistral | Family::Llama),
        a => a == family,
    };
    if !arch_ok {
        return Err(Error::InvalidRequest(format!(
            "ModelConfig.architecture is {:?} but the model is {family:?} ({})",
            config.architecture,
            spec.family.name()
        )));
    }
    let sizes = [
        ("num_kv_heads", config.num_kv_heads, spec.n_kv_heads),
        ("hidden_size", config.hidden_size, spec.hidden),
        ("num_layers", config.num_layers, spec.n_layers),
        ("vocab_size", config.vocab_size, spec.vocab_size),
    ];
    for (name, want, have) in sizes {
        if want.is_some_and(|w| w != have) {
            return Err(Error::InvalidRequest(format!(
                "ModelConfig.{name} is {} but the model has {have}",
                want.unwrap_or_default()
            )));
        }
    }
    if let Some(t) = config.rope_theta {
        // The file stores the base as f32.
        if t as f32 != spec.rope.theta {
            return Err(Error::InvalidRequest(format!(
                "ModelConfig.rope_theta is {t} but the model's is {}",
                spec.rope.theta
            )));
        }
    }
    if config.sliding_window.is_some() && config.sliding_window != spec.sliding_window {
        return Err(Error::InvalidRequest(format!(
            "ModelConfig.sliding_window is {:?} but the model's is {:?}",
            config.sliding_window, spec.sliding_window
        )));
    }
    Ok(())
}

/// Brings the weights to the format `config` asks for, or says why not.
fn apply_quantization(engine: &mut Engine, want: Option<Quantization>) -> Result<()> {
    let Some(want) = want else {
        return Ok(());
    };
    let target = want.ggml_type();
    let have = engine
        .model()
        .dominant_type()
        .ok_or_else(|| Error::Internal("the model has no weight matrices".into()))?;
    if have == target {
        return Ok(());
    }
    if have.is_quantized() {
        return Err(Error::NotImplemented(format!(
            "quantization {want:?}: the weights are stored as {}, and converting \
             quantized weights at load is not implemented (load a {} file instead)",
            have.name(),
            target.name()
        )));
    }
    if !ISQ_TYPES.contains(&target) {
        let available: Vec<&str> = ISQ_TYPES.iter().map(|t| t.name()).collect();
        return Err(Error::NotImplemented(format!(
            "in-situ quantization of {} weights to {} (available: {}; or load a file \
             quantized to {})",
            have.name(),
            target.name(),
            available.join(", "),
            target.name()
        )));
    }
    engine.quantize_weights(target);
    // K-quant rows that are not whole blocks of 256 take llama-quantize's
    // fallback type, which may then hold most of the parameters.
    match engine.model().dominant_type() {
        Some(t) if t.is_quantized() => Ok(()),
        _ => Err(Error::Unsupported(format!(
            "the model's matrices cannot be quantized to {}: their rows are not \
             multiples of {} values",
            target.name(),
            target.block_size()
        ))),
    }
}

impl LlmBackend for CpuBackend {
    fn load_model(&mut self, model_id: &str, config: ModelConfig) -> Result<()> {
        let opts = engine_options(&config, self.paging)?;
        let path = Path::new(model_id);
        if !path.exists() {
            return Err(Error::InvalidRequest(format!(
                "model '{model_id}' is not a local file or folder (loading from a hub is not supported)"
            )));
        }
        let mut engine = Engine::load(path, &opts)?;
        check_description(&config, &engine.model().spec)?;
        apply_quantization(&mut engine, config.quantization)?;
        if engine.context() < config.max_sequence_length {
            tracing::info!(
                asked = config.max_sequence_length,
                granted = engine.context(),
                "max_sequence_length capped by the model's context and the KV cache"
            );
        }
        self.engine = Some(EngineHandle::spawn(
            engine,
            LoopOptions::default(),
            opts.max_num_seqs,
        )?);
        Ok(())
    }

    fn generate(&self, prompt: &str, params: GenerateParams) -> Result<String> {
        let req = request(self.engine()?, prompt, &params, self.mix_for_request()?)?;
        match self.run_blocking(req)? {
            SeqEvent::Finished(s) => Ok(s.text),
            _ => Err(Error::Internal("unexpected event".into())),
        }
    }

    fn generate_stream(
        &self,
        prompt: &str,
        params: GenerateParams,
    ) -> Result<Box<dyn Iterator<Item = Result<GeneratedToken>> + Send + '_>> {
        let stream = self.generate_stream_v2(prompt, params)?;
        Ok(Box::new(Iterator::filter_map(stream, |ev| match ev {
            Ok(StreamEvent::Token(t)) => Some(Ok(t)),
            Ok(StreamEvent::Error(e)) => Some(Err(Error::InvalidRequest(e))),
            Ok(StreamEvent::Done { .. }) => None,
            Err(e) => Some(Err(e)),
        })))
    }

    fn generate_stream_v2(&self, prompt: &str, params: GenerateParams) -> Result<TokenStream> {
        let engine = self.engine()?;
        let req = request(engine, prompt, &params, self.mix_for_request()?)?;
        let (tx, stream) = TokenStream::waking_channel();
        let tok = engine.tokenizer.clone();
        let sink = Box::new(move |ev: SeqEvent| {
            let ev = match ev {
                SeqEvent::Token(t) => StreamEvent::Token(GeneratedToken {
                    id: t.id,
                    is_special: tok.is_control(t.id),
                    logprob: t.logprobs.map(|l| l.logprob),
                    text: t.text,
                }),
                SeqEvent::Finished(s) => StreamEvent::Done {
                    total_tokens: s.tokens.len(),
                    duration_ms: ((s.prefill_secs + s.decode_secs) * 1000.0) as u64,
                    tokens_per_second: if s.decode_secs > 0.0 {
                        s.tokens.len().saturating_sub(1) as f64 / s.decode_secs
                    } else {
                        0.0
                    },
                },
                SeqEvent::Failed(e) => StreamEvent::Error(e.to_string()),
                SeqEvent::Embedding { .. } | SeqEvent::PromptLogprobs(_) => return true,
            };
            tx.send(ev)
        });
        // Invalid requests fail this call, not the stream.
        let guard = engine.submit(vec![req], vec![sink])?;
        Ok(stream.with_guard(guard))
    }

    fn get_embeddings(&self, text: &str) -> Result<Vec<f32>> {
        let engine = self.engine()?;
        let prompt = engine.tokenizer.encode(text, true)?;
        if prompt.is_empty() {
            return Err(Error::InvalidRequest("cannot embed empty text".into()));
        }
        let req = GenerationRequest {
            prompt,
            embed: true,
            ..Default::default()
        };
        match self.run_blocking(req)? {
            SeqEvent::Embedding { vector, .. } => Ok(vector),
            _ => Err(Error::Internal("unexpected event".into())),
        }
    }

    fn tokenizer(&self) -> Option<&dyn Tokenizer> {
        self.engine
            .as_ref()
            .map(|e| e.tokenizer.as_ref() as &dyn Tokenizer)
    }

    fn is_model_loaded(&self) -> bool {
        self.engine.is_some()
    }

    fn model_info(&self) -> Option<ModelInfo> {
        let m = &self.engine.as_ref()?.model;
        let s = &m.spec;
        Some(ModelInfo {
            name: m.name.clone(),
            architecture: ModelArchitecture::from_family(s.family),
            num_parameters: m.n_params,
            vocab_size: s.vocab_size,
            hidden_size: s.hidden,
            num_layers: s.n_layers,
            max_context_length: m.context,
            quantization: m.dominant_type.map(Quantization::from_ggml_type),
            memory_usage: m.weight_bytes,
        })
    }

    fn unload_model(&mut self) {
        self.engine = None;
        self.lock_mix().clear();
    }
}

/// The original's name for its Rust-native backend: here, the CPU backend.
#[derive(Default)]
pub struct CandleBackend(CpuBackend);

impl CandleBackend {
    /// Never fails; the `Result` is the original's signature.
    pub fn new() -> Result<Self> {
        Ok(Self::default())
    }
}

/// Implements [`LlmBackend`] for a wrapper by forwarding to its `CpuBackend`
/// field, except `load_model`, which goes to the wrapper's own `load`.
macro_rules! forward_backend {
    ($ty:ty, $field:tt) => {
        impl LlmBackend for $ty {
            fn load_model(&mut self, model_id: &str, config: ModelConfig) -> Result<()> {
                self.load(model_id, config)
            }
            fn generate(&self, prompt: &str, params: GenerateParams) -> Result<String> {
                self.$field.generate(prompt, params)
            }
            fn generate_stream(
                &self,
                prompt: &str,
                params: GenerateParams,
            ) -> Result<Box<dyn Iterator<Item = Result<GeneratedToken>> + Send + '_>> {
                self.$field.generate_stream(prompt, params)
            }
            fn generate_stream_v2(
                &self,
                prompt: &str,
                params: GenerateParams,
            ) -> Result<TokenStream> {
                self.$field.generate_stream_v2(prompt, params)
            }
            fn get_embeddings(&self, text: &str) -> Result<Vec<f32>> {
                self.$field.get_embeddings(text)
            }
            fn tokenizer(&self) -> Option<&dyn Tokenizer> {
                self.$field.tokenizer()
            }
            fn is_model_loaded(&self) -> bool {
                self.$field.is_model_loaded()
            }
            fn model_info(&self) -> Option<ModelInfo> {
                self.$field.model_info()
            }
            fn unload_model(&mut self) {
                self.$field.unload_model()
            }
        }
    };
}
pub(crate) use forward_backend;

impl CandleBackend {
    fn load(&mut self, model_id: &str, config: ModelConfig) -> Result<()> {
        self.0.load_model(model_id, config)
    }
}

forward_backend!(CandleBackend, 0);

impl Tokenizer for crate::tokenizer::Tokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        crate::tokenizer::Tokenizer::encode(self, text, true)
    }
    fn decode(&self, tokens: &[u32]) -> Result<String> {
        Ok(crate::tokenizer::Tokenizer::decode(self, tokens, false))
    }
    fn vocab_size(&self) -> usize {
        crate::tokenizer::Tokenizer::vocab_size(self)
    }
    fn special_tokens(&self) -> SpecialTokens {
        SpecialTokens {
            bos_token_id: self.special.bos,
            eos_token_id: self.special.eos,
            pad_token_id: self.special.pad,
            unk_token_id: self.special.unk,
        }
    }
}
