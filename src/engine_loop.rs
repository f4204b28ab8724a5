//! The engine loop: one thread owns the [`Engine`] and steps it while any
//! request is live; everyone else talks to it through an [`EngineHandle`].

use crate::chat::ChatTemplate;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::model::lora::LoraAdapter;
use crate::model::xlora::XLora;
use crate::model::ModelSpec;
use crate::request::{validate, GenerationRequest, SeqEvent, Sink};
use crate::scheduler::SeqId;
use crate::tokenizer::Tokenizer;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct LoopOptions {
    /// Requests that may wait for admission beyond those running; more are
    /// refused with [`Error::Overloaded`].
    pub max_waiting: usize,
    /// After this long with nothing to do, memory that holds nothing worth
    /// keeping goes back to the system.
    pub idle_trim: Duration,
    /// Whether idle trimming forgets the prefix cache too.
    pub idle_trim_drops_cache: bool,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            max_waiting: 256,
            idle_trim: Duration::from_secs(10),
            idle_trim_drops_cache: false,
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
    AddAdapter {
        adapter: Box<LoraAdapter>,
        scale: f32,
        reply: Sender<Result<()>>,
    },
    RemoveAdapter {
        name: String,
        reply: Sender<Result<()>>,
    },
    AddXLora {
        xlora: Box<XLora>,
        reply: Sender<Result<()>>,
    },
    SetLearned {
        user: Option<String>,
        adapters: Vec<crate::model::lora::WeightedAdapter>,
    },
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Command>,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
    pub model: Arc<ModelSummary>,
    pub metrics: Arc<Metrics>,
    next_id: Arc<AtomicU64>,
    max_in_flight: usize,
    /// False once the loop thread has ended: nothing can be served.
    alive: Arc<AtomicBool>,
    /// Names of the adapters requests may choose, as the loop last saw them.
    adapters: Arc<Mutex<Vec<String>>>,
    /// Held while an adapter loads.
    loading: Arc<Mutex<()>>,
}

/// A request's sink with its share of the in-flight count and its latency
/// metrics.
///
/// It lives inside the sink the engine holds, so whatever way the request
/// leaves the engine (finished, failed, aborted, rejected on admission,
/// dropped with the engine after a panic), the count goes down exactly once;
/// and a request dropped without hearing its end is told it failed, so its
/// client learns at once rather than when its siblings finish.
struct Tracked {
    inner: Sink,
    metrics: Arc<Metrics>,
    arrival: Instant,
    last: Option<Instant>,
    /// Whether the request heard its end (finished, failed, embedded).
    ended: bool,
}

impl Tracked {
    fn event(&mut self, ev: SeqEvent) -> bool {
        let m = &self.metrics;
        match &ev {
            SeqEvent::Token(_) => {
                let now = Instant::now();
                match self.last {
                    None => m
                        .time_to_first_token
                        .observe((now - self.arrival).as_secs_f64()),
                    Some(t) => m.inter_token_latency.observe((now - t).as_secs_f64()),
                }
                self.last = Some(now);
            }
            SeqEvent::Finished(s) => {
                self.ended = true;
                if s.finish == crate::request::FinishReason::Cancelled {
                    m.requests_aborted_total.fetch_add(1, Relaxed);
                }
            }
            SeqEvent::Failed(e) => {
                self.ended = true;
                if matches!(e, Error::Internal(_)) {
                    m.requests_failed_total.fetch_add(1, Relaxed);
                }
            }
            SeqEvent::Embedding { .. } => self.ended = true,
            SeqEvent::PromptLogprobs(_) => {}
        }
        (self.inner)(ev)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.metrics.requests_in_flight.fetch_sub(1, Relaxed);
        if !self.ended {
            // Dropped without an answer: the engine lost it (a panic).
            self.metrics.requests_failed_total.fetch_add(1, Relaxed);
            (self.inner)(SeqEvent::Failed(Error::Internal(
                "the engine lost the request (an internal fault)".into(),
            )));
        }
    }
}

/// Marks the loop dead when its thread ends, by return or by panic.
struct AliveFlag(Arc<AtomicBool>);

impl Drop for AliveFlag {
    fn drop(&mut self) {
        self.0.store(false, Relaxed);
    }
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
        let (n_params, (weight_bytes, _)) =
            (engine.model().n_params(), engine.model().weight_bytes());
        let stats = engine.stats();
        let model = Arc::new(ModelSummary {
            name: engine.provenance.name.clone(),
            spec: engine.model().spec.clone(),
            context: engine.context(),
            block_size: engine.block_size(),
            kv_blocks: stats.blocks_total,
            max_num_seqs,
            n_params,
            weight_bytes,
            dominant_type: engine.model().dominant_type(),
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
            max_in_flight: max_num_seqs + opts.max_waiting,
            alive: Arc::new(AtomicBool::new(true)),
            adapters: Arc::new(Mutex::new(engine.adapter_names())),
            loading: Arc::new(Mutex::new(())),
        };
        let alive = AliveFlag(handle.alive.clone());
        let names = handle.adapters.clone();
        std::thread::Builder::new()
            .name("ruvllm-engine".into())
            .spawn(move || {
                let _alive = alive;
                run(engine, rx, metrics, names, &opts)
            })
            .map_err(|e| Error::io("engine thread", e))?;
        Ok(handle)
    }

    /// The named adapters requests may choose (`"model": name`).
    pub fn adapters(&self) -> Vec<String> {
        self.adapters.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Loads an adapter (a LoRA adapter, or an X-LoRA checkpoint) from
    /// `path` on the calling thread (it reads files:
    /// keep it off async threads) and hands it to the engine, which serves
    /// it from its next step on; running requests are not disturbed.
    pub fn load_adapter(&self, name: &str, path: &std::path::Path, scale: f32) -> Result<()> {
        // One load at a time (each reads a whole file into memory), and a
        // name already taken is refused before any reading.
        let _one = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        if self.adapters().iter().any(|a| a == name) {
            return Err(Error::InvalidRequest(format!(
                "a LoRA adapter named '{name}' is already loaded"
            )));
        }
        let (reply, rx) = std::sync::mpsc::channel();
        let command = if crate::model::xlora::is_checkpoint(path) {
            if scale != 1.0 {
                return Err(Error::InvalidRequest(format!(
                    "{}: an X-LoRA checkpoint takes no scale (its global_scaling_weight is one)",
                    path.display()
                )));
            }
            Command::AddXLora {
                xlora: Box::new(XLora::load(path, name, &self.model.spec)?),
                reply,
            }
        } else {
            Command::AddAdapter {
                adapter: Box::new(LoraAdapter::load(path, name, &self.model.spec)?),
                scale,
                reply,
            }
        };
        self.tx
            .send(command)
            .map_err(|_| Error::Internal("the engine has stopped".into()))?;
        rx.recv()
            .map_err(|_| Error::Internal("the engine has stopped".into()))?
    }

    /// Replaces the adapters learned from feedback (every request's, or
    /// one user's) from the engine's next step on; requests already
    /// running keep the versions they started with.
    pub fn set_learned(
        &self,
        user: Option<String>,
        adapters: Vec<crate::model::lora::WeightedAdapter>,
    ) -> Result<()> {
        self.tx
            .send(Command::SetLearned { user, adapters })
            .map_err(|_| Error::Internal("the engine has stopped".into()))
    }

    /// Unloads a named adapter (requests using it finish with it).
    pub fn unload_adapter(&self, name: &str) -> Result<()> {
        let (reply, rx) = std::sync::mpsc::channel();
        self.tx
            .send(Command::RemoveAdapter {
                name: name.to_string(),
                reply,
            })
            .map_err(|_| Error::Internal("the engine has stopped".into()))?;
        rx.recv()
            .map_err(|_| Error::Internal("the engine has stopped".into()))?
    }

    /// Requests submitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.metrics.requests_in_flight.load(Relaxed) as usize
    }

    /// Whether the engine loop is running (it can serve requests).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Relaxed)
    }

    /// Queues `reqs` with one sink each; the first request's prompt blocks
    /// are shared by the others (OpenAI's `n`). Invalid requests fail here,
    /// and so does a full queue ([`Error::Overloaded`]).
    pub fn submit(&self, reqs: Vec<GenerationRequest>, sinks: Vec<Sink>) -> Result<RequestGuard> {
        let mut guards = self.submit_groups(vec![(reqs, sinks)])?;
        Ok(guards.pop().expect("one guard per group"))
    }

    /// Queues several groups as [`EngineHandle::submit`] does one, all or
    /// nothing: every request is checked, and room is taken for all of
    /// them, before any is queued, so a bad member costs nothing.
    pub fn submit_groups(
        &self,
        groups: Vec<(Vec<GenerationRequest>, Vec<Sink>)>,
    ) -> Result<Vec<RequestGuard>> {
        for (reqs, sinks) in &groups {
            if reqs.is_empty() || reqs.len() != sinks.len() {
                return Err(Error::InvalidRequest(format!(
                    "{} requests with {} sinks: give one sink per request, at least one",
                    reqs.len(),
                    sinks.len()
                )));
            }
            for r in reqs {
                validate(r, self.model.context, self.model.spec.vocab_size)?;
            }
        }
        let n: usize = groups.iter().map(|(r, _)| r.len()).sum();
        if n > self.max_in_flight {
            return Err(Error::InvalidRequest(format!(
                "{n} sequences in one request; this server runs at most {} at once",
                self.max_in_flight
            )));
        }
        let count = &self.metrics.requests_in_flight;
        let prev = count.fetch_add(n as u64, Relaxed) as usize;
        if prev + n > self.max_in_flight {
            count.fetch_sub(n as u64, Relaxed);
            self.metrics.requests_rejected_total.fetch_add(1, Relaxed);
            return Err(Error::Overloaded(format!(
                "{prev} requests are in flight, the limit is {}",
                self.max_in_flight
            )));
        }
        // From here each sink owns one unit of the count (a send that fails
        // drops the sinks, and with them their units).
        let groups: Vec<(Vec<GenerationRequest>, Vec<Sink>)> = groups
            .into_iter()
            .map(|(reqs, sinks)| {
                (
                    reqs,
                    sinks.into_iter().map(|s| self.instrument(s)).collect(),
                )
            })
            .collect();
        let mut guards = Vec::with_capacity(groups.len());
        for (reqs, sinks) in groups {
            let k = reqs.len() as u64;
            let first = self.next_id.fetch_add(k, Relaxed);
            let ids: Vec<SeqId> = (first..first + k).collect();
            let cmd = Command::Submit {
                ids: ids.clone(),
                reqs,
                sinks,
            };
            if self.tx.send(cmd).is_err() {
                return Err(Error::Internal("the engine has stopped".into()));
            }
            guards.push(RequestGuard {
                ids,
                tx: self.tx.clone(),
            });
        }
        Ok(guards)
    }

    /// Wraps a sink to keep the in-flight count (held until the engine
    /// drops the sink) and the latency histograms.
    fn instrument(&self, inner: Sink) -> Sink {
        let mut t = Tracked {
            inner,
            metrics: self.metrics.clone(),
            arrival: Instant::now(),
            last: None,
            ended: false,
        };
        Box::new(move |ev| t.event(ev))
    }
}

/// The loop: commands first, then a step while any request is live, and
/// idle trimming when there is nothing to do. A panic anywhere in an
/// iteration fails the requests involved and the loop goes on; only a
/// panic while recovering ends it (and [`EngineHandle::is_alive`] says so).
fn run(
    mut engine: Engine,
    rx: Receiver<Command>,
    metrics: Arc<Metrics>,
    names: Arc<Mutex<Vec<String>>>,
    opts: &LoopOptions,
) {
    let mut idle = Idle {
        since: Instant::now(),
        trimmed: true,
    };
    loop {
        let mut involved: Vec<SeqId> = Vec::new();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            iteration(&mut engine, &rx, opts, &mut idle, &mut involved, &names)
        }));
        match r {
            Ok(true) => {}
            Ok(false) => return,
            Err(_) => {
                let recovered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    if involved.is_empty() {
                        tracing::error!("a step panicked; failing every live request");
                        engine.fail_all("internal error while running the batch");
                    } else {
                        tracing::error!(?involved, "handling a request panicked; failing it");
                        for &id in &involved {
                            engine.fail(id, "internal error while handling the request");
                        }
                    }
                }));
                if recovered.is_err() {
                    tracing::error!("the engine could not recover from a panic; it stops");
                    return;
                }
            }
        }
        publish(&engine, &metrics);
    }
}

struct Idle {
    since: Instant,
    trimmed: bool,
}

/// One command or one step. `involved` names the requests a command is
/// about, so that a panic fails those alone (a step's panic fails all).
/// Returns false when the loop should end.
fn iteration(
    engine: &mut Engine,
    rx: &Receiver<Command>,
    opts: &LoopOptions,
    idle: &mut Idle,
    involved: &mut Vec<SeqId>,
    names: &Mutex<Vec<String>>,
) -> bool {
    let cmd = if engine.has_work() {
        // A closed channel still lets the live requests finish.
        rx.try_recv().ok()
    } else {
        let wait = if idle.trimmed {
            Duration::from_secs(3600)
        } else {
            opts.idle_trim.saturating_sub(idle.since.elapsed())
        };
        match rx.recv_timeout(wait) {
            Ok(c) => Some(c),
            Err(RecvTimeoutError::Timeout) => {
                if !idle.trimmed {
                    idle.trimmed = true;
                    engine.trim(opts.idle_trim_drops_cache);
                }
                return true;
            }
            Err(RecvTimeoutError::Disconnected) => return false,
        }
    };
    if let Some(cmd) = cmd {
        match cmd {
            Command::Submit { ids, reqs, sinks } => {
                let lead = ids[0];
                involved.extend_from_slice(&ids);
                for (i, ((id, req), sink)) in ids.into_iter().zip(reqs).zip(sinks).enumerate() {
                    engine.add_request(id, req, (i > 0).then_some(lead), sink);
                }
            }
            Command::Abort(ids) => {
                involved.extend_from_slice(&ids);
                ids.into_iter().for_each(|id| engine.abort(id));
            }
            // The names clients check requests against change before the
            // reply: a client told "loaded" can use the adapter at once.
            Command::AddAdapter {
                adapter,
                scale,
                reply,
            } => {
                let r = engine.add_adapter(*adapter, scale);
                publish_names(engine, names);
                let _ = reply.send(r);
            }
            Command::AddXLora { xlora, reply } => {
                let r = engine.add_xlora(*xlora);
                publish_names(engine, names);
                let _ = reply.send(r);
            }
            Command::RemoveAdapter { name, reply } => {
                let r = engine.remove_adapter(&name);
                publish_names(engine, names);
                let _ = reply.send(r);
            }
            Command::SetLearned { user, adapters } => engine.set_learned_adapters(user, adapters),
        }
        return true;
    }
    engine.step();
    if !engine.has_work() {
        idle.since = Instant::now();
        idle.trimmed = false;
    }
    true
}

fn publish_names(engine: &Engine, names: &Mutex<Vec<String>>) {
    if let Ok(mut n) = names.lock() {
        *n = engine.adapter_names();
    }
}

fn publish(engine: &Engine, m: &Metrics) {
    if let Ok(mut l) = m.lora_requests.lock() {
        if !l.is_empty() || engine.has_adapters() {
            *l = engine.adapter_use();
        }
    }
    let s = engine.stats();
    let c = engine.counters();
    m.requests_running.store(s.running as u64, Relaxed);
    m.requests_waiting.store(s.waiting as u64, Relaxed);
    m.kv_blocks_used.store(s.blocks_used as u64, Relaxed);
    m.kv_blocks_lora
        .store(engine.adapter_blocks() as u64, Relaxed);
    m.kv_blocks_cached.store(s.blocks_cached as u64, Relaxed);
    m.preemptions_total.store(s.preemptions, Relaxed);
    m.prompt_tokens_total.store(c.prompt_tokens, Relaxed);
    m.generation_tokens_total
        .store(c.generation_tokens, Relaxed);
    m.prefix_cache_hit_tokens_total
        .store(c.prefix_cache_hit_tokens, Relaxed);
    m.spec_draft_tokens_total.store(c.draft_tokens, Relaxed);
    m.spec_accepted_tokens_total
        .store(c.accepted_draft_tokens, Relaxed);
}
