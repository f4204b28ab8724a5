//! The CPU backend: the serving engine loop behind the `LlmBackend` API.
//! Every call is a request to the same loop, so concurrent callers are
//! batched together.

use super::*;
use crate::engine::{Engine, EngineOptions, GenerationRequest, SeqEvent};
use crate::engine_loop::{EngineHandle, LoopOptions};
use crate::error::Error;
use crate::quant::GgmlType;
use std::path::Path;

#[derive(Default)]
pub struct CpuBackend {
    engine: Option<EngineHandle>,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
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
) -> Result<GenerationRequest> {
    Ok(GenerationRequest {
        prompt: engine.tokenizer.encode(prompt, true)?,
        sampling: params.sampling(),
        max_tokens: params.max_tokens,
        stop: params.stop_sequences.clone(),
        ..Default::default()
    })
}

impl LlmBackend for CpuBackend {
    fn load_model(&mut self, model_id: &str, config: ModelConfig) -> Result<()> {
        if config.device != DeviceType::Cpu {
            return Err(Error::NotImplemented(format!(
                "device {:?}: this build runs on the CPU only",
                config.device
            )));
        }
        let path = Path::new(model_id);
        if !path.exists() {
            return Err(Error::InvalidRequest(format!(
                "model '{model_id}' is not a local file or folder (loading from a hub is not supported)"
            )));
        }
        let opts = EngineOptions {
            threads: config
                .num_threads
                .unwrap_or_else(crate::engine::default_threads),
            context: Some(config.max_sequence_length),
            ..Default::default()
        };
        let mut engine = Engine::load(path, &opts)?;
        match config.quantization {
            None | Some(Quantization::None) => {}
            Some(Quantization::Q8) => engine.model.quantize_unquantized(GgmlType::Q8_0),
            Some(q) => {
                return Err(Error::NotImplemented(format!(
                    "in-situ quantization to {q:?} (Q8 is available; or load a pre-quantized GGUF)"
                )))
            }
        }
        self.engine = Some(EngineHandle::spawn(
            engine,
            LoopOptions::default(),
            opts.max_num_seqs,
        )?);
        Ok(())
    }

    fn generate(&self, prompt: &str, params: GenerateParams) -> Result<String> {
        let req = request(self.engine()?, prompt, &params)?;
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
        let req = request(engine, prompt, &params)?;
        let (tx, stream) = TokenStream::channel();
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
            tx.unbounded_send(ev).is_ok()
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
        let quantization = m.dominant_type.and_then(|t| match t {
            GgmlType::Q8_0 => Some(Quantization::Q8),
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
                Some(Quantization::Q4)
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K | GgmlType::Q3K => {
                Some(Quantization::Q4K)
            }
            GgmlType::Q2K => Some(Quantization::Q2K),
            _ => None,
        });
        Some(ModelInfo {
            name: m.name.clone(),
            architecture: ModelArchitecture::from_family(s.family),
            num_parameters: m.n_params,
            vocab_size: s.vocab_size,
            hidden_size: s.hidden,
            num_layers: s.n_layers,
            max_context_length: s.context_length,
            quantization,
            memory_usage: m.weight_bytes,
        })
    }

    fn unload_model(&mut self) {
        self.engine = None;
    }
}

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
