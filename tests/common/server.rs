//! A live `ruvllm serve` for end-to-end tests, and small HTTP helpers.

use super::models_dir;
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    pub url: String,
    /// Servers run one at a time: each wants both cores.
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a server on the default model with `extra` arguments and waits
/// until it is ready.
pub async fn start(extra: &[&str]) -> Server {
    start_model("SmolLM2-135M-Instruct.Q4_1.gguf", extra).await
}

/// Starts a server on `model` (a file in models/).
pub async fn start_model(model: &str, extra: &[&str]) -> Server {
    let turn = TURN.lock().await;
    let model = models_dir().join(model);
    assert!(model.exists(), "run scripts/fetch-models.sh first");
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_ruvllm"))
        .args(["serve", "--port", &port.to_string(), "--threads", "2"])
        .arg("--model")
        .arg(&model)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ruvllm serve");
    let s = Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _turn: turn,
    };
    let t0 = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("{}/health", s.url)).await {
            if r.status() == 200 {
                return s;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "server did not come up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn post(s: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", s.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub async fn metric(s: &Server, name: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .parse()
        .unwrap()
}

/// Waits until `metric` satisfies `ok`, failing after `within`.
pub async fn wait_for(s: &Server, metric_name: &str, ok: impl Fn(f64) -> bool, within: Duration) {
    let t0 = Instant::now();
    loop {
        let v = metric(s, metric_name).await;
        if ok(v) {
            return;
        }
        assert!(t0.elapsed() < within, "{metric_name} is still {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `tests/SCRIPT` (a Python check that drives the server with the
/// official `openai` client) against `s`; it must exit 0.
pub fn run_python_check(s: &Server, script: &str) {
    let out = Command::new("python3")
        .arg(format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR")))
        .env("OPENAI_BASE_URL", format!("{}/v1", s.url))
        .env("OPENAI_API_KEY", "unused")
        .output()
        .expect("python3 runs (make pydeps installs openai and jsonschema)");
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
