//! `ruvllm serve` end to end: a live server on SmolLM2, driven over HTTP.

mod common;

use common::server::*;
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The greedy output of each prompt run alone, one after another.
async fn run_alone(s: &Server, ps: &[String], max_tokens: usize) -> Vec<String> {
    let mut alone = Vec::new();
    for p in ps {
        let (st, v) = post(s, "/v1/completions", greedy(p, max_tokens)).await;
        assert_eq!(st, 200, "{v}");
        alone.push(text(&v));
    }
    alone
}

/// Runs all prompts at once and checks each output against `alone`.
async fn run_together(s: &Server, ps: &[String], max_tokens: usize, alone: &[String], what: &str) {
    let together = futures::future::join_all(
        ps.iter()
            .map(|p| post(s, "/v1/completions", greedy(p, max_tokens))),
    )
    .await;
    for (i, ((st, v), want)) in together.iter().zip(alone).enumerate() {
        assert_eq!(*st, 200, "{v}");
        assert_eq!(&text(v), want, "request {i} changed {what}");
    }
}

fn greedy(prompt: &str, max_tokens: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

fn text(v: &Value) -> String {
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

fn prompts(n: usize) -> Vec<String> {
    let topics = [
        "the sea",
        "a city at night",
        "mountains",
        "a library",
        "winter",
        "a robot",
        "the moon",
        "an old clock",
    ];
    (0..n)
        .map(|i| {
            format!(
                "Request {i}. Write {} words about {} and why it matters to the people who live nearby:",
                10 + i,
                topics[i % topics.len()]
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_works_against_the_server() {
    let s = start(&[]).await;
    run_python_check(&s, "openai_client.py");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_greedy_requests_match_the_same_requests_run_alone() {
    let s = start(&[]).await;
    // Together, each lands at some position of shared batches, some with
    // their prompt's blocks in the prefix cache from the solo run.
    let ps = prompts(32);
    let alone = run_alone(&s, &ps, 24).await;
    run_together(&s, &ps, 24, &alone, "when batched").await;
    assert!(metric(&s, "ruvllm_prefix_cache_hit_tokens_total").await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_requests_free_their_blocks_at_once() {
    let s = start(&[]).await;
    let client = reqwest::Client::new();
    let mut streams = Vec::new();
    for p in prompts(8) {
        let r = client
            .post(format!("{}/v1/completions", s.url))
            .json(&json!({"prompt": p, "max_tokens": 3000, "ignore_eos": true, "stream": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        streams.push(r.bytes_stream());
    }
    // Two that wait for a whole answer, abandoned by their clients too.
    let waiting: Vec<_> = prompts(2)
        .into_iter()
        .map(|p| {
            let (client, url) = (client.clone(), s.url.clone());
            tokio::spawn(async move {
                client
                    .post(format!("{url}/v1/completions"))
                    .json(&json!({"prompt": p, "max_tokens": 3000, "ignore_eos": true}))
                    .send()
                    .await
            })
        })
        .collect();
    // Read a few chunks of each stream so that all are running, then hang up.
    for st in &mut streams {
        for _ in 0..3 {
            st.next().await.unwrap().unwrap();
        }
    }
    wait_for(
        &s,
        "ruvllm_requests_running",
        |v| v == 10.0,
        Duration::from_secs(5),
    )
    .await;
    drop(streams);
    waiting.iter().for_each(|w| w.abort());
    drop(client);
    let t0 = Instant::now();
    let second = Duration::from_secs(1);
    wait_for(&s, "ruvllm_requests_running", |v| v == 0.0, second).await;
    wait_for(
        &s,
        "ruvllm_kv_blocks_used",
        |v| v == 0.0,
        second.saturating_sub(t0.elapsed()),
    )
    .await;
    // Each of the ten was stopped by the server, not left to finish.
    assert_eq!(metric(&s, "ruvllm_requests_aborted_total").await, 10.0);
    let (st, v) = post(&s, "/v1/completions", greedy("Hello", 4)).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_budget_too_small_for_the_load_preempts_without_changing_outputs() {
    // 5 MiB holds 14 blocks of 16 tokens (360 KiB each in f16) = 224
    // tokens; six requests of ~100 tokens each need almost three times that.
    let s = start(&["--kv-cache-mb", "5"]).await;
    let ps = prompts(6);
    let alone = run_alone(&s, &ps, 80).await;
    assert_eq!(metric(&s, "ruvllm_preemptions_total").await, 0.0);
    run_together(&s, &ps, 80, &alone, "under preemption").await;
    assert!(metric(&s, "ruvllm_preemptions_total").await > 0.0);
    // Gauges are published after each step, just after the last answer.
    wait_for(
        &s,
        "ruvllm_kv_blocks_used",
        |v| v == 0.0,
        Duration::from_secs(1),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_requests_sharing_a_long_prefix_reuse_its_blocks() {
    let s = start(&[]).await;
    let tokenize = |text: String| {
        let s = &s;
        async move {
            post(s, "/tokenize", json!({"prompt": text})).await.1["count"]
                .as_u64()
                .unwrap()
        }
    };
    // A document of about 1,000 tokens, then a different question each time.
    let mut doc = String::new();
    let mut i = 0;
    while tokenize(doc.clone()).await < 1000 {
        doc.push_str(&format!(
            "Fact {i}: the number {i} is followed by {}. ",
            i + 1
        ));
        i += 1;
    }
    for q in 0..10 {
        let (st, v) = post(
            &s,
            "/v1/completions",
            greedy(&format!("{doc}\nQuestion {q}: what follows {q}?"), 4),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        if q == 0 {
            assert_eq!(cached, 0);
        } else {
            assert!(cached >= 960, "request {q}: only {cached} cached tokens");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_clear_errors_while_a_stream_keeps_flowing() {
    let s = start(&["--max-body-kb", "256"]).await;
    let client = reqwest::Client::new();
    let stream = client
        .post(format!("{}/v1/completions", s.url))
        .json(&json!({"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": true, "stream": true, "temperature": 0}))
        .send()
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let body = stream.text().await.unwrap();
        body.matches("\"text\"").count()
    });
    let long_prompt: Vec<u32> = (0..5000).map(|i| 100 + i % 1000).collect();
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        ("bad JSON", "/v1/completions", "{\"prompt\": ".into(), 400, "JSON"),
        ("not an object", "/v1/completions", "[1, 2]".into(), 400, "object"),
        ("wrong type", "/v1/completions", json!({"prompt": "x", "max_tokens": "ten"}).to_string(), 400, "invalid"),
        ("missing prompt", "/v1/completions", json!({"max_tokens": 5}).to_string(), 400, "prompt"),
        ("negative max_tokens", "/v1/completions", json!({"prompt": "x", "max_tokens": -5}).to_string(), 400, "max_tokens"),
        ("absurd max_tokens", "/v1/completions", json!({"prompt": "x", "max_tokens": 1_000_000_000u64}).to_string(), 400, "maximum context length"),
        ("n = 0", "/v1/completions", json!({"prompt": "x", "n": 0}).to_string(), 400, "n must be"),
        ("absurd n", "/v1/completions", json!({"prompt": "x", "n": 100000}).to_string(), 400, "n must be"),
        ("absurd logprobs", "/v1/completions", json!({"prompt": "x", "logprobs": 500}).to_string(), 400, "log-probabilities"),
        ("absurd top_logprobs", "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 99}).to_string(), 400, "log-probabilities"),
        ("empty messages", "/v1/chat/completions", json!({"messages": []}).to_string(), 400, "messages"),
        ("bad role", "/v1/chat/completions", json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string(), 400, "role"),
        ("unknown model", "/v1/completions", json!({"model": "gpt-9", "prompt": "x"}).to_string(), 404, "gpt-9"),
        ("prompt longer than the context", "/v1/completions", json!({"prompt": long_prompt}).to_string(), 400, "5000 tokens"),
        ("token outside the vocabulary", "/v1/completions", json!({"prompt": [1, 99999999]}).to_string(), 400, "vocabulary"),
        ("negative temperature", "/v1/completions", json!({"prompt": "x", "temperature": -1}).to_string(), 400, "temperature"),
        ("NaN-like top_p", "/v1/completions", json!({"prompt": "x", "top_p": 7}).to_string(), 400, "top_p"),
        ("bad logit_bias key", "/v1/completions", json!({"prompt": "x", "logit_bias": {"abc": 1}}).to_string(), 400, "logit_bias"),
        ("empty prompt", "/v1/completions", json!({"prompt": ""}).to_string(), 400, "empty"),
        ("empty embedding input", "/v1/embeddings", json!({"input": []}).to_string(), 400, "no prompt"),
        ("bad detokenize id", "/detokenize", json!({"tokens": [-3]}).to_string(), 400, "vocabulary"),
        ("body too large", "/v1/completions", format!("{{\"prompt\": \"{}\"}}", "a".repeat(400_000)), 413, ""),
        ("no such endpoint", "/v1/nothing", "{}".into(), 404, "endpoint"),
    ];
    for (what, path, body, status, needle) in cases {
        let r = client
            .post(format!("{}{path}", s.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{what}");
        let v: Value = r.json().await.unwrap_or(Value::Null);
        let msg = v["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no error message in {v}"));
        assert!(
            msg.contains(needle),
            "{what}: message '{msg}' does not mention '{needle}'"
        );
        assert!(v["error"]["type"].is_string(), "{what}: {v}");
    }
    // The stream ran to its end meanwhile, and the server still answers.
    let chunks = reader.await.unwrap();
    assert!(chunks >= 250, "the stream delivered only {chunks} chunks");
    let (st, v) = post(&s, "/v1/completions", greedy("Hello", 4)).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_and_the_api_key_is_enforced() {
    let s = start(&[
        "--max-num-seqs",
        "1",
        "--max-waiting",
        "1",
        "--api-key",
        "sekret",
    ])
    .await;
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/v1/completions", s.url))
        .json(&greedy("x", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let send = |p: &str| {
        client
            .post(format!("{}/v1/completions", s.url))
            .bearer_auth("sekret")
            .json(&json!({"prompt": p, "max_tokens": 500, "ignore_eos": true, "stream": true}))
            .send()
    };
    // One running and one waiting fill the server; the third is refused.
    let (a, b) = (send("one").await.unwrap(), send("two").await.unwrap());
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let c = send("three").await.unwrap();
    assert_eq!(c.status(), 429);
    assert!(c.headers().contains_key("retry-after"));
    let v: Value = c.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("capacity"),
        "{v}"
    );
    drop((a, b));
    // Once they are gone, requests are accepted again.
    let t0 = Instant::now();
    loop {
        let r = client
            .post(format!("{}/v1/completions", s.url))
            .bearer_auth("sekret")
            .json(&greedy("x", 2))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "still refused: {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
