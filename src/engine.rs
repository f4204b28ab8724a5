//! A loaded model with its tokenizer and chat template, running any number
//! of generations at once: each [`Engine::step`] asks the scheduler for a
//! flat batch of tokens from many sequences, runs it through the model in one
//! forward pass and turns the logits into tokens.

use crate::chat::{ChatMessage, ChatTemplate, CHATML, GEMMA};
use crate::error::{Error, Result};
use crate::kv::{bytes_per_token, AnyKvCache, KvDtype};
use crate::model::lora::{LoraAdapter, WeightedAdapter};
use crate::model::{load_gguf, load_hf_folder, Batch, Family, Model, Output};
use crate::progress::Progress;
use crate::quant::GgmlType;
use crate::sampling::{Sampler, SamplingParams};
use crate::scheduler::{Chunk, Scheduler, SchedulerConfig, SchedulerStats, SeqId, SeqOptions};
use crate::threadpool::ThreadPool;
use crate::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Largest weight an adapter may be applied with (its scale, or a
/// request's mixing weight).
pub const MAX_ADAPTER_WEIGHT: f32 = 1000.0;

/// Context used when the model's own is larger (memory grows with it).
pub const DEFAULT_MAX_CONTEXT: usize = 4096;
/// The KV budget when none is given: this many full contexts, at most
/// [`DEFAULT_KV_CAP_MB`].
const DEFAULT_KV_CONTEXTS: usize = 4;
const DEFAULT_KV_CAP_MB: usize = 1024;
/// Memory one step may spend on logits of every prompt position (prompt
/// log-probabilities): a row is a vocabulary of floats.
const FULL_LOGITS_BYTES: usize = 32 << 20;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub threads: usize,
    /// Longest sequence (prompt + output) to accept; capped by the model's
    /// context and by the KV pool.
    pub context: Option<usize>,
    /// Memory for the KV block pool.
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
    /// In-situ quantization: F32/F16/BF16 weight matrices are quantized to
    /// this type at load (one of [`crate::quant::quantize::ISQ_TYPES`]).
    pub isq: Option<GgmlType>,
    /// Draw a progress bar on standard error (when it is a terminal) for
    /// long work at load.
    pub progress: bool,
    /// Named adapters resident at most; loading one more evicts the least
    /// recently used one that no request is using.
    pub max_loras: Option<usize>,
}

/// A LoRA adapter to load with the model.
#[derive(Debug, Clone)]
pub struct LoraOption {
    /// `None`: always applied. `Some(name)`: applied to requests that name
    /// it (the server's `"model": name`).
    pub name: Option<String>,
    /// A PEFT folder or a llama.cpp GGUF adapter.
    pub path: PathBuf,
    /// Multiplies the adapter's own `alpha / r`.
    pub scale: f32,
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
            isq: None,
            progress: false,
            max_loras: None,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, an end-of-turn token or a stop string.
    Stop,
    /// max_tokens or the context ran out.
    Length,
    /// The caller asked to stop.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Keep going past EOS / end-of-turn tokens (benchmarks).
    pub ignore_eos: bool,
    /// Report each token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// Return the mean of the final hidden states instead of generating.
    pub embed: bool,
    /// Report the log-probability of every prompt token after the first
    /// (and this many alternatives); the prompt is then computed in full,
    /// never taken from the prefix cache.
    pub prompt_logprobs: Option<usize>,
    /// Only prefixes cached under the same salt are reused (tenants do not
    /// share, or learn about, each other's prompts).
    pub cache_salt: Option<String>,
    /// Named adapters (loaded with [`LoraOption::name`]) to apply, with
    /// their weights, on top of the engine's always-on ones.
    pub adapters: Vec<(String, f32)>,
}

/// Alternatives reported per token at most.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One generated token and the text it completes (possibly empty while a
/// multi-byte character or a possible stop string is pending).
#[derive(Debug, Clone)]
pub struct TokenEvent {
    pub id: u32,
    pub text: String,
    /// The token's log-probability under the model and the most likely
    /// alternatives, when asked for.
    pub logprobs: Option<TokenLogprobs>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// How likely the model found one prompt token, given the tokens before it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// 1 for the most likely token.
    pub rank: usize,
    pub top: Vec<(u32, f32)>,
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
}

impl std::str::FromStr for FaultPlan {
    type Err = Error;
    /// `KIND:TOKEN`, KIND one of step-panic, step-error, admit-panic,
    /// abort-panic, fatal.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidRequest(format!("bad fault plan '{s}' (KIND:TOKEN)"));
        let (kind, token) = s.split_once(':').ok_or_else(bad)?;
        let kind = match kind {
            "step-panic" => FaultKind::StepPanic,
            "step-error" => FaultKind::StepError,
            "admit-panic" => FaultKind::AdmitPanic,
            "abort-panic" => FaultKind::AbortPanic,
            "fatal" => FaultKind::Fatal,
            _ => return Err(bad()),
        };
        Ok(FaultPlan {
            kind,
            token: token.parse().map_err(|_| bad())?,
        })
    }
}

/// What a request hears from the engine.
#[derive(Debug)]
pub enum SeqEvent {
    Token(TokenEvent),
    /// Unit-length mean of the prompt's final hidden states.
    Embedding {
        vector: Vec<f32>,
        tokens: usize,
    },
    /// Before the first token, when the request asked for prompt
    /// log-probabilities: one entry per prompt token after the first.
    PromptLogprobs(Vec<PromptTokenLogprob>),
    Finished(GenerationSummary),
    Failed(Error),
}

/// Receives a request's events; returning false cancels the request.
pub type Sink = Box<dyn FnMut(SeqEvent) -> bool + Send>;

#[derive(Debug, Clone)]
pub struct GenerationSummary {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    /// From arrival to the first token.
    pub prefill_secs: f64,
    /// From the first token to the last.
    pub decode_secs: f64,
}

pub struct Engine {
    pub model: Model,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
    pub provenance: Provenance,
    /// A short description of the tensor types, e.g. "Q4_1: 210, F32: 61".
    pub type_mix: Vec<(String, usize)>,
    pool: ThreadPool,
    kv: AnyKvCache,
    sched: Scheduler,
    requests: HashMap<SeqId, Active>,
    next_id: SeqId,
    context: usize,
    max_batched_tokens: usize,
    counters: Counters,
    /// Adapters applied to every sequence.
    always: Vec<WeightedAdapter>,
    /// Adapters requests may name, in load order, with when a request last
    /// asked for each (`None`: loaded at start, never evicted).
    named: Vec<(WeightedAdapter, Option<Instant>)>,
    max_loras: Option<usize>,
    /// Deliberate failures (tests of fault handling); none in normal use.
    pub fault: Option<FaultPlan>,
}

/// Totals since the engine started.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
}

/// A request the engine is working on.
struct Active {
    req: GenerationRequest,
    sampler: Sampler,
    text: TextAssembler,
    max_tokens: usize,
    generated: Vec<u32>,
    sink: Sink,
    arrival: Instant,
    first_token: Option<Instant>,
    /// Sum of the prompt's hidden states so far (embedding requests).
    embed_sum: Vec<f32>,
    /// Log-probabilities of prompt tokens 1.., by position (when asked for).
    prompt_lps: Vec<Option<PromptTokenLogprob>>,
    /// Every adapter applied to this sequence, with its weight.
    adapters: Vec<WeightedAdapter>,
}

/// Which logit or hidden-state rows a chunk needs from the forward pass.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Rows {
    None,
    /// The last row's logits: they choose the next token.
    Last,
    /// Logits of every row (prompt log-probabilities, then the next token).
    AllLogits,
    /// Hidden states of every row (embeddings).
    AllHidden,
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
        if let Some(ty) = opts.isq {
            crate::quant::quantize::ensure_isq_type(ty, "in-situ quantization")?;
            let t0 = Instant::now();
            let mut bar = Progress::new(format!("quantizing to {}", ty.name()), opts.progress);
            let n = model.quantize_unquantized(ty, &pool, &mut |d, t| bar.update(d, t));
            if n == 0 {
                tracing::warn!(
                    "--isq {}: no F32/F16/BF16 matrix with rows of whole blocks to quantize",
                    ty.name()
                );
            }
            tracing::info!(
                matrices = n,
                secs = t0.elapsed().as_secs_f64(),
                "in-situ quantization"
            );
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
        let per_block =
            bytes_per_token(spec.n_layers, spec.n_kv_heads, spec.head_dim, opts.kv_dtype) * bs;
        let n_blocks = match (opts.kv_blocks, opts.kv_cache_mb) {
            (Some(n), _) => n,
            (None, Some(mb)) => (mb << 20) / per_block,
            (None, None) => (wanted.div_ceil(bs) * DEFAULT_KV_CONTEXTS)
                .min((DEFAULT_KV_CAP_MB << 20) / per_block)
                .max(wanted.div_ceil(bs)),
        };
        if n_blocks == 0 {
            return Err(Error::Config(format!(
                "a KV budget of {} MiB holds no block of {bs} tokens ({} KiB each)",
                opts.kv_cache_mb.unwrap_or(0),
                per_block >> 10
            )));
        }
        let context = wanted.min(n_blocks * bs);
        let kv = AnyKvCache::new(
            opts.kv_dtype,
            spec.n_layers,
            spec.n_kv_heads,
            spec.head_dim,
            bs,
            n_blocks,
        )?;
        if opts.kv_dtype.values_per_element() > 1
            && crate::kv::KvRotation::for_cache::<crate::kv::BlockQ8_0>(spec.head_dim).is_none()
        {
            tracing::warn!(
                "--kv-dtype {}: heads of {} are not a multiple of 64, so keys and values are \
                 stored unrotated, which costs more accuracy (as in llama.cpp)",
                opts.kv_dtype,
                spec.head_dim
            );
        }
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
        model.set_context(context);
        let (mut always, mut named) =
            (Vec::new(), Vec::<(WeightedAdapter, Option<Instant>)>::new());
        for o in &opts.lora {
            if !o.scale.is_finite() || o.scale.abs() > MAX_ADAPTER_WEIGHT {
                return Err(Error::Config(format!(
                    "LoRA scale {} of {} is not a finite number",
                    o.scale,
                    o.path.display()
                )));
            }
            let label = o
                .name
                .clone()
                .unwrap_or_else(|| o.path.display().to_string());
            if o.name
                .as_deref()
                .is_some_and(|n| named.iter().any(|(w, _)| w.adapter.name == n))
            {
                return Err(Error::Config(format!(
                    "two LoRA adapters are named {label}"
                )));
            }
            let adapter = LoraAdapter::load(&o.path, &label, &model.spec)?;
            tracing::info!(
                name = %label,
                rank = adapter.rank,
                targets = ?adapter.targets(),
                kib = adapter.bytes() >> 10,
                "loaded LoRA adapter"
            );
            let w = WeightedAdapter {
                adapter: Arc::new(adapter),
                weight: o.scale,
            };
            match o.name {
                Some(_) => named.push((w, None)),
                None => always.push(w),
            }
        }
        if opts.max_loras == Some(0) {
            return Err(Error::Config("--max-loras must be at least 1".into()));
        }
        if let Some(max) = opts.max_loras.filter(|&m| named.len() > m) {
            return Err(Error::Config(format!(
                "{} named LoRA adapters, more than --max-loras {max}",
                named.len()
            )));
        }
        Ok(Engine {
            model,
            tokenizer: Arc::new(tokenizer),
            template: Arc::new(template),
            provenance,
            type_mix,
            pool,
            kv,
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
            requests: HashMap::new(),
            next_id: 0,
            context,
            max_batched_tokens,
            counters: Counters::default(),
            always,
            named,
            max_loras: opts.max_loras,
            fault: None,
        })
    }

    pub fn family(&self) -> Family {
        self.model.spec.family
    }

    /// The longest sequence (prompt + output) a request may reach.
    pub fn context(&self) -> usize {
        self.context
    }

    pub fn threads(&self) -> usize {
        self.pool.n_threads()
    }

    pub fn kv_dtype(&self) -> KvDtype {
        self.kv.dtype()
    }

    pub fn block_size(&self) -> usize {
        self.kv.block_size()
    }

    pub fn stats(&self) -> SchedulerStats {
        self.sched.stats()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Whether any request is queued or running.
    pub fn has_work(&self) -> bool {
        !self.requests.is_empty()
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
        req: GenerationRequest,
        after: Option<SeqId>,
        mut sink: Sink,
    ) {
        if let Err(e) = validate(&req, self.context, self.model.spec.vocab_size) {
            sink(SeqEvent::Failed(e));
            return;
        }
        self.maybe_fault(FaultKind::AdmitPanic, &req.prompt);
        let adapters = match self.adapters_for(&req.adapters) {
            Ok(a) => a,
            Err(e) => {
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
        self.sched.add(
            id,
            req.prompt.clone(),
            SeqOptions {
                use_prefix_cache: !req.embed,
                after: after.filter(|a| self.requests.contains_key(a)),
                cache_salt: adapter_salt(req.cache_salt.as_deref(), &adapters),
                full_logits: req.prompt_logprobs.is_some(),
            },
        );
        let active = Active {
            sampler: Sampler::new(req.sampling.clone()),
            text: TextAssembler::new(&req.stop),
            max_tokens,
            generated: Vec::new(),
            sink,
            arrival: Instant::now(),
            first_token: None,
            embed_sum: Vec::new(),
            prompt_lps: Vec::new(),
            adapters,
            req,
        };
        self.requests.insert(id, active);
    }

    /// Quantizes the unquantized weight matrices to `ty` in place (see
    /// [`EngineOptions::isq`]); returns how many changed.
    pub fn quantize_weights(&mut self, ty: GgmlType) -> usize {
        self.model
            .quantize_unquantized(ty, &self.pool, &mut |_, _| {})
    }

    /// The named adapters requests may ask for.
    pub fn adapter_names(&self) -> Vec<String> {
        self.named
            .iter()
            .map(|(w, _)| w.adapter.name.clone())
            .collect()
    }

    /// The adapters every request gets.
    pub fn always_on_adapters(&self) -> &[WeightedAdapter] {
        &self.always
    }

    /// Whether any named adapter is loaded.
    pub fn has_adapters(&self) -> bool {
        !self.named.is_empty()
    }

    /// Each named adapter with the requests (running or waiting) using it.
    pub fn adapter_use(&self) -> Vec<(String, usize)> {
        self.named
            .iter()
            .map(|(w, _)| (w.adapter.name.clone(), self.users(&w.adapter)))
            .collect()
    }

    fn users(&self, a: &Arc<LoraAdapter>) -> usize {
        self.requests
            .values()
            .filter(|r| r.adapters.iter().any(|x| Arc::ptr_eq(&x.adapter, a)))
            .count()
    }

    /// Makes `adapter` (loaded for this model, see [`LoraAdapter::load`])
    /// available under its name, applied with `scale`. At `max_loras`, the
    /// least recently used adapter loaded at run time that no admitted
    /// request is using goes first (adapters given at start stay; a request
    /// still on its way to the engine that names the evicted one gets 404).
    pub fn add_adapter(&mut self, adapter: LoraAdapter, scale: f32) -> Result<()> {
        if !scale.is_finite() || scale.abs() > MAX_ADAPTER_WEIGHT {
            return Err(Error::InvalidRequest(format!(
                "LoRA scale {scale} is not a finite number within ±{MAX_ADAPTER_WEIGHT}"
            )));
        }
        if self
            .named
            .iter()
            .any(|(w, _)| w.adapter.name == adapter.name)
        {
            return Err(Error::InvalidRequest(format!(
                "a LoRA adapter named '{}' is already loaded",
                adapter.name
            )));
        }
        if let Some(max) = self.max_loras.filter(|&m| self.named.len() >= m) {
            let idle = self
                .named
                .iter()
                .enumerate()
                .filter(|(_, (w, used))| used.is_some() && self.users(&w.adapter) == 0)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(i, _)| i);
            match idle {
                Some(i) => {
                    let (w, _) = self.named.remove(i);
                    tracing::info!(evicted = %w.adapter.name, "LoRA adapter unloaded to make room");
                }
                None => {
                    return Err(Error::Overloaded(format!(
                        "{max} LoRA adapters are loaded (--max-loras): those loaded at run \
                         time are all in use, and those given at start stay"
                    )))
                }
            }
        }
        self.named.push((
            WeightedAdapter {
                adapter: Arc::new(adapter),
                weight: scale,
            },
            Some(Instant::now()),
        ));
        Ok(())
    }

    /// Removes a named adapter. Requests already using it finish with it
    /// (they hold it); new requests cannot name it. Its memory goes when the
    /// last of them ends.
    pub fn remove_adapter(&mut self, name: &str) -> Result<()> {
        let i = self
            .named
            .iter()
            .position(|(w, _)| w.adapter.name == name)
            .ok_or_else(|| Error::NotFound(format!("no LoRA adapter named '{name}'")))?;
        self.named.remove(i);
        Ok(())
    }

    /// The always-on adapters followed by the named ones `wanted` asks
    /// for (their weight multiplies the scale they were loaded with).
    fn adapters_for(&mut self, wanted: &[(String, f32)]) -> Result<Vec<WeightedAdapter>> {
        let mut v = self.always.clone();
        for (name, weight) in wanted {
            if !weight.is_finite() {
                return Err(Error::InvalidRequest(format!(
                    "adapter weight {weight} is not a finite number"
                )));
            }
            let (w, used) = self
                .named
                .iter_mut()
                .find(|(w, _)| w.adapter.name == *name)
                .ok_or_else(|| Error::NotFound(format!("no LoRA adapter named '{name}'")))?;
            if used.is_some() {
                *used = Some(Instant::now());
            }
            let weight = w.weight * weight;
            if !weight.is_finite() {
                return Err(Error::InvalidRequest(format!(
                    "adapter '{name}': weight × scale is not a finite number"
                )));
            }
            v.push(WeightedAdapter {
                adapter: w.adapter.clone(),
                weight,
            });
        }
        Ok(v)
    }

    /// Stops a request now and frees its blocks; its sink hears `Finished`
    /// with [`FinishReason::Cancelled`].
    pub fn abort(&mut self, id: SeqId) {
        if let Some(a) = self.requests.get(&id) {
            self.maybe_fault(FaultKind::AbortPanic, &a.req.prompt);
            self.finish(id, FinishReason::Cancelled);
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
        let chunks = self.sched.schedule();
        if chunks.is_empty() {
            return false;
        }
        for c in &chunks {
            let prompt = &self.requests[&c.id].req.prompt;
            self.maybe_fault(FaultKind::StepPanic, prompt);
            self.maybe_fault(FaultKind::Fatal, prompt);
        }
        match self.run_chunks(&chunks) {
            Ok(out) => {
                self.sched.commit(&chunks);
                self.process(&chunks, out);
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
                            self.process(&one, out);
                        }
                        Err(e) => {
                            tracing::error!("forward pass failed: {e}");
                            self.fail(c.id, &format!("the forward pass failed: {e}"));
                        }
                    }
                }
            }
        }
        true
    }

    /// Ends a request with an internal error (our fault, not the client's).
    pub fn fail(&mut self, id: SeqId, why: &str) {
        if let Some(a) = self.requests.get(&id) {
            self.maybe_fault(FaultKind::Fatal, &a.req.prompt);
        }
        if let Some(mut a) = self.requests.remove(&id) {
            (a.sink)(SeqEvent::Failed(Error::Internal(why.to_string())));
        }
        self.sched.finish(id);
    }

    /// Fails every request (after a panic inside a step, whose state can no
    /// longer be trusted) and clears the prefix cache.
    pub fn fail_all(&mut self, why: &str) {
        for id in self.requests.keys().copied().collect::<Vec<_>>() {
            self.fail(id, why);
        }
        self.sched.drop_cached();
    }

    /// When no request is live: returns the memory of KV blocks that hold
    /// nothing worth keeping, and of freed activations, to the system.
    /// Cached prefixes stay (the next turn of a chat wants them) unless
    /// `drop_cache` says to forget them too.
    pub fn trim(&mut self, drop_cache: bool) {
        if self.has_work() {
            return;
        }
        let dropped = if drop_cache {
            self.sched.drop_cached().len()
        } else {
            0
        };
        let free = self.sched.idle_uncached();
        self.kv.discard(&free);
        // SAFETY: malloc_trim only returns free heap memory to the system.
        unsafe { libc::malloc_trim(0) };
        tracing::debug!(dropped, released = free.len(), "trimmed idle memory");
    }

    fn run_chunks(&mut self, chunks: &[Chunk]) -> Result<Output> {
        let n: usize = chunks.iter().map(|c| c.len).sum();
        let (mut tokens, mut positions, mut seq_index) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut rows, mut hidden_rows) = (Vec::new(), Vec::new());
        let mut tables = Vec::with_capacity(chunks.len());
        let mut adapters: Vec<&[WeightedAdapter]> = Vec::with_capacity(chunks.len());
        for (i, c) in chunks.iter().enumerate() {
            adapters.push(&self.requests[&c.id].adapters);
            let base = tokens.len();
            tokens.extend_from_slice(&self.sched.tokens(c.id)[c.start..c.start + c.len]);
            positions.extend(c.start..c.start + c.len);
            seq_index.extend(std::iter::repeat_n(i, c.len));
            tables.push(self.sched.block_table(c.id));
            match self.rows(c) {
                Rows::AllHidden => hidden_rows.extend(base..base + c.len),
                Rows::AllLogits => rows.extend(base..base + c.len),
                Rows::Last => rows.push(base + c.len - 1),
                Rows::None => {}
            }
        }
        if let Some(f) = self.fault.filter(|f| f.kind == FaultKind::StepError) {
            if tokens.contains(&f.token) {
                return Err(Error::Internal("injected fault: StepError".into()));
            }
        }
        if adapters.iter().all(|a| a.is_empty()) {
            adapters.clear();
        }
        let batch = Batch {
            tokens: &tokens,
            positions: &positions,
            seq_index: &seq_index,
            block_tables: &tables,
            adapters: &adapters,
        };
        self.model
            .forward_any(&batch, &mut self.kv, &rows, &hidden_rows, &self.pool)
    }

    fn rows(&self, c: &Chunk) -> Rows {
        let req = &self.requests[&c.id].req;
        if req.embed {
            Rows::AllHidden
        } else if req.prompt_logprobs.is_some() && c.start + 1 < req.prompt.len() {
            Rows::AllLogits
        } else if c.completes {
            Rows::Last
        } else {
            Rows::None
        }
    }

    /// Turns a step's outputs into tokens and embeddings.
    fn process(&mut self, chunks: &[Chunk], mut out: Output) {
        let (vocab, h) = (self.model.spec.vocab_size, self.model.spec.hidden);
        let mut logit_rows = out.logits.chunks_exact_mut(vocab);
        let mut hidden_rows = out.hidden.chunks_exact(h);
        for c in chunks {
            let plan = self.rows(c);
            let a = self
                .requests
                .get_mut(&c.id)
                .expect("scheduled requests are active");
            if a.req.embed {
                if c.start == 0 {
                    // Recomputed from the start after a preemption.
                    a.embed_sum = vec![0.0; h];
                }
                for row in hidden_rows.by_ref().take(c.len) {
                    a.embed_sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
                }
                if c.completes {
                    let mut v = std::mem::take(&mut a.embed_sum);
                    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                    if norm > 0.0 {
                        v.iter_mut().for_each(|x| *x /= norm);
                    }
                    let tokens = a.req.prompt.len();
                    (a.sink)(SeqEvent::Embedding { vector: v, tokens });
                    self.counters.prompt_tokens += tokens as u64;
                    self.finish(c.id, FinishReason::Stop);
                }
                continue;
            }
            if plan == Rows::AllLogits {
                let k = a.req.prompt_logprobs.unwrap_or(0);
                let n = a.req.prompt.len();
                a.prompt_lps.resize(n - 1, None);
                let mut last = None;
                for pos in c.start..c.start + c.len {
                    let row = logit_rows.next().expect("a logit row per position");
                    if pos + 1 < n {
                        a.prompt_lps[pos] = Some(prompt_logprob(row, a.req.prompt[pos + 1], k));
                    }
                    last = Some(row);
                }
                if c.completes {
                    let row = last.expect("a chunk has at least one token");
                    if let Some(reason) = self.sample(c.id, row) {
                        self.finish(c.id, reason);
                    }
                }
                continue;
            }
            if !c.completes {
                continue;
            }
            let logits = logit_rows.next().expect("a logit row per completed chunk");
            if let Some(reason) = self.sample(c.id, logits) {
                self.finish(c.id, reason);
            }
        }
    }

    /// Hands a request its prompt log-probabilities, once, before its
    /// first token.
    fn send_prompt_logprobs(&mut self, id: SeqId) {
        let a = self.requests.get_mut(&id).expect("active");
        if a.first_token.is_some() || a.req.prompt_logprobs.is_none() {
            return;
        }
        // Empty for a one-token prompt (nothing scores its only token).
        let lps = std::mem::take(&mut a.prompt_lps)
            .into_iter()
            .map(|e| e.expect("every prompt position was computed"))
            .collect();
        (a.sink)(SeqEvent::PromptLogprobs(lps));
    }

    /// Picks a sequence's next token and tells its sink; returns why the
    /// request ends, if it does.
    fn sample(&mut self, id: SeqId, logits: &mut [f32]) -> Option<FinishReason> {
        self.send_prompt_logprobs(id);
        let stop_ids = &self.tokenizer.special.stop;
        let a = self.requests.get_mut(&id).expect("active");
        let lp = a.req.logprobs.map(|k| log_softmax_top(logits, k));
        let tok = a.sampler.sample(logits);
        a.sampler.observe(tok);
        a.generated.push(tok);
        self.counters.generation_tokens += 1;
        if a.first_token.is_none() {
            a.first_token = Some(Instant::now());
            self.counters.prompt_tokens += a.req.prompt.len() as u64;
            self.counters.prefix_cache_hit_tokens += self.sched.cached_tokens(id) as u64;
        }
        if !a.req.ignore_eos && stop_ids.contains(&tok) {
            return Some(FinishReason::Stop);
        }
        let (mut piece, hit_stop) = a.text.push(self.tokenizer.token_bytes(tok));
        let out_of_room = !hit_stop && a.generated.len() >= a.max_tokens;
        if out_of_room {
            // The last token carries what was held back, not an extra event.
            piece.push_str(&a.text.finish());
        }
        let logprobs = lp.map(|(all, top)| TokenLogprobs {
            logprob: all[tok as usize],
            top,
        });
        let alive = (a.sink)(SeqEvent::Token(TokenEvent {
            id: tok,
            text: piece,
            logprobs,
        }));
        if !alive {
            return Some(FinishReason::Cancelled);
        }
        if hit_stop {
            return Some(FinishReason::Stop);
        }
        if out_of_room {
            return Some(FinishReason::Length);
        }
        self.sched.append(id, tok);
        None
    }

    fn finish(&mut self, id: SeqId, finish: FinishReason) {
        let cached_tokens = self.sched.cached_tokens(id);
        self.sched.finish(id);
        let Some(mut a) = self.requests.remove(&id) else {
            return;
        };
        if a.req.embed && finish != FinishReason::Cancelled {
            return; // the embedding was its answer
        }
        let tail = a.text.finish();
        if !tail.is_empty() && finish != FinishReason::Cancelled {
            (a.sink)(SeqEvent::Token(TokenEvent {
                id: *a.generated.last().unwrap_or(&0),
                text: tail,
                logprobs: None,
            }));
        }
        let now = Instant::now();
        let first = a.first_token.unwrap_or(now);
        tracing::debug!(
            seq = id,
            prompt = a.req.prompt.len(),
            cached = cached_tokens,
            generated = a.generated.len(),
            finish = finish.as_str(),
            "request done"
        );
        (a.sink)(SeqEvent::Finished(GenerationSummary {
            tokens: a.generated,
            text: a.text.emitted,
            finish,
            prompt_tokens: a.req.prompt.len(),
            cached_tokens,
            prefill_secs: (first - a.arrival).as_secs_f64(),
            decode_secs: (now - first).as_secs_f64(),
        }));
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
            let mut out = Output {
                logits: Vec::new(),
                hidden: Vec::new(),
            };
            let chunk = e.max_batched_tokens;
            for (ci, toks) in tokens.chunks(chunk).enumerate() {
                let base = ci * chunk;
                let local = |rs: &[usize]| -> Vec<usize> {
                    rs.iter()
                        .filter(|&&r| r >= base && r < base + toks.len())
                        .map(|&r| r - base)
                        .collect()
                };
                let o = e.forward_private(table, toks, base, &local(rows), &local(hidden_rows))?;
                out.logits.extend_from_slice(&o.logits);
                out.hidden.extend_from_slice(&o.hidden);
            }
            Ok(out)
        })
    }

    /// `log p(tokens[i + 1] | tokens[..=i])` for every `i`: how likely the
    /// model finds each token after the first (perplexity). Logits are
    /// turned into log-probabilities a few rows at a time, so memory stays
    /// bounded whatever the vocabulary.
    pub fn token_logprobs(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let vocab = self.model.spec.vocab_size;
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
            for (ci, toks) in prefix.chunks(e.max_batched_tokens).enumerate() {
                e.forward_private(table, toks, ci * e.max_batched_tokens, &[], &[])?;
            }
            let start = std::time::Instant::now();
            let mut logits = Vec::with_capacity(tokens.len() * e.model.spec.vocab_size);
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
        let positions: Vec<usize> = (start..start + tokens.len()).collect();
        let batch = Batch {
            tokens,
            positions: &positions,
            seq_index: &vec![0; tokens.len()],
            block_tables: &[table],
            adapters: &[&self.always],
        };
        self.model
            .forward_any(&batch, &mut self.kv, rows, hidden_rows, &self.pool)
    }

    /// Lends `f` a block table for a private sequence of `len` tokens.
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
        let mut table = Vec::new();
        while table.len() * self.block_size() < len {
            match self.sched.blocks.allocate() {
                Some(b) => table.push(b),
                None => {
                    self.sched.blocks.release(&table);
                    return Err(Error::Overloaded("the KV cache is busy".into()));
                }
            }
        }
        let r = f(self, &table);
        self.sched.blocks.release(&table);
        r
    }
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

/// Checks a request against the engine's limits before it is queued.
pub fn validate(req: &GenerationRequest, context: usize, vocab: usize) -> Result<()> {
    req.sampling.validate(vocab)?;
    if req.prompt.is_empty() {
        return Err(Error::InvalidRequest("the prompt is empty".into()));
    }
    if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::InvalidRequest(format!(
            "token id {t} is outside the vocabulary of {vocab}"
        )));
    }
    let room = if req.embed { 0 } else { 1 };
    if req.prompt.len() + room > context {
        return Err(Error::InvalidRequest(format!(
            "the prompt has {} tokens, but the context holds {context}{}",
            req.prompt.len(),
            if req.embed {
                ""
            } else {
                " (including at least one generated token)"
            }
        )));
    }
    if req.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS)
        || req.prompt_logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS)
    {
        return Err(Error::InvalidRequest(format!(
            "at most {MAX_TOP_LOGPROBS} top log-probabilities per token"
        )));
    }
    Ok(())
}

/// Renders a conversation with a template and tokenizes it.
pub fn chat_prompt(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[ChatMessage],
) -> Result<Vec<u32>> {
    let text = template.render(messages, true)?;
    // Templates that write the BOS text themselves must not get a second one.
    let bos_text = tokenizer.special.bos.and_then(|b| tokenizer.token_text(b));
    let has_bos = bos_text.is_some_and(|b| !b.is_empty() && text.starts_with(b));
    tokenizer.encode(&text, !has_bos)
}

/// The log-probability and rank of `token` under `logits`, with the `k`
/// most likely alternatives.
/// No allocation beyond the `k` alternatives: this runs for every prompt
/// position of a request that asks, on the engine's thread.
fn prompt_logprob(logits: &[f32], token: u32, k: usize) -> PromptTokenLogprob {
    let lse = log_sum_exp(logits);
    let own = logits[token as usize];
    PromptTokenLogprob {
        id: token,
        logprob: own - lse,
        rank: 1 + logits.iter().filter(|&&l| l > own).count(),
        top: top_k(logits, k)
            .into_iter()
            .map(|(i, l)| (i, l - lse))
            .collect(),
    }
}

/// ln Σ exp(logits), stable.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The `k` largest logits, largest first (ties: lower id first).
fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    #[derive(PartialEq)]
    struct Entry(f32, Reverse<u32>);
    impl Eq for Entry {}
    impl PartialOrd for Entry {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    impl Ord for Entry {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
        }
    }
    if k == 0 {
        return Vec::new();
    }
    // A min-heap of the best k so far.
    let mut heap: BinaryHeap<Reverse<Entry>> = BinaryHeap::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        let e = Entry(l, Reverse(i as u32));
        if heap.len() < k {
            heap.push(Reverse(e));
        } else if heap.peek().is_some_and(|Reverse(min)| e > *min) {
            heap.pop();
            heap.push(Reverse(e));
        }
    }
    let mut top: Vec<(u32, f32)> = heap
        .into_iter()
        .map(|Reverse(Entry(l, Reverse(i)))| (i, l))
        .collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    top
}

/// Log-probabilities of every token (natural log) and the `k` most likely.
fn log_softmax_top(logits: &[f32], k: usize) -> (Vec<f32>, Vec<(u32, f32)>) {
    let lse = log_sum_exp(logits);
    let all: Vec<f32> = logits.iter().map(|&v| v - lse).collect();
    let top = top_k(&all, k);
    (all, top)
}

/// Turns token bytes into text: holds back incomplete UTF-8 and any tail that
/// might begin a stop string, and cuts the text at a stop string.
pub struct TextAssembler {
    stops: Vec<String>,
    bytes: Vec<u8>,
    pending: String,
    pub emitted: String,
}

impl TextAssembler {
    pub fn new(stops: &[String]) -> Self {
        TextAssembler {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            bytes: Vec::new(),
            pending: String::new(),
            emitted: String::new(),
        }
    }

    /// Adds a token's bytes; returns the text that is now final and whether
    /// a stop string was reached.
    pub fn push(&mut self, b: &[u8]) -> (String, bool) {
        self.bytes.extend_from_slice(b);
        loop {
            match std::str::from_utf8(&self.bytes) {
                Ok(s) => {
                    self.pending.push_str(s);
                    self.bytes.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    self.pending
                        .push_str(std::str::from_utf8(&self.bytes[..valid]).expect("valid prefix"));
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            self.bytes.drain(..valid);
                            break;
                        }
                        Some(n) => {
                            self.pending.push('\u{FFFD}');
                            self.bytes.drain(..valid + n);
                        }
                    }
                }
            }
        }
        if let Some(i) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..i].to_string();
            self.emitted.push_str(&out);
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest tail that could still grow into a stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in self.pending.char_indices() {
                let tail = &self.pending[i..];
                if s.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out: String = self.pending.drain(..cut).collect();
        self.emitted.push_str(&out);
        (out, false)
    }

    /// Flushes what was held back (generation ended without a stop string).
    pub fn finish(&mut self) -> String {
        let mut out = std::mem::take(&mut self.pending);
        if !self.bytes.is_empty() {
            out.push_str(&String::from_utf8_lossy(&self.bytes));
            self.bytes.clear();
        }
        self.emitted.push_str(&out);
        out
    }
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
