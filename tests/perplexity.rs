//! `ruvllm perplexity` against llama.cpp's `llama-perplexity` on the default
//! models (figures in tests/fixtures/llama-perplexity.json, recorded by
//! scripts/make-perplexity-fixture.sh).

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// Our perplexity after `windows` windows of 512 tokens, as JSON.
fn ours(model: &str, windows: usize, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ruvllm"))
        .args([
            "perplexity",
            "-c",
            "512",
            "--json",
            "--chunks",
            &windows.to_string(),
        ])
        .arg("-m")
        .arg(models_dir().join(model))
        .arg("-f")
        .arg(fixtures().join("../text/licenses-gpl3-apache2.txt"))
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn perplexity_agrees_with_llama_perplexity_on_the_default_models() {
    let reference = read_json(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-perplexity.json"),
    );
    // A few windows each keep the test short; llama-perplexity's running
    // estimate after the same windows is the reference.
    for (model, windows) in [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", 6),
        ("gemma-3-270m-q4_k_m.gguf", 3),
    ] {
        let want = reference["models"][model]["running"][windows - 1]
            .as_f64()
            .unwrap();
        // llama-perplexity keeps keys and values in f16 by default.
        let got = ours(model, windows, &["--kv-dtype", "f16"]);
        let ppl = got["ppl"].as_f64().unwrap();
        assert_eq!(
            got["tokens"],
            255 * windows as u64,
            "{model}: tokens scored"
        );
        let rel = (ppl - want).abs() / want;
        assert!(
            rel <= 0.005,
            "{model}: perplexity {ppl}, llama-perplexity {want} ({:.2}%)",
            rel * 100.0
        );
    }
}
