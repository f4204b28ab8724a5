//! `ruvllm bench-hostile`: a mixed load of normal, malformed, half-bad and
//! abandoned requests against a running server, then checks that it gave
//! everything back: nothing in flight, no KV block held, memory back near
//! where it started, and a normal request still served.

use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

pub struct HostileConfig {
    pub url: String,
    pub requests: usize,
    pub clients: usize,
    /// Share of requests that are malformed, half-bad or abandoned.
    pub bad_fraction: f64,
    /// The server's process id, to read its resident memory.
    pub pid: Option<u32>,
    /// Seconds to wait after the load before the last memory reading (let
    /// the server's idle trim run).
    pub settle_secs: u64,
    pub json: bool,
}

/// What one request of the mix does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Normal,
    BadJson,
    UnknownModel,
    HalfBadEmbeddings,
    HalfBadCompletions,
    BadChat,
    AbandonedStream,
    AbandonedWaiting,
    AbandonedEmbeddings,
    HalfHeader,
    TruncatedBody,
}

const BAD: [Kind; 10] = [
    Kind::BadJson,
    Kind::UnknownModel,
    Kind::HalfBadEmbeddings,
    Kind::HalfBadCompletions,
    Kind::BadChat,
    Kind::AbandonedStream,
    Kind::AbandonedWaiting,
    Kind::AbandonedEmbeddings,
    Kind::HalfHeader,
    Kind::TruncatedBody,
];

/// The kind of request `i`: bad ones spread evenly through the run.
fn kind_of(i: usize, bad_fraction: f64) -> Kind {
    let before = (i as f64 * bad_fraction).floor();
    let after = ((i + 1) as f64 * bad_fraction).floor();
    if after > before {
        BAD[before as usize % BAD.len()]
    } else {
        Kind::Normal
    }
}

/// A prompt longer than any context this server is likely to have.
fn too_long() -> Vec<u32> {
    (0..20_000).map(|i| 100 + i % 1000).collect()
}

/// The outcome of one request: an HTTP status, or what happened instead.
async fn one(client: &reqwest::Client, url: &str, kind: Kind, i: usize) -> String {
    let post = |path: &str, body: Value| client.post(format!("{url}{path}")).json(&body);
    let status = |r: Result<reqwest::Response, reqwest::Error>| match r {
        Ok(r) => r.status().as_u16().to_string(),
        Err(e) if e.is_timeout() => "abandoned".to_string(),
        Err(e) => format!("error: {e}"),
    };
    match kind {
        Kind::Normal => {
            let r = post(
                "/v1/completions",
                json!({"prompt": format!("Request {i}: tell me a story."), "max_tokens": 8, "stream": true, "temperature": 0}),
            )
            .send()
            .await;
            match r {
                Ok(r) if r.status() == 200 => {
                    let body = r.text().await.unwrap_or_default();
                    if body.contains("[DONE]") && !body.contains("\"error\"") {
                        "200".into()
                    } else {
                        "200 (broken stream)".into()
                    }
                }
                other => status(other),
            }
        }
        Kind::BadJson => status(
            client
                .post(format!("{url}/v1/completions"))
                .header("content-type", "application/json")
                .body("{\"prompt\": ")
                .send()
                .await,
        ),
        Kind::UnknownModel => status(
            post("/v1/completions", json!({"model": "nope", "prompt": "x"}))
                .send()
                .await,
        ),
        Kind::HalfBadEmbeddings => status(
            post("/v1/embeddings", json!({"input": [vec![1u32, 2, 3], too_long()]}))
                .send()
                .await,
        ),
        Kind::HalfBadCompletions => status(
            post(
                "/v1/completions",
                json!({"prompt": [vec![1u32, 2, 3], too_long()], "max_tokens": 4}),
            )
            .send()
            .await,
        ),
        Kind::BadChat => status(
            post(
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}]}),
            )
            .send()
            .await,
        ),
        Kind::AbandonedStream => {
            let r = post(
                "/v1/completions",
                json!({"prompt": format!("Abandoned {i}"), "max_tokens": 500, "ignore_eos": true, "stream": true}),
            )
            .send()
            .await;
            match r {
                Ok(r) if r.status() == 200 => {
                    let mut s = r.bytes_stream();
                    let _ = s.next().await;
                    "abandoned".into()
                }
                other => status(other),
            }
        }
        Kind::AbandonedWaiting => status(
            post(
                "/v1/completions",
                json!({"prompt": format!("Waiting {i}"), "max_tokens": 500, "ignore_eos": true}),
            )
            .timeout(Duration::from_millis(30))
            .send()
            .await,
        ),
        Kind::AbandonedEmbeddings => status(
            post(
                "/v1/embeddings",
                json!({"input": vec![format!("An abandoned embedding {i}. ").repeat(60); 4]}),
            )
            .timeout(Duration::from_millis(10))
            .send()
            .await,
        ),
        Kind::HalfHeader | Kind::TruncatedBody => {
            let addr = url.trim_start_matches("http://").trim_end_matches('/');
            let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
                return "connect failed".into();
            };
            let bytes: &[u8] = if kind == Kind::HalfHeader {
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le"
            } else {
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": \"x"
            };
            let _ = s.write_all(bytes).await;
            "abandoned".into()
        }
    }
}

async fn metrics(client: &reqwest::Client, url: &str) -> BTreeMap<String, f64> {
    let text = match client.get(format!("{url}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn rss_mib(pid: Option<u32>) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

pub fn run(cfg: HostileConfig) -> ruvllm::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| ruvllm::Error::io("tokio runtime", e))?;
    rt.block_on(hostile(cfg))
}

const DRAINED: [&str; 4] = [
    "ruvllm_requests_in_flight",
    "ruvllm_requests_running",
    "ruvllm_requests_waiting",
    "ruvllm_kv_blocks_used",
];

async fn hostile(cfg: HostileConfig) -> ruvllm::Result<()> {
    let client = reqwest::Client::new();
    let url = cfg.url.trim_end_matches('/').to_string();
    // Warm up (pages of the model become resident), then settle.
    for i in 0..8 {
        one(&client, &url, Kind::Normal, i).await;
    }
    tokio::time::sleep(Duration::from_secs(cfg.settle_secs)).await;
    let rss_start = rss_mib(cfg.pid);
    let outcomes: Arc<Mutex<BTreeMap<(Kind, String), usize>>> = Default::default();
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..cfg.clients.max(1) {
        let (client, url, next, outcomes) =
            (client.clone(), url.clone(), next.clone(), outcomes.clone());
        let (total, frac) = (cfg.requests, cfg.bad_fraction);
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let kind = kind_of(i, frac);
                let out = one(&client, &url, kind, i).await;
                *outcomes
                    .lock()
                    .expect("no panics while held")
                    .entry((kind, out))
                    .or_default() += 1;
            }
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| ruvllm::Error::Internal(format!("a client task failed: {e}")))?;
    }
    let wall = start.elapsed().as_secs_f64();
    // Everything taken must come back.
    let t0 = Instant::now();
    let mut left = metrics(&client, &url).await;
    while DRAINED
        .iter()
        .any(|k| left.get(*k).copied().unwrap_or(f64::NAN) != 0.0)
        && t0.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = metrics(&client, &url).await;
    }
    let drain_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(cfg.settle_secs)).await;
    let rss_end = rss_mib(cfg.pid);
    let after = one(&client, &url, Kind::Normal, usize::MAX).await;
    let outcomes = outcomes.lock().expect("no panics while held").clone();
    let by_kind: BTreeMap<String, BTreeMap<String, usize>> =
        outcomes
            .iter()
            .fold(BTreeMap::new(), |mut m, ((k, out), n)| {
                *m.entry(format!("{k:?}"))
                    .or_default()
                    .entry(out.clone())
                    .or_default() += n;
                m
            });
    let server_errors: usize = outcomes
        .iter()
        .filter(|((_, o), _)| o.starts_with('5'))
        .map(|(_, n)| n)
        .sum();
    let drained = DRAINED.iter().all(|k| left.get(*k).copied() == Some(0.0));
    let r = json!({
        "requests": cfg.requests,
        "bad_fraction": cfg.bad_fraction,
        "clients": cfg.clients,
        "wall_s": wall,
        "outcomes": by_kind,
        "server_errors": server_errors,
        "drained": drained,
        "drain_s": drain_s,
        "left": DRAINED.iter().map(|k| (k.to_string(), left.get(*k).copied())).collect::<BTreeMap<_, _>>(),
        "rss_start_mib": rss_start,
        "rss_end_mib": rss_end,
        "rss_change": match (rss_start, rss_end) { (Some(a), Some(b)) => Some(b / a - 1.0), _ => None },
        "normal_request_after": after,
    });
    if cfg.json {
        println!("{r}");
    } else {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    }
    if !drained || after != "200" || server_errors > 0 {
        return Err(ruvllm::Error::Internal(format!(
            "the server did not come through: drained {drained}, a normal request after got {after}, {server_errors} server errors"
        )));
    }
    Ok(())
}
