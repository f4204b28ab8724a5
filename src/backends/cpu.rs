//! The CPU backend: an [`Engine`] behind a mutex, generations on a thread
//! of their own when streamed.

use super::*;
use crate::engine::{Engine, EngineOptions, GenerationRequest};
use crate::error::Error;
use crate::quant::GgmlType;
use std::path::Path;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct CpuBackend {
    engine: Option<Arc<Mutex<Engine>>>,
    tokenizer: Option<Arc<crate::tokenizer::Tokenizer>>,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }

    fn engine(&self) -> Result<&Arc<Mutex<Engine>>> {
        self.engine.as_ref().ok_or(Error::NoModel)
    }

    fn request(
        engine: &Engine,
        prompt: &str,
        params: &GenerateParams,
    ) -> Result<GenerationRequest> {
        Ok(GenerationRequest {
            prompt: engine.tokenizer.encode(prompt, true)?,
            sampling: params.sampling(),
            max_tokens: params.max_tokens,
            stop: params.stop_sequences.clone(),
            ignore_eos: false,
        })
    }
}

fn lock(e: &Mutex<Engine>) -> std::sync::MutexGuard<'_, Engine> {
    // A panic inside a generation leaves the engine usable: its state is
    // rebuilt per request.
    e.lock().unwrap_or_else(|p| p.into_inner())
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
        self.tokenizer = Some(engine.tokenizer.clone());
        self.engine = Some(Arc::new(Mutex::new(engine)));
        Ok(())
    }

    fn generate(&self, prompt: &str, params: GenerateParams) -> Result<String> {
        let mut e = lock(self.engine()?);
        let req = Self::request(&e, prompt, &params)?;
        Ok(e.generate(&req, &mut |_| true)?.text)
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
        let engine = self.engine()?.clone();
        // Validate up front so bad input fails the call, not the stream.
        let req = {
            let e = lock(&engine);
            let req = Self::request(&e, prompt, &params)?;
            req.sampling.validate(e.model.spec.vocab_size)?;
            req
        };
        let (tx, stream) = TokenStream::channel();
        std::thread::Builder::new()
            .name("ruvllm-generate".into())
            .spawn(move || {
                let mut e = lock(&engine);
                let tok = e.tokenizer.clone();
                let start = Instant::now();
                let r = e.generate(&req, &mut |t| {
                    let ev = StreamEvent::Token(GeneratedToken {
                        id: t.id,
                        text: t.text.clone(),
                        logprob: None,
                        is_special: tok.is_control(t.id),
                    });
                    tx.unbounded_send(ev).is_ok()
                });
                let last = match r {
                    Ok(s) => {
                        let secs = start.elapsed().as_secs_f64();
                        StreamEvent::Done {
                            total_tokens: s.tokens.len(),
                            duration_ms: (secs * 1000.0) as u64,
                            tokens_per_second: if s.decode_secs > 0.0 {
                                s.tokens.len() as f64 / s.decode_secs
                            } else {
                                0.0
                            },
                        }
                    }
                    Err(e) => StreamEvent::Error(e.to_string()),
                };
                let _ = tx.unbounded_send(last);
            })
            .map_err(|e| Error::io("generation thread", e))?;
        Ok(stream)
    }

    fn get_embeddings(&self, text: &str) -> Result<Vec<f32>> {
        let mut e = lock(self.engine()?);
        let ids = e.tokenizer.encode(text, true)?;
        if ids.is_empty() {
            return Err(Error::InvalidRequest("cannot embed empty text".into()));
        }
        let rows: Vec<usize> = (0..ids.len()).collect();
        let out = e.forward_sequence(&ids, &rows, true)?;
        let hidden = out.hidden.expect("asked for hidden states");
        let h = e.model.spec.hidden;
        let mut mean = vec![0f32; h];
        for row in hidden.chunks_exact(h) {
            mean.iter_mut().zip(row).for_each(|(m, v)| *m += v);
        }
        let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            mean.iter_mut().for_each(|v| *v /= norm);
        }
        Ok(mean)
    }

    fn tokenizer(&self) -> Option<&dyn Tokenizer> {
        self.tokenizer.as_deref().map(|t| t as &dyn Tokenizer)
    }

    fn is_model_loaded(&self) -> bool {
        self.engine.is_some()
    }

    fn model_info(&self) -> Option<ModelInfo> {
        let e = lock(self.engine.as_ref()?);
        let s = &e.model.spec;
        let (bytes, _) = e.model.weight_bytes();
        let quantization = e.model.dominant_type().and_then(|t| match t {
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
            name: e.provenance.name.clone(),
            architecture: ModelArchitecture::from_family(s.family),
            num_parameters: e.model.n_params(),
            vocab_size: s.vocab_size,
            hidden_size: s.hidden,
            num_layers: s.n_layers,
            max_context_length: s.context_length,
            quantization,
            memory_usage: bytes,
        })
    }

    fn unload_model(&mut self) {
        self.engine = None;
        self.tokenizer = None;
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
