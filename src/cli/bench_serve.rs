//! `ruvllm bench-serve`: N concurrent streaming clients against any
//! OpenAI-compatible server (ruvllm or llama-server), reporting aggregate
//! output tokens/s, time to first token and inter-token latency.

use futures::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct BenchServeConfig {
    pub url: String,
    /// Model names to send: request i names the (i mod n)-th (none: the
    /// server's only model), so one run can spread over LoRA adapters.
    pub models: Vec<String>,
    pub clients: usize,
    pub requests: usize,
    pub max_tokens: usize,
    /// Instead of the load test: one client sends `requests` prompts that
    /// share a document of about this many tokens, one after another.
    pub shared_prefix: Option<usize>,
    pub label: String,
    pub json: bool,
}

/// About 90 tokens with SmolLM2's tokenizer; each request gets a distinct
/// first line so that no two share a cached prefix.
const PROMPT_BODY: &str = "Write a detailed story about a lighthouse keeper who lives alone on a small rocky island far from the coast. \
Describe the daily routine of keeping the lamp lit, the storms that come in autumn, the supply boat that arrives once a month, \
the letters from a sister in the city, and the night a stranger's boat washes up on the shore with nobody aboard.";

struct Sample {
    ttft: f64,
    itl: Vec<f64>,
    tokens: usize,
    prompt_tokens: Option<usize>,
    cached_tokens: Option<usize>,
}

fn load_prompt(i: usize) -> String {
    format!("Story number {i}.\n{PROMPT_BODY}")
}

/// A document of about `tokens` tokens (14 per line with common BPE
/// vocabularies) followed by question `i`.
fn shared_prompt(tokens: usize, i: usize) -> String {
    let mut doc: String = (0..tokens / 14)
        .map(|j| format!("Fact {j}: the number {j} is followed by {}.\n", j + 1))
        .collect();
    doc.push_str(&format!(
        "Question {i}: which number follows {}?",
        3 * i + 1
    ));
    doc
}

pub fn run(cfg: BenchServeConfig) -> ruvllm::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ruvllm::Error::io("tokio runtime", e))?;
    match cfg.shared_prefix {
        Some(n) => rt.block_on(shared_prefix(cfg, n)),
        None => rt.block_on(bench(cfg)),
    }
}

/// The model name request `i` sends.
fn model_for(models: &[String], i: usize) -> Option<&str> {
    (!models.is_empty()).then(|| models[i % models.len()].as_str())
}

async fn shared_prefix(cfg: BenchServeConfig, tokens: usize) -> ruvllm::Result<()> {
    let client = reqwest::Client::new();
    let mut samples = Vec::new();
    for i in 0..cfg.requests.max(2) {
        let prompt = shared_prompt(tokens, i);
        let s = one(
            &client,
            &cfg.url,
            model_for(&cfg.models, i),
            prompt,
            cfg.max_tokens,
        )
        .await
        .map_err(|e| ruvllm::Error::Internal(format!("request failed: {e}")))?;
        samples.push(s);
    }
    let first = samples[0].ttft;
    let rest: Vec<f64> = samples[1..].iter().map(|s| s.ttft).collect();
    let rest_mean = rest.iter().sum::<f64>() / rest.len() as f64;
    let rest_max = rest.iter().copied().fold(0.0, f64::max);
    let cached: Vec<Option<usize>> = samples.iter().map(|s| s.cached_tokens).collect();
    let r = json!({
        "label": cfg.label,
        "requests": samples.len(),
        "prompt_tokens": samples[0].prompt_tokens,
        "ttft_first_s": first,
        "ttft_rest_mean_s": rest_mean,
        "ttft_rest_max_s": rest_max,
        "rest_over_first": rest_max / first,
        "cached_tokens": cached,
    });
    if cfg.json {
        println!("{r}");
    } else {
        println!(
            "{}: {} requests sharing a {:?}-token prompt prefix; TTFT first {:.3} s, later mean {:.3} s, max {:.3} s ({:.0}% of the first); cached tokens {:?}",
            cfg.label,
            samples.len(),
            samples[0].prompt_tokens,
            first,
            rest_mean,
            rest_max,
            100.0 * rest_max / first,
            cached
        );
    }
    Ok(())
}

async fn bench(cfg: BenchServeConfig) -> ruvllm::Result<()> {
    // A fresh connection per request: servers that close a streamed
    // response's connection would otherwise race the pool's reuse of it.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| ruvllm::Error::Internal(e.to_string()))?;
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..cfg.clients {
        let (client, next) = (client.clone(), next.clone());
        let (url, models, total, max_tokens) = (
            cfg.url.clone(),
            cfg.models.clone(),
            cfg.requests,
            cfg.max_tokens,
        );
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, String>(out);
                }
                let model = model_for(&models, i);
                out.push(one(&client, &url, model, load_prompt(i), max_tokens).await?);
            }
        }));
    }
    let mut samples = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(s)) => samples.extend(s),
            Ok(Err(e)) => return Err(ruvllm::Error::Internal(format!("request failed: {e}"))),
            Err(e) => return Err(ruvllm::Error::Internal(e.to_string())),
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let mut ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
    let mut itl: Vec<f64> = samples.iter().flat_map(|s| s.itl.iter().copied()).collect();
    let prompt_tokens = samples.iter().filter_map(|s| s.prompt_tokens).max();
    let mean_ttft = ttft.iter().sum::<f64>() / ttft.len().max(1) as f64;
    let r = json!({
        "label": cfg.label,
        "clients": cfg.clients,
        "requests": samples.len(),
        "prompt_tokens": prompt_tokens,
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_per_s": tokens as f64 / wall,
        "ttft_mean_s": mean_ttft,
        "ttft_p50_s": pct(&mut ttft, 0.5),
        "ttft_p99_s": pct(&mut ttft, 0.99),
        "itl_p50_s": pct(&mut itl, 0.5),
        "itl_p99_s": pct(&mut itl, 0.99),
    });
    if cfg.json {
        println!("{r}");
    } else {
        println!(
            "{}: {} clients, {} requests, {} output tokens in {:.1} s = {:.1} tok/s; TTFT p50 {:.3} s p99 {:.3} s; ITL p50 {:.1} ms p99 {:.1} ms",
            cfg.label,
            cfg.clients,
            samples.len(),
            tokens,
            wall,
            tokens as f64 / wall,
            r["ttft_p50_s"].as_f64().unwrap_or(0.0),
            r["ttft_p99_s"].as_f64().unwrap_or(0.0),
            r["itl_p50_s"].as_f64().unwrap_or(0.0) * 1e3,
            r["itl_p99_s"].as_f64().unwrap_or(0.0) * 1e3,
        );
    }
    Ok(())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn one(
    client: &reqwest::Client,
    url: &str,
    model: Option<&str>,
    prompt: String,
    max_tokens: usize,
) -> Result<Sample, String> {
    let mut body = json!({
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "ignore_eos": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    let t0 = Instant::now();
    let resp = client
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .timeout(Duration::from_secs(1800))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        let status = resp.status();
        return Err(format!(
            "{status}: {}",
            resp.text().await.unwrap_or_default()
        ));
    }
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let (mut usage_tokens, mut prompt_tokens, mut cached_tokens) = (None, None, None);
    // Several tokens may arrive in one read; their gaps share the time since
    // the previous token evenly, rather than counting as zero.
    let (mut first, mut last, mut itl): (Option<f64>, Option<f64>, Vec<f64>) =
        (None, None, Vec::new());
    let mut texts = 0usize;
    'read: while let Some(chunk) = stream.next().await {
        let now = t0.elapsed().as_secs_f64();
        let mut in_read = 0usize;
        buf.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let line = String::from_utf8_lossy(&event);
            let Some(data) = line.trim().strip_prefix("data:").map(str::trim) else {
                continue;
            };
            if data == "[DONE]" {
                account(now, in_read, &mut first, &mut last, &mut itl);
                break 'read;
            }
            let v: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
            if let Some(e) = v.get("error") {
                return Err(e.to_string());
            }
            let text = v["choices"][0]["text"].as_str().unwrap_or("");
            if !text.is_empty() {
                in_read += 1;
                texts += 1;
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                usage_tokens = u["completion_tokens"].as_u64().map(|n| n as usize);
                prompt_tokens = u["prompt_tokens"].as_u64().map(|n| n as usize);
                cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .map(|n| n as usize);
            }
        }
        account(now, in_read, &mut first, &mut last, &mut itl);
    }
    let Some(first) = first else {
        return Err("no tokens came back".into());
    };
    Ok(Sample {
        ttft: first,
        itl,
        tokens: usage_tokens.unwrap_or(texts),
        prompt_tokens,
        cached_tokens,
    })
}

/// Records `n` tokens that arrived together at `now`: the first token of a
/// response sets the time to first token; later ones each get an equal
/// share of the time since the previous arrival.
fn account(
    now: f64,
    n: usize,
    first: &mut Option<f64>,
    last: &mut Option<f64>,
    itl: &mut Vec<f64>,
) {
    if n == 0 {
        return;
    }
    let gaps = match *last {
        None => {
            *first = Some(now);
            n - 1
        }
        Some(_) => n,
    };
    let since = now - last.unwrap_or(now);
    itl.extend(std::iter::repeat_n(since / gaps.max(1) as f64, gaps));
    *last = Some(now);
}
