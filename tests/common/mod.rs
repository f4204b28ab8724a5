//! Shared helpers for the integration tests.
#![allow(dead_code)]

pub mod server;

use ruvllm::engine::{Engine, EngineOptions};
use ruvllm::request::{GenerationRequest, SeqEvent};
use ruvllm::sampling::SamplingParams;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// The reference fixtures: `$RUVLLM_FIXTURES` or `../shared/fixtures`.
pub fn fixtures() -> PathBuf {
    std::env::var_os("RUVLLM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"))
}

pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    fn walk(v: &serde_json::Value, out: &mut Vec<f32>) {
        match v {
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            serde_json::Value::Number(n) => out.push(n.as_f64().unwrap() as f32),
            other => panic!("not a number: {other}"),
        }
    }
    let mut out = Vec::new();
    walk(v, &mut out);
    out
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn engine(path: &Path, threads: usize) -> Engine {
    Engine::load(
        path,
        &EngineOptions {
            threads,
            context: Some(512),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// Largest |a - b|.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `ruvllm perplexity --json ARGS...`, which must succeed, as JSON.
pub fn perplexity_json<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ruvllm"))
        .args(["perplexity", "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub type Seen = (Vec<u32>, Vec<u32>, usize);

/// Submits `reqs` to one engine, steps it until idle, and returns each
/// request's events (in submission order).
pub fn run_all(e: &mut Engine, reqs: Vec<GenerationRequest>) -> Vec<mpsc::Receiver<SeqEvent>> {
    let mut rxs = Vec::new();
    for r in reqs {
        let (tx, rx) = mpsc::channel();
        let id = e.new_id();
        e.add_request(id, r, None, Box::new(move |ev| tx.send(ev).is_ok()));
        rxs.push(rx);
    }
    while e.step() {}
    rxs
}

/// Runs `reqs` together through one engine; each request's tokens, their
/// logprobs' bits and its cached prompt tokens.
pub fn run_together(e: &mut Engine, reqs: Vec<GenerationRequest>) -> Vec<Seen> {
    run_all(e, reqs)
        .into_iter()
        .map(|rx| {
            let (mut toks, mut lps) = (Vec::new(), Vec::new());
            loop {
                match rx.recv().unwrap() {
                    SeqEvent::Token(t) => {
                        toks.push(t.id);
                        lps.push(t.logprobs.unwrap().logprob.to_bits());
                    }
                    SeqEvent::Finished(s) => return (toks, lps, s.cached_tokens),
                    SeqEvent::Failed(e) => panic!("{e}"),
                    _ => {}
                }
            }
        })
        .collect()
}

/// Greedy decoding of `n` tokens past EOS, with log-probabilities.
pub fn greedy_request(prompt: &[u32], n: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.to_vec(),
        sampling: SamplingParams::greedy(),
        max_tokens: n,
        ignore_eos: true,
        logprobs: Some(0),
        ..Default::default()
    }
}
