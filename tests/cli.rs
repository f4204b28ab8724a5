//! The `ruvllm` command line, run as a user would.

mod common;
use common::*;
use std::process::Command;

fn ruvllm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ruvllm"))
        .args(args)
        .output()
        .unwrap()
}

fn fixture(p: &str) -> String {
    fixtures().join(p).to_string_lossy().into_owned()
}

#[test]
fn logits_prints_the_reference_logits_both_ways() {
    let expected = read_json(&fixtures().join("qwen3/expected.json"));
    let tokens: Vec<String> = ids(&expected["input_ids"])
        .iter()
        .map(|t| t.to_string())
        .collect();
    let want = floats(&expected["logits"]);
    for decode in [false, true] {
        let model = fixture("qwen3/model-f32.gguf");
        let mut args = vec!["logits", "--model", &model, "--tokens"];
        let joined = tokens.join(",");
        args.push(&joined);
        if decode {
            args.push("--decode");
        }
        let out = ruvllm(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["logits"].as_array().unwrap().len(), tokens.len());
        let d = max_abs_diff(&floats(&json["logits"]), &want);
        assert!(d <= 1e-3, "decode={decode}: {d}");
    }
}

#[test]
fn tokenize_prints_ids_with_bos_as_the_metadata_says() {
    let cases = read_json(&fixtures().join("tokenizer/cases.json"));
    let model = fixture("llama/model-f32.gguf");
    for case in cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c["text"].as_str().unwrap().is_empty())
    {
        let out = ruvllm(&[
            "tokenize",
            "--model",
            &model,
            "--text",
            case["text"].as_str().unwrap(),
        ]);
        assert!(out.status.success());
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            ids(&json["ids"]),
            ids(&case["ids_with_bos"]),
            "{}",
            case["text"]
        );
    }
}

#[test]
fn info_describes_the_model() {
    let out = ruvllm(&["info", "--model", &fixture("gemma2/model-q8_0.gguf")]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "gemma2",
        "layers:         4",
        "Q8_0",
        "sliding window: 8 tokens on 2 of 4 layers",
    ] {
        assert!(text.contains(needle), "missing '{needle}' in:\n{text}");
    }
}

#[test]
fn damaged_or_missing_models_exit_nonzero_with_a_message() {
    let dir = std::env::temp_dir().join(format!("ruvllm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.gguf");
    let good = std::fs::read(fixtures().join("llama/model-f32.gguf")).unwrap();
    std::fs::write(&bad, &good[..5000]).unwrap();
    let bad = bad.to_string_lossy().into_owned();
    for args in [
        vec!["info", "--model", &bad],
        vec!["logits", "--model", &bad, "--tokens", "1,2"],
    ] {
        let out = ruvllm(&args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid GGUF file"), "{err}");
    }
    let out = ruvllm(&["info", "--model", "/nonexistent/model.gguf"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("model not found"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_tokens_and_parameters_are_errors_not_crashes() {
    let model = fixture("llama/model-f32.gguf");
    let out = ruvllm(&["logits", "--model", &model, "--tokens", "1,99999"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside the vocabulary"));
    let out = ruvllm(&["run", "--model", &model, "--prompt", "hi", "--top-p", "7"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p"));
    let long: String = "the ".repeat(400);
    let out = ruvllm(&["run", "--model", &model, "--prompt", &long]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("context"));
    // The fixture's heads of 16 are not whole blocks of a quantized cache.
    for kv in ["q8_0", "q4_0"] {
        let out = ruvllm(&[
            "logits",
            "--model",
            &model,
            "--tokens",
            "1,2",
            "--kv-dtype",
            kv,
        ]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("not a multiple of 32") && err.contains(kv),
            "{err}"
        );
    }
}

#[test]
fn run_streams_a_seeded_completion_reproducibly() {
    let model = fixture("gemma3/model-q8_0.gguf");
    let args = [
        "run",
        "--model",
        &model,
        "--prompt",
        "The quick",
        "-n",
        "12",
        "--temperature",
        "0.9",
        "--seed",
        "42",
    ];
    let a = ruvllm(&args);
    let b = ruvllm(&args);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
    assert!(a.stdout.len() > 1);
}

/// `--lora` on `logits`: PEFT's logits; on `perplexity`: the perplexity
/// transformers' logits give, with and without the adapter.
#[test]
fn lora_flags_and_perplexity_agree_with_transformers() {
    let lora = fixture("llama/lora");
    let expected = read_json(&fixtures().join("llama/lora/expected.json"));
    let tokens: Vec<String> = ids(&expected["input_ids"])
        .iter()
        .map(|t| t.to_string())
        .collect();
    let model = fixture("llama/model-f32.gguf");
    let joined = tokens.join(",");
    let out = ruvllm(&["logits", "-m", &model, "--lora", &lora, "--tokens", &joined]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = max_abs_diff(&floats(&json["logits"]), &floats(&expected["logits"]));
    assert!(d <= 1e-3, "logits with --lora differ by {d}");

    // Perplexity of the fixture prompt, scored as llama-perplexity scores
    // one window: the text tokenized with BOS (the fixture's 24 input ids),
    // the second half scored.
    let text = std::env::temp_dir().join(format!("ruvllm-ppl-{}.txt", std::process::id()));
    std::fs::write(&text, expected["prompt_text"].as_str().unwrap()).unwrap();
    let text = text.to_string_lossy().into_owned();
    let ppl_of = |logits: &[f32]| {
        let input = ids(&expected["input_ids"]);
        let (n, v) = (input.len(), logits.len() / input.len());
        let mut nll = 0f64;
        for r in n / 2..n - 1 {
            let row = &logits[r * v..(r + 1) * v];
            let max = row.iter().fold(f32::MIN, |m, &x| m.max(x)) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            nll += lse - row[input[r + 1] as usize] as f64;
        }
        (nll / (n - 1 - n / 2) as f64).exp()
    };
    let base = read_json(&fixtures().join("llama/expected.json"));
    for (extra, want) in [
        (vec![], ppl_of(&floats(&base["logits"]))),
        (
            vec!["--lora", lora.as_str()],
            ppl_of(&floats(&expected["logits"])),
        ),
    ] {
        let mut args = vec![
            "perplexity",
            "-m",
            &model,
            "-f",
            &text,
            "--ctx-size",
            "24",
            "--json",
        ];
        args.extend(extra.iter().copied());
        let out = ruvllm(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let got = json["ppl"].as_f64().unwrap();
        assert_eq!(json["tokens"], 11);
        assert!(
            (got - want).abs() <= 1e-3 * want,
            "{extra:?}: perplexity {got}, transformers' logits give {want}"
        );
    }

    // Mistakes are errors with a message.
    for (args, needle) in [
        (
            vec![
                "logits",
                "-m",
                &model,
                "--lora",
                "/no/such/adapter",
                "--tokens",
                "1",
            ],
            "not found",
        ),
        (
            vec![
                "logits",
                "-m",
                &model,
                "--lora",
                &lora,
                "--lora-scale",
                "1",
                "--lora-scale",
                "2",
                "--tokens",
                "1",
            ],
            "--lora-scale",
        ),
        (
            vec!["logits", "-m", &model, "--lora", &model, "--tokens", "1"],
            "adapter",
        ),
        (
            vec!["perplexity", "-m", &model, "-f", &text, "--ctx-size", "100"],
            "fewer than one window",
        ),
    ] {
        let out = ruvllm(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn train_writes_an_adapter_that_changes_what_the_model_says() {
    // Teach the tiny llama a fixed answer in all three data formats, then
    // ask it through `run --lora`: greedy decoding must give the answer the
    // base model does not.
    let dir = std::env::temp_dir().join(format!("ruvllm-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data.jsonl");
    let answer = " the license";
    let lines = [
        serde_json::json!({"prompt": "Read", "completion": answer}),
        serde_json::json!({"text": format!("Read{answer}")}),
        serde_json::json!({"messages": [
            {"role": "user", "content": "Read"},
            {"role": "assistant", "content": answer.trim()}
        ]}),
    ];
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&data, text.join("\n") + "\n").unwrap();
    let model = fixture("llama");
    let out_dir = dir.join("adapter");
    let (data_s, out_s) = (data.to_string_lossy(), out_dir.to_string_lossy());
    let out = ruvllm(&[
        "train", "--model", &model, "--data", &data_s, "-o", &out_s, "--epochs", "30", "--lr",
        "1e-2", "--batch", "3", "--rank", "4", "--json", "-t", "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (before, after) = (
        r["loss_before"].as_f64().unwrap(),
        r["loss_after"].as_f64().unwrap(),
    );
    assert!(after < before / 10.0, "loss {before} -> {after}");
    assert_eq!(r["examples"], 3);
    assert_eq!(r["steps"], 30);
    let say = |lora: bool| {
        let mut args = vec!["run", "--model", &model, "--prompt", "Read", "-n", "3"];
        args.extend(["--temperature", "0"]);
        if lora {
            args.extend(["--lora", &out_s]);
        }
        let out = ruvllm(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (base, tuned) = (say(false), say(true));
    assert!(tuned.starts_with(answer), "with the adapter: {tuned:?}");
    assert!(
        !base.starts_with(answer),
        "the base model already says {base:?}"
    );

    // Mistakes are clear errors.
    std::fs::write(&data, "{\"prompt\": \"x\"}\n").unwrap();
    let out = ruvllm(&["train", "--model", &model, "--data", &data_s, "-o", &out_s]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 1") && err.contains("completion"),
        "{err}"
    );
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n",
    )
    .unwrap();
    let out = ruvllm(&["train", "--model", &model, "--data", &data_s, "-o", &out_s]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("assistant turn"));
    let out = ruvllm(&[
        "train",
        "--model",
        &model,
        "--data",
        &data_s,
        "-o",
        &out_s,
        "--targets",
        "q,bogus",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown LoRA target"));
    std::fs::remove_dir_all(&dir).ok();
}
