//! X-LoRA (learned mixing of LoRA experts) against PEFT's
//! `peft.tuners.xlora` (`tests/fixtures/xlora`, made by
//! `scripts/make-xlora-fixture.py`): logits, classifier scalings and greedy
//! decoding through the paged KV cache, on Hugging Face and GGUF bases;
//! batches mixing X-LoRA, LoRA and base requests; refused checkpoints; the
//! server's `"model": NAME`.

mod common;
use common::*;
use ruvllm::adapter_registry::{LoraOption, XLoraOption};
use ruvllm::engine::{Engine, EngineOptions};
use ruvllm::model::xlora::XLora;
use ruvllm::request::{GenerationRequest, SeqEvent};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// Cases on the llama fixture (its mixing adapters as experts).
const CASES: [&str; 2] = ["layerwise", "topk"];
/// Every case, with phi3 (fused modules, `o_proj` first; experts that
/// target different modules).
const ALL_CASES: [&str; 3] = ["layerwise", "topk", "phi3"];

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/xlora")
        .join(case)
}

fn load(base: &Path, xlora: Vec<XLoraOption>, lora: Vec<LoraOption>, chunk: usize) -> Engine {
    Engine::load(
        base,
        &EngineOptions {
            threads: 2,
            context: Some(256),
            max_batched_tokens: chunk,
            xlora,
            lora,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", base.display()))
}

fn always(case: &str) -> Vec<XLoraOption> {
    vec![XLoraOption {
        name: None,
        path: case_dir(case),
    }]
}

/// Every position's logits, then the greedy continuation through the
/// scheduler (prefill in chunks of `chunk`, then one token per step, each
/// with the scaling pass on its own KV cache), against PEFT's cache-less
/// recomputation.
#[test]
fn xlora_matches_peft_on_hf_and_gguf_bases() {
    for case in ALL_CASES {
        let expected = read_json(&case_dir(case).join("expected.json"));
        let llama = fixtures().join(expected["base"].as_str().unwrap());
        let input = ids(&expected["input_ids"]);
        let rows: Vec<usize> = (0..input.len()).collect();
        for (base, chunk) in [(llama.clone(), 5), (llama.join("model-f32.gguf"), 512)] {
            let what = format!("{case} on {} (chunks of {chunk})", base.display());
            let mut e = load(&base, always(case), Vec::new(), chunk);
            let got = e.forward_sequence(&input, &rows, false).unwrap().logits;
            let d = max_abs_diff(&got, &floats(&expected["logits"]));
            assert!(d <= 1e-3, "{what}: logits differ from PEFT's by {d}");

            let g = &expected["greedy"];
            let want = ids(&g["tokens"]);
            let out = e
                .generate(&greedy_request(&ids(&g["prompt"]), want.len()), &mut |_| {
                    true
                })
                .unwrap();
            assert_eq!(out.tokens, want, "{what}: greedy continuation");
            // The pool gets back everything the sequences held.
            assert_eq!(e.stats().blocks_used, 0, "{what}: blocks left held");
        }
    }
}

/// With scaling pass value 0 the scaling pass is the base model: the
/// classifier on the base model's final hidden states gives PEFT's
/// scalings (after its softmax, before top-k), module by module in PEFT's
/// order (phi3's per-layer case: `o_proj` before the fused `qkv_proj`).
#[test]
fn classifier_scalings_match_peft() {
    for case in ["topk", "phi3"] {
        let expected = read_json(&case_dir(case).join("expected.json"));
        let base = fixtures().join(expected["base"].as_str().unwrap());
        let pass = expected["options"]["scaling_pass_value"].as_f64();
        assert!(pass.is_none() || pass == Some(0.0), "{case}");
        let input = ids(&expected["input_ids"]);
        let rows: Vec<usize> = (0..input.len()).collect();
        let mut e = engine(&base, 2);
        let hidden = e.forward_sequence(&input, &rows, true).unwrap().hidden;
        let x = XLora::load(&case_dir(case), case, &e.model().spec).unwrap();
        assert_eq!(
            x.n_modules(),
            expected["n_modules"].as_u64().unwrap() as usize,
            "{case}"
        );
        let got = x.scalings(&hidden);
        let want = floats(&expected["scalings"]);
        let d = max_abs_diff(&got, &want);
        assert!(d <= 1e-4, "{case}: scalings differ from PEFT's by {d}");
        // The fixture's scalings differ from token to token: a classifier
        // that ignored its input could not pass.
        let per_row = got.len() / input.len();
        assert!((1..input.len()).any(|r| got[r * per_row] != got[0]));
    }
}

/// X-LoRA requests share batch steps with LoRA and base requests: each
/// gets, bit for bit, what it gets alone, and the X-LoRA ones what PEFT
/// computes.
#[test]
fn a_batch_mixing_xlora_lora_and_base_gives_each_what_it_gets_alone() {
    let llama = fixtures().join("llama");
    let engine = || {
        load(
            &llama.join("model-f32.gguf"),
            CASES
                .iter()
                .map(|c| XLoraOption {
                    name: Some(c.to_string()),
                    path: case_dir(c),
                })
                .collect(),
            vec![LoraOption {
                name: Some("code".into()),
                path: llama.join("lora_mix/code"),
                scale: 1.0,
            }],
            7,
        )
    };
    let prompt = ids(&read_json(&case_dir("topk").join("expected.json"))["greedy"]["prompt"]);
    let reqs: Vec<GenerationRequest> = ["layerwise", "", "code", "topk", "topk", "layerwise"]
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut r = greedy_request(&prompt[..prompt.len() - i % 2], 8);
            if !m.is_empty() {
                r.adapters = vec![(m.to_string(), 1.0)];
            }
            r
        })
        .collect();
    let alone: Vec<Seen> = reqs
        .iter()
        .map(|r| run_together(&mut engine(), vec![r.clone()]).remove(0))
        .collect();
    let mut e = engine();
    let together = run_together(&mut e, reqs.clone());
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            a, t,
            "request {i} ({:?}) changed in a mixed batch",
            reqs[i].adapters
        );
    }
    for case in CASES {
        let g = &read_json(&case_dir(case).join("expected.json"))["greedy"];
        let i = reqs
            .iter()
            .position(|r| {
                r.adapters.first().is_some_and(|a| a.0 == case) && r.prompt.len() == prompt.len()
            })
            .unwrap();
        assert_eq!(together[i].0, ids(&g["tokens"]), "{case}: against PEFT");
    }
    assert_ne!(
        together[0].0, together[1].0,
        "X-LoRA and base agree: the test proves nothing"
    );
    assert_eq!(e.stats().blocks_used, 0, "blocks left held");
    // One X-LoRA per request, and only names that exist.
    for wanted in [
        vec![("topk".to_string(), 1.0), ("layerwise".to_string(), 1.0)],
        vec![("nope".to_string(), 1.0)],
    ] {
        let mut r = greedy_request(&prompt, 2);
        r.adapters = wanted.clone();
        let (tx, rx) = mpsc::channel();
        let id = e.new_id();
        e.add_request(id, r, None, Box::new(move |ev| tx.send(ev).is_ok()));
        match rx.recv().unwrap() {
            SeqEvent::Failed(err) => assert!(
                matches!(
                    err,
                    ruvllm::Error::InvalidRequest(_) | ruvllm::Error::NotFound(_)
                ),
                "{wanted:?}: {err}"
            ),
            other => panic!("{wanted:?} was accepted: {other:?}"),
        }
    }
}

/// A copy of checkpoint `case` in a fresh folder, for a test to damage.
fn copy_case(case: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("ruvllm-xlora-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    fn copy(src: &Path, dst: &Path) {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            let to = dst.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &to);
            } else {
                std::fs::copy(e.path(), to).unwrap();
            }
        }
    }
    copy(&case_dir(case), &dst);
    dst
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("adapter_config.json");
    let mut v: serde_json::Value = read_json(&p);
    f(v.as_object_mut().unwrap());
    std::fs::write(p, serde_json::to_string(&v).unwrap()).unwrap();
}

/// Damaged checkpoints are refused with an error naming the problem; no
/// panic, nothing loads half.
#[test]
fn hostile_xlora_checkpoints_are_refused() {
    let llama = fixtures().join("llama");
    type Damage = Box<dyn Fn(&Path)>;
    let set = |key: &'static str, value: serde_json::Value| -> Damage {
        Box::new(move |d| {
            edit_config(d, |c| {
                c.insert(key.into(), value.clone());
            })
        })
    };
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "lora-type",
            set("peft_type", serde_json::json!("LORA")),
            "XLORA",
        ),
        (
            "hidden",
            set("hidden_size", serde_json::json!(32)),
            "hidden_size",
        ),
        (
            "depth",
            set("xlora_depth", serde_json::json!(3)),
            "xlora_depth",
        ),
        (
            "huge-depth",
            set("xlora_depth", serde_json::json!(1_000_000_000u64)),
            "xlora_depth",
        ),
        ("width", set("xlora_size", serde_json::json!(31)), "shape"),
        (
            "no-adapters",
            set("adapters", serde_json::json!({})),
            "adapters",
        ),
        (
            "named-keys",
            set("adapters", serde_json::json!({"code": "0", "chat": "1"})),
            "must be \"0\"",
        ),
        (
            "escaping-key",
            set("adapters", serde_json::json!({"0": "0", "../1": "1"})),
            "must be \"0\"",
        ),
        (
            "many-tensors",
            Box::new(|d| {
                let zero = [0u8; 4];
                let views: Vec<(String, safetensors::tensor::TensorView)> = (0..1000)
                    .map(|i| {
                        let v = safetensors::tensor::TensorView::new(
                            safetensors::Dtype::F32,
                            vec![1],
                            &zero,
                        )
                        .unwrap();
                        (format!("internal_xlora_classifier.layers.{i}.weight"), v)
                    })
                    .collect();
                let out = safetensors::serialize(views, None).unwrap();
                std::fs::write(d.join("adapter_model.safetensors"), out).unwrap();
            }),
            "tensors",
        ),
        (
            "missing-expert",
            Box::new(|d| std::fs::remove_dir_all(d.join("1")).unwrap()),
            "no PEFT LoRA folder",
        ),
        (
            "temperature",
            set("softmax_temperature", serde_json::json!(0)),
            "temperature",
        ),
        (
            "truncated",
            Box::new(|d| {
                let p = d.join("adapter_model.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            }),
            "safetensors",
        ),
        (
            "layer-gone",
            Box::new(|d| {
                let p = d.join("adapter_model.safetensors");
                let b = std::fs::read(&p).unwrap();
                let st = safetensors::SafeTensors::deserialize(&b).unwrap();
                let kept: Vec<(String, safetensors::tensor::TensorView)> = st
                    .tensors()
                    .into_iter()
                    .filter(|(n, _)| !n.contains("layers.0."))
                    .collect();
                let out = safetensors::serialize(kept, None).unwrap();
                std::fs::write(&p, out).unwrap();
            }),
            "classifier layers",
        ),
    ];
    for (tag, damage, words) in cases {
        let dir = copy_case("layerwise", tag);
        damage(&dir);
        let r = Engine::load(
            &llama,
            &EngineOptions {
                threads: 1,
                context: Some(64),
                xlora: vec![XLoraOption {
                    name: None,
                    path: dir.clone(),
                }],
                ..Default::default()
            },
        );
        let err = match r {
            Ok(_) => panic!("{tag}: a damaged checkpoint loaded"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(words), "{tag}: {err:?} does not say {words:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// `serve --xlora NAME=PATH`: listed in /v1/models, chosen with
/// `"model": NAME`, and PEFT's greedy tokens come back.
#[tokio::test]
async fn the_server_serves_an_xlora_by_name() {
    use common::server::{post, start_model};
    let llama = fixtures().join("llama");
    let model = llama.join("model-f32.gguf");
    let arg = format!("mix={}", case_dir("layerwise").display());
    let s = start_model(
        model.to_str().unwrap(),
        &["--xlora", &arg, "--allow-lora-updates", "--kv-dtype", "f32"],
    )
    .await;
    let models: serde_json::Value = reqwest::get(format!("{}/v1/models", s.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "mix"),
        "{models}"
    );
    let g = &read_json(&case_dir("layerwise").join("expected.json"))["greedy"];
    let (st, v) = post(
        &s,
        "/v1/completions",
        serde_json::json!({
            "model": "mix", "prompt": g["prompt"], "max_tokens": 8,
            "temperature": 0, "ignore_eos": true,
        }),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let tok = engine(&model, 1).tokenizer.clone();
    assert_eq!(
        v["choices"][0]["text"],
        tok.decode(&ids(&g["tokens"]), false).as_str(),
        "{v}"
    );

    // Hot load and unload, as for LoRA adapters.
    let (st, v) = post(
        &s,
        "/v1/load_lora_adapter",
        serde_json::json!({"lora_name": "top", "lora_path": case_dir("topk")}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let g = &read_json(&case_dir("topk").join("expected.json"))["greedy"];
    let body = serde_json::json!({
        "model": "top", "prompt": g["prompt"], "max_tokens": 8,
        "temperature": 0, "ignore_eos": true,
    });
    let (st, v) = post(&s, "/v1/completions", body.clone()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["choices"][0]["text"],
        tok.decode(&ids(&g["tokens"]), false).as_str(),
        "{v}"
    );
    let (st, v) = post(
        &s,
        "/v1/unload_lora_adapter",
        serde_json::json!({"lora_name": "top"}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(post(&s, "/v1/completions", body).await.0, 404);
}
