//! RoPE scalings of real model families against transformers: tiny models
//! with Llama 3 scaling, YaRN (Qwen2.5), LongRoPE (Phi-3, both factor sets)
//! and Gemma 3's linear-global / plain-local split, as HF folders and as
//! GGUF files, at sequences past their original context
//! (`tests/fixtures/rope/`, built by `scripts/make-rope-fixtures.py`).
//!
//! Bound: |Δlogit| ≤ 1e-3 absolute, on logits of magnitude up to ~11. Each
//! fixture records (`control`) how far the logits move when the scaling is
//! replaced by the mistake it guards against: 2.8 to 10, so a wrong scaling
//! cannot pass.

mod common;
use common::*;
use ruvllm::engine::{Engine, EngineOptions};
use ruvllm::request::GenerationRequest;
use ruvllm::sampling::SamplingParams;
use ruvllm::Error;
use std::path::{Path, PathBuf};

const TOLERANCE: f32 = 1e-3;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/rope")
        .join(name)
}

fn load(path: &Path, context: usize) -> ruvllm::Result<Engine> {
    Engine::load(
        path,
        &EngineOptions {
            threads: 1,
            context: Some(context),
            ..Default::default()
        },
    )
}

/// Every run of `expected.json` through the model at `path`: prefill logits
/// at the recorded rows, the same through the KV cache one token at a time,
/// and the greedy continuation.
fn check_source(path: &Path, expected: &serde_json::Value, what: &str) {
    for run in expected["runs"].as_array().unwrap() {
        let context = run["context"].as_u64().unwrap() as usize;
        let mut e = load(path, context).unwrap_or_else(|err| panic!("{what}: {err}"));
        assert_eq!(e.context(), context, "{what}: context");
        let input = ids(&run["input_ids"]);
        let rows: Vec<usize> = run["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_u64().unwrap() as usize)
            .collect();
        let want = floats(&run["logits"]);
        let what = format!("{what}, {} tokens, context {context}", input.len());

        let got = e.forward_sequence(&input, &rows, false).unwrap().logits;
        let d = max_abs_diff(&got, &want);
        assert!(d <= TOLERANCE, "{what}: logits differ by {d}");

        let vocab = e.model().spec.vocab_size;
        let dec = e.decode_logits(&input).unwrap();
        let dec_rows: Vec<f32> = rows
            .iter()
            .flat_map(|&r| dec[r * vocab..(r + 1) * vocab].iter().copied())
            .collect();
        let d = max_abs_diff(&dec_rows, &want);
        assert!(d <= TOLERANCE, "{what}: cached decode logits differ by {d}");

        let greedy = ids(&run["greedy"]);
        let req = GenerationRequest {
            prompt: input.clone(),
            sampling: SamplingParams::greedy(),
            max_tokens: greedy.len(),
            stop: vec![],
            ignore_eos: true,
            ..Default::default()
        };
        let out = e.generate(&req, &mut |_| true).unwrap();
        assert_eq!(out.tokens, greedy, "{what}: greedy continuation");
    }
}

fn check(name: &str) {
    let dir = fixture(name);
    let expected = read_json(&dir.join("expected.json"));
    check_source(&dir, &expected, &format!("{name} (HF folder)"));
    check_source(
        &dir.join("model.gguf"),
        &expected,
        &format!("{name} (GGUF)"),
    );
}

#[test]
fn llama3_scaling() {
    check("llama3");
}

#[test]
fn qwen2_yarn() {
    check("qwen2-yarn");
}

/// Long factors past the original 64 tokens (context 256), short ones
/// within it (context 64).
#[test]
fn phi3_longrope_long_and_short_factors() {
    check("phi3-longrope");
}

/// Linear factor 8 on the global layer only; the sliding layer keeps base
/// 10000 unscaled.
#[test]
fn gemma3_linear_global_plain_local() {
    check("gemma3-linear");
}

fn expect_unsupported(result: ruvllm::Result<Engine>, name: &str) {
    match result {
        Err(Error::Unsupported(msg)) => {
            assert!(msg.contains(name), "'{msg}' does not name '{name}'")
        }
        Err(other) => panic!("expected Unsupported naming '{name}', got {other}"),
        Ok(_) => panic!("a model with RoPE scaling '{name}' loaded"),
    }
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ruvllm-rope-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn unknown_scaling_in_config_json_is_an_error() {
    let src = fixture("qwen2-yarn");
    let dir = scratch("hf");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let mut cfg = read_json(&dir.join("config.json"));
    cfg["rope_parameters"]["rope_type"] = "xpos".into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    expect_unsupported(load(&dir, 256), "xpos");

    // The transformers 4.x key, on a Gemma 3 layout.
    let mut cfg = read_json(&fixture("gemma3-linear").join("config.json"));
    cfg["rope_scaling"]["rope_type"] = "mrope".into();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture("gemma3-linear").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    expect_unsupported(load(&dir, 256), "mrope");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_scaling_in_gguf_is_an_error() {
    let mut bytes = std::fs::read(fixture("qwen2-yarn").join("model.gguf")).unwrap();
    // The key, its string type (8), length 4, then the value.
    let key = b"qwen2.rope.scaling.type";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the fixture names its scaling type")
        + key.len()
        + 4
        + 8;
    assert_eq!(&bytes[at..at + 4], b"yarn");
    bytes[at..at + 4].copy_from_slice(b"xpos");
    let dir = scratch("gguf");
    let path = dir.join("model.gguf");
    std::fs::write(&path, &bytes).unwrap();
    expect_unsupported(load(&path, 256), "xpos");
    std::fs::remove_dir_all(&dir).unwrap();
}
