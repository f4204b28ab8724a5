//! SONA: the server learns from feedback on its responses, into LoRA
//! adapters it applies to the requests that follow.
//!
//! Each rating (and any better answer given with it) becomes a
//! [`Trajectory`]. A learning thread, apart from the engine's, runs:
//! - the *instant* loop: on each feedback, a few AdamW steps on a rank-2
//!   [`MicroLoRA`] (the global one, or the rating user's), published to
//!   the engine at once;
//! - the *background* loop ([`SonaEngine::background_consolidate`]): the
//!   rank-8 base LoRA trained on every stored trajectory, with EWC++
//!   (an online diagonal Fisher) pulling it towards its last version. The
//!   new version goes live only if a held-back slice of the feedback does
//!   not get worse; the global micro-LoRA, whose lessons it now holds, is
//!   reset. It learns from ratings of requests that named no user: a
//!   user's stay in that user's micro-LoRA.
//!
//! Positive ratings and preferred answers are targets (cross-entropy),
//! negative ratings are pushed away from (unlikelihood). Trajectories and
//! the base LoRA are kept in the SONA folder, so learning survives
//! restarts. Every figure reported is computed.

mod store;

pub use store::{Recorded, ResponseStore};

use crate::engine_loop::EngineHandle;
use crate::error::{Error, Result};
use crate::model::lora::{LoraAdapter, Target, WeightedAdapter, ALL_TARGETS};
use crate::model::Model;
use crate::threadpool::ThreadPool;
use crate::train::{loss, AdamW, AdamWConfig, Example, LoraGrads, Trainer};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The per-feedback adapter (the original's name).
pub type MicroLoRA = LoraAdapter;
/// The consolidated adapter (the original's name).
pub type BaseLoRA = LoraAdapter;

#[derive(Debug, Clone)]
pub struct SonaConfig {
    /// Where trajectories and the base LoRA are kept.
    pub dir: PathBuf,
    pub micro_rank: usize,
    /// Layers the micro-LoRAs adapt, counted from the top (None: the upper
    /// half). The backward pass of the instant loop stops below them.
    pub micro_top_layers: Option<usize>,
    pub base_rank: usize,
    /// AdamW steps of the instant loop per feedback.
    pub instant_steps: usize,
    pub instant_lr: f32,
    pub base_lr: f32,
    /// Passes over the trajectories per consolidation.
    pub consolidate_epochs: usize,
    /// Responses kept for feedback to refer to.
    pub max_responses: usize,
    /// Tokens (prompts and outputs) those responses may hold in all.
    pub max_response_tokens: usize,
    /// Ratings waiting for the learning thread, at most (more are refused
    /// with 503 until it catches up).
    pub max_queued: usize,
    /// Trajectories kept (the oldest go first).
    pub max_trajectories: usize,
    /// Users with adapters of their own, at most (the least recently
    /// rated go first).
    pub max_users: usize,
    /// Strength of the EWC++ pull towards the last base version.
    pub ewc_lambda: f32,
    /// Consolidate after this many feedbacks (0: only when asked).
    pub consolidate_every: usize,
}

impl Default for SonaConfig {
    fn default() -> Self {
        SonaConfig {
            dir: PathBuf::from("sona"),
            micro_rank: 2,
            micro_top_layers: None,
            base_rank: 8,
            instant_steps: 2,
            instant_lr: 2e-3,
            base_lr: 1e-3,
            consolidate_epochs: 2,
            max_responses: 1024,
            max_response_tokens: 4 << 20,
            max_queued: 64,
            max_trajectories: 4096,
            max_users: 64,
            ewc_lambda: 100.0,
            consolidate_every: 0,
        }
    }
}

/// One rated response: what the model was given, what it said, the
/// rating in [-1, 1] and a better answer if one was given.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trajectory {
    pub prompt: Vec<u32>,
    pub output: Vec<u32>,
    pub rating: f32,
    pub preferred: Option<Vec<u32>>,
    pub user: Option<String>,
}

impl Trajectory {
    /// The training examples it gives: the output weighted by the rating
    /// (cross-entropy when positive, unlikelihood when negative, in
    /// proportion to its size), and the preferred answer as a target.
    pub fn examples(&self) -> Vec<Example> {
        let mut out = Vec::new();
        let with = |tail: &[u32], w: f32| {
            let mut tokens = self.prompt.clone();
            tokens.extend_from_slice(tail);
            let weights = (0..tokens.len())
                .map(|i| {
                    if i >= self.prompt.len().max(1) {
                        w
                    } else {
                        0.0
                    }
                })
                .collect();
            Example { tokens, weights }
        };
        if self.rating != 0.0 && !self.output.is_empty() {
            out.push(with(&self.output, self.rating));
        }
        if let Some(p) = self.preferred.as_ref().filter(|p| !p.is_empty()) {
            out.push(with(p, 1.0));
        }
        out
    }
}

/// Figures of one consolidation.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ConsolidateReport {
    pub examples: usize,
    pub steps: usize,
    /// Rated responses of requests without a user (what the base learns
    /// from).
    pub trajectories: usize,
    /// Mean loss over the training examples under the live adapters
    /// before, and under the new base alone after.
    pub loss_before: f32,
    pub loss_after: f32,
    pub held_out: usize,
    pub held_out_before: Option<f32>,
    pub held_out_after: Option<f32>,
    /// Whether the new version went live.
    pub accepted: bool,
    pub version: u64,
    pub seconds: f64,
}

/// Counts and timings for `/v1/sona/stats` and `/metrics`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SonaStats {
    pub feedback_total: u64,
    pub instant_updates_total: u64,
    pub instant_last_seconds: f64,
    pub instant_mean_seconds: f64,
    pub consolidations_total: u64,
    pub consolidations_rejected_total: u64,
    pub base_version: u64,
    pub trajectories: usize,
    pub responses: usize,
    pub users: usize,
    pub last_consolidation: Option<ConsolidateReport>,
}

impl SonaStats {
    /// The counters in Prometheus' text format.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        let mut put = |name: &str, kind: &str, help: &str, v: f64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            ));
        };
        put(
            "ruvllm_sona_feedback_total",
            "counter",
            "Ratings received.",
            self.feedback_total as f64,
        );
        put(
            "ruvllm_sona_instant_updates_total",
            "counter",
            "Instant-loop updates published.",
            self.instant_updates_total as f64,
        );
        put(
            "ruvllm_sona_instant_last_seconds",
            "gauge",
            "Time from a rating to its update going live, last one.",
            self.instant_last_seconds,
        );
        put(
            "ruvllm_sona_consolidations_total",
            "counter",
            "Background consolidations run.",
            self.consolidations_total as f64,
        );
        put(
            "ruvllm_sona_consolidations_rejected_total",
            "counter",
            "Consolidations whose version did worse on held-back feedback and was not used.",
            self.consolidations_rejected_total as f64,
        );
        put(
            "ruvllm_sona_base_version",
            "gauge",
            "Live version of the base adapter.",
            self.base_version as f64,
        );
        put(
            "ruvllm_sona_trajectories",
            "gauge",
            "Rated responses kept.",
            self.trajectories as f64,
        );
        out
    }
}

enum Job {
    Feedback(Trajectory),
    Consolidate(Sender<Result<ConsolidateReport>>),
}

/// The learning side of a server: takes feedback, trains, publishes.
pub struct SonaEngine {
    pub config: SonaConfig,
    responses: Mutex<ResponseStore>,
    tx: SyncSender<Job>,
    /// A consolidation is queued or running (one at a time).
    consolidating: Arc<std::sync::atomic::AtomicBool>,
    stats: Arc<Mutex<SonaStats>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SonaEngine {
    /// Starts the learning thread over `model` (the one `engine` serves),
    /// loading the kept base LoRA and trajectories from the folder.
    pub fn start(config: SonaConfig, model: Arc<Model>, engine: EngineHandle) -> Result<Self> {
        if config.micro_rank == 0 || config.base_rank == 0 {
            return Err(Error::Config("SONA ranks must be positive".into()));
        }
        std::fs::create_dir_all(&config.dir).map_err(|e| Error::io(&config.dir, e))?;
        let mut learner = Learner::new(&config, model, engine)?;
        let stats = Arc::new(Mutex::new(SonaStats {
            base_version: learner.version,
            trajectories: learner.trajectories.len(),
            ..Default::default()
        }));
        let (tx, rx) = sync_channel(config.max_queued.max(1));
        let st = stats.clone();
        std::thread::Builder::new()
            .name("sona".into())
            .spawn(move || learner.run(rx, st))
            .map_err(|e| Error::io("sona thread", e))?;
        Ok(SonaEngine {
            responses: Mutex::new(ResponseStore::new(
                config.max_responses,
                config.max_response_tokens,
            )),
            config,
            tx,
            consolidating: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            stats,
        })
    }

    /// Keeps choice `choice` of response `id` for feedback to refer to.
    pub fn record(&self, id: &str, choice: usize, r: Recorded) {
        let mut s = lock(&self.responses);
        s.record(id, choice, r);
        lock(&self.stats).responses = s.len();
    }

    /// The recorded choice of a response, if it is still kept.
    pub fn response(&self, id: &str, choice: usize) -> Option<Recorded> {
        lock(&self.responses).get(id, choice).cloned()
    }

    /// Queues a trajectory for the instant loop (`begin_trajectory`,
    /// `add_step` and `end_trajectory` of the original in one call).
    pub fn end_trajectory(&self, t: Trajectory) -> Result<()> {
        if !(t.rating.is_finite() && (-1.0..=1.0).contains(&t.rating)) {
            return Err(Error::InvalidRequest(format!(
                "rating {} is not in [-1, 1]",
                t.rating
            )));
        }
        match self.tx.try_send(Job::Feedback(t)) {
            Ok(()) => {
                lock(&self.stats).feedback_total += 1;
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(Error::Overloaded(format!(
                "{} ratings are waiting for the learning thread; try again later",
                self.config.max_queued
            ))),
            Err(TrySendError::Disconnected(_)) => {
                Err(Error::Internal("the learning thread has stopped".into()))
            }
        }
    }

    /// Runs the background loop now and returns its figures.
    /// One runs at a time: asking while one is queued or running is
    /// [`Error::Overloaded`], as is a full queue.
    pub fn background_consolidate(&self) -> Result<ConsolidateReport> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.consolidating.swap(true, SeqCst) {
            return Err(Error::Overloaded(
                "a consolidation is already queued or running".into(),
            ));
        }
        struct Clear<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                self.0.store(false, SeqCst);
            }
        }
        let _clear = Clear(&self.consolidating);
        let (reply, rx) = channel();
        match self.tx.try_send(Job::Consolidate(reply)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(Error::Overloaded(
                    "ratings are waiting for the learning thread; try again later".into(),
                ))
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(Error::Internal("the learning thread has stopped".into()))
            }
        }
        rx.recv()
            .map_err(|_| Error::Internal("the learning thread has stopped".into()))?
    }

    pub fn stats(&self) -> SonaStats {
        lock(&self.stats).clone()
    }
}

/// A micro-LoRA with its optimizer and when it was last trained.
struct Micro {
    adapter: MicroLoRA,
    optimizer: AdamW,
    used: Instant,
}

/// The learning thread's state.
struct Learner {
    config: SonaConfig,
    model: Arc<Model>,
    engine: EngineHandle,
    pool: ThreadPool,
    base: BaseLoRA,
    /// The base as requests get it (one id per version, so cached
    /// prefixes stay valid between consolidations); None until it has
    /// learned anything (a zero base is not applied).
    published: Option<Arc<LoraAdapter>>,
    version: u64,
    global: Micro,
    users: HashMap<String, Micro>,
    trajectories: VecDeque<Trajectory>,
    /// Lines in the trajectories file (it is rewritten with only the kept
    /// ones when it holds twice as many).
    file_lines: usize,
    /// EWC++: the running diagonal Fisher of the base's weights (not kept
    /// across restarts: the first consolidation after one has no pull).
    fisher: Option<LoraGrads>,
    /// Consolidations run (turns the held-back slice).
    consolidations: u64,
    seed: u64,
}

const TARGETS: [Target; 7] = ALL_TARGETS;

impl Learner {
    fn new(config: &SonaConfig, model: Arc<Model>, engine: EngineHandle) -> Result<Self> {
        let spec = &model.spec;
        let has_gate = model.layers.iter().all(|l| l.gate.is_some());
        let base_dir = config.dir.join("base");
        let (base, version) = if base_dir.join("adapter_config.json").exists() {
            let v = std::fs::read_to_string(config.dir.join("base_version"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(1);
            (LoraAdapter::load(&base_dir, "sona-base", spec)?, v)
        } else {
            let scale = 2.0;
            let b = LoraAdapter::new_trainable(
                "sona-base",
                spec,
                has_gate,
                config.base_rank,
                scale,
                &TARGETS,
                1,
            )?;
            (b, 0)
        };
        let mut trajectories = Vec::new();
        let mut file_lines = 0;
        if let Ok(text) = std::fs::read_to_string(config.dir.join("trajectories.jsonl")) {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                file_lines += 1;
                match serde_json::from_str::<Trajectory>(line) {
                    Ok(t)
                        if t.prompt
                            .iter()
                            .chain(&t.output)
                            .chain(t.preferred.iter().flatten())
                            .all(|&x| (x as usize) < spec.vocab_size) =>
                    {
                        trajectories.push(t)
                    }
                    _ => tracing::warn!("skipping a damaged line of the SONA trajectories"),
                }
            }
        }
        let over = trajectories.len().saturating_sub(config.max_trajectories);
        trajectories.drain(..over);
        let published = (version > 0).then(|| Arc::new(base.new_version()));
        let l = Learner {
            published,
            config: config.clone(),
            global: Micro::fresh(&model, config, 2)?,
            model,
            engine,
            pool: ThreadPool::new(1),
            base,
            version,
            users: HashMap::new(),
            trajectories: trajectories.into(),
            file_lines,
            fisher: None,
            consolidations: 0,
            seed: 3,
        };
        l.publish(None)?;
        Ok(l)
    }

    fn run(&mut self, rx: Receiver<Job>, stats: Arc<Mutex<SonaStats>>) {
        let mut since = 0usize;
        while let Ok(job) = rx.recv() {
            match job {
                Job::Feedback(t) => {
                    let start = Instant::now();
                    let user = t.user.clone();
                    match self.instant_adapt(t) {
                        Ok(()) => {
                            let secs = start.elapsed().as_secs_f64();
                            let mut s = lock(&stats);
                            s.instant_updates_total += 1;
                            s.instant_last_seconds = secs;
                            let n = s.instant_updates_total as f64;
                            s.instant_mean_seconds += (secs - s.instant_mean_seconds) / n;
                            s.trajectories = self.trajectories.len();
                            s.users = self.users.len();
                        }
                        Err(e) => tracing::warn!(?user, "SONA instant update failed: {e}"),
                    }
                    since += 1;
                    if self.config.consolidate_every > 0 && since >= self.config.consolidate_every {
                        since = 0;
                        let r = self.background_consolidate();
                        record_consolidation(&stats, &r);
                        if let Err(e) = r {
                            tracing::warn!("SONA consolidation failed: {e}");
                        }
                    }
                }
                Job::Consolidate(reply) => {
                    since = 0;
                    let r = self.background_consolidate();
                    record_consolidation(&stats, &r);
                    let _ = reply.send(r);
                }
            }
        }
    }

    /// The instant loop: a few steps of the rater's micro-LoRA (or the
    /// global one) on this trajectory, over the base, then published.
    fn instant_adapt(&mut self, t: Trajectory) -> Result<()> {
        let spec = &self.model.spec;
        let examples = t.examples();
        for e in &examples {
            e.validate(spec.vocab_size, spec.context_length)?;
        }
        self.keep(t.clone())?;
        if examples.is_empty() {
            return Ok(());
        }
        let user = t.user.clone();
        if let Some(u) = &user {
            if !self.users.contains_key(u) && self.users.len() >= self.config.max_users {
                // The least recently rated user's adapter goes.
                if let Some(old) = self
                    .users
                    .iter()
                    .min_by_key(|(_, m)| m.used)
                    .map(|(k, _)| k.clone())
                {
                    self.users.remove(&old);
                    self.engine.set_learned(Some(old), Vec::new())?;
                }
            }
            if !self.users.contains_key(u) {
                self.seed += 1;
                let m = Micro::fresh(&self.model, &self.config, self.seed)?;
                self.users.insert(u.clone(), m);
            }
        }
        // A user's micro-LoRA trains over what it is served over: the base
        // and the global micro-LoRA.
        let mut frozen = self.base_mix();
        if user.is_some() {
            frozen.extend(self.global_mix());
        }
        let micro = match &user {
            Some(u) => self.users.get_mut(u).expect("inserted above"),
            None => &mut self.global,
        };
        let refs: Vec<&Example> = examples.iter().collect();
        micro.used = Instant::now();
        let mut trainer = Trainer {
            model: &self.model,
            frozen: &frozen,
            adapter: &mut micro.adapter,
            optimizer: &mut micro.optimizer,
        };
        for _ in 0..self.config.instant_steps {
            trainer.step(&refs, &self.pool)?;
        }
        self.publish(user)
    }

    /// The base, when it has learned anything, as the frozen layer under
    /// the micro-LoRAs.
    fn base_mix(&self) -> Vec<WeightedAdapter> {
        self.published
            .iter()
            .map(|a| WeightedAdapter {
                adapter: a.clone(),
                weight: 1.0,
            })
            .collect()
    }

    /// The global micro-LoRA as requests get it, once trained.
    fn global_mix(&self) -> Option<WeightedAdapter> {
        (self.global.optimizer.steps() > 0).then(|| WeightedAdapter {
            adapter: Arc::new(self.global.adapter.new_version()),
            weight: 1.0,
        })
    }

    /// Hands the engine new versions: every request's (base and global
    /// micro) or one user's micro.
    fn publish(&self, user: Option<String>) -> Result<()> {
        // An untrained micro-LoRA (B still zero) would cost every request
        // its products for nothing.
        let micro = |m: &Micro| {
            (m.optimizer.steps() > 0).then(|| WeightedAdapter {
                adapter: Arc::new(m.adapter.new_version()),
                weight: 1.0,
            })
        };
        match user {
            Some(u) => {
                let list = self.users.get(&u).and_then(micro).into_iter().collect();
                self.engine.set_learned(Some(u), list)
            }
            None => {
                let mut list = self.base_mix();
                list.extend(self.global_mix());
                self.engine.set_learned(None, list)
            }
        }
    }

    /// Stores a trajectory in memory and in the folder.
    fn keep(&mut self, t: Trajectory) -> Result<()> {
        let path = self.config.dir.join("trajectories.jsonl");
        let line = serde_json::to_string(&t).expect("serializable");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        writeln!(f, "{line}").map_err(|e| Error::io(&path, e))?;
        self.file_lines += 1;
        self.trajectories.push_back(t);
        if self.trajectories.len() > self.config.max_trajectories {
            self.trajectories.pop_front();
        }
        if self.file_lines > 2 * self.config.max_trajectories {
            // Only what is kept in memory is worth keeping on disk.
            let mut text = String::new();
            for t in &self.trajectories {
                text.push_str(&serde_json::to_string(t).expect("serializable"));
                text.push('\n');
            }
            crate::atomic_file::write_atomic(&path, text.as_bytes())?;
            self.file_lines = self.trajectories.len();
        }
        Ok(())
    }

    /// The background loop: the base trained on every trajectory with the
    /// EWC++ pull, live only if the held-back slice does not get worse.
    fn background_consolidate(&mut self) -> Result<ConsolidateReport> {
        let start = Instant::now();
        // The base is everyone's: it learns from ratings of requests that
        // named no user (a user's stay in that user's micro-LoRA). Every
        // fifth is held back to judge the new version (none while there
        // are fewer than five).
        let global: Vec<&Trajectory> = self
            .trajectories
            .iter()
            .filter(|t| t.user.is_none())
            .collect();
        let (mut train, mut held) = (Vec::new(), Vec::new());
        let spec = &self.model.spec;
        let turn = self.consolidations as usize;
        for (i, t) in global.iter().enumerate() {
            // A bad example (from a damaged file) is left out, not fatal.
            let ex: Vec<Example> = t
                .examples()
                .into_iter()
                .filter(|e| e.validate(spec.vocab_size, spec.context_length).is_ok())
                .collect();
            // The held-back fifth rotates, so every rating is learned from
            // in four consolidations out of five.
            if global.len() >= 5 && (i + turn) % 5 == 4 {
                held.extend(ex);
            } else {
                train.extend(ex);
            }
        }
        let mut report = ConsolidateReport {
            trajectories: global.len(),
            examples: train.len(),
            held_out: held.len(),
            version: self.version,
            ..Default::default()
        };
        if train.is_empty() {
            return Err(Error::InvalidRequest(
                "no feedback to consolidate yet".into(),
            ));
        }
        let mean = |adapter: &LoraAdapter, frozen: &[WeightedAdapter], exs: &[Example]| {
            let mut s = 0f32;
            for e in exs {
                s += loss(&self.model, adapter, frozen, e, &self.pool)?;
            }
            Ok::<f32, Error>(s / exs.len().max(1) as f32)
        };
        // The base now against the new base, both without micro-LoRAs
        // (which have trained on the held-back ratings too).
        report.loss_before = mean(&self.base, &[], &train)?;
        if !held.is_empty() {
            report.held_out_before = Some(mean(&self.base, &[], &held)?);
        }
        let anchor = self.base.new_version();
        let mut candidate = self.base.new_version();
        let mut optimizer = AdamW::new(AdamWConfig {
            lr: self.config.base_lr,
            ..AdamWConfig::default()
        })?;
        let mut fisher_new: Option<LoraGrads> = None;
        for _ in 0..self.config.consolidate_epochs {
            for ex in &train {
                let (_, mut g) =
                    crate::train::loss_and_grads(&self.model, &candidate, &[], ex, &self.pool)?;
                let k = 1.0 / (train.len() * self.config.consolidate_epochs) as f32;
                accumulate_squares(&mut fisher_new, &g, k);
                if let Some(f) = &self.fisher {
                    g.add_pull(f, &candidate, &anchor, self.config.ewc_lambda);
                }
                optimizer.step(&mut candidate, &g)?;
                report.steps += 1;
            }
        }
        report.loss_after = mean(&candidate, &[], &train)?;
        if !held.is_empty() {
            report.held_out_after = Some(mean(&candidate, &[], &held)?);
        }
        report.accepted = match (report.held_out_before, report.held_out_after) {
            (Some(b), Some(a)) => a <= b,
            _ => report.loss_after <= report.loss_before,
        };
        self.consolidations += 1;
        if report.accepted {
            // Kept on disk first: a failed write changes nothing.
            self.save_base(&candidate, self.version + 1)?;
            self.base = candidate;
            self.version += 1;
            self.published = Some(Arc::new(self.base.new_version()));
            // EWC++: the Fisher decays and takes the new data's.
            match (&mut self.fisher, fisher_new) {
                (Some(f), Some(n)) => {
                    f.scale(0.5);
                    f.add_scaled(&n, 0.5);
                }
                (f, n) => *f = n,
            }
            // The global micro-LoRA's lessons are in the base now (users'
            // stay theirs).
            self.seed += 1;
            self.global = Micro::fresh(&self.model, &self.config, self.seed)?;
            self.publish(None)?;
        }
        report.version = self.version;
        report.seconds = start.elapsed().as_secs_f64();
        Ok(report)
    }

    fn save_base(&self, base: &LoraAdapter, version: u64) -> Result<()> {
        let dir = self.config.dir.join("base");
        base.save_peft(&dir, &self.model.spec)?;
        let v = self.config.dir.join("base_version");
        std::fs::write(&v, version.to_string()).map_err(|e| Error::io(&v, e))
    }
}

impl Micro {
    fn fresh(model: &Model, config: &SonaConfig, seed: u64) -> Result<Self> {
        let has_gate = model.layers.iter().all(|l| l.gate.is_some());
        let mut adapter = LoraAdapter::new_trainable(
            "sona-micro",
            &model.spec,
            has_gate,
            config.micro_rank,
            1.0,
            &TARGETS,
            seed,
        )?;
        let n = model.spec.n_layers;
        let top = config.micro_top_layers.unwrap_or(n.div_ceil(2)).clamp(1, n);
        adapter.drop_layers_below(n - top);
        Ok(Micro {
            adapter,
            optimizer: AdamW::new(AdamWConfig {
                lr: config.instant_lr,
                ..AdamWConfig::default()
            })?,
            used: Instant::now(),
        })
    }
}

fn record_consolidation(stats: &Mutex<SonaStats>, r: &Result<ConsolidateReport>) {
    if let Ok(r) = r {
        let mut s = lock(stats);
        s.consolidations_total += 1;
        if !r.accepted {
            s.consolidations_rejected_total += 1;
        }
        s.base_version = r.version;
        s.last_consolidation = Some(r.clone());
    }
}

/// `acc += k · g²`, element by element.
fn accumulate_squares(acc: &mut Option<LoraGrads>, g: &LoraGrads, k: f32) {
    let mut sq = g.clone();
    sq.map(|v| v * v);
    match acc {
        Some(a) => a.add_scaled(&sq, k),
        None => {
            sq.scale(k);
            *acc = Some(sq);
        }
    }
}
