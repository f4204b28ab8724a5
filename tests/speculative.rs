//! Speculative decoding by prompt lookup changes no output: on both
//! default models, greedy and seeded sampling give the same tokens and the
//! same log-probabilities (bit for bit) with drafting on as off, alone, in
//! a batch, under preemption and at every max_tokens; and drafts are made
//! and accepted (else these tests would check nothing).

mod common;

use common::{models_dir, run_together, Seen};
use ruvllm::engine::{Engine, EngineOptions};
use ruvllm::request::GenerationRequest;
use ruvllm::sampling::SamplingParams;
use ruvllm::speculative::SpecConfig;

const MODELS: [&str; 2] = [
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma-3-270m-q4_k_m.gguf",
];

fn load(model: &str, kv_blocks: Option<usize>) -> Engine {
    Engine::load(
        &models_dir().join(model),
        &EngineOptions {
            // One thread each: the tests run side by side on two cores,
            // and spinning pool threads would fight over them.
            threads: 1,
            context: Some(1024),
            kv_blocks,
            ..Default::default()
        },
    )
    .unwrap()
}

/// A chat prompt that asks the model to copy a passage: its output repeats
/// its input, which is where prompt lookup drafts well.
fn copy_prompt(e: &Engine) -> Vec<u32> {
    let passage = "The lighthouse keeper climbed the spiral stairs every evening at dusk. \
        He wound the clockwork, trimmed the wick and polished the great lens until it shone. \
        Ships far out at sea saw the beam sweep across the water, once every ten seconds, \
        and knew the rocks were near. In the morning he wrote the weather in his logbook: \
        wind from the west, light rain, visibility four miles.";
    e.chat_prompt(&[ruvllm::chat::ChatMessage::new(
        "user",
        format!("Here is a passage:\n\n{passage}\n\nCopy the passage exactly."),
    )])
    .unwrap()
}

fn request(prompt: &[u32], n: usize, sampling: SamplingParams) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.to_vec(),
        sampling,
        max_tokens: n,
        logprobs: Some(0),
        ..Default::default()
    }
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        repetition_penalty: 1.1,
        seed: Some(seed),
        ..SamplingParams::greedy()
    }
}

/// `reqs` run together with drafting off, then on (up to `max_seqs`
/// drafting sequences); returns both runs and the drafted and accepted
/// tokens of the second.
fn off_and_on(
    e: &mut Engine,
    reqs: &[GenerationRequest],
    max_seqs: usize,
) -> (Vec<Seen>, Vec<Seen>, u64, u64) {
    e.set_speculative(None);
    let off = run_together(e, reqs.to_vec());
    e.set_speculative(Some(SpecConfig {
        max_seqs,
        ..Default::default()
    }));
    let before = e.counters();
    let on = run_together(e, reqs.to_vec());
    let after = e.counters();
    (
        off,
        on,
        after.draft_tokens - before.draft_tokens,
        after.accepted_draft_tokens - before.accepted_draft_tokens,
    )
}

#[test]
fn greedy_and_seeded_outputs_are_the_same_with_drafting_on() {
    for model in MODELS {
        let mut e = load(model, None);
        let p = copy_prompt(&e);
        for sampling in [SamplingParams::greedy(), sampled(7)] {
            let (off, on, drafted, accepted) =
                off_and_on(&mut e, &[request(&p, 48, sampling.clone())], 1);
            assert_eq!(off[0].0, on[0].0, "{model}: tokens differ ({sampling:?})");
            assert_eq!(
                off[0].1, on[0].1,
                "{model}: log-probabilities differ ({sampling:?})"
            );
            assert!(
                drafted > 0 && accepted > 0,
                "{model}: {accepted} of {drafted} drafts accepted"
            );
        }
    }
}

/// Drafts never run past max_tokens (they are capped so that the token
/// after them still fits): every cut gives the same tokens and
/// log-probabilities, and drafts are made on the way.
#[test]
fn max_tokens_caps_drafts() {
    let mut e = load(MODELS[0], None);
    let p = copy_prompt(&e);
    let full = off_and_on(&mut e, &[request(&p, 16, SamplingParams::greedy())], 1);
    assert!(full.3 > 0, "no draft accepted in 16 tokens");
    for n in [1, 2, 3, 5, 6, 9] {
        let (off, on, _, _) = off_and_on(&mut e, &[request(&p, n, SamplingParams::greedy())], 1);
        assert_eq!(off[0].0, on[0].0, "max_tokens {n}");
        assert_eq!(off[0].1, on[0].1, "max_tokens {n}");
        assert_eq!(on[0].0.len(), n);
        assert_eq!(on[0].0, full.1[0].0[..n]);
    }
}

/// A stop string or EOS that ends the output in the middle of checking
/// drafts ends it where plain decoding does, with the same text.
#[test]
fn a_stop_inside_drafts_ends_the_same() {
    let mut e = load(MODELS[0], None);
    let p = copy_prompt(&e);
    let text = |e: &mut Engine, stop: &[&str], spec: bool| {
        e.set_speculative(spec.then(SpecConfig::default));
        let mut r = request(&p, 120, SamplingParams::greedy());
        r.stop = stop.iter().map(|s| s.to_string()).collect();
        let mut toks = Vec::new();
        let s = e
            .generate(&r, &mut |t| {
                toks.push(t.id);
                true
            })
            .unwrap();
        (toks, s.text, s.finish)
    };
    let (_, full, _) = text(&mut e, &[], false);
    // A word the copy reaches after drafts have been accepted.
    let stop = ["beam", "logbook", "rocks"]
        .into_iter()
        .find(|w| full.find(w).is_some_and(|i| i > 60))
        .unwrap_or_else(|| panic!("no stop word in {full:?}"));
    for stops in [vec![stop], vec![]] {
        assert_eq!(
            text(&mut e, &stops, false),
            text(&mut e, &stops, true),
            "stop {stops:?}"
        );
    }
}

/// A request after a drafting run reuses that run's output blocks from
/// the prefix cache: rejected drafts' keys and values must not be in them.
#[test]
fn output_blocks_cached_after_drafting_hold_no_rejected_drafts() {
    let follow = |spec: bool| {
        let mut e = load(MODELS[0], None);
        e.set_speculative(spec.then(SpecConfig::default));
        let p = copy_prompt(&e);
        let first = run_together(&mut e, vec![request(&p, 64, SamplingParams::greedy())]).remove(0);
        let mut again = p.clone();
        again.extend(&first.0);
        again.extend(e.tokenizer.encode(" And again:", false).unwrap());
        e.set_speculative(None);
        let second =
            run_together(&mut e, vec![request(&again, 24, SamplingParams::greedy())]).remove(0);
        assert!(
            second.2 > p.len(),
            "the output's blocks were not reused ({} cached)",
            second.2
        );
        (first, second)
    };
    let (a, b) = (follow(false), follow(true));
    assert_eq!(a.0 .0, b.0 .0);
    assert_eq!(
        a.1 .0, b.1 .0,
        "tokens after reusing the cached output differ"
    );
    assert_eq!(
        a.1 .1, b.1 .1,
        "log-probabilities after reusing the cached output differ"
    );
}

/// Several drafting sequences in one batch beside prompts being computed,
/// and a pool so small that sequences are preempted mid-draft: each gets
/// what it gets alone without drafts.
#[test]
fn batches_and_preemption_change_nothing() {
    for kv_blocks in [None, Some(18)] {
        let mut e = load(MODELS[0], kv_blocks);
        let p = copy_prompt(&e);
        let mut reqs: Vec<GenerationRequest> = (0..2)
            .map(|i| request(&p, 40 + 10 * i, sampled(i as u64)))
            .collect();
        reqs.push(request(&p, 50, SamplingParams::greedy()));
        // One computes its prompt's log-probabilities beside the drafts.
        let mut other = p.clone();
        other.extend(e.tokenizer.encode(" Then say it twice.", false).unwrap());
        let mut lp = request(&other, 30, SamplingParams::greedy());
        lp.prompt_logprobs = Some(2);
        reqs.push(lp);
        for r in &mut reqs {
            r.ignore_eos = true;
        }
        let alone: Vec<Seen> = {
            e.set_speculative(None);
            reqs.iter()
                .map(|r| run_together(&mut e, vec![r.clone()]).remove(0))
                .collect()
        };
        let preempted = e.stats().preemptions;
        let (_, on, drafted, accepted) = off_and_on(&mut e, &reqs, 8);
        for (i, (a, b)) in alone.iter().zip(&on).enumerate() {
            assert_eq!(a.0, b.0, "request {i} (kv_blocks {kv_blocks:?})");
            assert_eq!(a.1, b.1, "request {i} (kv_blocks {kv_blocks:?})");
        }
        assert!(accepted > 0, "{accepted} of {drafted} accepted");
        if kv_blocks.is_some() {
            assert!(
                e.stats().preemptions > preempted,
                "the small pool preempted nobody"
            );
        }
    }
}
