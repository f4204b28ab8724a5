//! The model runner: the model, its KV cache and its threads. Sequences'
//! tokens, positions, block tables and adapters go in; one forward pass
//! over their flat batch writes their keys and values and returns the
//! logits or hidden states of the rows asked for. It knows no requests,
//! no scheduler and no sampling.

use crate::error::{Error, Result};
use crate::kv::{bytes_per_token, AnyKvCache, KvDtype};
use crate::model::lora::{factors_len, WeightedAdapter};
use crate::model::xlora::XLora;
use crate::model::{Batch, Model, ModelSpec, Output};
use crate::threadpool::ThreadPool;
use std::sync::Arc;

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
#[derive(Clone, Copy)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub block_table: &'a [u32],
    /// Applied to this sequence's rows only (empty: the base model).
    pub adapters: &'a [WeightedAdapter],
    /// The X-LoRA whose experts end `adapters`: a scaling pass picks
    /// their weights per token, and `block_table` holds each logical
    /// block as a pair (the real pass's, then the scaling pass's).
    pub xlora: Option<&'a XLora>,
    pub rows: Rows,
}

pub struct ModelRunner {
    /// Shared read-only with whoever trains adapters over it while it
    /// serves (the learning loop); changed only before that starts.
    model: Arc<Model>,
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
        Ok(ModelRunner {
            model: Arc::new(model),
            kv,
            pool,
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model, shared (it stays read-only from here on).
    pub fn shared_model(&self) -> Arc<Model> {
        self.model.clone()
    }

    /// The model, to change its weights (in-situ quantization, at load:
    /// nothing shares it yet).
    pub fn model_mut(&mut self) -> &mut Model {
        Arc::get_mut(&mut self.model).expect("the model is changed only before it is shared")
    }

    /// Quantizes the model's unquantized weight matrices to `ty` on the
    /// runner's threads; returns how many changed.
    pub fn quantize_weights(
        &mut self,
        ty: crate::quant::GgmlType,
        progress: &mut dyn FnMut(usize, usize),
    ) -> usize {
        let pool = &self.pool;
        Arc::get_mut(&mut self.model)
            .expect("the model is changed only before it is shared")
            .quantize_unquantized(ty, pool, progress)
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

    /// One forward pass over `seqs`' tokens as one flat batch (two for
    /// X-LoRA sequences: their scaling pass first). The output holds, in
    /// `seqs` order, the logit rows of every sequence that asked for
    /// logits, then (separately) the hidden rows of those that asked for
    /// hidden states.
    pub fn run(&mut self, seqs: &[SeqInput]) -> Result<Output> {
        let layers = self.model.spec.n_layers;
        let tables: Vec<Tables> = seqs
            .iter()
            .map(|s| Tables::of(s.block_table, s.xlora.is_some()))
            .collect();
        let factors = self.scaling_pass(seqs, &tables)?;
        let mut b = FlatBatch::default();
        for (i, s) in seqs.iter().enumerate() {
            let f = factors[i].as_deref().map(|f| {
                let len = factors_len(layers, s.adapters.len());
                (f, len, len)
            });
            b.push(s, tables[i].main(), f);
        }
        b.forward(&self.model, &mut self.kv, &self.pool)
    }

    /// Runs the scaling pass of the X-LoRA sequences of `seqs` through
    /// their own KV tables and returns, for each of them, its rows'
    /// weight factors for the real pass.
    fn scaling_pass(
        &mut self,
        seqs: &[SeqInput],
        tables: &[Tables],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let mut out: Vec<Option<Vec<f32>>> = seqs.iter().map(|_| None).collect();
        if seqs.iter().all(|s| s.xlora.is_none()) {
            return Ok(out);
        }
        let layers = self.model.spec.n_layers;
        let mut b = FlatBatch::default();
        let dummies: Vec<Option<Vec<f32>>> = seqs
            .iter()
            .map(|s| s.xlora.map(|x| x.scaling_pass_factors(layers, lead(s, x))))
            .collect();
        for (i, s) in seqs.iter().enumerate() {
            if let (Some(d), Some(scaling)) = (&dummies[i], tables[i].scaling()) {
                let pass = SeqInput {
                    rows: Rows::AllHidden,
                    ..*s
                };
                b.push(&pass, scaling, Some((d.as_slice(), 0, d.len())));
            }
        }
        let hidden = b.forward(&self.model, &mut self.kv, &self.pool)?.hidden;
        let h = self.model.spec.hidden;
        let mut at = 0;
        for (i, s) in seqs.iter().enumerate() {
            if let Some(x) = s.xlora {
                let rows = &hidden[at * h..(at + s.tokens.len()) * h];
                out[i] = Some(x.factors(layers, lead(s, x), rows));
                at += s.tokens.len();
            }
        }
        Ok(out)
    }

    /// One sequence's `tokens` at positions `start..`, returning the logits
    /// of `rows` and the hidden states of `hidden_rows` (indices into
    /// `tokens`).
    #[allow(clippy::too_many_arguments)]
    pub fn run_rows(
        &mut self,
        block_table: &[u32],
        tokens: &[u32],
        start: usize,
        adapters: &[WeightedAdapter],
        xlora: Option<&XLora>,
        rows: &[usize],
        hidden_rows: &[usize],
    ) -> Result<Output> {
        let seq = SeqInput {
            tokens,
            start,
            block_table,
            adapters,
            xlora,
            rows: Rows::None,
        };
        let tables = [Tables::of(block_table, xlora.is_some())];
        let factors = self.scaling_pass(std::slice::from_ref(&seq), &tables)?;
        let mut b = FlatBatch::default();
        let f = factors[0].as_deref().map(|f| {
            let len = factors_len(self.model.spec.n_layers, adapters.len());
            (f, len, len)
        });
        b.push(&seq, tables[0].main(), f);
        b.rows.extend_from_slice(rows);
        b.hidden_rows.extend_from_slice(hidden_rows);
        b.forward(&self.model, &mut self.kv, &self.pool)
    }
}

/// How many adapters of a sequence's mix come before X-LoRA's experts.
fn lead(s: &SeqInput, x: &XLora) -> usize {
    s.adapters.len().saturating_sub(x.experts.len())
}

/// A sequence's block table, split when it interleaves two: an X-LoRA
/// sequence keeps each logical block of its KV cache as a pair, the real
/// pass's then the scaling pass's.
enum Tables<'a> {
    One(&'a [u32]),
    Two(Vec<u32>, Vec<u32>),
}

impl<'a> Tables<'a> {
    fn of(table: &'a [u32], paired: bool) -> Self {
        if !paired {
            return Tables::One(table);
        }
        let main = table.iter().step_by(2).copied().collect();
        let scaling = table.iter().skip(1).step_by(2).copied().collect();
        Tables::Two(main, scaling)
    }

    fn main(&self) -> &[u32] {
        match self {
            Tables::One(t) => t,
            Tables::Two(m, _) => m,
        }
    }

    fn scaling(&self) -> Option<&[u32]> {
        match self {
            Tables::One(_) => None,
            Tables::Two(_, s) => Some(s),
        }
    }
}

/// Sequences gathered into one flat batch.
#[derive(Default)]
struct FlatBatch<'a> {
    tokens: Vec<u32>,
    positions: Vec<usize>,
    seq_index: Vec<usize>,
    tables: Vec<&'a [u32]>,
    adapters: Vec<&'a [WeightedAdapter]>,
    factors: Vec<&'a [f32]>,
    rows: Vec<usize>,
    hidden_rows: Vec<usize>,
}

impl<'a> FlatBatch<'a> {
    /// Adds `s` with KV `table` and, if any, per-row weight factors
    /// `(values, stride, len)`: row `j`'s are `values[j·stride..][..len]`
    /// (stride 0: the same for every row).
    fn push(
        &mut self,
        s: &SeqInput<'a>,
        table: &'a [u32],
        factors: Option<(&'a [f32], usize, usize)>,
    ) {
        let (base, len) = (self.tokens.len(), s.tokens.len());
        let i = self.tables.len();
        self.tokens.extend_from_slice(s.tokens);
        self.positions.extend(s.start..s.start + len);
        self.seq_index.extend(std::iter::repeat_n(i, len));
        self.tables.push(table);
        self.adapters.push(s.adapters);
        match factors {
            Some((f, stride, flen)) => {
                if self.factors.len() < base {
                    self.factors.resize(base, &[]);
                }
                self.factors
                    .extend((0..len).map(|j| &f[j * stride..j * stride + flen]));
            }
            None if !self.factors.is_empty() => self.factors.resize(base + len, &[]),
            None => {}
        }
        match s.rows {
            Rows::AllHidden => self.hidden_rows.extend(base..base + len),
            Rows::AllLogits => self.rows.extend(base..base + len),
            Rows::Last if len > 0 => self.rows.push(base + len - 1),
            Rows::Last | Rows::None => {}
        }
    }

    fn forward(self, model: &Model, kv: &mut AnyKvCache, pool: &ThreadPool) -> Result<Output> {
        let mut factors = self.factors;
        if !factors.is_empty() {
            factors.resize(self.tokens.len(), &[]);
        }
        let adapters = if self.adapters.iter().all(|a| a.is_empty()) {
            &[][..]
        } else {
            &self.adapters[..]
        };
        let batch = Batch {
            tokens: &self.tokens,
            positions: &self.positions,
            seq_index: &self.seq_index,
            block_tables: &self.tables,
            adapters,
            factors: &factors,
        };
        model.forward_any(&batch, kv, &self.rows, &self.hidden_rows, pool)
    }
}
