//! LoRA training against PyTorch autograd with PEFT
//! (`tests/fixtures/train`, written by `scripts/make-train-fixtures.py`):
//! the loss of a sequence, the gradient of every LoRA tensor and three
//! AdamW steps, on each family's tiny model.

mod common;
use common::*;
use ruvllm::model::lora::{module_targets, LoraAdapter, Target};
use ruvllm::model::{load_hf_folder, Model};
use ruvllm::threadpool::ThreadPool;
use ruvllm::train::{loss_and_grads, AdamW, AdamWConfig, Example, LoraGrads};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const ARCHS: [&str; 9] = [
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "phi",
];

fn train_dir(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/train")
        .join(arch)
}

fn read_tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
            let v = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, v)
        })
        .collect()
}

/// Our value of the PEFT tensor `name` (`…layers.L.module.lora_A.weight`):
/// `A` of the module's first slice (slices of a fused module share it),
/// or the `B`s of its slices stacked.
fn ours(
    model: &Model,
    name: &str,
    get: &dyn Fn(usize, Target) -> Option<(Vec<f32>, Vec<f32>)>,
) -> Vec<f32> {
    let rest = name
        .strip_prefix("base_model.model.model.layers.")
        .unwrap_or_else(|| panic!("{name}"));
    let (layer, module) = rest.split_once('.').unwrap();
    let layer: usize = layer.parse().unwrap();
    let (module, is_a) = match module.strip_suffix(".lora_A.weight") {
        Some(m) => (m, true),
        None => (module.strip_suffix(".lora_B.weight").unwrap(), false),
    };
    let pieces = module_targets(model.spec.family, module, &model.spec).unwrap();
    if is_a {
        let first = get(layer, pieces[0].0).unwrap().0;
        for &(t, _) in &pieces[1..] {
            assert_eq!(get(layer, t).unwrap().0, first, "{name}: slices' A differ");
        }
        first
    } else {
        pieces
            .iter()
            .flat_map(|&(t, _)| get(layer, t).unwrap().1)
            .collect()
    }
}

/// The largest difference relative to the largest reference value.
fn rel_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    max_abs_diff(got, want) / scale.max(1e-30)
}

fn setup(arch: &str) -> (Model, LoraAdapter, serde_json::Value, Example) {
    let model = load_hf_folder(&fixtures().join(arch)).unwrap().model;
    let dir = train_dir(arch);
    let adapter = LoraAdapter::load(&dir, "trained", &model.spec).unwrap();
    let expected = read_json(&dir.join("expected.json"));
    let ex = Example::completion(
        ids(&expected["input_ids"]),
        expected["first_target"].as_u64().unwrap() as usize,
    );
    (model, adapter, expected, ex)
}

#[test]
fn loss_and_gradients_equal_pytorch_autograd_on_every_family() {
    let pool = ThreadPool::new(2);
    for arch in ARCHS {
        let (model, adapter, expected, ex) = setup(arch);
        let (loss, grads) = loss_and_grads(&model, &adapter, &[], &ex, &pool).unwrap();
        let want = expected["loss"].as_f64().unwrap() as f32;
        assert!(
            ((loss - want) / want).abs() <= 1e-5,
            "{arch}: loss {loss}, PyTorch {want}"
        );
        let reference = read_tensors(&train_dir(arch).join("grads.safetensors"));
        assert!(
            reference.len() >= 12,
            "{arch}: {} gradients",
            reference.len()
        );
        let get = |l: usize, t: Target| grads.pair(l, t).map(|g| (g.a.clone(), g.b.clone()));
        let mut worst = 0f32;
        for (name, want) in &reference {
            let d = rel_diff(&ours(&model, name, &get), want);
            assert!(d <= 1e-4, "{arch}: {name} differs by {d} (relative)");
            worst = worst.max(d);
        }
        eprintln!("{arch}: loss {loss} (PyTorch {want}), worst gradient {worst:.2e}");
    }
}

#[test]
fn three_adamw_steps_follow_pytorch() {
    let pool = ThreadPool::new(2);
    for arch in ARCHS {
        let (model, mut adapter, expected, ex) = setup(arch);
        let c = &expected["adamw"];
        let f = |k: &str| c[k].as_f64().unwrap() as f32;
        let mut opt = AdamW::new(AdamWConfig {
            lr: f("lr"),
            beta1: c["betas"][0].as_f64().unwrap() as f32,
            beta2: c["betas"][1].as_f64().unwrap() as f32,
            eps: f("eps"),
            weight_decay: f("weight_decay"),
        })
        .unwrap();
        let losses = floats(&c["losses"]);
        for (i, want) in losses.iter().enumerate() {
            let (loss, grads): (f32, LoraGrads) =
                loss_and_grads(&model, &adapter, &[], &ex, &pool).unwrap();
            assert!(
                ((loss - want) / want).abs() <= 1e-4,
                "{arch}: loss before step {i}: {loss}, PyTorch {want}"
            );
            opt.step(&mut adapter, &grads).unwrap();
        }
        let reference = read_tensors(&train_dir(arch).join("after_adamw.safetensors"));
        let get = |l: usize, t: Target| adapter.pair(l, t).map(|p| (p.a.clone(), p.b.clone()));
        let mut worst = 0f32;
        for (name, want) in &reference {
            let d = max_abs_diff(&ours(&model, name, &get), want);
            worst = worst.max(d);
        }
        // Each step moves a weight by at most lr (1e-2): the bound is a
        // hundredth of one step (measured worst 1.1e-5, gemma2).
        assert!(
            worst <= 1e-4,
            "{arch}: weights after AdamW differ by {worst}"
        );
        let (final_loss, _) = loss_and_grads(&model, &adapter, &[], &ex, &pool).unwrap();
        let want = f("final_loss");
        assert!(
            ((final_loss - want) / want).abs() <= 1e-4,
            "{arch}: loss after AdamW {final_loss}, PyTorch {want}"
        );
        eprintln!(
            "{arch}: after 3 steps loss {final_loss} (PyTorch {want}), weights within {worst:.2e}"
        );
    }
}

/// Central differences of the loss in f64-free f32: what a gradient
/// element must be near, computed without any backward pass.
fn numeric(
    model: &Model,
    adapter: &mut LoraAdapter,
    frozen: &[ruvllm::model::lora::WeightedAdapter],
    ex: &Example,
    pool: &ThreadPool,
    at: (usize, Target, bool, usize),
) -> f32 {
    let (l, t, is_a, i) = at;
    let h = 1e-2f32;
    let p = adapter.pair(l, t).unwrap();
    let v = if is_a { p.a[i] } else { p.b[i] };
    let mut loss_at = |v: f32| {
        let p = adapter.pair_mut(l, t).unwrap();
        let w = if is_a { &mut p.a[i] } else { &mut p.b[i] };
        let old = *w;
        *w = v;
        let (loss, _) = loss_and_grads(model, adapter, frozen, ex, pool).unwrap();
        let p = adapter.pair_mut(l, t).unwrap();
        *(if is_a { &mut p.a[i] } else { &mut p.b[i] }) = old;
        loss
    };
    (loss_at(v + h) - loss_at(v - h)) / (2.0 * h)
}

#[test]
fn unlikelihood_over_a_frozen_adapter_on_a_gguf_base_matches_finite_differences() {
    // The GGUF base: llama.cpp's permuted q/k rows and interleaved RoPE.
    // A PEFT adapter applied frozen at weight 0.5 under a fresh trainable
    // one; the loss mixes cross-entropy and unlikelihood. (The f32 file:
    // over quantized weights the forward pass rounds activations to 8 bits
    // as inference does, so the loss is a step function at the scale of a
    // finite difference; see the next test.)
    let pool = ThreadPool::new(2);
    let dir = fixtures().join("llama");
    let model = ruvllm::model::load_gguf(&dir.join("model-f32.gguf"))
        .unwrap()
        .model;
    let frozen = [ruvllm::model::lora::WeightedAdapter {
        adapter: std::sync::Arc::new(
            LoraAdapter::load(&dir.join("lora"), "frozen", &model.spec).unwrap(),
        ),
        weight: 0.5,
    }];
    let all = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];
    let mut adapter = LoraAdapter::new_trainable("t", &model.spec, true, 2, 2.0, &all, 7).unwrap();
    let mut rng = ruvllm::sampling::Rng::new(3);
    for l in 0..model.spec.n_layers {
        for t in all {
            for b in &mut adapter.pair_mut(l, t).unwrap().b {
                *b = (rng.next_f32() - 0.5) * 0.2;
            }
        }
    }
    let tokens = ids(&read_json(&dir.join("expected.json"))["input_ids"]);
    let weights = (0..tokens.len())
        .map(|i| match i {
            0..=5 => 0.0,
            _ if i % 3 == 0 => -0.5,
            _ => 1.0,
        })
        .collect();
    let ex = Example { tokens, weights };
    let (_, grads) = loss_and_grads(&model, &adapter, &frozen, &ex, &pool).unwrap();
    let mut checked = 0;
    for (l, t) in [
        (0, Target::Q),
        (0, Target::K),
        (1, Target::V),
        (1, Target::Down),
        (0, Target::Gate),
    ] {
        let g = grads.pair(l, t).unwrap();
        for (is_a, len) in [(true, g.a.len()), (false, g.b.len())] {
            for i in [0, len / 3, len - 1] {
                let want = numeric(&model, &mut adapter, &frozen, &ex, &pool, (l, t, is_a, i));
                let got = if is_a { g.a[i] } else { g.b[i] };
                assert!(
                    (got - want).abs() <= 2e-3 + 2e-2 * want.abs(),
                    "layer {l} {t:?} {} [{i}]: backprop {got}, finite difference {want}",
                    if is_a { "A" } else { "B" }
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 30);
}

#[test]
fn gradients_over_quantized_weights_are_those_of_the_dequantized_model() {
    // Over Q8_0 weights the backward pass carries gradients through the
    // dequantized weights and treats the forward pass's 8-bit rounding of
    // activations as the identity (the straight-through estimator). The
    // gradients must then be those of the same model in f32 up to that
    // rounding.
    let pool = ThreadPool::new(2);
    let dir = fixtures().join("llama");
    let q8 = ruvllm::model::load_gguf(&dir.join("model-q8_0.gguf"))
        .unwrap()
        .model;
    let mut f32_model = ruvllm::model::load_gguf(&dir.join("model-q8_0.gguf"))
        .unwrap()
        .model;
    let f32_of =
        |m: &ruvllm::tensor::Matrix| ruvllm::tensor::Matrix::from_f32(m.rows, m.cols, m.to_f32());
    f32_model.embed = f32_of(&f32_model.embed);
    f32_model.output.w = f32_of(&f32_model.output.w);
    for l in &mut f32_model.layers {
        for lin in [
            &mut l.q,
            &mut l.k,
            &mut l.v,
            &mut l.o,
            &mut l.up,
            &mut l.down,
        ]
        .into_iter()
        .chain(l.gate.as_mut())
        {
            lin.w = f32_of(&lin.w);
        }
    }
    assert!(q8.dominant_type() == Some(ruvllm::quant::GgmlType::Q8_0));
    let adapter = LoraAdapter::load(&train_dir("llama"), "t", &q8.spec).unwrap();
    let tokens = ids(&read_json(&dir.join("expected.json"))["input_ids"]);
    let ex = Example::completion(tokens, 8);
    let (lq, gq) = loss_and_grads(&q8, &adapter, &[], &ex, &pool).unwrap();
    let (lf, gf) = loss_and_grads(&f32_model, &adapter, &[], &ex, &pool).unwrap();
    assert!(
        (lq - lf).abs() / lf <= 1e-2,
        "loss {lq} over Q8_0, {lf} dequantized"
    );
    // The whole gradient as one vector: its direction is what training
    // follows.
    let (mut dot, mut nq, mut nf) = (0f64, 0f64, 0f64);
    let mut worst = 0f32;
    for (l, t, g) in gf.pairs() {
        let q = gq.pair(l, t).unwrap();
        worst = worst.max(rel_diff(&q.a, &g.a)).max(rel_diff(&q.b, &g.b));
        for (a, b) in q.a.iter().chain(&q.b).zip(g.a.iter().chain(&g.b)) {
            dot += *a as f64 * *b as f64;
            nq += *a as f64 * *a as f64;
            nf += *b as f64 * *b as f64;
        }
    }
    let cos = dot / (nq.sqrt() * nf.sqrt());
    eprintln!(
        "Q8_0 against dequantized: loss {lq} / {lf}, cosine {cos:.6}, worst tensor {worst:.3}"
    );
    assert!(cos >= 0.99, "gradient directions differ: cosine {cos}");
}

#[test]
fn adapters_written_as_peft_hold_the_same_tensors_and_load_back() {
    let tmp = std::env::temp_dir().join(format!("ruvllm-peft-save-{}", std::process::id()));
    for arch in ARCHS {
        let dir = train_dir(arch);
        let original = read_tensors(&dir.join("adapter_model.safetensors"));
        // The llama GGUF base holds llama.cpp's permuted q/k rows: what is
        // written must be back in Hugging Face's order.
        let mut bases = vec![fixtures().join(arch)];
        if arch == "llama" {
            bases.push(fixtures().join("llama/model-f32.gguf"));
        }
        for base in bases {
            let spec = if base.is_dir() {
                load_hf_folder(&base).unwrap().model.spec
            } else {
                ruvllm::model::load_gguf(&base).unwrap().model.spec
            };
            let a = LoraAdapter::load(&dir, "a", &spec).unwrap();
            let out = tmp.join(arch);
            a.save_peft(&out, &spec).unwrap();
            assert_eq!(
                read_tensors(&out.join("adapter_model.safetensors")),
                original,
                "{arch} on {}",
                base.display()
            );
            let b = LoraAdapter::load(&out, "b", &spec).unwrap();
            assert_eq!(a.pairs().count(), b.pairs().count());
            for ((l, t, p), (_, _, q)) in a.pairs().zip(b.pairs()) {
                assert!(
                    p.a == q.a
                        && p.b == q.b
                        && p.rank == q.rank
                        && (p.scale - q.scale).abs() < 1e-6,
                    "{arch} layer {l} {t:?}"
                );
            }
        }
    }
    // An adapter PEFT cannot express is refused, and nothing is written.
    let spec = load_hf_folder(&fixtures().join("phi3")).unwrap().model.spec;
    let mut a = LoraAdapter::load(&train_dir("phi3"), "a", &spec).unwrap();
    a.pair_mut(0, Target::K).unwrap().a[0] += 1.0;
    let out = tmp.join("refused");
    let err = a.save_peft(&out, &spec).unwrap_err().to_string();
    assert!(err.contains("share one A"), "{err}");
    assert!(!out.join("adapter_model.safetensors").exists());
    // Nor can a new adapter train part of a fused module.
    let err = LoraAdapter::new_trainable("p", &spec, true, 2, 1.0, &[Target::Q], 1)
        .err()
        .expect("q alone of phi3's qkv_proj")
        .to_string();
    assert!(err.contains("qkv_proj"), "{err}");
    assert!(LoraAdapter::new_trainable(
        "p",
        &spec,
        true,
        2,
        1.0,
        &[Target::Q, Target::K, Target::V],
        1
    )
    .is_ok());
    std::fs::remove_dir_all(&tmp).ok();
}
