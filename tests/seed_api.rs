//! A program written against the original ruvllm `backends` module, using
//! every name it defines (Apple- and mistral.rs-internal ones aside) the way
//! its doc comments do, plus what each promises: `recv_timeout` times out
//! and delivers, the async stream ends and is woken only by events, the
//! log-probabilities are the model's.

mod common;
use common::*;
use futures::{Stream, StreamExt};
use ruvllm::backends::async_stream;
use ruvllm::backends::{
    create_backend, AsyncTokenStream, CandleBackend, DType, DeviceType, GenerateParams,
    GeneratedToken, IsqConfig, IsqMethod, LlmBackend, LlmBackendAsync, MistralBackend,
    MistralBackendConfig, ModelArchitecture, ModelConfig, ModelInfo, NoopBackend,
    PagedAttentionConfigExt, Quantization, SharedBackend, SpecialTokens, StreamEvent, TokenStream,
    Tokenizer, XLoraConfig, XLoraManager, XLoraManagerStats, XLoraMixingMode,
};
use ruvllm::Error;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

fn fixture(p: &str) -> String {
    fixtures().join(p).to_string_lossy().into_owned()
}

/// Small and exact: one thread, an f32 KV cache.
fn config() -> ModelConfig {
    ModelConfig {
        dtype: DType::F32,
        num_threads: Some(1),
        ..Default::default()
    }
}

fn greedy(n: usize) -> GenerateParams {
    GenerateParams::default()
        .with_temperature(0.0)
        .with_repetition_penalty(1.0)
        .with_max_tokens(n)
}

#[test]
fn module_doc_candle_example() -> ruvllm::Result<()> {
    let mut backend = CandleBackend::new()?;
    let config = ModelConfig {
        architecture: ModelArchitecture::Mistral,
        quantization: Some(Quantization::Q4K),
        use_flash_attention: true,
        ..Default::default()
    };
    // No hub downloads: a clear error, not a panic.
    let err = backend
        .load_model("mistralai/Mistral-7B-v0.1", config.clone())
        .unwrap_err();
    assert!(err.to_string().contains("not a local file"), "{err}");
    // Q2_K from F32 weights is not implemented, and says so.
    let q2k = ModelConfig {
        quantization: Some(Quantization::Q2K),
        ..config.clone()
    };
    let err = backend
        .load_model(&fixture("mistral/model-f32.gguf"), q2k)
        .unwrap_err();
    assert!(matches!(err, Error::NotImplemented(_)), "{err}");
    // Q4_K is quantized in situ (the fixture's rows of 64 are not whole
    // blocks of 256 and take llama-quantize's fallback, Q5_0).
    let config = ModelConfig {
        num_threads: Some(1),
        ..config
    };
    backend.load_model(&fixture("mistral/model-f32.gguf"), config)?;
    let params = GenerateParams::default()
        .with_max_tokens(256)
        .with_temperature(0.7);
    let _response: String = backend.generate("Hello, world!", params)?;
    let info = backend.model_info().unwrap();
    assert_eq!(
        (info.architecture, info.quantization),
        (ModelArchitecture::Llama, Some(Quantization::Q5_0)),
        "mistral's GGUF is labelled llama; its weights took Q4_K's fallback"
    );
    Ok(())
}

#[test]
fn module_doc_mistral_example() -> ruvllm::Result<()> {
    // The module doc's X-LoRA example, on the tiny llama and the two PEFT
    // adapters of the mixing fixture: PEFT's greedy tokens for 0.7/0.3.
    let xlora = MistralBackendConfig::default()
        .with_paged_attention(16, 4096)
        .with_xlora_adapters(vec!["code", "chat"]);
    let mut backend = MistralBackend::with_config(xlora)?;
    backend.load_model(&fixture("llama"), config())?;
    let mix = read_json(&fixtures().join("llama/lora_mix/expected.json"));
    let prompt = read_json(&fixtures().join("llama/expected.json"))["prompt_text"].clone();
    let prompt = prompt.as_str().unwrap();
    // Learned routing (the default) needs a checkpoint: without one, or
    // weights, no text.
    assert!(matches!(
        backend.generate(prompt, greedy(4)),
        Err(Error::InvalidRequest(_))
    ));
    backend.load_xlora_adapter("code", Path::new(&fixture("llama/lora_mix/code")))?;
    backend.load_xlora_adapter("chat", Path::new(&fixture("llama/lora_mix/chat")))?;
    assert!(backend
        .load_xlora_adapter("other", Path::new(&fixture("llama/lora")))
        .is_err());
    backend.set_xlora_adapters(vec![("code", 0.7), ("chat", 0.3)])?;
    let response = backend.generate(prompt, greedy(16))?;
    let case = mix["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["weights"]["code"] == 0.7)
        .unwrap();
    let want_ids = ids(&case["greedy"]);
    let tok = ruvllm::tokenizer::Tokenizer::from_hf_dir(&fixtures().join("llama"))?;
    assert_eq!(response, tok.decode(&want_ids, false), "PEFT's 0.7/0.3 mix");
    let stats = backend.xlora_stats().unwrap();
    assert_eq!((stats.loaded_adapters, stats.forward_count), (2, 1));
    assert_eq!(stats.adapter_usage["chat"], 1);
    assert!(backend
        .set_xlora_adapters(vec![("code", f32::NAN)])
        .is_err());
    assert!(backend.set_xlora_adapters(vec![("nope", 1.0)]).is_err());
    // Other mixing modes are refused up front, not ignored.
    let mut gated = MistralBackendConfig::default().with_xlora_adapters(vec!["code"]);
    gated.xlora.as_mut().unwrap().mixing_mode = XLoraMixingMode::Gated;
    assert!(matches!(
        MistralBackend::with_config(gated),
        Err(Error::NotImplemented(_))
    ));

    let config = MistralBackendConfig::default().with_paged_attention(16, 4096);
    let mut backend = MistralBackend::with_config(config)?;
    backend.load_model(&fixture("mistral"), config_for_mistral())?;
    // Without X-LoRA configured, its calls say so.
    assert!(backend
        .load_xlora_adapter("code", Path::new("./adapters/code"))
        .is_err());
    assert!(backend.xlora_stats().is_none());
    let expected = read_json(&fixtures().join("mistral/expected.json"));
    let response = backend.generate(expected["prompt_text"].as_str().unwrap(), greedy(16))?;
    assert_eq!(response, expected["greedy_text"].as_str().unwrap());

    // The paging is honoured: 8 blocks of 4 tokens hold a 32-token context.
    let mut small =
        MistralBackend::with_config(MistralBackendConfig::default().with_paged_attention(4, 8))?;
    small.load_model(&fixture("mistral"), config_for_mistral())?;
    assert_eq!(small.model_info().unwrap().max_context_length, 32);
    assert!(MistralBackend::with_config(
        MistralBackendConfig::default().with_paged_attention(0, 8)
    )
    .is_err());

    // ISQ: 8-bit round-to-nearest is what ModelConfig.quantization = Q8 does.
    let isq = MistralBackendConfig {
        isq: Some(IsqConfig {
            bits: 8,
            method: IsqMethod::RTN,
        }),
        ..Default::default()
    };
    let mut b = MistralBackend::with_config(isq)?;
    b.load_model(&fixture("mistral"), config_for_mistral())?;
    assert_eq!(b.model_info().unwrap().quantization, Some(Quantization::Q8));
    for bad in [
        MistralBackendConfig::default().with_isq(8), // AWQ by default
        MistralBackendConfig::default().with_isq(4),
    ] {
        assert!(matches!(
            MistralBackend::with_config(bad),
            Err(Error::NotImplemented(_))
        ));
    }
    Ok(())
}

fn config_for_mistral() -> ModelConfig {
    ModelConfig {
        architecture: ModelArchitecture::Mistral,
        ..config()
    }
}

#[test]
fn xlora_names_exist_and_refuse() {
    let cfg = XLoraConfig {
        adapter_names: vec!["code".into()],
        mixing_mode: XLoraMixingMode::Gated,
        ..Default::default()
    };
    let manager = XLoraManager::new(cfg);
    assert!(matches!(
        manager.load_adapter("code", Path::new("/nowhere")),
        Err(Error::NotImplemented(_))
    ));
    assert!(manager.set_active(vec![("code", 1.0)]).is_err());
    assert!(manager.unload_adapter("code").is_err());
    let stats: XLoraManagerStats = manager.stats();
    assert_eq!(stats.loaded_adapters, 0);
    assert_eq!(XLoraMixingMode::default(), XLoraMixingMode::Additive);
    let pa = PagedAttentionConfigExt::default();
    assert_eq!((pa.block_size, pa.max_pages), (16, 4096));
    assert_eq!(IsqConfig::default().method, IsqMethod::AWQ);
}

#[test]
fn architecture_quantization_and_defaults() {
    let arch = ModelArchitecture::Mistral;
    assert_eq!(arch.config_name(), "mistral");
    let phi3 = ModelArchitecture::Phi3;
    assert_eq!(phi3.config_name(), "phi3");
    assert_eq!(ModelArchitecture::Llama.config_name(), "llama");
    assert_eq!(ModelArchitecture::Qwen.config_name(), "qwen2");
    assert_eq!(ModelArchitecture::default(), ModelArchitecture::Llama);
    assert_eq!(
        ModelArchitecture::detect_from_model_id("mistralai/Codestral-22B"),
        Some(ModelArchitecture::Mistral)
    );
    assert_eq!(
        ModelArchitecture::detect_from_model_id("google/gemma-2-9b"),
        Some(ModelArchitecture::Gemma2)
    );
    assert_eq!(
        ModelArchitecture::detect_from_model_id("microsoft/phi-2"),
        Some(ModelArchitecture::Phi)
    );
    assert_eq!(ModelArchitecture::detect_from_model_id("bert-base"), None);
    assert!(ModelArchitecture::Llama.uses_gqa() && !ModelArchitecture::Phi3.uses_gqa());
    assert!(ModelArchitecture::Gemma2.uses_sliding_window());
    assert!(!ModelArchitecture::Qwen.uses_sliding_window());
    assert_eq!(
        ModelArchitecture::Mistral.default_sliding_window(),
        Some(4096)
    );
    assert_eq!(ModelArchitecture::Phi3.default_sliding_window(), Some(2048));
    assert_eq!(ModelArchitecture::Llama.default_sliding_window(), None);

    // Storage per weight, block scales included (Q4_K: 144 bytes per 256).
    let quant = Quantization::Q4K;
    assert_eq!(quant.bytes_per_weight(), 144.0 / 256.0);
    assert!(quant.is_gguf());
    assert_eq!(Quantization::None.bytes_per_weight(), 4.0);
    assert_eq!(Quantization::F16.bytes_per_weight(), 2.0);
    assert_eq!(Quantization::Q8.bytes_per_weight(), 34.0 / 32.0);
    assert_eq!(Quantization::Q4.bytes_per_weight(), 18.0 / 32.0);
    assert_eq!(Quantization::Bf16.bytes_per_weight(), 2.0);
    assert!(!Quantization::Bf16.is_gguf() && Quantization::Q4.is_gguf());
    assert!(!Quantization::F16.is_gguf() && Quantization::Q2K.is_gguf());
    assert_eq!(Quantization::default(), Quantization::Q4K);

    let c = ModelConfig::default();
    assert_eq!(c.architecture, ModelArchitecture::Llama);
    assert!(c.use_flash_attention);
    assert_eq!(c.max_sequence_length, 4096);
    assert_eq!(c.quantization, None, "load files as stored");
    assert_eq!((c.device, c.dtype), (DeviceType::Cpu, DType::F16));
    assert_eq!(DType::default(), DType::F16);

    let p = GenerateParams::default();
    assert_eq!(
        (p.max_tokens, p.temperature, p.top_p, p.top_k),
        (256, 0.7, 0.9, 40)
    );
    assert_eq!(
        (
            p.repetition_penalty,
            p.frequency_penalty,
            p.presence_penalty
        ),
        (1.1, 0.0, 0.0)
    );
    assert!(p.stop_sequences.is_empty() && p.seed.is_none());
    // The builders, as in GenerateParams' doc.
    let creative = GenerateParams::default()
        .with_max_tokens(512)
        .with_temperature(0.9)
        .with_top_p(0.95)
        .with_top_k(50);
    assert_eq!(
        (
            creative.max_tokens,
            creative.temperature,
            creative.top_p,
            creative.top_k
        ),
        (512, 0.9, 0.95, 50)
    );
    let code = GenerateParams::default()
        .with_max_tokens(256)
        .with_temperature(0.2)
        .with_top_p(0.9)
        .with_repetition_penalty(1.2)
        .with_stop_sequence("\n\n");
    assert_eq!(code.repetition_penalty, 1.2);
    assert_eq!(code.stop_sequences, vec!["\n\n".to_string()]);
    let deterministic = GenerateParams::default()
        .with_temperature(0.0)
        .with_seed(42);
    assert_eq!(deterministic.seed, Some(42));
}

/// Every config field is honoured or refused; none is ignored.
#[test]
fn model_config_fields_are_honoured_or_refused() {
    let model = fixture("llama/model-f32.gguf");
    let load = |c: ModelConfig| {
        let mut b = create_backend();
        b.load_model(&model, c).map(|_| b)
    };
    // ModelConfig's own doc example asks for Metal: not in this build.
    let metal = ModelConfig {
        architecture: ModelArchitecture::Mistral,
        quantization: Some(Quantization::Q4K),
        use_flash_attention: true,
        max_sequence_length: 8192,
        device: DeviceType::Metal,
        ..Default::default()
    };
    assert!(matches!(load(metal), Err(Error::NotImplemented(_))));
    for bad in [
        ModelConfig {
            device: DeviceType::Cuda(0),
            ..config()
        },
        ModelConfig {
            use_flash_attention: false,
            ..config()
        },
        ModelConfig {
            dtype: DType::Bf16,
            ..config()
        },
    ] {
        assert!(matches!(load(bad), Err(Error::NotImplemented(_))));
    }
    // What describes the model must match the file (llama: 64 hidden, 2
    // layers, 2 KV heads, vocab 512, RoPE base 500000, no window).
    for bad in [
        ModelConfig {
            architecture: ModelArchitecture::Gemma,
            ..config()
        },
        ModelConfig {
            hidden_size: Some(128),
            ..config()
        },
        ModelConfig {
            num_layers: Some(3),
            ..config()
        },
        ModelConfig {
            num_kv_heads: Some(4),
            ..config()
        },
        ModelConfig {
            vocab_size: Some(32000),
            ..config()
        },
        ModelConfig {
            rope_theta: Some(10000.0),
            ..config()
        },
        ModelConfig {
            sliding_window: Some(8),
            ..config()
        },
        ModelConfig {
            max_sequence_length: 0,
            ..config()
        },
    ] {
        let err = load(bad.clone()).err().expect("refused");
        assert!(matches!(err, Error::InvalidRequest(_)), "{bad:?}: {err}");
    }
    let good = ModelConfig {
        architecture: ModelArchitecture::Llama,
        hidden_size: Some(64),
        num_layers: Some(2),
        num_kv_heads: Some(2),
        vocab_size: Some(512),
        rope_theta: Some(500000.0),
        quantization: Some(Quantization::None),
        max_sequence_length: 100,
        ..config()
    };
    let b = load(good).unwrap();
    // max_sequence_length is the context: 100 tokens, not the model's 256.
    assert_eq!(b.model_info().unwrap().max_context_length, 100);
    // A prompt between 100 and 256 tokens no longer fits.
    let mut long = String::new();
    while b.tokenizer().unwrap().encode(&long).unwrap().len() <= 100 {
        long.push_str("the quick brown fox ");
    }
    assert!(b.tokenizer().unwrap().encode(&long).unwrap().len() < 200);
    assert!(b.generate(&long, greedy(4)).is_err());
    assert!(b.generate("the quick brown fox", greedy(4)).is_ok());
    // Asking for more than the model has is capped at the model's.
    let b = load(ModelConfig {
        max_sequence_length: 100_000,
        ..config()
    })
    .unwrap();
    assert_eq!(b.model_info().unwrap().max_context_length, 256);
    // A sliding window that matches is accepted.
    let mut m = create_backend();
    m.load_model(
        &fixture("mistral/model-f32.gguf"),
        ModelConfig {
            sliding_window: Some(8),
            ..config()
        },
    )
    .unwrap();

    // dtype is the KV cache's: F16 changes the numbers a little, F32 not at all.
    let expected = read_json(&fixtures().join("llama/expected.json"));
    let prompt = expected["prompt_text"].as_str().unwrap();
    let lp = |dtype| {
        let b = load(ModelConfig { dtype, ..config() }).unwrap();
        b.generate_stream(prompt, greedy(16))
            .unwrap()
            .map(|t| t.unwrap().logprob.unwrap())
            .collect::<Vec<f32>>()
    };
    let (f32_lp, f16_lp) = (lp(DType::F32), lp(DType::F16));
    assert_eq!(f32_lp, lp(DType::F32));
    assert_ne!(f32_lp, f16_lp);
    assert!(max_abs_diff(&f32_lp, &f16_lp) < 0.05);
}

/// `ModelInfo.quantization` names the stored type.
#[test]
fn model_info_names_the_real_weight_type() {
    for (file, want) in [
        ("llama/model-f32.gguf", Quantization::None),
        ("llama/model-q8_0.gguf", Quantization::Q8),
        ("SmolLM2-135M-Instruct.Q4_1.gguf", Quantization::Q4_1),
        ("gemma-3-270m-q4_k_m.gguf", Quantization::Q8),
    ] {
        let path = if file.contains('/') {
            fixtures().join(file)
        } else {
            models_dir().join(file)
        };
        let mut b = create_backend();
        b.load_model(&path.to_string_lossy(), config()).unwrap();
        let info: ModelInfo = b.model_info().unwrap();
        assert_eq!(info.quantization, Some(want), "{file}");
        if file.starts_with("SmolLM2") {
            // The file's general.name.
            assert_eq!(info.name, "Smollm2 135M 8k Lc100K Mix1 Ep2");
        } else {
            assert!(!info.name.is_empty(), "{file}");
        }
        assert!(info.memory_usage > 0 && info.num_parameters > 0);
    }
}

#[test]
fn llm_backend_doc_example_and_logprobs() -> ruvllm::Result<()> {
    let mut backend = create_backend();
    let config = ModelConfig::default();
    backend.load_model(
        &fixture("llama/model-f32.gguf"),
        ModelConfig {
            dtype: DType::F32,
            ..config
        },
    )?;
    assert!(backend.is_model_loaded());
    let params = GenerateParams::default().with_max_tokens(100);
    let _response: String = backend.generate("Hello, ", params)?;

    let expected = read_json(&fixtures().join("llama/expected.json"));
    let prompt = expected["prompt_text"].as_str().unwrap();
    let mut stream = backend.generate_stream_v2(prompt, greedy(16))?;
    let mut tokens: Vec<GeneratedToken> = Vec::new();
    let mut done = None;
    for event in &mut stream {
        match event? {
            StreamEvent::Token(t) => tokens.push(t),
            StreamEvent::Done {
                total_tokens,
                tokens_per_second,
                duration_ms,
            } => done = Some((total_tokens, tokens_per_second, duration_ms)),
            StreamEvent::Error(e) => panic!("Error: {e}"),
        }
    }
    let (total, _, _) = done.expect("a Done event");
    assert_eq!(total, 16);
    assert!(stream.is_finished());
    assert_eq!(stream.tokens_received(), 16);
    assert!(stream.tokens_per_second() > 0.0);
    assert!(stream.elapsed() > Duration::ZERO);
    let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
    assert_eq!(ids, common::ids(&expected["greedy"]));
    assert!(tokens.iter().all(|t| !t.is_special));

    // Each logprob is the log-softmax of the model's logits at that step:
    // against a full uncached forward of prompt + tokens, and against
    // transformers' own logits for the first and the last token.
    let input = common::ids(&expected["input_ids"]);
    let mut seq = input.clone();
    seq.extend(&ids[..15]);
    let mut e = engine(&fixtures().join("llama/model-f32.gguf"), 1);
    let rows: Vec<usize> = (input.len() - 1..seq.len()).collect();
    let logits = e.forward_sequence(&seq, &rows, false)?.logits;
    let vocab = 512;
    let ref_first = &floats(&expected["logits"])[(input.len() - 1) * vocab..];
    let ref_last = floats(&expected["greedy_logits_last"]);
    for (i, t) in tokens.iter().enumerate() {
        let lp = t.logprob.expect("logprob is filled in");
        assert!(lp <= 0.0, "{lp}");
        let want = log_softmax_at(&logits[i * vocab..(i + 1) * vocab], t.id);
        assert!((lp - want).abs() < 1e-4, "token {i}: {lp} vs {want}");
    }
    let first = log_softmax_at(&ref_first[..vocab], ids[0]);
    let last = log_softmax_at(&ref_last, ids[15]);
    assert!((tokens[0].logprob.unwrap() - first).abs() < 2e-4);
    assert!((tokens[15].logprob.unwrap() - last).abs() < 2e-4);

    let tokenizer: &dyn Tokenizer = backend.tokenizer().unwrap();
    assert_eq!(tokenizer.encode(prompt)?, input);
    assert_eq!(tokenizer.vocab_size(), 512);
    let special: SpecialTokens = tokenizer.special_tokens();
    // The fixture's tokenizer.json: <s> 0, </s> 1, <unk> 2, <pad> 3.
    assert_eq!(
        (
            special.bos_token_id,
            special.eos_token_id,
            special.unk_token_id,
            special.pad_token_id
        ),
        (Some(0), Some(1), Some(2), Some(3))
    );
    let none = SpecialTokens::default();
    assert!(
        none.bos_token_id.is_none() && none.pad_token_id.is_none() && none.unk_token_id.is_none()
    );
    assert_eq!(
        tokenizer.decode(&ids)?,
        expected["greedy_text"].as_str().unwrap()
    );
    let legacy: Vec<u32> = backend
        .generate_stream(prompt, greedy(16))?
        .map(|t| t.map(|t| t.id))
        .collect::<ruvllm::Result<_>>()?;
    assert_eq!(legacy, ids);
    assert_eq!(backend.get_embeddings(prompt)?.len(), 64);
    let info = backend.model_info().unwrap();
    assert_eq!(
        (info.vocab_size, info.hidden_size, info.num_layers),
        (512, 64, 2)
    );
    backend.unload_model();
    assert!(!backend.is_model_loaded() && backend.model_info().is_none());
    assert!(matches!(
        backend.generate("x", GenerateParams::default()),
        Err(Error::NoModel)
    ));
    Ok(())
}

fn log_softmax_at(logits: &[f32], id: u32) -> f32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
    logits[id as usize] - max - sum.ln() as f32
}

fn handle_event(ev: StreamEvent, seen: &mut Vec<StreamEvent>) {
    seen.push(ev);
}

#[test]
fn token_stream_polling_and_timeouts() -> ruvllm::Result<()> {
    // recv_timeout times out when nothing comes...
    let (tx, mut stream) = TokenStream::channel();
    let t0 = Instant::now();
    assert!(stream.recv_timeout(Duration::from_millis(50)).is_none());
    assert!(t0.elapsed() >= Duration::from_millis(50));
    assert!(!stream.is_finished());
    assert!(stream.try_next().is_none());
    // ...and returns events as they come.
    let producer = std::thread::spawn(move || {
        for id in 0..3 {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(token(id)).unwrap();
        }
        tx.send(StreamEvent::Done {
            total_tokens: 3,
            duration_ms: 60,
            tokens_per_second: 50.0,
        })
        .unwrap();
    });
    let mut seen = Vec::new();
    while let Some(event) = stream.recv_timeout(Duration::from_secs(5)) {
        handle_event(event?, &mut seen);
    }
    producer.join().unwrap();
    assert_eq!(seen.len(), 4);
    assert!(stream.is_finished() && stream.tokens_received() == 3);
    assert!(stream.tokens_per_second() > 0.0);

    // try_next: what is there, without blocking.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut stream = TokenStream::new(rx);
    tx.send(token(1)).unwrap();
    tx.send(token(2)).unwrap();
    let mut seen = Vec::new();
    while let Some(event) = stream.try_next() {
        handle_event(event?, &mut seen);
    }
    assert_eq!(seen.len(), 2);
    assert!(!stream.is_finished(), "the sender is still there");
    drop(tx);
    assert!(stream.try_next().is_none() && stream.is_finished());

    // A real generation, polled: every token arrives, then Done.
    let mut backend = create_backend();
    backend.load_model(&fixture("llama/model-f32.gguf"), config())?;
    let mut stream = backend.generate_stream_v2("The quick", greedy(8))?;
    let mut seen = Vec::new();
    while !stream.is_finished() {
        if let Some(event) = stream.recv_timeout(Duration::from_millis(100)) {
            handle_event(event?, &mut seen);
        }
    }
    assert_eq!(stream.tokens_received(), 8);
    assert!(matches!(
        seen.last(),
        Some(StreamEvent::Done {
            total_tokens: 8,
            ..
        })
    ));
    Ok(())
}

fn token(id: u32) -> StreamEvent {
    StreamEvent::Token(GeneratedToken {
        id,
        text: format!("t{id}"),
        logprob: Some(-1.0),
        is_special: false,
    })
}

/// Counts wake-ups and lets the polling thread sleep until one comes.
#[derive(Default)]
struct CountingWaker {
    wakes: AtomicUsize,
    flag: Mutex<bool>,
    cv: Condvar,
}

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
        *self.flag.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

/// Drives `stream` to its end on this thread; returns the events and how
/// many polls found nothing ready.
fn drive(mut stream: AsyncTokenStream) -> (Vec<StreamEvent>, usize, AsyncTokenStream) {
    let w = Arc::new(CountingWaker::default());
    let waker = Waker::from(w.clone());
    let mut cx = Context::from_waker(&waker);
    let (mut events, mut pending) = (Vec::new(), 0);
    loop {
        match Pin::new(&mut stream).poll_next(&mut cx) {
            Poll::Ready(Some(ev)) => events.push(ev.unwrap()),
            Poll::Ready(None) => break,
            Poll::Pending => {
                pending += 1;
                let mut woken = w.flag.lock().unwrap();
                while !*woken {
                    let (g, timeout) = w.cv.wait_timeout(woken, Duration::from_secs(10)).unwrap();
                    woken = g;
                    assert!(!timeout.timed_out(), "never woken: the stream hangs");
                }
                *woken = false;
            }
        }
    }
    (events, pending, stream)
}

#[test]
fn async_token_stream_ends_and_wakes_only_on_events() -> ruvllm::Result<()> {
    let mut backend = create_backend();
    backend.load_model(&fixture("llama/model-f32.gguf"), config())?;
    let stream = AsyncTokenStream::new(backend.generate_stream_v2("The quick", greedy(16))?);
    let (events, pending, stream) = drive(stream);
    assert_eq!(events.len(), 17, "16 tokens and Done");
    assert!(stream.is_finished() && stream.tokens_received() == 16);
    assert!(stream.tokens_per_second() > 0.0);
    // A busy-polling stream wakes itself on every empty poll; this one only
    // when an event is sent (at most once per event, plus the end).
    assert!(pending <= events.len() + 2, "{pending} empty polls");

    // A plain channel whose producer pauses between events: the task sleeps
    // through the pauses instead of spinning.
    let (tx, plain) = TokenStream::channel();
    let producer = std::thread::spawn(move || {
        for id in 0..3 {
            std::thread::sleep(Duration::from_millis(30));
            tx.send(token(id)).unwrap();
        }
    });
    let (events, pending, stream) = drive(async_stream::AsyncTokenStream::new(plain));
    producer.join().unwrap();
    assert_eq!(events.len(), 3);
    assert!(stream.is_finished());
    assert!(pending <= events.len() + 2, "{pending} empty polls");

    // LlmBackendAsync, under an executor, as the original's async example.
    let text: String = futures::executor::block_on(async {
        let mut stream = backend
            .generate_stream_async("The quick", greedy(16))
            .await?;
        let mut text = String::new();
        while let Some(event) = stream.next().await {
            if let StreamEvent::Token(t) = event? {
                text.push_str(&t.text);
            }
        }
        Ok::<_, Error>(text)
    })?;
    assert_eq!(text, backend.generate("The quick", greedy(16))?);
    Ok(())
}

/// The seed's learned routing: an X-LoRA checkpoint loaded by name runs
/// every later generation under its classifier, giving PEFT's tokens.
#[test]
fn learned_xlora_routing_through_the_seed_api() -> ruvllm::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/xlora/layerwise");
    let expected = read_json(&dir.join("expected.json"));
    let config_x = MistralBackendConfig::default()
        .with_paged_attention(16, 4096)
        .with_xlora_adapters(vec!["mix"]);
    let mut backend = MistralBackend::with_config(config_x)?;
    backend.load_model(&fixture("llama/model-f32.gguf"), config())?;
    let tok = ruvllm::tokenizer::Tokenizer::from_hf_dir(&fixtures().join("llama"))?;
    let prompt = ids(&expected["greedy"]["prompt"]);
    let text = tok.decode(&prompt[1..], false);
    assert_eq!(
        tok.encode(&text, true)?,
        prompt,
        "the prompt text round-trips"
    );
    assert!(
        backend.generate(&text, greedy(8)).is_err(),
        "no checkpoint yet"
    );
    backend.load_xlora_adapter("mix", &dir)?;
    let want = tok.decode(&ids(&expected["greedy"]["tokens"]), false);
    assert_eq!(
        backend.generate(&text, greedy(8))?,
        want,
        "PEFT's X-LoRA tokens"
    );
    let stats = backend.xlora_stats().unwrap();
    assert_eq!((stats.loaded_adapters, stats.forward_count), (1, 1));
    // The name is taken; a checkpoint cannot load twice.
    assert!(matches!(
        backend.load_xlora_adapter("mix", &dir),
        Err(Error::InvalidRequest(_))
    ));
    Ok(())
}

#[test]
fn noop_and_shared_backends() -> ruvllm::Result<()> {
    let mut noop = NoopBackend;
    assert!(matches!(
        noop.load_model("x", ModelConfig::default()),
        Err(Error::NotImplemented(_))
    ));
    assert!(noop.generate("x", GenerateParams::default()).is_err());
    assert!(noop
        .generate_stream("x", GenerateParams::default())
        .is_err());
    assert!(noop
        .generate_stream_v2("x", GenerateParams::default())
        .is_err());
    assert!(noop.get_embeddings("x").is_err());
    assert!(noop.tokenizer().is_none() && !noop.is_model_loaded() && noop.model_info().is_none());
    noop.unload_model();

    // A backend shared by threads: concurrent calls are batched by one engine
    // and each gets what it would get alone.
    let mut backend = create_backend();
    backend.load_model(&fixture("llama/model-f32.gguf"), config())?;
    let shared: SharedBackend = Arc::from(backend);
    let alone = shared.generate("The quick", greedy(12))?;
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let b = shared.clone();
            std::thread::spawn(move || b.generate("The quick", greedy(12)))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap()?, alone);
    }
    Ok(())
}
