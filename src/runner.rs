//! The model runner: the model, its KV cache and its threads. Sequences'
//! tokens, positions, block tables and adapters go in; one forward pass
//! over their flat batch writes their keys and values and returns the
//! logits or hidden states of the rows asked for. It knows no requests,
//! no scheduler and no sampling.

use crate::error::{Error, Result};
use crate::kv::{bytes_per_token, AnyKvCache, KvDtype};
use crate::model::lora::WeightedAdapter;
use crate::model::{Batch, Model, ModelSpec, Output};
use crate::threadpool::ThreadPool;

/// The KV budget when none is given: this many full contexts, at most
/// [`DEFAULT_KV_CAP_MB`].
const DEFAULT_KV_CONTEXTS: usize = 4;
const DEFAULT_KV_CAP_MB: usize = 1024;

/// Which rows of a sequence's tokens the forward pass returns.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Rows {
    None,
    /// The last row's logits: they choose the next token.
    Last,
    /// Logits of every row (prompt log-probabilities, then the next token).
    AllLogits,
    /// Hidden states of every row (embeddings).
    AllHidden,
}

/// One sequence's part of a step: `tokens` at positions `start..`.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub block_table: &'a [u32],
    /// Applied to this sequence's rows only (empty: the base model).
    pub adapters: &'a [WeightedAdapter],
    pub rows: Rows,
}

pub struct ModelRunner {
    model: Model,
    kv: AnyKvCache,
    pool: ThreadPool,
}

/// Bytes of one KV block of `block_size` tokens (keys and values of every
/// layer).
pub fn kv_block_bytes(spec: &ModelSpec, dtype: KvDtype, block_size: usize) -> usize {
    bytes_per_token(spec.n_layers, spec.n_kv_heads, spec.head_dim, dtype) * block_size
}

/// How many KV blocks of `block_size` tokens the pool gets: `kv_blocks`
/// if given, else what `kv_cache_mb` holds, else [`DEFAULT_KV_CONTEXTS`]
/// contexts of `context` tokens within [`DEFAULT_KV_CAP_MB`] (and never
/// less than one context).
pub fn kv_pool_blocks(
    spec: &ModelSpec,
    dtype: KvDtype,
    block_size: usize,
    context: usize,
    kv_blocks: Option<usize>,
    kv_cache_mb: Option<usize>,
) -> Result<usize> {
    let per_block = kv_block_bytes(spec, dtype, block_size);
    let n_blocks = match (kv_blocks, kv_cache_mb) {
        (Some(n), _) => n,
        (None, Some(mb)) => (mb << 20) / per_block,
        (None, None) => (context.div_ceil(block_size) * DEFAULT_KV_CONTEXTS)
            .min((DEFAULT_KV_CAP_MB << 20) / per_block)
            .max(context.div_ceil(block_size)),
    };
    if n_blocks == 0 {
        return Err(Error::Config(format!(
            "a KV budget of {} MiB holds no block of {block_size} tokens ({} KiB each)",
            kv_cache_mb.unwrap_or(0),
            per_block >> 10
        )));
    }
    Ok(n_blocks)
}

impl ModelRunner {
    /// The runner of `model` with a KV pool of `n_blocks` blocks.
    pub fn new(
        model: Model,
        pool: ThreadPool,
        dtype: KvDtype,
        block_size: usize,
        n_blocks: usize,
    ) -> Result<Self> {
        let spec = &model.spec;
        let kv = AnyKvCache::new(
            dtype,
            spec.n_layers,
            spec.n_kv_heads,
            spec.head_dim,
            block_size,
            n_blocks,
        )?;
        if dtype.values_per_element() > 1
            && crate::kv::KvRotation::for_cache::<crate::kv::BlockQ8_0>(spec.head_dim).is_none()
        {
            tracing::warn!(
                "--kv-dtype {dtype}: heads of {} are not a multiple of 64, so keys and values \
                 are stored unrotated, which costs more accuracy (as in llama.cpp)",
                spec.head_dim
            );
        }
        Ok(ModelRunner { model, kv, pool })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model, to change its weights (in-situ quantization).
    pub fn model_mut(&mut self) -> &mut Model {
        &mut self.model
    }

    /// Quantizes the model's unquantized weight matrices to `ty` on the
    /// runner's threads; returns how many changed.
    pub fn quantize_weights(
        &mut self,
        ty: crate::quant::GgmlType,
        progress: &mut dyn FnMut(usize, usize),
    ) -> usize {
        self.model.quantize_unquantized(ty, &self.pool, progress)
    }

    pub fn pool(&self) -> &ThreadPool {
        &self.pool
    }

    pub fn kv_dtype(&self) -> KvDtype {
        self.kv.dtype()
    }

    pub fn block_size(&self) -> usize {
        self.kv.block_size()
    }

    /// Returns the memory of `blocks` (which hold nothing worth keeping)
    /// to the system.
    pub fn discard(&mut self, blocks: &[u32]) {
        self.kv.discard(blocks);
    }

    /// One forward pass over `seqs`' tokens as one flat batch. The output
    /// holds, in `seqs` order, the logit rows of every sequence that asked
    /// for logits, then (separately) the hidden rows of those that asked
    /// for hidden states.
    pub fn run(&mut self, seqs: &[SeqInput]) -> Result<Output> {
        let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let (mut tokens, mut positions, mut seq_index) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut rows, mut hidden_rows) = (Vec::new(), Vec::new());
        let mut tables = Vec::with_capacity(seqs.len());
        let mut adapters: Vec<&[WeightedAdapter]> = Vec::with_capacity(seqs.len());
        for (i, s) in seqs.iter().enumerate() {
            let (base, len) = (tokens.len(), s.tokens.len());
            tokens.extend_from_slice(s.tokens);
            positions.extend(s.start..s.start + len);
            seq_index.extend(std::iter::repeat_n(i, len));
            tables.push(s.block_table);
            adapters.push(s.adapters);
            match s.rows {
                Rows::AllHidden => hidden_rows.extend(base..base + len),
                Rows::AllLogits => rows.extend(base..base + len),
                Rows::Last if len > 0 => rows.push(base + len - 1),
                Rows::Last | Rows::None => {}
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

    /// One sequence's `tokens` at positions `start..`, returning the logits
    /// of `rows` and the hidden states of `hidden_rows` (indices into
    /// `tokens`).
    pub fn run_rows(
        &mut self,
        block_table: &[u32],
        tokens: &[u32],
        start: usize,
        adapters: &[WeightedAdapter],
        rows: &[usize],
        hidden_rows: &[usize],
    ) -> Result<Output> {
        let positions: Vec<usize> = (start..start + tokens.len()).collect();
        let one = [adapters];
        let batch = Batch {
            tokens,
            positions: &positions,
            seq_index: &vec![0; tokens.len()],
            block_tables: &[block_table],
            adapters: if adapters.is_empty() { &[] } else { &one },
        };
        self.model
            .forward_any(&batch, &mut self.kv, rows, hidden_rows, &self.pool)
    }
}
