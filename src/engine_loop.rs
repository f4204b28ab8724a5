//! The engine loop: one thread owns the [`Engine`] and steps it while any
//! request is live; everyone else talks to it through an [`EngineHandle`].

use crate::chat::ChatTemplate;
use crate::engine::{validate, Engine, GenerationRequest, SeqEvent, Sink};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::model::ModelSpec;
use crate::scheduler::SeqId;
use crate::tokenizer::Tokenizer;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct LoopOptions {
    /// Requests that may wait for admission beyond those running; more are
    /// refused with [`Error::Overloaded`].
    pub max_waiting: usize,
    /// After this long with nothing to do, the prefix cache is dropped and
    /// its memory returned to the system.
    pub idle_trim: Duration,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            max_waiting: 256,
            idle_trim: Duration::from_secs(10),
        }
    }
}

/// What callers may know about the loaded model without the engine.
#[derive(Debug, Clone)]
pub struct ModelSummary {
    pub name: String,
    pub spec: ModelSpec,
    pub context: usize,
    pub block_size: usize,
    pub kv_blocks: usize,
    pub max_num_seqs: usize,
    pub n_params: usize,
    pub weight_bytes: usize,
    pub dominant_type: Option<crate::quant::GgmlType>,
}

enum Command {
    Submit {
        ids: Vec<SeqId>,
        reqs: Vec<GenerationRequest>,
        sinks: Vec<Sink>,
    },
    Abort(Vec<SeqId>),
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Command>,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
    pub model: Arc<ModelSummary>,
    pub metrics: Arc<Metrics>,
    next_id: Arc<AtomicU64>,
    /// Requests submitted and not yet finished.
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
}

/// Aborts its requests when dropped (a client went away); harmless once
/// they have finished.
pub struct RequestGuard {
    ids: Vec<SeqId>,
    tx: Sender<Command>,
}

impl RequestGuard {
    pub fn ids(&self) -> &[SeqId] {
        &self.ids
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Abort(std::mem::take(&mut self.ids)));
    }
}

impl EngineHandle {
    /// Starts the loop thread, which owns `engine` from now on.
    pub fn spawn(engine: Engine, opts: LoopOptions, max_num_seqs: usize) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (n_params, (weight_bytes, _)) = (engine.model.n_params(), engine.model.weight_bytes());
        let stats = engine.stats();
        let model = Arc::new(ModelSummary {
            name: engine.provenance.name.clone(),
            spec: engine.model.spec.clone(),
            context: engine.context(),
            block_size: engine.block_size(),
            kv_blocks: stats.blocks_total,
            max_num_seqs,
            n_params,
            weight_bytes,
            dominant_type: engine.model.dominant_type(),
        });
        let metrics = Arc::new(Metrics::default());
        metrics
            .kv_blocks_total
            .store(stats.blocks_total as u64, Relaxed);
        let handle = EngineHandle {
            tx,
            tokenizer: engine.tokenizer.clone(),
            template: engine.template.clone(),
            model,
            metrics: metrics.clone(),
            next_id: Arc::new(AtomicU64::new(1)),
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: max_num_seqs + opts.max_waiting,
        };
        std::thread::Builder::new()
            .name("ruvllm-engine".into())
            .spawn(move || run(engine, rx, metrics, opts.idle_trim))
            .map_err(|e| Error::io("engine thread", e))?;
        Ok(handle)
    }

    /// Requests submitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    /// Queues `reqs` with one sink each; the first request's prompt blocks
    /// are shared by the others (OpenAI's `n`). Invalid requests fail here,
    /// and so does a full queue ([`Error::Overloaded`]).
    pub fn submit(&self, reqs: Vec<GenerationRequest>, sinks: Vec<Sink>) -> Result<RequestGuard> {
        assert_eq!(reqs.len(), sinks.len(), "one sink per request");
        for r in &reqs {
            validate(r, self.model.context, self.model.spec.vocab_size)?;
        }
        let n = reqs.len();
        let prev = self.in_flight.fetch_add(n, Relaxed);
        if prev + n > self.max_in_flight {
            self.in_flight.fetch_sub(n, Relaxed);
            self.metrics.requests_rejected_total.fetch_add(1, Relaxed);
            return Err(Error::Overloaded(format!(
                "{prev} requests are in flight, the limit is {}",
                self.max_in_flight
            )));
        }
        let first = self.next_id.fetch_add(n as u64, Relaxed);
        let ids: Vec<SeqId> = (first..first + n as u64).collect();
        let sinks = sinks.into_iter().map(|s| self.instrument(s)).collect();
        let cmd = Command::Submit {
            ids: ids.clone(),
            reqs,
            sinks,
        };
        if self.tx.send(cmd).is_err() {
            self.in_flight.fetch_sub(n, Relaxed);
            return Err(Error::Internal("the engine has stopped".into()));
        }
        Ok(RequestGuard {
            ids,
            tx: self.tx.clone(),
        })
    }

    /// Wraps a sink to keep the in-flight count and the latency histograms.
    fn instrument(&self, mut inner: Sink) -> Sink {
        let in_flight = self.in_flight.clone();
        let metrics = self.metrics.clone();
        let arrival = Instant::now();
        let mut last: Option<Instant> = None;
        Box::new(move |ev| {
            match &ev {
                SeqEvent::Token(_) => {
                    let now = Instant::now();
                    match last {
                        None => metrics
                            .time_to_first_token
                            .observe((now - arrival).as_secs_f64()),
                        Some(t) => metrics.inter_token_latency.observe((now - t).as_secs_f64()),
                    }
                    last = Some(now);
                }
                SeqEvent::Finished(_) | SeqEvent::Failed(_) | SeqEvent::Embedding { .. } => {
                    in_flight.fetch_sub(1, Relaxed);
                }
            }
            inner(ev)
        })
    }
}

fn run(mut engine: Engine, rx: Receiver<Command>, metrics: Arc<Metrics>, idle_trim: Duration) {
    let mut idle_since = Instant::now();
    let mut trimmed = true;
    loop {
        let cmd = if engine.has_work() {
            // A closed channel still lets the live requests finish.
            rx.try_recv().ok()
        } else {
            let wait = if trimmed {
                Duration::from_secs(3600)
            } else {
                idle_trim.saturating_sub(idle_since.elapsed())
            };
            match rx.recv_timeout(wait) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => {
                    if !trimmed {
                        engine.trim();
                        trimmed = true;
                        publish(&engine, &metrics);
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        if let Some(cmd) = cmd {
            match cmd {
                Command::Submit { ids, reqs, sinks } => {
                    let lead = ids[0];
                    for (i, ((id, req), sink)) in ids.into_iter().zip(reqs).zip(sinks).enumerate() {
                        engine.add_request(id, req, (i > 0).then_some(lead), sink);
                    }
                }
                Command::Abort(ids) => ids.into_iter().for_each(|id| engine.abort(id)),
            }
            publish(&engine, &metrics);
            continue;
        }
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.step()));
        if stepped.is_err() {
            tracing::error!("a step panicked; failing its requests");
            engine.fail_all("internal error while running the batch");
        }
        publish(&engine, &metrics);
        if !engine.has_work() {
            idle_since = Instant::now();
            trimmed = false;
        }
    }
}

fn publish(engine: &Engine, m: &Metrics) {
    let s = engine.stats();
    let c = engine.counters();
    m.requests_running.store(s.running as u64, Relaxed);
    m.requests_waiting.store(s.waiting as u64, Relaxed);
    m.kv_blocks_used.store(s.blocks_used as u64, Relaxed);
    m.kv_blocks_cached.store(s.blocks_cached as u64, Relaxed);
    m.preemptions_total.store(s.preemptions, Relaxed);
    m.prompt_tokens_total.store(c.prompt_tokens, Relaxed);
    m.generation_tokens_total
        .store(c.generation_tokens, Relaxed);
    m.prefix_cache_hit_tokens_total
        .store(c.prefix_cache_hit_tokens, Relaxed);
}
