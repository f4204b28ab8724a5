//! `ruvllm perplexity` against llama.cpp's `llama-perplexity` on the default
//! models (figures in tests/fixtures/llama-perplexity.json, recorded by
//! scripts/make-perplexity-fixture.sh).

mod common;
use common::*;
use std::path::Path;

/// Our perplexity after `windows` windows of 512 tokens, as JSON.
fn ours(model: &str, windows: usize, extra: &[&str]) -> serde_json::Value {
    let mut args: Vec<std::ffi::OsString> = vec![
        "-c".into(),
        "512".into(),
        "--chunks".into(),
        windows.to_string().into(),
        "-m".into(),
        models_dir().join(model).into(),
        "-f".into(),
        fixtures().join("../text/licenses-gpl3-apache2.txt").into(),
    ];
    args.extend(extra.iter().map(|a| a.into()));
    perplexity_json(&args)
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

#[test]
fn quantized_kv_caches_lose_no_more_than_llama_cpps() {
    let reference = read_json(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama-perplexity.json"),
    );
    let want = |model: &str, kv: &str, windows: usize| {
        let r = &reference["models"][model];
        let running = if kv == "f16" {
            &r["running"]
        } else {
            &r["kv"][kv]
        };
        running[windows - 1].as_f64().unwrap()
    };
    let rel = |a: f64, b: f64| (a - b) / b;

    // Q8_0 is within 0.5% of f16 keys and values, and of llama.cpp's Q8_0.
    let smol = "SmolLM2-135M-Instruct.Q4_1.gguf";
    let got = ours(smol, 4, &["--kv-dtype", "q8_0"])["ppl"]
        .as_f64()
        .unwrap();
    for kv in ["f16", "q8_0"] {
        let r = rel(got, want(smol, kv, 4));
        assert!(
            r.abs() <= 0.005,
            "q8_0 KV: perplexity {got}, llama.cpp's with {kv} KV {} ({:+.2}%)",
            want(smol, kv, 4),
            r * 100.0
        );
    }
    // Q4_0 costs more (both models' keys have outlier channels); it must
    // cost no more than llama.cpp's Q4_0 cache does. Gemma 3's heads of 256
    // take the larger key rotation.
    for (model, windows) in [(smol, 4), ("gemma-3-270m-q4_k_m.gguf", 2)] {
        let got = ours(model, windows, &["--kv-dtype", "q4_0"])["ppl"]
            .as_f64()
            .unwrap();
        // It is quantized at all: 4 bits cost these models over 2%.
        assert!(
            rel(got, want(model, "f16", windows)) > 0.02,
            "{model}: q4_0 KV perplexity {got} is as good as f16's"
        );
        let r = rel(got, want(model, "q4_0", windows));
        assert!(
            r <= 0.01,
            "{model}: q4_0 KV perplexity {got}, llama.cpp's {} ({:+.2}%)",
            want(model, "q4_0", windows),
            r * 100.0
        );
    }
}
