//! A loaded model with its tokenizer and chat template, running one
//! generation at a time over the paged KV cache.

use crate::chat::{ChatMessage, ChatTemplate, CHATML, GEMMA};
use crate::error::{Error, Result};
use crate::kv::{BlockHash, BlockManager, KvCache};
use crate::model::{load_gguf, load_hf_folder, Batch, Family, Model, Output};
use crate::sampling::{Sampler, SamplingParams};
use crate::threadpool::ThreadPool;
use crate::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const BLOCK_SIZE: usize = 16;
/// Prompts are run through the model this many tokens at a time, bounding
/// activation memory whatever the prompt length.
pub const PREFILL_CHUNK: usize = 512;
/// Context used when the model's own is larger (memory grows with it).
pub const DEFAULT_MAX_CONTEXT: usize = 4096;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub threads: usize,
    /// Tokens of context to allocate KV blocks for (capped by the model's).
    pub context: Option<usize>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            threads: default_threads(),
            context: None,
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

pub struct Engine {
    pub model: Model,
    pub tokenizer: Arc<Tokenizer>,
    pub template: ChatTemplate,
    pub provenance: Provenance,
    /// A short description of the tensor types, e.g. "Q4_1: 210, F32: 61".
    pub type_mix: Vec<(String, usize)>,
    pool: ThreadPool,
    kv: KvCache,
    blocks: BlockManager,
    context: usize,
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

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Keep going past EOS / end-of-turn tokens (benchmarks).
    pub ignore_eos: bool,
}

/// One generated token and the text it completes (possibly empty while a
/// multi-byte character or a possible stop string is pending).
#[derive(Debug, Clone)]
pub struct TokenEvent {
    pub id: u32,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct GenerationSummary {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
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
        let model = loaded.model;
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
        let context = opts
            .context
            .unwrap_or(DEFAULT_MAX_CONTEXT)
            .min(spec.context_length)
            .max(1);
        let n_blocks = context.div_ceil(BLOCK_SIZE);
        let kv = KvCache::new(
            spec.n_layers,
            spec.n_kv_heads,
            spec.head_dim,
            BLOCK_SIZE,
            n_blocks,
        );
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
        Ok(Engine {
            model,
            tokenizer: Arc::new(tokenizer),
            template,
            provenance,
            type_mix,
            pool: ThreadPool::new(opts.threads),
            kv,
            blocks: BlockManager::new(n_blocks, BLOCK_SIZE),
            context,
        })
    }

    pub fn family(&self) -> Family {
        self.model.spec.family
    }

    pub fn context(&self) -> usize {
        self.context
    }

    pub fn threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// Renders a conversation with the model's template and tokenizes it.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.template.render(messages, true)?;
        // Templates that write the BOS text themselves must not get a second one.
        let bos_text = self
            .tokenizer
            .special
            .bos
            .and_then(|b| self.tokenizer.token_text(b));
        let has_bos = bos_text.is_some_and(|b| !b.is_empty() && text.starts_with(b));
        self.tokenizer.encode(&text, !has_bos)
    }

    /// Runs `tokens` through the model as one sequence starting at position 0
    /// and returns the outputs for `rows`. Used for logits, embeddings and
    /// prompt processing.
    pub fn forward_sequence(
        &mut self,
        tokens: &[u32],
        rows: &[usize],
        want_hidden: bool,
    ) -> Result<Output> {
        let mut seq = self.new_sequence();
        let r = self.extend(&mut seq, tokens, rows, want_hidden);
        self.release(seq);
        r
    }

    /// Feeds `tokens` one at a time through the KV cache (the first as a
    /// one-token prefill) and returns each step's logits, `n × vocab`.
    pub fn decode_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut seq = self.new_sequence();
        let mut logits = Vec::with_capacity(tokens.len() * self.model.spec.vocab_size);
        let r = tokens.iter().try_for_each(|&t| {
            logits.extend(self.extend(&mut seq, &[t], &[0], false)?.logits);
            Ok(())
        });
        self.release(seq);
        r.map(|_| logits)
    }

    fn new_sequence(&self) -> Sequence {
        Sequence::default()
    }

    /// A sequence that starts on the cached blocks of the longest known
    /// prefix of `prompt`.
    fn cached_sequence(&mut self, prompt: &[u32]) -> Sequence {
        let (blocks, hashes) = self.blocks.lookup_prefix(prompt);
        let len = blocks.len() * BLOCK_SIZE;
        Sequence {
            blocks,
            hashes,
            tokens: prompt[..len].to_vec(),
            len,
        }
    }

    fn release(&mut self, seq: Sequence) {
        self.blocks.release(&seq.blocks);
    }

    /// Appends `tokens` to `seq` (prefilling in chunks) and returns the
    /// outputs for `rows` (indices into `tokens`).
    fn extend(
        &mut self,
        seq: &mut Sequence,
        tokens: &[u32],
        rows: &[usize],
        want_hidden: bool,
    ) -> Result<Output> {
        if seq.len + tokens.len() > self.context {
            return Err(Error::InvalidRequest(format!(
                "{} tokens exceed the context of {} tokens",
                seq.len + tokens.len(),
                self.context
            )));
        }
        while seq.blocks.len() * BLOCK_SIZE < seq.len + tokens.len() {
            let b = self
                .blocks
                .allocate()
                .ok_or_else(|| Error::InvalidRequest("KV cache is full".into()))?;
            seq.blocks.push(b);
        }
        let mut out = Output {
            logits: Vec::with_capacity(rows.len() * self.model.spec.vocab_size),
            hidden: want_hidden.then(Vec::new),
        };
        for (ci, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
            let base = ci * PREFILL_CHUNK;
            let positions: Vec<usize> = (seq.len..seq.len + chunk.len()).collect();
            let chunk_rows: Vec<usize> = rows
                .iter()
                .filter(|&&r| r >= base && r < base + chunk.len())
                .map(|&r| r - base)
                .collect();
            let tables = [seq.blocks.as_slice()];
            let batch = Batch {
                tokens: chunk,
                positions: &positions,
                seq_index: &vec![0; chunk.len()],
                block_tables: &tables,
            };
            let o =
                self.model
                    .forward(&batch, &mut self.kv, &chunk_rows, want_hidden, &self.pool)?;
            seq.len += chunk.len();
            seq.tokens.extend_from_slice(chunk);
            // Blocks that just filled up become reusable prefixes.
            while seq.hashes.len() < seq.len / BLOCK_SIZE {
                let i = seq.hashes.len();
                let prev = seq.hashes.last().copied().unwrap_or_default();
                let h = BlockManager::chain_hash(
                    &prev,
                    &seq.tokens[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE],
                );
                self.blocks.register(seq.blocks[i], h);
                seq.hashes.push(h);
            }
            out.logits.extend_from_slice(&o.logits);
            if let (Some(h), Some(oh)) = (out.hidden.as_mut(), o.hidden) {
                h.extend_from_slice(&oh);
            }
        }
        Ok(out)
    }

    /// Generates from `req`, calling `on_token` for every token; it returns
    /// false to cancel.
    pub fn generate(
        &mut self,
        req: &GenerationRequest,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<GenerationSummary> {
        let vocab = self.model.spec.vocab_size;
        req.sampling.validate(vocab)?;
        if req.prompt.is_empty() {
            return Err(Error::InvalidRequest("the prompt is empty".into()));
        }
        if req.prompt.len() >= self.context {
            return Err(Error::InvalidRequest(format!(
                "the prompt has {} tokens, but the context holds {} (including at least one generated token)",
                req.prompt.len(),
                self.context
            )));
        }
        let max_tokens = req.max_tokens.min(self.context - req.prompt.len());
        let mut sampler = Sampler::new(req.sampling.clone());
        let mut text = TextAssembler::new(&req.stop);
        let mut seq = self.cached_sequence(&req.prompt);
        let cached_tokens = seq.len;
        let t0 = std::time::Instant::now();
        let result = (|| {
            let rest = &req.prompt[cached_tokens..];
            let out = self.extend(&mut seq, rest, &[rest.len() - 1], false)?;
            let prefill_secs = t0.elapsed().as_secs_f64();
            let t1 = std::time::Instant::now();
            let mut logits = out.logits;
            let mut tokens = Vec::new();
            let mut finish = FinishReason::Length;
            while tokens.len() < max_tokens {
                let id = sampler.sample(&mut logits);
                sampler.observe(id);
                tokens.push(id);
                if !req.ignore_eos && self.tokenizer.special.stop.contains(&id) {
                    finish = FinishReason::Stop;
                    break;
                }
                let (piece, hit_stop) = text.push(self.tokenizer.token_bytes(id));
                if !on_token(&TokenEvent { id, text: piece }) {
                    finish = FinishReason::Cancelled;
                    break;
                }
                if hit_stop {
                    finish = FinishReason::Stop;
                    break;
                }
                if tokens.len() == max_tokens {
                    break;
                }
                logits = self.extend(&mut seq, &[id], &[0], false)?.logits;
            }
            let tail = text.finish();
            if !tail.is_empty() && finish != FinishReason::Cancelled {
                on_token(&TokenEvent {
                    id: *tokens.last().unwrap_or(&0),
                    text: tail,
                });
            }
            tracing::debug!(
                prompt = req.prompt.len(),
                cached = cached_tokens,
                generated = tokens.len(),
                prefill_secs,
                finish = finish.as_str(),
                "generation done"
            );
            Ok(GenerationSummary {
                tokens,
                text: text.emitted,
                finish,
                prompt_tokens: req.prompt.len(),
                cached_tokens,
                prefill_secs,
                decode_secs: t1.elapsed().as_secs_f64(),
            })
        })();
        self.release(seq);
        result
    }
}

/// A sequence's KV blocks, tokens and the hashes of its full blocks.
#[derive(Default)]
struct Sequence {
    blocks: Vec<u32>,
    hashes: Vec<BlockHash>,
    tokens: Vec<u32>,
    len: usize,
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
