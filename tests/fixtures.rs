//! Agreement with Hugging Face transformers on the tiny reference models of
//! every architecture (`../shared/fixtures/<arch>/`).

mod common;
use common::*;
use ruvllm::request::GenerationRequest;
use ruvllm::sampling::{argmax, SamplingParams};
use std::path::Path;

const ARCHS: &[&str] = &[
    "llama", "mistral", "qwen2", "qwen3", "phi3", "phi", "gemma", "gemma2", "gemma3",
];

/// Logits, final hidden states, greedy continuation and the cached decode of
/// one model source against `expected`.
fn check_f32_source(model: &Path, expected: &serde_json::Value, what: &str) {
    let mut e = engine(model, 1);
    let input = ids(&expected["input_ids"]);
    let vocab = e.model().spec.vocab_size;
    let rows: Vec<usize> = (0..input.len()).collect();
    let out = e.forward_sequence(&input, &rows, true).unwrap();
    let want = floats(&expected["logits"]);
    let d = max_abs_diff(&out.logits, &want);
    assert!(d <= 1e-3, "{what}: logits differ by {d}");
    if let Some(h) = expected.get("final_hidden") {
        let d = max_abs_diff(&out.hidden, &floats(h));
        assert!(d <= 1e-3, "{what}: final hidden states differ by {d}");
    }

    // Token-by-token through the KV cache gives the same logits.
    let dec = e.decode_logits(&input).unwrap();
    let d = max_abs_diff(&dec, &want);
    assert!(d <= 1e-3, "{what}: cached decode logits differ by {d}");

    // The bf16 fixtures carry logits only.
    let Some(greedy) = expected.get("greedy").map(ids) else {
        return;
    };
    let req = GenerationRequest {
        prompt: input.clone(),
        sampling: SamplingParams::greedy(),
        max_tokens: greedy.len(),
        stop: vec![],
        ignore_eos: true,
        ..Default::default()
    };
    let got = e.generate(&req, &mut |_| true).unwrap();
    assert_eq!(got.tokens, greedy, "{what}: greedy continuation");

    // The last greedy step's logits, computed through the cache.
    let mut all = input.clone();
    all.extend_from_slice(&greedy[..greedy.len() - 1]);
    let last = e.forward_sequence(&all, &[all.len() - 1], false).unwrap();
    let d = max_abs_diff(&last.logits, &floats(&expected["greedy_logits_last"]));
    assert!(d <= 1e-3, "{what}: greedy_logits_last differ by {d}");
    assert_eq!(last.logits.len(), vocab);
}

fn check_arch(arch: &str) {
    let dir = fixtures().join(arch);
    let expected = read_json(&dir.join("expected.json"));
    check_f32_source(&dir, &expected, &format!("{arch} (HF folder)"));
    check_f32_source(
        &dir.join("model-f32.gguf"),
        &expected,
        &format!("{arch} (GGUF f32)"),
    );

    // Q8_0: against HF run on the dequantized weights (f32 activations).
    let q8 = read_json(&dir.join("expected_q8_0.json"));
    let mut e = engine(&dir.join("model-q8_0.gguf"), 1);
    let input = ids(&q8["input_ids"]);
    let rows: Vec<usize> = (0..input.len()).collect();
    let got = e.forward_sequence(&input, &rows, false).unwrap().logits;
    let want = floats(&q8["logits"]);
    let vocab = e.model().spec.vocab_size;
    let mean = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / got.len() as f32;
    let same_top1 = got
        .chunks(vocab)
        .zip(want.chunks(vocab))
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    assert!(mean <= 0.5, "{arch} q8_0: mean |Δlogit| {mean}");
    assert!(
        same_top1 * 4 >= input.len() * 3,
        "{arch} q8_0: top-1 agrees at {same_top1} of {} positions",
        input.len()
    );
}

#[test]
fn llama() {
    check_arch("llama");
}
#[test]
fn mistral() {
    check_arch("mistral");
}
#[test]
fn qwen2() {
    check_arch("qwen2");
}
#[test]
fn qwen3() {
    check_arch("qwen3");
}
#[test]
fn phi3() {
    check_arch("phi3");
}
#[test]
fn phi() {
    check_arch("phi");
}
#[test]
fn gemma() {
    check_arch("gemma");
}
#[test]
fn gemma2() {
    check_arch("gemma2");
}
#[test]
fn gemma3() {
    check_arch("gemma3");
}

#[test]
fn bf16_folders_widen_exactly() {
    for arch in ["llama", "qwen3"] {
        let dir = fixtures().join(arch).join("hf-bf16");
        let expected = read_json(&dir.join("expected.json"));
        check_f32_source(&dir, &expected, &format!("{arch} (HF bf16)"));
    }
}

#[test]
fn every_architecture_has_a_test() {
    for arch in ARCHS {
        assert!(
            fixtures().join(arch).join("expected.json").exists(),
            "{arch}"
        );
    }
}

#[test]
fn two_threads_match_one() {
    let dir = fixtures().join("gemma2");
    let input = ids(&read_json(&dir.join("expected.json"))["input_ids"]);
    let rows: Vec<usize> = (0..input.len()).collect();
    for file in ["model-f32.gguf", "model-q8_0.gguf"] {
        let a = engine(&dir.join(file), 1)
            .forward_sequence(&input, &rows, false)
            .unwrap()
            .logits;
        let b = engine(&dir.join(file), 2)
            .forward_sequence(&input, &rows, false)
            .unwrap()
            .logits;
        assert_eq!(a, b, "{file}: thread count changed the logits");
    }
}

#[test]
fn sharded_safetensors_folder_loads_like_the_single_file() {
    // Split the llama fixture's tensors over two files with an index, as
    // large checkpoints are published.
    let src = fixtures().join("llama");
    let dir = std::env::temp_dir().join(format!("ruvllm-sharded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let expected = read_json(&src.join("expected.json"));
    let input = ids(&expected["input_ids"]);
    let rows: Vec<usize> = (0..input.len()).collect();
    let got = engine(&dir, 1)
        .forward_sequence(&input, &rows, false)
        .unwrap()
        .logits;
    assert!(max_abs_diff(&got, &floats(&expected["logits"])) <= 1e-3);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_flat_batch_of_several_sequences_matches_each_alone_bit_for_bit() {
    use ruvllm::kv::KvCache;
    use ruvllm::model::{load_gguf, Batch};
    use ruvllm::threadpool::ThreadPool;
    // gemma2: sliding-window and global layers, soft-capping.
    let dir = fixtures().join("gemma2");
    let expected = read_json(&dir.join("expected.json"));
    let a_tokens = ids(&expected["input_ids"]);
    let b_tokens: Vec<u32> = a_tokens.iter().rev().take(10).copied().collect();
    let model = load_gguf(&dir.join("model-f32.gguf")).unwrap().model;
    let s = &model.spec;
    let pool = ThreadPool::new(2);
    let new_cache = || KvCache::<f32>::new(s.n_layers, s.n_kv_heads, s.head_dim, 4, 32);

    // Each sequence alone, all positions' logits.
    let alone = |tokens: &[u32], table: &[u32]| {
        let mut kv = new_cache();
        let positions: Vec<usize> = (0..tokens.len()).collect();
        let rows: Vec<usize> = (0..tokens.len()).collect();
        let batch = Batch {
            tokens,
            positions: &positions,
            seq_index: &vec![0; tokens.len()],
            block_tables: &[table],
            adapters: &[],
            factors: &[],
        };
        model
            .forward(&batch, &mut kv, &rows, &[], &pool)
            .unwrap()
            .logits
    };
    let table_a: Vec<u32> = (0..6).collect();
    let table_b: Vec<u32> = (10..13).collect();
    let la = alone(&a_tokens, &table_a);
    let lb = alone(&b_tokens, &table_b);
    assert!(max_abs_diff(&la, &floats(&expected["logits"])) <= 1e-3);

    // Both in one flat batch, interleaved, sharing one cache.
    let mut kv = new_cache();
    let (mut tokens, mut positions, mut seq_index) = (vec![], vec![], vec![]);
    for i in 0..a_tokens.len() {
        tokens.push(a_tokens[i]);
        positions.push(i);
        seq_index.push(0);
        if i < b_tokens.len() {
            tokens.push(b_tokens[i]);
            positions.push(i);
            seq_index.push(1);
        }
    }
    let rows: Vec<usize> = (0..tokens.len()).collect();
    let batch = Batch {
        tokens: &tokens,
        positions: &positions,
        seq_index: &seq_index,
        block_tables: &[&table_a, &table_b],
        adapters: &[],
        factors: &[],
    };
    let both = model
        .forward(&batch, &mut kv, &rows, &[], &pool)
        .unwrap()
        .logits;
    let v = s.vocab_size;
    let (mut ia, mut ib) = (0, 0);
    for (r, &seq) in seq_index.iter().enumerate() {
        let got = &both[r * v..(r + 1) * v];
        if seq == 0 {
            assert_eq!(got, &la[ia * v..(ia + 1) * v], "sequence A position {ia}");
            ia += 1;
        } else {
            assert_eq!(got, &lb[ib * v..(ib + 1) * v], "sequence B position {ib}");
            ib += 1;
        }
    }
}

/// An f16 KV cache (the server's default) rounds keys and values to half
/// precision: logits move by a few hundredths at most and the greedy
/// continuations of every architecture stay the same.
#[test]
fn an_f16_kv_cache_stays_close_to_the_reference() {
    for arch in ARCHS {
        let dir = fixtures().join(arch);
        let expected = read_json(&dir.join("expected.json"));
        let mut e = ruvllm::engine::Engine::load(
            &dir.join("model-f32.gguf"),
            &ruvllm::engine::EngineOptions {
                threads: 1,
                context: Some(512),
                kv_dtype: ruvllm::kv::KvDtype::F16,
                ..Default::default()
            },
        )
        .unwrap();
        let input = ids(&expected["input_ids"]);
        let rows: Vec<usize> = (0..input.len()).collect();
        let got = e.forward_sequence(&input, &rows, false).unwrap().logits;
        let d = max_abs_diff(&got, &floats(&expected["logits"]));
        assert!(d <= 0.1, "{arch}: f16 KV logits differ by {d}");
        let greedy = ids(&expected["greedy"]);
        let req = GenerationRequest {
            prompt: input,
            sampling: SamplingParams::greedy(),
            max_tokens: greedy.len(),
            ignore_eos: true,
            ..Default::default()
        };
        assert_eq!(
            e.generate(&req, &mut |_| true).unwrap().tokens,
            greedy,
            "{arch}"
        );
    }
}

/// Mistral's layers all use an 8-token sliding window, so the engine
/// releases blocks behind it while generating: a 100-token sequence holds a
/// handful of 4-token blocks instead of 25, and its tokens are those of a
/// full-cache forward pass over the same text.
#[test]
fn releasing_blocks_behind_a_sliding_window_changes_nothing() {
    use ruvllm::engine::{Engine, EngineOptions};
    use ruvllm::request::SeqEvent;
    use std::sync::{Arc, Mutex};
    let dir = fixtures().join("mistral");
    let opts = EngineOptions {
        threads: 1,
        context: Some(128),
        block_size: 4,
        ..Default::default()
    };
    let mut e = Engine::load(&dir.join("model-f32.gguf"), &opts).unwrap();
    let prompt = ids(&read_json(&dir.join("expected.json"))["input_ids"]);
    let req = GenerationRequest {
        prompt: prompt.clone(),
        sampling: SamplingParams::greedy(),
        max_tokens: 100 - prompt.len(),
        ignore_eos: true,
        ..Default::default()
    };
    let out = Arc::new(Mutex::new(Vec::new()));
    let sink_out = out.clone();
    let id = e.new_id();
    e.add_request(
        id,
        req,
        None,
        Box::new(move |ev| {
            if let SeqEvent::Finished(s) = ev {
                *sink_out.lock().unwrap() = s.tokens;
            }
            true
        }),
    );
    let mut peak = 0;
    while e.has_work() {
        e.step();
        peak = peak.max(e.stats().blocks_used);
    }
    assert!(peak <= 5, "{peak} blocks held at once");
    assert_eq!(e.stats().blocks_used, 0);
    let out = out.lock().unwrap().clone();
    assert_eq!(out.len(), 100 - prompt.len());
    let mut all = prompt.clone();
    all.extend_from_slice(&out[..out.len() - 1]);
    let rows: Vec<usize> = (prompt.len() - 1..all.len()).collect();
    let logits = e.forward_sequence(&all, &rows, false).unwrap().logits;
    let vocab = e.model().spec.vocab_size;
    let want: Vec<u32> = logits.chunks(vocab).map(argmax).collect();
    assert_eq!(out, want);
}
