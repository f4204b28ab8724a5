//! A loaded model with its tokenizer and chat template, running any number
//! of generations at once. The engine ties three parts together: each
//! [`Engine::step`] asks the scheduler for a flat batch of tokens from many
//! sequences, the model runner runs it through the model in one forward
//! pass, and the output processor turns the logits into tokens.

use crate::adapter_registry::AdapterRegistry;
use crate::chat::{ChatMessage, ChatTemplate, CHATML, GEMMA};
use crate::error::{Error, Result};
use crate::kv::KvDtype;
use crate::model::lora::{LoraAdapter, WeightedAdapter};
use crate::model::{load_gguf, load_hf_folder, Family, Model, Output};
use crate::output::{log_sum_exp, rows, OutputProcessor, RequestState};
use crate::progress::Progress;
use crate::quant::GgmlType;
use crate::runner::{kv_block_bytes, kv_pool_blocks, ModelRunner, SeqInput};
use crate::scheduler::{Chunk, Scheduler, SchedulerConfig, SchedulerStats, SeqId, SeqOptions};
use crate::threadpool::ThreadPool;
use crate::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

// Where these lived before the engine was split, for code that names them
// through the engine.
pub use crate::adapter_registry::{LoraOption, XLoraOption, MAX_ADAPTER_WEIGHT};
pub use crate::output::{Counters, TextAssembler};
pub use crate::request::{
    validate, FinishReason, GenerationRequest, GenerationSummary, PromptTokenLogprob, SeqEvent,
    Sink, TokenEvent, TokenLogprobs, MAX_TOP_LOGPROBS,
};

/// Context used when the model's own is larger (memory grows with it).
pub const DEFAULT_MAX_CONTEXT: usize = 4096;
/// Memory one step may spend on logits of every prompt position (prompt
/// log-probabilities): a row is a vocabulary of floats.
const FULL_LOGITS_BYTES: usize = 32 << 20;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub threads: usize,
    /// Longest sequence (prompt + output) to accept; capped by the model's
    /// context and by the KV pool.
    pub context: Option<usize>,
    /// Memory for the KV block pool, LoRA adapters' memory included (they
    /// hold the blocks their bytes fill).
    pub kv_cache_mb: Option<usize>,
    /// Blocks in the KV pool; takes precedence over `kv_cache_mb`.
    pub kv_blocks: Option<usize>,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Tokens one step may run, across all sequences (also the prefill chunk).
    pub max_batched_tokens: usize,
    /// Sequences that may run at once.
    pub max_num_seqs: usize,
    /// How keys and values are stored: f32 is exact, f16 halves the memory.
    pub kv_dtype: KvDtype,
    /// LoRA adapters to load: unnamed ones apply to every request, named
    /// ones to the requests that ask for them.
    pub lora: Vec<LoraOption>,
    /// X-LoRA checkpoints to load: an unnamed one applies to every
    /// request, named ones to the requests that ask for them. Their
    /// sequences keep a second KV cache (for the scaling pass) and do not
    /// use the prefix cache.
    pub xlora: Vec<XLoraOption>,
    /// In-situ quantization: F32/F16/BF16 weight matrices are quantized to
    /// this type at load (one of [`crate::quant::quantize::ISQ_TYPES`]).
    pub isq: Option<GgmlType>,
    /// Draw a progress bar on standard error (when it is a terminal) for
    /// long work at load.
    pub progress: bool,
    /// Named adapters resident at most; loading one more evicts the least
    /// recently used one that no request is using.
    pub max_loras: Option<usize>,
    /// With `isq`: run the float model over this text first and fit every
    /// block under the importance of its columns (activation-aware
    /// quantization, llama.cpp's importance matrix).
    pub calibration: Option<Calibration>,
    /// Speculative decoding by prompt lookup (`None`: off). Greedy and
    /// sampled outputs are the same with it as without.
    pub speculative: Option<crate::speculative::SpecConfig>,
}

/// Text to calibrate in-situ quantization on (see
/// [`EngineOptions::calibration`]).
#[derive(Debug, Clone)]
pub struct Calibration {
    pub text: PathBuf,
    /// Windows of the text to run, at most.
    pub windows: usize,
    /// Tokens per window (at most the context), each starting with BOS as
    /// llama-imatrix's chunks do.
    pub window: usize,
}

impl Calibration {
    pub const DEFAULT_WINDOWS: usize = 16;
    pub const DEFAULT_WINDOW: usize = 512;
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            threads: default_threads(),
            context: None,
            kv_cache_mb: None,
            kv_blocks: None,
            block_size: 16,
            max_batched_tokens: 512,
            max_num_seqs: 32,
            kv_dtype: KvDtype::F32,
            lora: Vec::new(),
            xlora: Vec::new(),
            isq: None,
            progress: false,
            max_loras: None,
            calibration: None,
            speculative: Some(crate::speculative::SpecConfig::default()),
        }
    }
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Where a model was loaded from, and what it is.
#[derive(Debug, Clone)]
pub struct Provenance {
    pub path: PathBuf,
    pub file_size: u64,
    pub name: String,
    pub format: &'static str,
}

/// Deliberate failures, for testing how the engine and the server survive
/// their own faults: each triggers on requests whose prompt holds `token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    pub kind: FaultKind,
    pub token: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// A panic inside a step.
    StepPanic,
    /// The forward pass returns an error.
    StepError,
    /// A panic while the request is admitted.
    AdmitPanic,
    /// A panic while the request is aborted.
    AbortPanic,
    /// A panic inside a step and again while failing the request: the
    /// engine cannot recover.
    Fatal,
    /// Every step that runs the request takes [`SLOW_STEP`] longer, so
    /// that tests can act while it is surely in flight.
    Slow,
}

/// What a [`FaultKind::Slow`] request adds to each step it is in.
pub const SLOW_STEP: std::time::Duration = std::time::Duration::from_millis(10);

impl std::str::FromStr for FaultPlan {
    type Err = Error;
    /// `KIND:TOKEN`, KIND one of step-panic, step-error, admit-panic,
    /// abort-panic, fatal, slow.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidRequest(format!("bad fault plan '{s}' (KIND:TOKEN)"));
        let (kind, token) = s.split_once(':').ok_or_else(bad)?;
        let kind = match kind {
            "step-panic" => FaultKind::StepPanic,
            "step-error" => FaultKind::StepError,
            "admit-panic" => FaultKind::AdmitPanic,
            "abort-panic" => FaultKind::AbortPanic,
            "fatal" => FaultKind::Fatal,
            "slow" => FaultKind::Slow,
            _ => return Err(bad()),
        };
        Ok(FaultPlan {
            kind,
            token: token.parse().map_err(|_| bad())?,
        })
    }
}

pub struct Engine {
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
    pub provenance: Provenance,
    /// A short description of the tensor types, e.g. "Q4_1: 210, F32: 61".
    pub type_mix: Vec<(String, usize)>,
    runner: ModelRunner,
    /// Every request's sequence, with the engine's state of it.
    sched: Scheduler<RequestState>,
    output: OutputProcessor,
    adapters: AdapterRegistry,
    next_id: SeqId,
    context: usize,
    /// Whether adapters loaded at run time are paid for out of the KV
    /// pool: only when the budget was given (a default pool may be one
    /// context, with nothing to spare).
    charge_runtime_adapters: bool,
    /// KV caches the longest-keeping sequence holds (2 with an X-LoRA):
    /// the pool always keeps room for one context of those.
    kv_tables: usize,
    max_batched_tokens: usize,
    /// Compiles output constraints; made on first use (its token trie
    /// takes a while for a large vocabulary).
    grammars: Option<Arc<crate::constraint::Grammars>>,
    /// Speculative decoding by prompt lookup, when on.
    speculative: Option<crate::speculative::SpecConfig>,
    /// Deliberate failures (tests of fault handling); none in normal use.
    pub fault: Option<FaultPlan>,
}

impl Engine {
    pub fn load(path: &Path, opts: &EngineOptions) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let (loaded, tokenizer, format) = if meta.is_dir() {
            let l = load_hf_folder(path)?;
            let t = Tokenizer::from_hf_dir(path)?;
            (l, t, "safetensors")
        } else {
            let l = load_gguf(path)?;
            let t = Tokenizer::from_gguf(l.gguf.as_ref().expect("gguf loader keeps the file"))?;
            (l, t, "gguf")
        };
        let mut model = loaded.model;
        let pool = ThreadPool::new(opts.threads);
        if opts.calibration.is_some() && opts.isq.is_none() {
            return Err(Error::Config(
                "calibration text given without --isq: it weighs the quantization of float \
                 weights, and nothing is to be quantized"
                    .into(),
            ));
        }
        if let Some(ty) = opts.isq {
            crate::quant::quantize::ensure_isq_type(ty, "in-situ quantization")?;
        }
        let spec = &model.spec;
        if tokenizer.vocab_size() > spec.vocab_size {
            return Err(Error::Config(format!(
                "tokenizer has {} tokens but the model only {}",
                tokenizer.vocab_size(),
                spec.vocab_size
            )));
        }
        let (template_src, name) = match (&loaded.gguf, &loaded.hf_dir) {
            (Some(g), _) => (
                g.get("tokenizer.chat_template")
                    .and_then(|v| v.as_str())
                    .map(String::from),
                g.get("general.name")
                    .and_then(|v| v.as_str())
                    .map(String::from),
            ),
            (None, Some(dir)) => (hf_chat_template(dir)?, None),
            _ => (None, None),
        };
        let template_src = template_src.unwrap_or_else(|| {
            if spec.family.is_gemma() {
                GEMMA
            } else {
                CHATML
            }
            .to_string()
        });
        let text_of = |id: Option<u32>| {
            id.and_then(|i| tokenizer.token_text(i))
                .unwrap_or("")
                .to_string()
        };
        let template = ChatTemplate::new(
            &template_src,
            &text_of(tokenizer.special.bos),
            &text_of(tokenizer.special.eos),
        )?;
        let mut type_mix: Vec<(String, usize)> = Vec::new();
        if let Some(g) = &loaded.gguf {
            for t in &g.tensors {
                match type_mix.iter_mut().find(|(n, _)| n == t.ty.name()) {
                    Some((_, c)) => *c += 1,
                    None => type_mix.push((t.ty.name().to_string(), 1)),
                }
            }
        }
        if opts.block_size == 0 || opts.block_size > 1024 {
            return Err(Error::Config(format!(
                "block size must be within 1..=1024, got {}",
                opts.block_size
            )));
        }
        let bs = opts.block_size;
        let wanted = opts
            .context
            .unwrap_or(DEFAULT_MAX_CONTEXT)
            .min(spec.context_length)
            .max(1);
        // The KV type first: it may refuse the model outright.
        opts.kv_dtype.check(spec.head_dim)?;
        let adapters = AdapterRegistry::load(&opts.lora, &opts.xlora, spec, opts.max_loras)?;
        let block_bytes = kv_block_bytes(spec, opts.kv_dtype, bs);
        let adapter_blocks = adapters.blocks_needed(block_bytes);
        let mut n_blocks = kv_pool_blocks(
            spec,
            opts.kv_dtype,
            bs,
            wanted,
            opts.kv_blocks,
            opts.kv_cache_mb,
        )?;
        // Adapters are paid for out of the KV budget: a budget given is
        // shared, the default one grows by what they take.
        if opts.kv_blocks.is_none() && opts.kv_cache_mb.is_none() {
            n_blocks += adapter_blocks;
        }
        if adapter_blocks >= n_blocks {
            return Err(Error::Config(format!(
                "the LoRA adapters take {adapter_blocks} of the {n_blocks} KV blocks of the \
                 budget ({} of {} MiB), leaving none for keys and values",
                (adapter_blocks * block_bytes) >> 20,
                (n_blocks * block_bytes) >> 20
            )));
        }
        // An X-LoRA sequence keeps two caches: the pool must hold it.
        let kv_tables = if adapters.has_xlora() { 2 } else { 1 };
        let context = wanted.min((n_blocks - adapter_blocks) / kv_tables * bs);
        if kv_tables > 1 && context < wanted.min((n_blocks - adapter_blocks) * bs) {
            tracing::warn!(
                context,
                "X-LoRA sequences keep two KV caches: the context is cut to what the pool \
                 holds twice (give a larger --kv-cache-mb for more)"
            );
        }
        if context == 0 {
            return Err(Error::Config(format!(
                "the KV pool of {n_blocks} blocks holds no X-LoRA sequence (two caches) \
                 beside the adapters' {adapter_blocks} blocks: give a larger --kv-cache-mb"
            )));
        }
        model.set_context(context);
        let runner = ModelRunner::new(model, pool, opts.kv_dtype, bs, n_blocks)?;
        let spec = &runner.model().spec;
        let provenance = Provenance {
            path: path.to_path_buf(),
            file_size: if meta.is_dir() {
                dir_size(path)
            } else {
                meta.len()
            },
            name: name.unwrap_or_else(|| {
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }),
            format,
        };
        let max_batched_tokens = opts.max_batched_tokens.max(1);
        let max_full_logit_rows = FULL_LOGITS_BYTES / (spec.vocab_size * 4).max(1);
        // Only when no layer attends further back can old blocks go.
        let window = spec
            .sliding_window
            .filter(|_| spec.sliding_layers.iter().all(|&s| s));
        let tokenizer = Arc::new(tokenizer);
        let output = OutputProcessor::new(tokenizer.clone(), spec.vocab_size, spec.hidden);
        let mut engine = Engine {
            tokenizer,
            template: Arc::new(template),
            provenance,
            type_mix,
            runner,
            sched: Scheduler::new(
                n_blocks,
                bs,
                SchedulerConfig {
                    max_batched_tokens,
                    max_num_seqs: opts.max_num_seqs,
                    window,
                    max_full_logit_rows,
                },
            ),
            output,
            adapters,
            next_id: 0,
            context,
            charge_runtime_adapters: opts.kv_blocks.is_some() || opts.kv_cache_mb.is_some(),
            kv_tables,
            max_batched_tokens,
            grammars: None,
            speculative: opts.speculative,
            fault: None,
        };
        let sched = &mut engine.sched;
        if !engine
            .adapters
            .hold_blocks(block_bytes, |n| sched.lease(n * bs))
        {
            return Err(Error::Internal(
                "a fresh KV pool could not hold the adapters it was sized for".into(),
            ));
        }
        if let Some(ty) = opts.isq {
            // The KV pool's pages are only touched as it fills, so
            // quantizing after it is made costs no memory.
            engine.quantize_in_situ(ty, opts.calibration.as_ref(), opts.progress)?;
        }
        Ok(engine)
    }

    /// Quantizes the unquantized weight matrices to `ty` (see
    /// [`EngineOptions::isq`]), after calibrating on `cal` if given, with a
    /// progress bar when `bar`.
    fn quantize_in_situ(
        &mut self,
        ty: GgmlType,
        cal: Option<&Calibration>,
        bar: bool,
    ) -> Result<()> {
        let t0 = Instant::now();
        // Nothing to quantize: no calibration to pay for either.
        let calibration_tokens = match cal {
            Some(cal) if self.model().has_unquantized() => self.calibrate(cal, bar)?,
            _ => 0,
        };
        let t1 = Instant::now();
        let mut progress = Progress::new(format!("quantizing to {}", ty.name()), bar);
        let changed = self
            .runner
            .quantize_weights(ty, &mut |d, t| progress.update(d, t));
        self.runner.model_mut().record_input_stats(false);
        if changed == 0 {
            tracing::warn!(
                "--isq {}: no F32/F16/BF16 matrix with rows of whole blocks to quantize",
                ty.name()
            );
        }
        tracing::info!(
            matrices = changed,
            calibration_tokens,
            calibrate_secs = (t1 - t0).as_secs_f64(),
            quantize_secs = t1.elapsed().as_secs_f64(),
            "in-situ quantization"
        );
        Ok(())
    }

    /// Runs the model over `cal`'s text with every projection gathering
    /// the squares of its inputs (left on for [`Self::quantize_in_situ`]);
    /// returns how many tokens it ran.
    fn calibrate(&mut self, cal: &Calibration, bar: bool) -> Result<usize> {
        if cal.windows == 0 {
            return Err(Error::Config(
                "calibration needs at least one window (--calibrate-windows)".into(),
            ));
        }
        let text = std::fs::read_to_string(&cal.text).map_err(|e| Error::io(&cal.text, e))?;
        let window = cal.window.min(self.context);
        let (windows, n_tokens) = self.tokenizer.bos_windows(&text, window, cal.windows)?;
        if window < 2 || windows.is_empty() {
            return Err(Error::Config(format!(
                "calibration text {}: {n_tokens} tokens, fewer than one window of {window} \
                 (at least 2)",
                cal.text.display(),
            )));
        }
        let n = windows.len();
        self.runner.model_mut().record_input_stats(true);
        let mut progress = Progress::new(format!("calibrating on {n} × {window} tokens"), bar);
        for (i, w) in windows.iter().enumerate() {
            // Every row's logits, so the output projection sees them all.
            if let Err(e) = self.token_logprobs(w) {
                self.runner.model_mut().record_input_stats(false);
                return Err(e);
            }
            progress.update(i + 1, n);
        }
        Ok(n * window)
    }

    /// The model (its spec, weights and sizes).
    pub fn model(&self) -> &Model {
        self.runner.model()
    }

    /// The threads the model's products run on.
    pub fn pool(&self) -> &crate::threadpool::ThreadPool {
        self.runner.pool()
    }

    pub fn family(&self) -> Family {
        self.model().spec.family
    }

    /// The longest sequence (prompt + output) a request may reach.
    pub fn context(&self) -> usize {
        self.context
    }

    pub fn threads(&self) -> usize {
        self.runner.pool().n_threads()
    }

    pub fn kv_dtype(&self) -> KvDtype {
        self.runner.kv_dtype()
    }

    pub fn block_size(&self) -> usize {
        self.runner.block_size()
    }

    /// Turns speculative decoding on (with its settings) or off.
    pub fn set_speculative(&mut self, cfg: Option<crate::speculative::SpecConfig>) {
        self.speculative = cfg;
    }

    /// The scheduler's figures; `blocks_used` counts blocks held by
    /// sequences, not those adapters' memory takes ([`Engine::adapter_blocks`]).
    pub fn stats(&self) -> SchedulerStats {
        let mut s = self.sched.stats();
        s.blocks_used = s.blocks_used.saturating_sub(self.adapters.blocks_held());
        s
    }

    pub fn counters(&self) -> Counters {
        self.output.counters
    }

    /// Whether any request is queued or running.
    pub fn has_work(&self) -> bool {
        !self.sched.is_idle()
    }

    /// Renders a conversation with the model's template and tokenizes it.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        chat_prompt(&self.tokenizer, &self.template, messages)
    }

    /// A fresh request id (ids may also be chosen by the caller of
    /// [`Engine::add_request`], as long as they are unique).
    pub fn new_id(&mut self) -> SeqId {
        self.next_id += 1;
        self.next_id | (1 << 63)
    }

    /// Queues a request under `id`. With `after`, it waits until that
    /// request has processed its prompt, so that an identical prompt is
    /// shared through the prefix cache rather than computed twice.
    pub fn add_request(
        &mut self,
        id: SeqId,
        mut req: GenerationRequest,
        after: Option<SeqId>,
        mut sink: Sink,
    ) {
        if let Err(e) = validate(&req, self.context, self.model().spec.vocab_size) {
            sink(SeqEvent::Failed(e));
            return;
        }
        self.maybe_fault(FaultKind::AdmitPanic, &req.prompt);
        // Embeddings stay those of the model as served without learning,
        // so that vectors kept in an index stay comparable across
        // learned versions.
        let mix = match self
            .adapters
            .resolve(&req.adapters, req.user.as_deref(), !req.embed)
        {
            Ok(a) => a,
            Err(e) => {
                sink(SeqEvent::Failed(e));
                return;
            }
        };
        let compiled = req.compiled.take().map(|c| Ok(c.into_matcher()));
        let matcher = match compiled.or_else(|| req.constraint.as_ref().map(|c| self.matcher(c))) {
            None => None,
            Some(Ok(m)) => Some(m),
            Some(Err(e)) => {
                sink(SeqEvent::Failed(e));
                return;
            }
        };
        let max_tokens = req.max_tokens.min(self.context - req.prompt.len());
        if max_tokens == 0 && !req.embed {
            // Nothing asked, nothing generated (not even a first token).
            sink(SeqEvent::Finished(GenerationSummary {
                tokens: Vec::new(),
                text: String::new(),
                finish: FinishReason::Length,
                prompt_tokens: req.prompt.len(),
                cached_tokens: 0,
                prefill_secs: 0.0,
                decode_secs: 0.0,
            }));
            return;
        }
        let opts = SeqOptions {
            use_prefix_cache: !req.embed,
            after: after.filter(|&a| self.sched.contains(a)),
            cache_salt: adapter_salt(req.cache_salt.as_deref(), &mix.adapters),
            full_logits: req.prompt_logprobs.is_some(),
            kv_tables: if mix.xlora.is_some() { 2 } else { 1 },
        };
        let prompt = std::mem::take(&mut req.prompt);
        let mut state = RequestState::new(req, max_tokens, sink, mix);
        state.matcher = matcher;
        self.sched.add(id, prompt, opts, state);
    }

    /// A fresh matcher of the output constraint `c`.
    fn matcher(&mut self, c: &crate::constraint::Constraint) -> Result<llguidance::Matcher> {
        let g = match &self.grammars {
            Some(g) => g.clone(),
            None => {
                let g = Arc::new(crate::constraint::Grammars::new(
                    self.tokenizer.clone(),
                    self.model().spec.vocab_size,
                )?);
                self.grammars = Some(g.clone());
                g
            }
        };
        g.matcher(c)
    }

    /// Quantizes the unquantized weight matrices to `ty` in place (see
    /// [`EngineOptions::isq`]); returns how many changed.
    pub fn quantize_weights(&mut self, ty: GgmlType) -> usize {
        self.runner.quantize_weights(ty, &mut |_, _| {})
    }

    /// The named adapters requests may ask for.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.names()
    }

    /// The adapters every request gets.
    pub fn always_on_adapters(&self) -> &[WeightedAdapter] {
        self.adapters.always_on()
    }

    /// Replaces the adapters learned from feedback, for every request
    /// (`user` None) or one user's; requests already admitted keep theirs.
    pub fn set_learned_adapters(&mut self, user: Option<String>, adapters: Vec<WeightedAdapter>) {
        self.adapters.set_learned(user, adapters);
    }

    /// The model, shared read-only (to train adapters over while serving).
    pub fn shared_model(&self) -> std::sync::Arc<Model> {
        self.runner.shared_model()
    }

    /// Whether any named adapter is loaded.
    pub fn has_adapters(&self) -> bool {
        self.adapters.named().next().is_some()
    }

    /// Each named adapter with the requests (running or waiting) using it.
    pub fn adapter_use(&self) -> Vec<(String, usize)> {
        let xlora_users = |x: &Arc<crate::model::xlora::XLora>| {
            self.sched
                .iter()
                .filter(|(_, s)| s.data.mix.xlora.as_ref().is_some_and(|y| Arc::ptr_eq(x, y)))
                .count()
        };
        self.adapters
            .named()
            .map(|a| (a.name.clone(), users(&self.sched, a)))
            .chain(
                self.adapters
                    .named_xloras()
                    .map(|(n, x)| (n.to_string(), xlora_users(x))),
            )
            .collect()
    }

    /// Makes `adapter` (loaded for this model, see [`LoraAdapter::load`])
    /// available under its name, applied with `scale`. At `max_loras`, the
    /// least recently used adapter loaded at run time that no admitted
    /// request is using goes first (adapters given at start stay; a request
    /// still on its way to the engine that names the evicted one gets 404).
    ///
    /// Its memory comes out of the KV budget, in KV blocks: it is refused
    /// (503) when the free blocks cannot hold it, or when holding it would
    /// leave the pool less than one context.
    pub fn add_adapter(&mut self, adapter: LoraAdapter, scale: f32) -> Result<()> {
        self.reap_adapters();
        let sched = &self.sched;
        // Everything is checked before anything changes: a refused load
        // unloads no other adapter.
        let victim = self
            .adapters
            .make_room(&adapter, scale, |a| users(sched, a))?;
        let freed = victim.map_or(0, |(_, blocks)| blocks);
        let need = self.charged_blocks(adapter.bytes());
        self.check_room(&adapter.name, adapter.bytes(), need, freed, self.kv_tables)?;
        if let Some((i, _)) = victim {
            self.adapters.evict(i);
            self.reap_adapters();
        }
        let blocks = self.lease_for_adapter(need)?;
        self.adapters.insert(adapter, scale, blocks);
        Ok(())
    }

    /// Makes the X-LoRA `xlora` (see [`crate::model::xlora::XLora::load`])
    /// available under its name. Its memory comes out of the KV budget as
    /// an adapter's does, and since its sequences keep two KV caches, the
    /// pool must keep room for two contexts besides (503 otherwise).
    pub fn add_xlora(&mut self, xlora: crate::model::xlora::XLora) -> Result<()> {
        self.reap_adapters();
        if self.adapters.name_taken(&xlora.name) {
            return Err(Error::InvalidRequest(format!(
                "an adapter named '{}' is already loaded",
                xlora.name
            )));
        }
        if self.adapters.full() {
            return Err(Error::Overloaded(format!(
                "X-LoRA '{}': --max-loras adapters are loaded (an X-LoRA evicts none); \
                 unload one first",
                xlora.name
            )));
        }
        let need = self.charged_blocks(xlora.bytes());
        self.check_room(&xlora.name, xlora.bytes(), need, 0, 2)?;
        let blocks = self.lease_for_adapter(need)?;
        self.adapters.insert_xlora(xlora, blocks);
        self.kv_tables = 2;
        Ok(())
    }

    /// KV blocks an adapter of `bytes` loaded at run time is charged.
    fn charged_blocks(&self, bytes: usize) -> usize {
        if !self.charge_runtime_adapters {
            return 0;
        }
        let block_bytes = kv_block_bytes(&self.model().spec, self.kv_dtype(), self.block_size());
        bytes.div_ceil(block_bytes.max(1))
    }

    /// Checks that `need` more blocks for adapter `name` (of `bytes`), with
    /// `freed` given back first, leave the pool one context of sequences
    /// keeping `kv_tables` caches, and that they are free now.
    fn check_room(
        &self,
        name: &str,
        bytes: usize,
        need: usize,
        freed: usize,
        kv_tables: usize,
    ) -> Result<()> {
        let bs = self.block_size();
        let s = self.sched.stats();
        let (total, available) = (s.blocks_total, s.blocks_total - s.blocks_used);
        let keep = self.context.div_ceil(bs) * kv_tables;
        let held = self.adapters.blocks_held() - freed;
        if held + need + keep > total {
            return Err(Error::Overloaded(format!(
                "adapter '{name}' needs {need} KV blocks ({} KiB); with the {held} that \
                 adapters hold, the pool of {total} would keep less than one context ({keep} \
                 blocks): unload an adapter or give a larger --kv-cache-mb",
                bytes >> 10,
            )));
        }
        if need > available + freed {
            return Err(Error::Overloaded(format!(
                "adapter '{name}' needs {need} free KV blocks; running requests hold the \
                 pool now, try again later"
            )));
        }
        Ok(())
    }

    /// Leases `need` blocks for an adapter's memory.
    fn lease_for_adapter(&mut self, need: usize) -> Result<Vec<u32>> {
        let blocks = self
            .sched
            .lease(need * self.block_size())
            .ok_or_else(|| Error::Internal("checked free KV blocks were not there".into()))?;
        // They may have held keys and values: their pages go back, and the
        // adapter's own memory takes their place in the budget.
        self.runner.discard(&blocks);
        Ok(blocks)
    }

    /// Gives back the blocks of removed adapters that no request holds.
    fn reap_adapters(&mut self) {
        let free = self.adapters.reap();
        if !free.is_empty() {
            self.sched.give_back(free);
        }
    }

    /// KV blocks that adapters' memory takes out of the pool.
    pub fn adapter_blocks(&self) -> usize {
        self.adapters.blocks_held()
    }

    /// Removes a named adapter. Requests already using it finish with it
    /// (they hold it); new requests cannot name it. Its memory goes when the
    /// last of them ends.
    pub fn remove_adapter(&mut self, name: &str) -> Result<()> {
        self.adapters.remove(name)?;
        self.reap_adapters();
        Ok(())
    }

    /// Stops a request now and frees its blocks; its sink hears `Finished`
    /// with [`FinishReason::Cancelled`].
    pub fn abort(&mut self, id: SeqId) {
        if let Some(s) = self.sched.get(id) {
            self.maybe_fault(FaultKind::AbortPanic, s.prompt());
            self.output
                .finish(&mut self.sched, id, FinishReason::Cancelled);
        }
    }

    /// Panics as a [`FaultPlan`] asks, when `prompt` holds its token.
    fn maybe_fault(&self, kind: FaultKind, prompt: &[u32]) {
        if let Some(f) = self.fault.filter(|f| f.kind == kind) {
            if prompt.contains(&f.token) {
                panic!("injected fault: {kind:?}");
            }
        }
    }

    /// Runs one batch. Returns false when there was nothing to run.
    pub fn step(&mut self) -> bool {
        self.reap_adapters();
        self.draft();
        let chunks = self.sched.schedule();
        if chunks.is_empty() {
            return false;
        }
        let mut slow = false;
        for c in &chunks {
            let prompt = self.sched.get(c.id).expect("scheduled").prompt();
            self.maybe_fault(FaultKind::StepPanic, prompt);
            self.maybe_fault(FaultKind::Fatal, prompt);
            slow |= self
                .fault
                .is_some_and(|f| f.kind == FaultKind::Slow && prompt.contains(&f.token));
        }
        if slow {
            std::thread::sleep(SLOW_STEP);
        }
        match self.run_chunks_masking(&chunks) {
            Ok(out) => {
                self.sched.commit(&chunks);
                self.output.process(&mut self.sched, &chunks, out);
            }
            Err(e) if chunks.len() == 1 => {
                // Only a bug gets here (requests are validated on entry):
                // fail the request rather than the whole engine.
                tracing::error!("forward pass failed: {e}");
                self.fail(chunks[0].id, &format!("the forward pass failed: {e}"));
            }
            Err(e) => {
                // Sequences are independent: run each alone, so that only
                // those that fail by themselves are failed. Each rewrites
                // the same keys and values the batch would have.
                tracing::error!(
                    "a batched forward pass failed ({e}); retrying its sequences one by one"
                );
                for c in chunks {
                    let one = [c];
                    match self.run_chunks(&one) {
                        Ok(out) => {
                            self.sched.commit(&one);
                            self.output.process(&mut self.sched, &one, out);
                        }
                        Err(e) => {
                            tracing::error!("forward pass failed: {e}");
                            self.fail(c.id, &format!("the forward pass failed: {e}"));
                        }
                    }
                }
            }
        }
        // Requests that ended may have let go of a removed adapter.
        self.reap_adapters();
        true
    }

    /// Proposes draft tokens for the sequences about to decode (prompt
    /// lookup), when few enough decode that checking drafts pays: with
    /// nobody waiting to be admitted and at most
    /// [`SpecConfig::max_seqs`](crate::speculative::SpecConfig) running.
    /// Constrained, X-LoRA and embedding sequences are not drafted for.
    fn draft(&mut self) {
        let Some(cfg) = self.speculative else { return };
        let stats = self.sched.stats();
        if stats.waiting > 0 || stats.running > cfg.max_seqs {
            return;
        }
        let context = self.context;
        let ids: Vec<SeqId> = self.sched.decoding().collect();
        for id in ids {
            let s = self.sched.get_mut(id).expect("running");
            if s.data.matcher.is_some() || s.data.req.embed || s.data.mix.xlora.is_some() {
                continue;
            }
            if s.data.draft_wait > 0 {
                // Backing off after drafts that were all rejected.
                s.data.draft_wait -= 1;
                continue;
            }
            // Room for the drafts and the token after them, within
            // max_tokens and the context.
            let left = s
                .data
                .max_tokens
                .saturating_sub(s.output().len())
                .min(context.saturating_sub(s.tokens().len()));
            let k = cfg.tokens.min(left.saturating_sub(1));
            let d = crate::speculative::propose(s.tokens(), k, cfg.min_ngram, cfg.max_ngram);
            if !d.is_empty() {
                self.sched.set_drafts(id, &d);
            }
        }
    }

    /// Ends a request with an internal error (our fault, not the client's).
    pub fn fail(&mut self, id: SeqId, why: &str) {
        if let Some(s) = self.sched.get(id) {
            self.maybe_fault(FaultKind::Fatal, s.prompt());
        }
        if let Some(mut s) = self.sched.finish(id) {
            (s.data.sink)(SeqEvent::Failed(Error::Internal(why.to_string())));
        }
    }

    /// Fails every request (after a panic inside a step, whose state can no
    /// longer be trusted) and clears the prefix cache.
    pub fn fail_all(&mut self, why: &str) {
        for id in self.sched.iter().map(|(id, _)| id).collect::<Vec<_>>() {
            self.fail(id, why);
        }
        self.sched.drop_cached();
    }

    /// When no request is live: returns the memory of KV blocks that hold
    /// nothing worth keeping, and of freed activations, to the system.
    /// Cached prefixes stay (the next turn of a chat wants them) unless
    /// `drop_cache` says to forget them too.
    pub fn trim(&mut self, drop_cache: bool) {
        self.reap_adapters();
        if self.has_work() {
            return;
        }
        let dropped = if drop_cache {
            self.sched.drop_cached().len()
        } else {
            0
        };
        let free = self.sched.idle_uncached();
        self.runner.discard(&free);
        // SAFETY: malloc_trim only returns free heap memory to the system.
        unsafe { libc::malloc_trim(0) };
        tracing::debug!(dropped, released = free.len(), "trimmed idle memory");
    }

    /// [`Self::run_chunks`], with the output constraints' masks of the
    /// sequences about to sample computed on a thread of their own
    /// meanwhile: the mask depends only on the tokens so far, and computing
    /// it (a quarter of a millisecond on average, a few at most) then costs
    /// the step nothing when the forward pass takes longer.
    ///
    /// Only when a core is left over beside the runner's threads: on a
    /// machine whose every core runs the forward pass, the masking thread
    /// takes its core from the pass's and slows it by more than the mask
    /// costs (measured on 2 cores, BENCHMARKS.md), so the mask is then
    /// computed before sampling instead.
    fn run_chunks_masking(&mut self, chunks: &[Chunk]) -> Result<Output> {
        if self.runner.pool().n_threads() >= default_threads() {
            return self.run_chunks(chunks);
        }
        let work: Vec<(SeqId, llguidance::Matcher)> = chunks
            .iter()
            .filter(|c| c.completes)
            .filter_map(|c| {
                let s = self.sched.get_mut(c.id)?;
                if s.data.mask.is_some() {
                    return None;
                }
                Some((c.id, s.data.matcher.take()?))
            })
            .collect();
        if work.is_empty() {
            return self.run_chunks(chunks);
        }
        let ids: Vec<SeqId> = work.iter().map(|w| w.0).collect();
        let (out, masked) = std::thread::scope(|scope| {
            let masking = scope.spawn(move || {
                work.into_iter()
                    .map(|(id, mut m)| {
                        let mask = m.compute_mask_or_eos().map_err(|e| e.to_string());
                        (id, m, mask)
                    })
                    .collect::<Vec<_>>()
            });
            let out = self.run_chunks(chunks);
            (out, masking.join())
        });
        match masked {
            Ok(done) => {
                for (id, m, mask) in done {
                    if let Some(s) = self.sched.get_mut(id) {
                        s.data.matcher = Some(m);
                        s.data.mask = Some(mask);
                    }
                }
            }
            // The library panicked: those sequences' constraints are gone,
            // and they fail when they come to sample.
            Err(_) => {
                for id in ids {
                    if let Some(s) = self.sched.get_mut(id) {
                        s.data.mask = Some(Err("the constraint library failed".into()));
                    }
                }
            }
        }
        out
    }

    /// Runs `chunks` through the model runner as one batch.
    fn run_chunks(&mut self, chunks: &[Chunk]) -> Result<Output> {
        let inputs: Vec<SeqInput> = chunks
            .iter()
            .map(|c| {
                let s = self.sched.get(c.id).expect("scheduled requests are active");
                SeqInput {
                    tokens: &s.scheduled_tokens()[c.start..c.start + c.len],
                    start: c.start,
                    block_table: s.block_table(),
                    adapters: &s.data.mix.adapters,
                    xlora: s.data.mix.xlora.as_deref(),
                    rows: rows(s, c),
                }
            })
            .collect();
        if let Some(f) = self.fault.filter(|f| f.kind == FaultKind::StepError) {
            if inputs.iter().any(|i| i.tokens.contains(&f.token)) {
                return Err(Error::Internal("injected fault: StepError".into()));
            }
        }
        self.runner.run(&inputs)
    }

    /// Generates from `req` alone, calling `on_token` for every token; it
    /// returns false to cancel. The same path as batched serving.
    pub fn generate(
        &mut self,
        req: &GenerationRequest,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<GenerationSummary> {
        let (tx, rx) = std::sync::mpsc::channel();
        let id = self.new_id();
        self.add_request(
            id,
            req.clone(),
            None,
            Box::new(move |ev| tx.send(ev).is_ok()),
        );
        loop {
            self.step();
            while let Ok(ev) = rx.try_recv() {
                match ev {
                    SeqEvent::Token(t) => {
                        if !on_token(&t) {
                            self.abort(id);
                        }
                    }
                    SeqEvent::Finished(s) => return Ok(s),
                    SeqEvent::Failed(e) => return Err(e),
                    SeqEvent::Embedding { .. } | SeqEvent::PromptLogprobs(_) => {}
                }
            }
        }
    }

    /// Runs `tokens` through the model as one sequence starting at position
    /// 0 and returns the logits for `rows` (and their final hidden states).
    /// Used for logits, tests and prompt benchmarks.
    pub fn forward_sequence(
        &mut self,
        tokens: &[u32],
        rows: &[usize],
        want_hidden: bool,
    ) -> Result<Output> {
        let hidden_rows = if want_hidden { rows } else { &[] };
        self.with_sequence(tokens.len(), |e, table| {
            e.forward_chunked(table, tokens, rows, hidden_rows)
        })
    }

    /// Runs `tokens` from position 0 of a private sequence in chunks of
    /// the step's token budget, returning the logits of `rows` and the
    /// hidden states of `hidden_rows`.
    fn forward_chunked(
        &mut self,
        table: &[u32],
        tokens: &[u32],
        rows: &[usize],
        hidden_rows: &[usize],
    ) -> Result<Output> {
        let mut out = Output {
            logits: Vec::new(),
            hidden: Vec::new(),
        };
        let chunk = self.max_batched_tokens;
        for (ci, toks) in tokens.chunks(chunk).enumerate() {
            let base = ci * chunk;
            let local = |rs: &[usize]| -> Vec<usize> {
                rs.iter()
                    .filter(|&&r| r >= base && r < base + toks.len())
                    .map(|&r| r - base)
                    .collect()
            };
            let o = self.forward_private(table, toks, base, &local(rows), &local(hidden_rows))?;
            out.logits.extend_from_slice(&o.logits);
            out.hidden.extend_from_slice(&o.hidden);
        }
        Ok(out)
    }

    /// `log p(tokens[i + 1] | tokens[..=i])` for every `i`: how likely the
    /// model finds each token after the first (perplexity). Logits are
    /// turned into log-probabilities a few rows at a time, so memory stays
    /// bounded whatever the vocabulary.
    pub fn token_logprobs(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let vocab = self.model().spec.vocab_size;
        let piece = (FULL_LOGITS_BYTES / (vocab * 4).max(1)).clamp(1, self.max_batched_tokens);
        self.with_sequence(tokens.len(), |e, table| {
            let mut out = Vec::with_capacity(tokens.len().saturating_sub(1));
            for (pi, toks) in tokens.chunks(piece).enumerate() {
                let base = pi * piece;
                // Rows whose next token is known.
                let rows: Vec<usize> = (0..toks.len())
                    .filter(|&r| base + r + 1 < tokens.len())
                    .collect();
                let o = e.forward_private(table, toks, base, &rows, &[])?;
                for (&r, logits) in rows.iter().zip(o.logits.chunks_exact(vocab)) {
                    let next = tokens[base + r + 1] as usize;
                    out.push(logits[next] - log_sum_exp(logits));
                }
            }
            Ok(out)
        })
    }

    /// Feeds `tokens` one at a time through the KV cache (the first as a
    /// one-token prefill) and returns each step's logits, `n × vocab`.
    pub fn decode_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        Ok(self.decode_after(&[], tokens)?.0)
    }

    /// [`Engine::decode_logits`] of `tokens` after `prefix` (prefilled in
    /// batches first), with how long the decoding took, the prefill not
    /// counted: decode speed at a given depth of context.
    pub fn decode_after(
        &mut self,
        prefix: &[u32],
        tokens: &[u32],
    ) -> Result<(Vec<f32>, std::time::Duration)> {
        let d = prefix.len();
        self.with_sequence(d + tokens.len(), |e, table| {
            e.forward_chunked(table, prefix, &[], &[])?;
            let start = std::time::Instant::now();
            let mut logits = Vec::with_capacity(tokens.len() * e.model().spec.vocab_size);
            for (p, &t) in tokens.iter().enumerate() {
                logits.extend(e.forward_private(table, &[t], d + p, &[0], &[])?.logits);
            }
            Ok((logits, start.elapsed()))
        })
    }

    /// Runs `tokens`, at positions `start..`, of a private sequence (see
    /// [`Engine::with_sequence`]) with the always-on adapters.
    fn forward_private(
        &mut self,
        table: &[u32],
        tokens: &[u32],
        start: usize,
        rows: &[usize],
        hidden_rows: &[usize],
    ) -> Result<Output> {
        let mix = self.adapters.resolve(&[], None, true)?;
        self.runner.run_rows(
            table,
            tokens,
            start,
            &mix.adapters,
            mix.xlora.as_deref(),
            rows,
            hidden_rows,
        )
    }

    /// Lends `f` a block table for a private sequence of `len` tokens,
    /// leased from the scheduler's pool.
    fn with_sequence<T>(
        &mut self,
        len: usize,
        f: impl FnOnce(&mut Self, &[u32]) -> Result<T>,
    ) -> Result<T> {
        if len == 0 || len > self.context {
            return Err(Error::InvalidRequest(format!(
                "{len} tokens: the context holds 1 to {} tokens",
                self.context
            )));
        }
        // An always-on X-LoRA keeps a second cache: each logical block
        // is a pair (see `SeqOptions::kv_tables`).
        let width = if self.adapters.always_on_xlora().is_some() {
            2
        } else {
            1
        };
        let bs = self.block_size();
        let table = self
            .sched
            .lease(len.div_ceil(bs) * bs * width)
            .ok_or_else(|| Error::Overloaded("the KV cache is busy".into()))?;
        // The blocks go back even if `f` panics (the engine loop survives
        // panics and goes on with this engine).
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self, &table)));
        self.sched.give_back(table);
        r.unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

/// How many of `sched`'s requests (running or waiting) use adapter `a`.
fn users(sched: &Scheduler<RequestState>, a: &Arc<LoraAdapter>) -> usize {
    sched
        .iter()
        .filter(|(_, s)| {
            s.data
                .mix
                .adapters
                .iter()
                .any(|x| Arc::ptr_eq(&x.adapter, a))
        })
        .count()
}

/// The prefix-cache salt of a sequence: its adapters change every key and
/// value, so each mix (adapter identities and exact weights) caches apart.
/// The encoding is injective, so no client-chosen salt can name another
/// mix's entries: a client salt is length-prefixed, a mix without one
/// starts with `-`.
fn adapter_salt(salt: Option<&str>, adapters: &[WeightedAdapter]) -> Option<String> {
    let mut s = match salt {
        None if adapters.is_empty() => return None,
        None => "-".to_string(),
        Some(c) => format!("{}:{c}", c.len()),
    };
    for w in adapters {
        s.push_str(&format!(
            "/lora:{}x{:08x}",
            w.adapter.id,
            w.weight.to_bits()
        ));
    }
    Some(s)
}

/// Renders a conversation with a template and tokenizes it.
pub fn chat_prompt(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[ChatMessage],
) -> Result<Vec<u32>> {
    encode_chat(tokenizer, &template.render(messages, true)?)
}

/// Tokenizes a rendered chat prompt.
pub fn encode_chat(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    // Templates that write the BOS text themselves must not get a second one.
    let bos_text = tokenizer.special.bos.and_then(|b| tokenizer.token_text(b));
    let has_bos = bos_text.is_some_and(|b| !b.is_empty() && text.starts_with(b));
    tokenizer.encode(text, !has_bos)
}

fn hf_chat_template(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let cfg: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    Ok(match cfg.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(String::from),
        _ => None,
    })
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
