//! LoRA adapters against PEFT (`../shared/fixtures/{llama,qwen2}/lora` and
//! `llama/lora_mix`): unmerged application on Hugging Face and GGUF bases,
//! mixing, mixed batches, the prefix cache, and refused files.

mod common;
use common::*;
use ruvllm::adapter_registry::LoraOption;
use ruvllm::engine::{Engine, EngineOptions};
use ruvllm::request::SeqEvent;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

fn with_loras(path: &Path, lora: Vec<LoraOption>) -> ruvllm::Result<Engine> {
    with_loras_threads(path, lora, 2)
}

fn with_loras_threads(
    path: &Path,
    lora: Vec<LoraOption>,
    threads: usize,
) -> ruvllm::Result<Engine> {
    Engine::load(
        path,
        &EngineOptions {
            threads,
            context: Some(512),
            lora,
            ..Default::default()
        },
    )
}

fn always(path: PathBuf, scale: f32) -> LoraOption {
    LoraOption {
        name: None,
        path,
        scale,
    }
}

fn named(name: &str, path: PathBuf) -> LoraOption {
    LoraOption {
        name: Some(name.into()),
        path,
        scale: 1.0,
    }
}

/// Logits of the prompt and the greedy continuation against `expected`.
fn check(e: &mut Engine, expected: &serde_json::Value, logits: &serde_json::Value, what: &str) {
    let input = ids(&expected["input_ids"]);
    let rows: Vec<usize> = (0..input.len()).collect();
    let got = e.forward_sequence(&input, &rows, false).unwrap().logits;
    let d = max_abs_diff(&got, &floats(logits));
    assert!(d <= 1e-3, "{what}: logits differ from PEFT's by {d}");
    let greedy = ids(&expected["greedy"]);
    let out = e
        .generate(&greedy_request(&input, greedy.len()), &mut |_| true)
        .unwrap();
    assert_eq!(out.tokens, greedy, "{what}: greedy continuation");
}

#[test]
fn peft_adapters_match_peft_on_hf_and_gguf_bases() {
    for arch in ["llama", "qwen2"] {
        let dir = fixtures().join(arch);
        let expected = read_json(&dir.join("lora/expected.json"));
        // The GGUF base has llama.cpp's permuted q/k rows (llama): the
        // adapter's B must follow them.
        for base in [dir.clone(), dir.join("model-f32.gguf")] {
            let mut e = with_loras(&base, vec![always(dir.join("lora"), 1.0)]).unwrap();
            check(
                &mut e,
                &expected,
                &expected["logits"],
                &format!("{arch} {}", base.display()),
            );
            let last = {
                let mut all = ids(&expected["input_ids"]);
                let g = ids(&expected["greedy"]);
                all.extend_from_slice(&g[..g.len() - 1]);
                e.decode_logits(&all).unwrap()
            };
            let v = e.model().spec.vocab_size;
            let d = max_abs_diff(
                &last[last.len() - v..],
                &floats(&expected["greedy_logits_last"]),
            );
            assert!(
                d <= 1e-3,
                "{arch}: cached decode with the adapter differs by {d}"
            );
        }
    }
}

/// One thread runs every row of a batch in one piece of work: each row
/// still gets its adapter.
#[test]
fn a_one_thread_pool_adapts_every_row() {
    let dir = fixtures().join("llama");
    let expected = read_json(&dir.join("lora/expected.json"));
    let mut e = with_loras_threads(&dir, vec![always(dir.join("lora"), 1.0)], 1).unwrap();
    check(&mut e, &expected, &expected["logits"], "one thread");
}

#[test]
fn scale_zero_is_the_base_model_and_the_adapter_changes_it() {
    let dir = fixtures().join("llama");
    let base = read_json(&dir.join("expected.json"));
    let mut e = with_loras(&dir, vec![always(dir.join("lora"), 0.0)]).unwrap();
    let input = ids(&base["input_ids"]);
    let rows: Vec<usize> = (0..input.len()).collect();
    let got = e.forward_sequence(&input, &rows, false).unwrap().logits;
    assert!(max_abs_diff(&got, &floats(&base["logits"])) <= 1e-3);
    let lora = read_json(&dir.join("lora/expected.json"));
    assert!(
        max_abs_diff(&floats(&lora["logits"]), &floats(&base["logits"])) > 1.0,
        "the fixture's adapter must move the logits for these tests to mean anything"
    );
}

#[test]
fn mixed_adapters_match_peft_weightings() {
    let dir = fixtures().join("llama");
    let mix = read_json(&dir.join("lora_mix/expected.json"));
    for case in mix["cases"].as_array().unwrap() {
        let w = |k: &str| case["weights"][k].as_f64().unwrap() as f32;
        let what = format!("code {} chat {}", w("code"), w("chat"));
        let expected = serde_json::json!({
            "input_ids": mix["input_ids"],
            "greedy": case["greedy"],
        });
        // Loaded with the weights as scales…
        let mut e = with_loras(
            &dir,
            vec![
                always(dir.join("lora_mix/code"), w("code")),
                always(dir.join("lora_mix/chat"), w("chat")),
            ],
        )
        .unwrap();
        check(&mut e, &expected, &case["logits"], &what);

        // …and chosen per request from named adapters, on the GGUF base.
        let mut e = with_loras(
            &dir.join("model-f32.gguf"),
            vec![
                named("code", dir.join("lora_mix/code")),
                named("chat", dir.join("lora_mix/chat")),
            ],
        )
        .unwrap();
        let greedy = ids(&case["greedy"]);
        let mut req = greedy_request(&ids(&mix["input_ids"]), greedy.len());
        req.adapters = vec![("code".into(), w("code")), ("chat".into(), w("chat"))];
        let out = e.generate(&req, &mut |_| true).unwrap();
        assert_eq!(
            out.tokens, greedy,
            "{what}: per-request mix on the GGUF base"
        );
    }
}

#[test]
fn a_mixed_batch_gives_each_request_what_it_gets_alone() {
    let dir = fixtures().join("llama");
    let load = || {
        with_loras(
            &dir.join("model-f32.gguf"),
            vec![
                named("code", dir.join("lora_mix/code")),
                named("chat", dir.join("lora_mix/chat")),
            ],
        )
        .unwrap()
    };
    let prompt = ids(&read_json(&dir.join("expected.json"))["input_ids"]);
    let reqs = || {
        [
            vec![],
            vec![("code".to_string(), 1.0)],
            vec![("chat".to_string(), 1.0)],
        ]
        .map(|a| {
            let mut r = greedy_request(&prompt, 12);
            r.adapters = a;
            r
        })
    };
    let alone: Vec<Seen> = reqs()
        .into_iter()
        .map(|r| run_together(&mut load(), vec![r]).remove(0))
        .collect();
    let together = run_together(&mut load(), reqs().to_vec());
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.0, t.0, "request {i}: tokens");
        assert_eq!(a.1, t.1, "request {i}: logprobs, bit for bit");
    }
    assert_ne!(
        together[0].0, together[1].0,
        "the adapters must change the output"
    );
    assert_ne!(together[1].0, together[2].0);
}

#[test]
fn an_adapter_never_reuses_another_adapters_cached_prefix() {
    let dir = fixtures().join("llama");
    let mut e = with_loras(
        &dir.join("model-f32.gguf"),
        vec![named("code", dir.join("lora_mix/code"))],
    )
    .unwrap();
    let prompt: Vec<u32> = ids(&read_json(&dir.join("expected.json"))["input_ids"]);
    let base = || greedy_request(&prompt, 4);
    let code = || {
        let mut r = greedy_request(&prompt, 4);
        r.adapters = vec![("code".into(), 1.0)];
        r
    };
    let half = || {
        let mut r = code();
        r.adapters[0].1 = 0.5;
        r
    };
    assert_eq!(run_together(&mut e, vec![base()])[0].2, 0);
    // Same prompt, other adapter (or weight): nothing cached for it yet.
    let first = run_together(&mut e, vec![code()]).remove(0);
    assert_eq!(first.2, 0, "the adapter hit the base model's blocks");
    assert_eq!(
        run_together(&mut e, vec![half()])[0].2,
        0,
        "another weight hit"
    );
    // Same adapter again: its own blocks are reused, with the same result.
    let again = run_together(&mut e, vec![code()]).remove(0);
    assert!(again.2 >= 16, "cached {} tokens", again.2);
    assert_eq!(again.0, first.0);
    // An unknown adapter is refused.
    let mut r = base();
    r.adapters = vec![("nope".into(), 1.0)];
    let (tx, rx) = mpsc::channel();
    let id = e.new_id();
    e.add_request(id, r, None, Box::new(move |ev| tx.send(ev).is_ok()));
    match rx.recv().unwrap() {
        SeqEvent::Failed(err) => assert!(err.to_string().contains("nope"), "{err}"),
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// Writes a copy of the llama adapter with `edit` applied to its tensors
/// (name → (shape, values)) and config.
fn crafted(
    tag: &str,
    edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>, &mut serde_json::Value),
) -> PathBuf {
    let src = fixtures().join("llama/lora");
    let dir = std::env::temp_dir().join(format!("ruvllm-lora-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n, t.shape().to_vec(), v)
        })
        .collect();
    let mut cfg = read_json(&src.join("adapter_config.json"));
    edit(&mut tensors, &mut cfg);
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = raw
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).unwrap();
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    dir
}

#[test]
fn bad_adapters_are_refused_naming_the_problem() {
    let base = fixtures().join("llama");
    let refused = |dir: &Path, needle: &str| {
        let err = match with_loras(&base, vec![always(dir.to_path_buf(), 1.0)]) {
            Ok(_) => panic!("{}: loaded", dir.display()),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(needle),
            "error {err:?} does not mention {needle:?}"
        );
    };
    let q_a = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";
    let q_b = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight";

    // B of another rank than A.
    let d = crafted("rank", |t, _| {
        let b = t.iter_mut().find(|x| x.0 == q_b).unwrap();
        b.1 = vec![64, 2];
        b.2.truncate(128);
    });
    refused(&d, q_b);
    // A for a projection of another width (a different base).
    let d = crafted("shape", |t, _| {
        let a = t.iter_mut().find(|x| x.0 == q_a).unwrap();
        a.1 = vec![4, 32];
        a.2.truncate(128);
    });
    refused(&d, q_a);
    // A module the architecture has no such projection for.
    let d = crafted("module", |t, _| {
        t.push((
            "base_model.model.lm_head.lora_A.weight".into(),
            vec![4, 64],
            vec![0.0; 256],
        ));
    });
    refused(&d, "lm_head");
    let d = crafted("module2", |t, _| {
        for x in t.iter_mut() {
            x.0 = x.0.replace("self_attn.q_proj", "self_attn.qkv_proj");
        }
    });
    refused(&d, "qkv_proj");
    // A without its B, and a layer the base does not have.
    let d = crafted("pair", |t, _| t.retain(|x| x.0 != q_b));
    refused(&d, q_b);
    let d = crafted("layer", |t, _| {
        for x in t.iter_mut() {
            x.0 = x.0.replace("layers.1.", "layers.7.");
        }
    });
    refused(&d, "layer 7");
    // r in the config disagrees with the tensors.
    let d = crafted("r", |_, c| c["r"] = 8.into());
    refused(&d, "r is 8");
    // PEFT's per-module patterns: plain names match the end of the full
    // module name; regular expressions and clashing keys are refused.
    let d = crafted("rankpat", |_, c| {
        c["rank_pattern"] = serde_json::json!({"q_proj": 8})
    });
    refused(&d, "rank_pattern says 8");
    let d = crafted("regex", |_, c| {
        c["alpha_pattern"] = serde_json::json!({"^model.*q_proj": 16})
    });
    refused(&d, "regular expression");
    let d = crafted("clash", |_, c| {
        c["alpha_pattern"] = serde_json::json!({"q_proj": 16, "self_attn.q_proj": 4})
    });
    refused(&d, "several alpha_pattern keys");
    let d = crafted("nan", |t, _| t[0].2[0] = f32::NAN);
    refused(&d, "NaN");
    // Adapter kinds that do more than B·A.
    let d = crafted("dora", |_, c| c["use_dora"] = true.into());
    refused(&d, "DoRA");
    let d = crafted("bias", |_, c| c["bias"] = "all".into());
    refused(&d, "bias");
    // A truncated file.
    let d = crafted("trunc", |_, _| {});
    let f = d.join("adapter_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    refused(&d, "adapter_model.safetensors");
    // A model file is not an adapter.
    refused(&base.join("model-f32.gguf"), "not \"adapter\"");
    // No such folder.
    refused(&base.join("no-such-adapter"), "no-such-adapter");
    // Two adapters under one name.
    let two = with_loras(
        &base,
        vec![named("x", base.join("lora")), named("x", base.join("lora"))],
    );
    assert!(two
        .err()
        .unwrap()
        .to_string()
        .contains("two LoRA adapters are named x"));
}

#[test]
fn rs_lora_scales_by_the_square_root_of_the_rank() {
    // use_rslora: s = alpha / sqrt(r) = 8 / 2 = 4, twice the plain 8 / 4;
    // so the rsLoRA adapter at scale 0.5 is the plain one at scale 1.
    let base = fixtures().join("llama");
    let expected = read_json(&base.join("lora/expected.json"));
    let d = crafted("rslora", |_, c| c["use_rslora"] = true.into());
    let mut e = with_loras(&base, vec![always(d, 0.5)]).unwrap();
    check(
        &mut e,
        &expected,
        &expected["logits"],
        "rsLoRA at half scale",
    );
}

/// `serve --lora NAME=PATH`: requests choose an adapter with `"model"`, and
/// base and adapter requests running together each get PEFT's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_serves_named_adapters_beside_the_base_model() {
    use common::server::{post, start_model};
    let dir = fixtures().join("llama");
    let base_text = read_json(&dir.join("expected.json"))["greedy_text"].clone();
    let lora = read_json(&dir.join("lora/expected.json"));
    let model = dir.join("model-f32.gguf");
    let full = format!("full={}", dir.join("lora").display());
    let code = format!("code={}", dir.join("lora_mix/code").display());
    let s = start_model(
        model.to_str().unwrap(),
        &["--lora", &full, "--lora", &code, "--kv-dtype", "f32"],
    )
    .await;

    let models: serde_json::Value = reqwest::get(format!("{}/v1/models", s.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let data = models["data"].as_array().unwrap();
    let listed: Vec<(&str, &serde_json::Value)> = data
        .iter()
        .map(|m| (m["id"].as_str().unwrap(), &m["parent"]))
        .collect();
    assert_eq!(listed.len(), 3, "{models}");
    assert_eq!(listed[0], ("model-f32", &serde_json::Value::Null));
    assert_eq!(listed[1].0, "full");
    assert_eq!(listed[1].1, "model-f32");
    assert_eq!(listed[2].0, "code");

    let body = |m: Option<&str>| {
        let mut b = serde_json::json!({
            "prompt": lora["input_ids"], "max_tokens": 16, "temperature": 0, "ignore_eos": true,
        });
        if let Some(m) = m {
            b["model"] = m.into();
        }
        b
    };
    // Together: base, adapter, base under its own name, adapter again.
    let (a, b, c, d) = tokio::join!(
        post(&s, "/v1/completions", body(None)),
        post(&s, "/v1/completions", body(Some("full"))),
        post(&s, "/v1/completions", body(Some("model-f32"))),
        post(&s, "/v1/completions", body(Some("full"))),
    );
    for (status, v) in [&a, &b, &c, &d] {
        assert_eq!(*status, 200, "{v}");
    }
    let text = |v: &serde_json::Value| v["choices"][0]["text"].clone();
    assert_eq!(text(&a.1), base_text, "base model");
    assert_eq!(text(&c.1), base_text, "base model by name");
    assert_eq!(text(&b.1), lora["greedy_text"], "adapter 'full'");
    assert_eq!(text(&d.1), lora["greedy_text"], "adapter 'full' again");
    assert_eq!(b.1["model"], "full");
    assert_eq!(a.1["model"], "model-f32");

    // Chat and embeddings take the adapter too; an unknown name is 404.
    let (st, v) = post(
        &s,
        "/v1/chat/completions",
        serde_json::json!({"model": "code", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    )
    .await;
    assert_eq!((st, v["model"].as_str()), (200, Some("code")), "{v}");
    let emb = |m: &str| {
        post(
            &s,
            "/v1/embeddings",
            serde_json::json!({"model": m, "input": "hello"}),
        )
    };
    let (e1, e2) = tokio::join!(emb("model-f32"), emb("code"));
    assert_eq!((e1.0, e2.0), (200, 200));
    assert_ne!(e1.1["data"][0]["embedding"], e2.1["data"][0]["embedding"]);
    // Per-request weights: `"adapters": {"full": 1.0}` is `"model": "full"`.
    let mut b = body(None);
    b["adapters"] = serde_json::json!({"full": 1.0});
    let (st, v) = post(&s, "/v1/completions", b.clone()).await;
    assert_eq!((st, text(&v)), (200, lora["greedy_text"].clone()), "{v}");
    b["adapters"] = serde_json::json!({"full": 1.0, "nope": 0.5});
    let (st, v) = post(&s, "/v1/completions", b.clone()).await;
    assert_eq!(st, 404, "{v}");
    b["adapters"] = serde_json::json!({"full": 1e9});
    let (st, v) = post(&s, "/v1/completions", b).await;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("adapters")),
        "{v}"
    );
    let (st, v) = post(&s, "/v1/completions", body(Some("nope"))).await;
    assert_eq!(st, 404, "{v}");
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("full"),
        "{v}"
    );
}

/// llama.cpp's GGUF adapter format (`tests/fixtures/lora/*.gguf`, written
/// from the PEFT fixtures by `scripts/peft-to-gguf-lora.py` as llama.cpp's
/// `convert_lora_to_gguf.py` writes them: q/k rows of llama permuted) gives
/// PEFT's outputs on either kind of base.
#[test]
fn llama_cpp_gguf_adapters_match_peft() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora");
    for arch in ["llama", "qwen2"] {
        let dir = fixtures().join(arch);
        let expected = read_json(&dir.join("lora/expected.json"));
        let adapter = here.join(format!("{arch}-lora.gguf"));
        for base in [dir.join("model-f32.gguf"), dir.clone()] {
            let mut e = with_loras(&base, vec![always(adapter.clone(), 1.0)]).unwrap();
            check(
                &mut e,
                &expected,
                &expected["logits"],
                &format!("{arch} GGUF adapter on {}", base.display()),
            );
        }
    }
    // An adapter of another architecture is refused.
    let err = with_loras(
        &fixtures().join("gemma"),
        vec![always(here.join("llama-lora.gguf"), 1.0)],
    )
    .err()
    .expect("a llama adapter on a gemma base loaded");
    assert!(err.to_string().contains("\"llama\" model"), "{err}");
}

/// Loading and unloading adapters over HTTP while requests run: nothing in
/// flight is disturbed, `--max-loras` evicts the least recently used idle
/// adapter, bad files are the client's 400, and the routes are off unless
/// the server allows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_and_unload_under_traffic() {
    use common::server::{metric, post, start_model};
    let dir = fixtures().join("llama");
    let lora = read_json(&dir.join("lora/expected.json"));
    let model = dir.join("model-f32.gguf");
    // A token no other prompt of this test holds.
    const SLOW: u32 = 7;
    assert!(!lora["input_ids"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!(SLOW)));
    let code = format!("code={}", dir.join("lora_mix/code").display());
    let body = |m: &str| {
        serde_json::json!({
            "model": m, "prompt": lora["input_ids"], "max_tokens": 16, "temperature": 0, "ignore_eos": true,
        })
    };
    let load = |name: &str, path: &Path| serde_json::json!({"lora_name": name, "lora_path": path});
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let list = |url: String| async move {
        reqwest::get(format!("{url}/v1/models"))
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    };
    {
        let s = start_model(model.to_str().unwrap(), &["--lora", &code]).await;
        let (st, v) = post(&s, "/v1/load_lora_adapter", load("full", &dir.join("lora"))).await;
        assert_eq!(st, 403, "runtime loading must be off by default: {v}");
    }
    let s = start_model(
        model.to_str().unwrap(),
        &[
            "--lora",
            &code,
            "--allow-lora-updates",
            "--max-loras",
            "2",
            "--kv-dtype",
            "f32",
            "--debug-fault",
            &format!("slow:{SLOW}"),
        ],
    )
    .await;
    let (st, _) = post(&s, "/v1/load_lora_adapter", load("full", &dir.join("lora"))).await;
    assert_eq!(st, 200);
    assert_eq!(
        ids(&list(s.url.clone()).await),
        ["model-f32", "code", "full"]
    );
    let (st, v) = post(&s, "/v1/completions", body("full")).await;
    assert_eq!(
        (st, &v["choices"][0]["text"]),
        (200, &lora["greedy_text"]),
        "{v}"
    );
    assert_eq!(metric(&s, "ruvllm_lora_adapters_loaded").await, 2.0);

    // Mistakes: the same name twice, files that are not adapters, bad names.
    for (req, param) in [
        (load("full", &dir.join("lora")), None),
        (load("bad", &dir.join("model-f32.gguf")), Some("lora_path")),
        (load("gone", &dir.join("no-such-dir")), Some("lora_path")),
        (load("a b", &dir.join("lora")), Some("lora_name")),
        (load("model-f32", &dir.join("lora")), Some("lora_name")),
        (serde_json::json!({"lora_name": "x"}), Some("lora_path")),
    ] {
        let (st, v) = post(&s, "/v1/load_lora_adapter", req.clone()).await;
        assert_eq!(st, 400, "{req}: {v}");
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{req}: {v}");
        }
    }
    let (st, _) = post(
        &s,
        "/v1/unload_lora_adapter",
        serde_json::json!({"lora_name": "nope"}),
    )
    .await;
    assert_eq!(st, 404);

    // At --max-loras 2, a third evicts the least recently used idle adapter
    // loaded at run time ("full"); "code", given at start, stays.
    let (st, _) = post(
        &s,
        "/v1/load_lora_adapter",
        load("chat", &dir.join("lora_mix/chat")),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(
        ids(&list(s.url.clone()).await),
        ["model-f32", "code", "chat"]
    );
    assert_eq!(post(&s, "/v1/completions", body("full")).await.0, 404);
    let (st, _) = post(&s, "/v1/load_lora_adapter", load("full", &dir.join("lora"))).await;
    assert_eq!(st, 200, "chat, idle, makes room");
    assert_eq!(
        ids(&list(s.url.clone()).await),
        ["model-f32", "code", "full"]
    );

    // Unload "full" while requests for it run: three long ones, unloaded
    // once the server reports them in progress. They finish exactly as
    // alone; requests sent after the unload answered are refused. Their
    // prompt holds the token of the server's slow fault, so that each of
    // their steps takes 10 ms more and they are surely still running when
    // the unload comes (a tiny model on a fast machine could otherwise
    // finish them between two polls of the gauge).
    let long = || {
        let mut b = body("full");
        b["max_tokens"] = 200.into();
        b["prompt"].as_array_mut().unwrap().push(SLOW.into());
        b
    };
    let (st, alone) = post(&s, "/v1/completions", long()).await;
    assert_eq!(st, 200);
    let longs = futures::future::join_all((0..3).map(|_| post(&s, "/v1/completions", long())));
    let unload = async {
        let gauge = "ruvllm_lora_requests{adapter=\"full\"}";
        common::server::wait_for(&s, gauge, |v| v >= 3.0, std::time::Duration::from_secs(10)).await;
        let r = post(
            &s,
            "/v1/unload_lora_adapter",
            serde_json::json!({"lora_name": "full"}),
        )
        .await;
        // Right after: refused.
        let after = post(&s, "/v1/completions", body("full")).await.0;
        (r, after)
    };
    let (longs, ((st, v), after)) = tokio::join!(longs, unload);
    assert_eq!(st, 200, "{v}");
    assert_eq!(after, 404, "a request after the unload was served");
    for (st, v) in longs {
        assert_eq!(st, 200, "{v}");
        assert_eq!(
            v["choices"][0]["text"], alone["choices"][0]["text"],
            "a running request saw its adapter change"
        );
    }
    assert_eq!(ids(&list(s.url.clone()).await), ["model-f32", "code"]);
    // The engine lets go of a request just after its answer is sent.
    let secs = std::time::Duration::from_secs(5);
    common::server::wait_for(&s, "ruvllm_requests_in_flight", |v| v == 0.0, secs).await;
    assert_eq!(metric(&s, "ruvllm_lora_adapters_loaded").await, 1.0);
    // "code" holds its memory's worth of the KV budget, apart from sequences.
    assert!(metric(&s, "ruvllm_kv_blocks_lora").await >= 1.0);
    assert_eq!(metric(&s, "ruvllm_kv_blocks_used").await, 0.0);
    // Loaded again under the same name, it serves the same output.
    let (st, _) = post(&s, "/v1/load_lora_adapter", load("full", &dir.join("lora"))).await;
    assert_eq!(st, 200);
    let (st, v) = post(&s, "/v1/completions", body("full")).await;
    assert_eq!(
        (st, &v["choices"][0]["text"]),
        (200, &lora["greedy_text"]),
        "{v}"
    );
}

/// An alpha_pattern entry for one module of one layer changes that module's
/// scale alone: doubling alpha there equals the plain adapter with that
/// module's B doubled.
#[test]
fn alpha_pattern_scales_only_the_modules_it_names() {
    let base = fixtures().join("llama");
    let target = "model.layers.1.self_attn.v_proj";
    let by_pattern = crafted("alphapat", |_, c| {
        c["alpha_pattern"] = serde_json::json!({target: 16})
    });
    let by_weights = crafted("alphab", |t, _| {
        let b = t
            .iter_mut()
            .find(|x| x.0 == format!("base_model.model.{target}.lora_B.weight"))
            .unwrap();
        b.2.iter_mut().for_each(|v| *v *= 2.0);
    });
    let input = ids(&read_json(&base.join("lora/expected.json"))["input_ids"]);
    let rows: Vec<usize> = (0..input.len()).collect();
    let logits = |d: PathBuf| {
        with_loras(&base, vec![always(d, 1.0)])
            .unwrap()
            .forward_sequence(&input, &rows, false)
            .unwrap()
            .logits
    };
    let (a, b) = (logits(by_pattern), logits(by_weights));
    assert!(max_abs_diff(&a, &b) <= 1e-4, "{}", max_abs_diff(&a, &b));
    let plain = logits(fixtures().join("llama/lora"));
    assert!(
        max_abs_diff(&a, &plain) > 1e-3,
        "the pattern changed nothing"
    );
}

/// Adapters are paid for out of the KV budget, in KV blocks: one given at
/// start holds its blocks (not counted as used by sequences); one loaded
/// at run time is refused while it would leave the pool less than a
/// context, and fits once another is removed; a removed adapter that a
/// running request holds keeps its blocks until the request ends; start
/// adapters that leave no room are a clear error.
#[test]
fn adapters_take_their_memory_out_of_the_kv_budget() {
    use ruvllm::adapter_registry::blocks_for;
    use ruvllm::kv::KvDtype;
    use ruvllm::model::lora::LoraAdapter;
    let dir = fixtures().join("llama");
    let model = dir.join("model-f32.gguf");
    let load = |kv_blocks: usize| {
        Engine::load(
            &model,
            &EngineOptions {
                threads: 2,
                context: Some(64),
                kv_blocks: Some(kv_blocks),
                block_size: 16,
                lora: vec![named("code", dir.join("lora_mix/code"))],
                ..Default::default()
            },
        )
    };
    let probe = load(64).unwrap();
    let spec = probe.model().spec.clone();
    let block_bytes = ruvllm::runner::kv_block_bytes(&spec, KvDtype::F32, 16);
    let full = || LoraAdapter::load(&dir.join("lora"), "full", &spec).unwrap();
    let code_blocks = blocks_for(
        &LoraAdapter::load(&dir.join("lora_mix/code"), "c", &spec).unwrap(),
        block_bytes,
    );
    let full_blocks = blocks_for(&full(), block_bytes);
    assert!(code_blocks >= 1 && full_blocks >= 1);
    drop(probe);
    // Room for "code", one context (4 blocks) and all of "full" but one.
    let total = code_blocks + 4 + full_blocks - 1;
    let mut e = load(total).unwrap();
    assert_eq!(e.context(), 64);
    assert_eq!(e.adapter_blocks(), code_blocks);
    assert_eq!(e.stats().blocks_used, 0, "adapters are no sequence's");
    assert_eq!(e.stats().blocks_total, total);
    let err = e.add_adapter(full(), 1.0).unwrap_err();
    assert!(matches!(err, ruvllm::Error::Overloaded(_)), "{err}");
    assert!(err.to_string().contains("less than one context"), "{err}");
    assert_eq!(
        e.adapter_blocks(),
        code_blocks,
        "a refused load holds nothing"
    );
    e.remove_adapter("code").unwrap();
    assert_eq!(e.adapter_blocks(), 0);
    e.add_adapter(full(), 1.0).unwrap();
    assert_eq!(e.adapter_blocks(), full_blocks);
    // Removed while a request runs with it: its blocks wait for the request.
    let mut req = greedy_request(&[1, 2, 3, 4], 8);
    req.adapters = vec![("full".into(), 1.0)];
    let (tx, rx) = mpsc::channel();
    e.add_request(7, req, None, Box::new(move |ev| tx.send(ev).is_ok()));
    e.step();
    e.remove_adapter("full").unwrap();
    assert_eq!(e.adapter_blocks(), full_blocks, "still in use");
    while e.step() {}
    assert!(rx
        .try_iter()
        .any(|ev| matches!(ev, SeqEvent::Finished(s) if s.tokens.len() == 8)));
    assert_eq!(e.adapter_blocks(), 0, "given back once the request ended");
    assert_eq!(e.stats().blocks_used, 0);
    // A budget the start adapters fill leaves nothing for keys and values.
    let err = load(code_blocks).err().expect("no room");
    assert!(err.to_string().contains("leaving none"), "{err}");

    // At --max-loras 1, a load refused for want of room unloads nothing:
    // "chat" stays when the larger "full" cannot fit even in its place.
    let bb = ruvllm::runner::kv_block_bytes(&spec, KvDtype::F32, 1);
    let chat = || LoraAdapter::load(&dir.join("lora_mix/chat"), "chat", &spec).unwrap();
    let (chat_blocks, full_blocks) = (blocks_for(&chat(), bb), blocks_for(&full(), bb));
    assert!(full_blocks > chat_blocks, "{full_blocks} vs {chat_blocks}");
    let mut e = Engine::load(
        &model,
        &EngineOptions {
            threads: 2,
            context: Some(64),
            kv_blocks: Some(64 + chat_blocks),
            block_size: 1,
            max_loras: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    e.add_adapter(chat(), 1.0).unwrap();
    let err = e.add_adapter(full(), 1.0).unwrap_err();
    assert!(err.to_string().contains("less than one context"), "{err}");
    assert_eq!(
        e.adapter_names(),
        ["chat"],
        "the refused load evicted nothing"
    );
    assert_eq!(e.adapter_blocks(), chat_blocks);
}
