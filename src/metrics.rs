//! Serving metrics, exported in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A latency histogram with fixed bucket bounds in seconds.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

const LATENCY_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
    40.0, 80.0,
];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, secs: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| secs <= b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.sum_us.fetch_add((secs * 1e6) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}\n{name}_count {count}",
            self.sum_us.load(Relaxed) as f64 / 1e6
        );
    }
}

pub struct Metrics {
    pub requests_running: AtomicU64,
    pub requests_waiting: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    /// Blocks of the KV budget that LoRA adapters' memory takes.
    pub kv_blocks_lora: AtomicU64,
    pub kv_blocks_cached: AtomicU64,
    pub preemptions_total: AtomicU64,
    pub prefix_cache_hit_tokens_total: AtomicU64,
    pub prompt_tokens_total: AtomicU64,
    pub generation_tokens_total: AtomicU64,
    /// Draft tokens checked by speculative decoding, and those accepted.
    pub spec_draft_tokens_total: AtomicU64,
    pub spec_accepted_tokens_total: AtomicU64,
    pub requests_rejected_total: AtomicU64,
    /// Requests accepted whose sink the engine still holds.
    pub requests_in_flight: AtomicU64,
    pub requests_aborted_total: AtomicU64,
    pub requests_failed_total: AtomicU64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    /// Each loaded named LoRA adapter with the requests using it.
    pub lora_requests: std::sync::Mutex<Vec<(String, usize)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let z = || AtomicU64::new(0);
        Metrics {
            requests_running: z(),
            requests_waiting: z(),
            kv_blocks_total: z(),
            kv_blocks_used: z(),
            kv_blocks_lora: z(),
            kv_blocks_cached: z(),
            preemptions_total: z(),
            prefix_cache_hit_tokens_total: z(),
            prompt_tokens_total: z(),
            generation_tokens_total: z(),
            spec_draft_tokens_total: z(),
            spec_accepted_tokens_total: z(),
            requests_rejected_total: z(),
            requests_in_flight: z(),
            requests_aborted_total: z(),
            requests_failed_total: z(),
            time_to_first_token: Histogram::new(LATENCY_BOUNDS),
            inter_token_latency: Histogram::new(LATENCY_BOUNDS),
            lora_requests: std::sync::Mutex::new(Vec::new()),
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut put = |name: &str, kind: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Relaxed)
            );
        };
        put(
            "ruvllm_requests_running",
            "gauge",
            "Requests holding KV blocks.",
            &self.requests_running,
        );
        put(
            "ruvllm_requests_waiting",
            "gauge",
            "Requests queued for admission.",
            &self.requests_waiting,
        );
        put(
            "ruvllm_kv_blocks_total",
            "gauge",
            "KV blocks in the pool.",
            &self.kv_blocks_total,
        );
        put(
            "ruvllm_kv_blocks_used",
            "gauge",
            "KV blocks held by live sequences.",
            &self.kv_blocks_used,
        );
        put(
            "ruvllm_kv_blocks_lora",
            "gauge",
            "KV blocks of the budget that LoRA adapters' memory takes.",
            &self.kv_blocks_lora,
        );
        put(
            "ruvllm_kv_blocks_cached",
            "gauge",
            "Free KV blocks kept for prefix reuse.",
            &self.kv_blocks_cached,
        );
        put(
            "ruvllm_preemptions_total",
            "counter",
            "Sequences preempted for lack of KV blocks.",
            &self.preemptions_total,
        );
        put(
            "ruvllm_prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens served from the prefix cache.",
            &self.prefix_cache_hit_tokens_total,
        );
        put(
            "ruvllm_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            &self.prompt_tokens_total,
        );
        put(
            "ruvllm_generation_tokens_total",
            "counter",
            "Tokens generated.",
            &self.generation_tokens_total,
        );
        put(
            "ruvllm_spec_draft_tokens_total",
            "counter",
            "Draft tokens checked by speculative decoding (prompt lookup).",
            &self.spec_draft_tokens_total,
        );
        put(
            "ruvllm_spec_accepted_tokens_total",
            "counter",
            "Draft tokens accepted: each saved a forward pass.",
            &self.spec_accepted_tokens_total,
        );
        put(
            "ruvllm_requests_rejected_total",
            "counter",
            "Requests refused because the queue was full.",
            &self.requests_rejected_total,
        );
        put(
            "ruvllm_requests_in_flight",
            "gauge",
            "Requests accepted and not yet finished (running, waiting or being handed over).",
            &self.requests_in_flight,
        );
        put(
            "ruvllm_requests_aborted_total",
            "counter",
            "Requests stopped before their end (client gone, timeout, shutdown).",
            &self.requests_aborted_total,
        );
        put(
            "ruvllm_requests_failed_total",
            "counter",
            "Requests ended by an internal error.",
            &self.requests_failed_total,
        );
        let lora = self
            .lora_requests
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "# HELP ruvllm_lora_adapters_loaded Named LoRA adapters loaded.\n# TYPE ruvllm_lora_adapters_loaded gauge\nruvllm_lora_adapters_loaded {}",
            lora.len()
        );
        let _ = writeln!(
            out,
            "# HELP ruvllm_lora_requests Requests (running or waiting) using each adapter.\n# TYPE ruvllm_lora_requests gauge"
        );
        for (name, n) in &lora {
            // Names come from the operator; quotes and backslashes escaped
            // as the text format asks.
            let label = name
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = writeln!(out, "ruvllm_lora_requests{{adapter=\"{label}\"}} {n}");
        }
        self.time_to_first_token.render(
            &mut out,
            "ruvllm_time_to_first_token_seconds",
            "Time from arrival to the first token.",
        );
        self.inter_token_latency.render(
            &mut out,
            "ruvllm_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
        );
        out
    }
}
