//! Agreement with llama.cpp on the two default models
//! (`../shared/fixtures/llamacpp/`): exact tokenization, and the same
//! greedy choices when teacher-forced on llama.cpp's continuation.
//! The models come from `scripts/fetch-models.sh`.

mod common;
use common::*;
use ruvllm::chat::ChatMessage;
use ruvllm::sampling::argmax;

fn model_path(file: &str) -> std::path::PathBuf {
    let p = models_dir().join(file);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        p.display()
    );
    p
}

// Both runtimes quantize activations to 8 bits and llama.cpp keeps K/V in
// f16; on these small models such rounding alone moves probabilities by a
// few hundredths, so near-ties flip either way from build to build. llama.cpp
// itself, run with exact attention (-fa off, f32 K/V), agrees with this
// reference at only 185/192 positions on SmolLM2 (flips up to 0.049 below its
// top-1) and 189/192 on Gemma 3 (scripts/llamacpp-self-agreement.py). The
// bounds below sit just above that noise as we measure it (mean |Δp| 0.015,
// worst 0.17, 3–8 flips of 192, each within 0.065 of llama.cpp's top-1) and
// far below what a real defect produces.

/// Least share of positions where our top-1 is llama.cpp's.
const MIN_AGREEMENT_PERCENT: usize = 95;
/// Where we differ, llama.cpp's probability of our choice is at most this far below its top-1.
const NEAR_TIE: f64 = 0.08;
/// Largest |Δp| over llama.cpp's top-10 at any position, and its mean.
const MAX_PROB_DIFF: f64 = 0.25;
const MEAN_PROB_DIFF: f64 = 0.03;

fn softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = logits.iter().map(|&v| (v as f64 - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

fn check(model_file: &str, reference: &str) {
    let refs = read_json(&fixtures().join("llamacpp").join(reference));
    let mut e = engine(&model_path(model_file), 2);
    let vocab = e.model().spec.vocab_size;
    let (mut agree, mut total, mut sum_diff) = (0, 0, 0f64);
    for (name, p) in refs["prompts"].as_object().unwrap() {
        let text = p["prompt"].as_str().unwrap();
        let with = ids(&p["prompt_ids_add_special_true"]);
        assert_eq!(
            e.tokenizer.encode(text, true).unwrap(),
            with,
            "{name}: tokens with special"
        );
        assert_eq!(
            e.tokenizer.encode(text, false).unwrap(),
            ids(&p["prompt_ids_add_special_false"]),
            "{name}: tokens without special"
        );
        let generated = ids(&p["generated_ids"]);
        assert_eq!(
            e.tokenizer.decode(&generated, false),
            p["generated_text"].as_str().unwrap(),
            "{name}: detokenization"
        );
        let mut input = with.clone();
        input.extend_from_slice(&generated[..generated.len() - 1]);
        let rows: Vec<usize> = (with.len() - 1..input.len()).collect();
        let logits = e.forward_sequence(&input, &rows, false).unwrap().logits;
        for (i, (row, pos)) in logits
            .chunks(vocab)
            .zip(p["positions"].as_array().unwrap())
            .enumerate()
        {
            total += 1;
            let probs = softmax(row);
            let top = pos["top10"].as_array().unwrap();
            let mut worst = 0f64;
            for t in top {
                let id = t["id"].as_u64().unwrap() as usize;
                worst = worst.max((probs[id] - t["prob"].as_f64().unwrap()).abs());
            }
            assert!(
                worst <= MAX_PROB_DIFF,
                "{name} step {i}: probabilities differ by {worst:.3}"
            );
            sum_diff += worst;
            let ours = argmax(row);
            if ours == generated[i] {
                agree += 1;
                continue;
            }
            let p1 = top[0]["prob"].as_f64().unwrap();
            let p_ours = top
                .iter()
                .find(|t| t["id"].as_u64() == Some(ours as u64))
                .map_or(0.0, |t| t["prob"].as_f64().unwrap());
            assert!(
                p1 - p_ours <= NEAR_TIE,
                "{name} step {i}: we chose {ours} ({p_ours:.4} to llama.cpp), llama.cpp {} ({p1:.4})",
                generated[i]
            );
        }
    }
    let mean = sum_diff / total as f64;
    assert!(
        mean <= MEAN_PROB_DIFF,
        "{model_file}: mean probability difference {mean:.4}"
    );
    assert!(
        agree * 100 >= total * MIN_AGREEMENT_PERCENT,
        "{model_file}: top-1 agrees at {agree} of {total} positions"
    );

    // The chat prompt's tokens as llama.cpp rendered them.
    let chat = &refs["chat"];
    let rendered = chat["rendered_prompt_via_apply_template"].as_str().unwrap();
    assert_eq!(
        e.tokenizer.encode(rendered, true).unwrap(),
        ids(&chat["rendered_prompt_ids_add_special_true"]),
        "chat prompt tokens"
    );
}

#[test]
fn smollm2_matches_llamacpp() {
    check("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2.json");
}

#[test]
fn gemma3_matches_llamacpp() {
    check("gemma-3-270m-q4_k_m.gguf", "gemma3.json");
}

#[test]
fn smollm2_chat_template_renders_as_llamacpp() {
    let refs = read_json(&fixtures().join("llamacpp/smollm2.json"));
    let e = engine(&model_path("SmolLM2-135M-Instruct.Q4_1.gguf"), 1);
    let msgs: Vec<ChatMessage> = serde_json::from_value(refs["chat"]["messages"].clone()).unwrap();
    assert_eq!(
        e.template.render(&msgs, true).unwrap(),
        refs["chat"]["rendered_prompt_via_apply_template"]
            .as_str()
            .unwrap()
    );
    assert_eq!(
        e.chat_prompt(&msgs).unwrap(),
        ids(&refs["chat"]["rendered_prompt_ids_add_special_true"])
    );
}
