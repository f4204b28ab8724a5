//! The decoder-only transformer shared by every supported family.
//!
//! `Model::forward` is a pure function of the weights, a flat batch of tokens
//! (from any number of sequences, each with its own positions and KV block
//! table) and the KV cache it reads and appends to. Family differences are
//! data in [`ModelSpec`] and optional weights, not separate code paths.

mod load;
pub mod lora;
mod lora_save;
pub mod ops;
pub mod rope;
pub mod spec;
pub mod xlora;

use crate::error::{Error, Result};
use crate::kv::{AnyKvCache, KvCache, KvElem, KvRotation};
use crate::simd::{dispatch, Kernel, Simd};
use crate::tensor::{matmul, Matrix};
use crate::threadpool::{SyncPtr, ThreadPool};
pub use load::{load_gguf, load_hf_folder, LoadedModel};
use lora::{add_lora, Target, WeightedAdapter};
use ops::{
    activate_slice, dot_multi, exp, hadamard_rotate, softcap, softcap_in, weighted_sum_multi, Norm,
};
use rope::{Rope, RopeFreqs};
pub use rope::{RopeParams, RopeScaling};
pub use spec::{Activation, Family, ModelSpec, RopeStyle};
use std::sync::Mutex;

/// Calls `f(j, block, slots)` for each block holding positions `lo..=pos`
/// of a sequence, where `slots` are the block's slots in that range and `j`
/// counts positions from `lo`. Always inlined, so that the attention kernel's
/// copies hold `f` compiled with their instruction set.
#[inline(always)]
fn for_each_block(
    table: &[u32],
    lo: usize,
    pos: usize,
    bs: usize,
    mut f: impl FnMut(usize, usize, std::ops::Range<usize>),
) {
    let mut p = lo;
    while p <= pos {
        let end = (p / bs + 1) * bs;
        let hi = end.min(pos + 1);
        f(p - lo, table[p / bs] as usize, p % bs..p % bs + (hi - p));
        p = hi;
    }
}

/// Elements per task for element-wise work spread over the pool.
const ELEMENTWISE_CHUNK: usize = 4096;

/// A projection: `y = W x (+ b)`.
pub struct Linear {
    pub w: Matrix,
    pub b: Option<Vec<f32>>,
    /// While calibrating: the squares of every input row, summed.
    pub stats: Option<Mutex<InputStats>>,
}

/// Sums of squared inputs of a projection, per input column, over the
/// rows it saw while calibrating: how much each column of its weights
/// matters to its output (llama.cpp's importance matrix).
#[derive(Debug, Default)]
pub struct InputStats {
    sum_sq: Vec<f64>,
    /// Finite values seen per column (a NaN or infinity is left out rather
    /// than making its column's importance meaningless).
    counts: Vec<u64>,
}

impl InputStats {
    fn add(&mut self, x: &[f32], cols: usize) {
        if self.sum_sq.len() != cols {
            self.sum_sq = vec![0.0; cols];
            self.counts = vec![0; cols];
        }
        for row in x.chunks_exact(cols) {
            for ((s, n), &v) in self.sum_sq.iter_mut().zip(&mut self.counts).zip(row) {
                if v.is_finite() {
                    *s += v as f64 * v as f64;
                    *n += 1;
                }
            }
        }
    }

    /// The mean square of each input column over its finite values (0 for
    /// a column that had none); `None` before any row.
    pub fn importance(&self) -> Option<Vec<f32>> {
        self.counts.iter().any(|&n| n > 0).then(|| {
            self.sum_sq
                .iter()
                .zip(&self.counts)
                .map(|(s, &n)| if n > 0 { (s / n as f64) as f32 } else { 0.0 })
                .map(|v| if v.is_finite() { v } else { 0.0 })
                .collect()
        })
    }
}

impl Linear {
    pub fn new(w: Matrix, b: Option<Vec<f32>>) -> Self {
        Linear { w, b, stats: None }
    }

    fn importance(&self) -> Option<Vec<f32>> {
        let s = self.stats.as_ref()?;
        s.lock().unwrap_or_else(|e| e.into_inner()).importance()
    }

    pub(crate) fn forward(&self, x: &[f32], n: usize, pool: &ThreadPool) -> Vec<f32> {
        if let Some(s) = &self.stats {
            s.lock()
                .unwrap_or_else(|e| e.into_inner())
                .add(&x[..n * self.w.cols], self.w.cols);
        }
        let mut y = vec![0f32; n * self.w.rows];
        matmul(&self.w, x, n, &mut y, pool);
        if let Some(b) = &self.b {
            for row in y.chunks_exact_mut(self.w.rows) {
                for (v, b) in row.iter_mut().zip(b) {
                    *v += b;
                }
            }
        }
        y
    }
}

pub struct Layer {
    pub attn_norm: Norm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    pub o: Linear,
    pub post_attn_norm: Option<Norm>,
    /// None for parallel blocks (phi2), where the MLP reads `attn_norm`'s output.
    pub ffn_norm: Option<Norm>,
    pub gate: Option<Linear>,
    pub up: Linear,
    pub down: Linear,
    pub post_ffn_norm: Option<Norm>,
}

pub struct Model {
    pub spec: ModelSpec,
    pub embed: Matrix,
    pub layers: Vec<Layer>,
    pub final_norm: Norm,
    pub output: Linear,
    /// RoPE frequencies of full-attention layers, and of sliding ones when
    /// they differ, for the context set by [`Model::set_context`].
    rope: RopeFreqs,
    rope_local: Option<RopeFreqs>,
}

/// Adds the batch's adapters to a projection's output: (target, input, output).
type AddLora<'a> = dyn Fn(Target, &[f32], &mut [f32]) + 'a;

/// A flat batch of tokens from one or more sequences.
pub struct Batch<'a> {
    pub tokens: &'a [u32],
    /// Position of each token within its sequence.
    pub positions: &'a [usize],
    /// Index into `block_tables` of each token's sequence.
    pub seq_index: &'a [usize],
    pub block_tables: &'a [&'a [u32]],
    /// LoRA adapters of each sequence (indexed like `block_tables`); empty
    /// when no sequence has any.
    pub adapters: &'a [&'a [WeightedAdapter]],
    /// Per row: factors of its adapters' weights for each layer and
    /// projection (X-LoRA's scalings, laid out as
    /// [`lora::factor_index`] says), or empty (every factor 1). Empty
    /// when no row has any.
    pub factors: &'a [&'a [f32]],
}

/// What a forward pass returns for the rows it was asked about.
pub struct Output {
    /// `rows × vocab` logits.
    pub logits: Vec<f32>,
    /// `hidden_rows × hidden` final-norm hidden states.
    pub hidden: Vec<f32>,
}

impl Model {
    /// A model for sequences up to the spec's context length.
    pub fn new(
        spec: ModelSpec,
        embed: Matrix,
        layers: Vec<Layer>,
        final_norm: Norm,
        output: Linear,
    ) -> Self {
        let context = spec.context_length;
        let mut m = Model {
            spec,
            embed,
            layers,
            final_norm,
            output,
            rope: RopeFreqs {
                inv_freq: Vec::new(),
                mscale: 1.0,
            },
            rope_local: None,
        };
        m.set_context(context);
        m
    }

    /// Fixes the longest sequence the model will see, which decides the
    /// RoPE frequencies where they depend on it (LongRoPE's factor set).
    pub fn set_context(&mut self, context: usize) {
        let s = &self.spec;
        self.rope = s.rope.frequencies(s.rope_dim, context);
        self.rope_local = s
            .rope_local
            .as_ref()
            .map(|r| r.frequencies(s.rope_dim, context));
    }

    /// RoPE frequencies of layer `layer` (sliding layers may have their own).
    pub(crate) fn rope_freqs(&self, layer: usize) -> &RopeFreqs {
        match (&self.rope_local, self.spec.sliding_layers[layer]) {
            (Some(r), true) => r,
            _ => &self.rope,
        }
    }

    /// Runs the batch through the model, appending its keys/values to `kv`,
    /// and returns logits for the batch rows listed in `rows` and final
    /// hidden states for those in `hidden_rows`.
    pub fn forward<T: KvElem>(
        &self,
        batch: &Batch,
        kv: &mut KvCache<T>,
        rows: &[usize],
        hidden_rows: &[usize],
        pool: &ThreadPool,
    ) -> Result<Output> {
        let s = &self.spec;
        let n = batch.tokens.len();
        if batch.positions.len() != n || batch.seq_index.len() != n {
            return Err(Error::InvalidRequest(
                "batch arrays differ in length".into(),
            ));
        }
        if let Some(&r) = rows.iter().chain(hidden_rows).find(|&&r| r >= n) {
            return Err(Error::InvalidRequest(format!(
                "logit row {r} outside a batch of {n}"
            )));
        }
        if let Some(&t) = batch.tokens.iter().find(|&&t| t as usize >= s.vocab_size) {
            return Err(Error::InvalidRequest(format!(
                "token id {t} is outside the vocabulary of {}",
                s.vocab_size
            )));
        }
        // Where each token's K/V goes; validated before any state changes.
        let mut slots = Vec::with_capacity(n);
        for t in 0..n {
            let table = batch
                .block_tables
                .get(batch.seq_index[t])
                .ok_or_else(|| Error::InvalidRequest("bad sequence index".into()))?;
            slots.push(kv.locate(table, batch.positions[t])?);
        }

        let h = s.hidden;
        let mut x = vec![0f32; n * h];
        for (t, row) in x.chunks_exact_mut(h).enumerate() {
            self.embed.dequantize_row(batch.tokens[t] as usize, row);
            if let Some(sc) = s.embed_scale {
                row.iter_mut().for_each(|v| *v *= sc);
            }
        }

        let rope_global = Rope::new(batch.positions, &self.rope);
        let rope_local = self
            .rope_local
            .as_ref()
            .map(|f| Rope::new(batch.positions, f));

        let rotation = KvRotation::for_cache::<T>(s.head_dim);
        let mut normed = vec![0f32; n * h];
        for (li, layer) in self.layers.iter().enumerate() {
            let sliding = s.sliding_layers[li];
            let rope = match (&rope_local, sliding) {
                (Some(r), true) => r,
                _ => &rope_global,
            };
            layer.attn_norm.apply(&x, &mut normed);
            let lora = |t: Target, x: &[f32], y: &mut [f32]| {
                add_lora(
                    batch.adapters,
                    batch.factors,
                    batch.seq_index,
                    li,
                    t,
                    x,
                    y,
                    pool,
                )
            };
            let mut q = layer.q.forward(&normed, n, pool);
            lora(Target::Q, &normed, &mut q);
            let mut k = layer.k.forward(&normed, n, pool);
            lora(Target::K, &normed, &mut k);
            let mut v = layer.v.forward(&normed, n, pool);
            lora(Target::V, &normed, &mut v);
            if let Some(qn) = &layer.q_norm {
                qn.apply_in_place(&mut q);
            }
            if let Some(kn) = &layer.k_norm {
                kn.apply_in_place(&mut k);
            }
            let (qd, kd) = (s.q_dim(), s.kv_dim());
            rope.apply(s.rope_style, &mut q, qd, s.head_dim);
            rope.apply(s.rope_style, &mut k, kd, s.head_dim);
            if let Some(r) = rotation {
                hadamard_rotate(&mut q, r.k);
                hadamard_rotate(&mut k, r.k);
                hadamard_rotate(&mut v, r.v);
            }
            for t in 0..n {
                let (b, slot) = slots[t];
                kv.write(
                    li,
                    b,
                    slot,
                    &k[t * kd..(t + 1) * kd],
                    &v[t * kd..(t + 1) * kd],
                );
            }
            let window = if sliding { s.sliding_window } else { None };
            let mut attn = self.attention(li, &q, batch, kv, window, pool);
            if let Some(r) = rotation {
                hadamard_rotate(&mut attn, r.v);
            }
            let mut o = layer.o.forward(&attn, n, pool);
            lora(Target::O, &attn, &mut o);
            if let Some(pn) = &layer.post_attn_norm {
                pn.apply_in_place(&mut o);
            }
            match &layer.ffn_norm {
                Some(fnorm) => {
                    x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
                    fnorm.apply(&x, &mut normed);
                    let f = self.mlp(layer, &normed, n, &lora, pool);
                    x.iter_mut().zip(&f).for_each(|(x, f)| *x += f);
                }
                None => {
                    // Parallel block: attention and MLP both read the same normed input.
                    let f = self.mlp(layer, &normed, n, &lora, pool);
                    for i in 0..x.len() {
                        x[i] += o[i] + f[i];
                    }
                }
            }
        }

        let final_rows = |rows: &[usize]| {
            let mut out = vec![0f32; rows.len() * h];
            for (i, &r) in rows.iter().enumerate() {
                out[i * h..(i + 1) * h].copy_from_slice(&x[r * h..(r + 1) * h]);
            }
            self.final_norm.apply_in_place(&mut out);
            out
        };
        let mut logits = self.output.forward(&final_rows(rows), rows.len(), pool);
        if let Some(cap) = s.final_softcap {
            softcap(&mut logits, cap);
        }
        Ok(Output {
            logits,
            hidden: final_rows(hidden_rows),
        })
    }

    fn mlp(
        &self,
        layer: &Layer,
        x: &[f32],
        n: usize,
        lora: &AddLora,
        pool: &ThreadPool,
    ) -> Vec<f32> {
        let act = self.spec.activation;
        let mut up = layer.up.forward(x, n, pool);
        lora(Target::Up, x, &mut up);
        match &layer.gate {
            Some(gate) => {
                let mut g = gate.forward(x, n, pool);
                lora(Target::Gate, x, &mut g);
                pool.par_chunks_mut(&mut up, ELEMENTWISE_CHUNK, &|off, u| {
                    activate_slice(act, u, Some(&g[off..off + u.len()]))
                });
            }
            None => pool.par_chunks_mut(&mut up, ELEMENTWISE_CHUNK, &|_, u| {
                activate_slice(act, u, None)
            }),
        }
        let mut post = layer.down.forward(&up, n, pool);
        lora(Target::Down, &up, &mut post);
        if let Some(pn) = &layer.post_ffn_norm {
            pn.apply_in_place(&mut post);
        }
        post
    }

    /// Causal (optionally sliding-window) attention of every batch token over
    /// its sequence's cached keys, read block by block from the paged cache.
    fn attention<T: KvElem>(
        &self,
        layer: usize,
        q: &[f32],
        batch: &Batch,
        kv: &KvCache<T>,
        window: Option<usize>,
        pool: &ThreadPool,
    ) -> Vec<f32> {
        let s = &self.spec;
        let n = batch.tokens.len();
        let mut out = vec![0f32; n * s.n_heads * s.head_dim];
        let job = Attention {
            spec: s,
            layer,
            q,
            batch,
            kv,
            window,
            out: SyncPtr(out.as_mut_ptr()),
        };
        // One task per (token, KV head): the group of query heads sharing that
        // KV head reads each key and value once.
        pool.for_each_chunk(n * s.n_kv_heads, 2, &|tasks| {
            dispatch(AttentionTasks { job: &job, tasks })
        });
        out
    }

    /// [`Model::forward`] over a cache of either element type.
    pub fn forward_any(
        &self,
        batch: &Batch,
        kv: &mut AnyKvCache,
        rows: &[usize],
        hidden_rows: &[usize],
        pool: &ThreadPool,
    ) -> Result<Output> {
        crate::kv::with_kv_cache!(kv, c => self.forward(batch, c, rows, hidden_rows, pool))
    }

    /// Whether the output projection is the embedding matrix itself.
    pub fn is_tied(&self) -> bool {
        self.output.w.row(0).as_ptr() == self.embed.row(0).as_ptr()
    }

    /// Starts (`true`) or stops gathering the inputs' squares of every
    /// projection (see [`InputStats`]); starting clears what was gathered,
    /// stopping drops it.
    pub fn record_input_stats(&mut self, on: bool) {
        for l in layer_linears_mut(&mut self.layers).chain([&mut self.output]) {
            l.stats = on.then(Mutex::default);
        }
    }

    /// Every weight matrix once, with the importance of its columns when
    /// inputs were gathered. A tied embedding is the output projection too:
    /// it takes the output's importance.
    fn matrices_mut(&mut self) -> Vec<(&mut Matrix, Option<Vec<f32>>)> {
        let tied = self.is_tied();
        let out_importance = self.output.importance();
        let mut v = vec![(&mut self.embed, out_importance.filter(|_| tied))];
        for lin in layer_linears_mut(&mut self.layers) {
            let imp = lin.importance();
            v.push((&mut lin.w, imp));
        }
        if !tied {
            let imp = self.output.importance();
            v.push((&mut self.output.w, imp));
        }
        v
    }

    /// Every weight matrix once (a tied output is not counted twice).
    fn matrices(&self) -> Vec<&Matrix> {
        let tied = self.is_tied();
        let mut v: Vec<&Matrix> = vec![&self.embed];
        for l in &self.layers {
            v.extend([&l.q.w, &l.k.w, &l.v.w, &l.o.w, &l.up.w, &l.down.w]);
            v.extend(l.gate.as_ref().map(|g| &g.w));
        }
        if !tied {
            v.push(&self.output.w);
        }
        v
    }

    /// Whether any weight matrix is unquantized (F32/F16/BF16): something
    /// for in-situ quantization to do.
    pub fn has_unquantized(&self) -> bool {
        self.matrices().iter().any(|m| !m.ty.is_quantized())
    }

    /// Weight bytes, and how many of them are memory-mapped.
    pub fn weight_bytes(&self) -> (usize, usize) {
        let ms = self.matrices();
        let total = ms.iter().map(|m| m.nbytes()).sum();
        let mapped = ms
            .iter()
            .filter(|m| m.is_mapped())
            .map(|m| m.nbytes())
            .sum();
        (total, mapped)
    }

    /// Parameters in the weight matrices.
    pub fn n_params(&self) -> usize {
        self.matrices().iter().map(|m| m.rows * m.cols).sum()
    }

    /// The type holding the most parameters.
    pub fn dominant_type(&self) -> Option<crate::quant::GgmlType> {
        let mut by_type: Vec<(crate::quant::GgmlType, usize)> = Vec::new();
        for m in self.matrices() {
            match by_type.iter_mut().find(|(t, _)| *t == m.ty) {
                Some((_, n)) => *n += m.rows * m.cols,
                None => by_type.push((m.ty, m.rows * m.cols)),
            }
        }
        by_type.into_iter().max_by_key(|(_, n)| *n).map(|(t, _)| t)
    }

    /// Quantizes F32/F16/BF16 weight matrices to `ty` in memory (in-situ
    /// quantization), calling `progress(done, total)` after each matrix.
    /// Where inputs were gathered ([`Model::record_input_stats`]), blocks
    /// are fitted under their columns' importance.
    /// Rows that are not whole blocks of a K-quant take llama-quantize's
    /// fallback type; quantized matrices, and those no type fits, are left
    /// as they are. Returns how many were quantized.
    pub fn quantize_unquantized(
        &mut self,
        ty: crate::quant::GgmlType,
        pool: &ThreadPool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> usize {
        let tied = self.is_tied();
        let mut ms = self.matrices_mut();
        let total = ms.len();
        let mut changed = 0;
        for (i, (m, importance)) in ms.iter_mut().enumerate() {
            changed += m.quantize_to(ty, importance.as_deref(), pool) as usize;
            progress(i + 1, total);
        }
        if tied {
            self.output.w = self.embed.clone();
        }
        changed
    }
}

/// Every projection of `layers`.
fn layer_linears_mut(layers: &mut [Layer]) -> impl Iterator<Item = &mut Linear> {
    layers.iter_mut().flat_map(|l| {
        [
            &mut l.q,
            &mut l.k,
            &mut l.v,
            &mut l.o,
            &mut l.up,
            &mut l.down,
        ]
        .into_iter()
        .chain(l.gate.as_mut())
    })
}

/// What every attention task reads, and the output they share.
struct Attention<'a, T: KvElem> {
    spec: &'a ModelSpec,
    layer: usize,
    q: &'a [f32],
    batch: &'a Batch<'a>,
    kv: &'a KvCache<T>,
    window: Option<usize>,
    /// `n × n_heads × head_dim`; each task writes its own heads.
    out: SyncPtr<f32>,
}

struct AttentionTasks<'a, T: KvElem> {
    job: &'a Attention<'a, T>,
    tasks: std::ops::Range<usize>,
}

impl<T: KvElem> Kernel for AttentionTasks<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self, simd: S) {
        let Attention {
            spec: s,
            layer,
            q,
            batch,
            kv,
            window,
            out,
        } = *self.job;
        let (hd, nh) = (s.head_dim, s.n_heads);
        let group = nh / s.n_kv_heads;
        let bs = kv.block_size;
        let mut scores: Vec<f32> = Vec::new();
        let mut vals: Vec<&[T]> = Vec::new();
        for task in self.tasks {
            let (t, kvh) = (task / s.n_kv_heads, task % s.n_kv_heads);
            let pos = batch.positions[t];
            let table = batch.block_tables[batch.seq_index[t]];
            let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let len = pos + 1 - lo;
            let h0 = kvh * group;
            let qs = &q[(t * nh + h0) * hd..(t * nh + h0 + group) * hd];
            // scores[g * len + j]: head h0 + g against key lo + j.
            scores.clear();
            scores.resize(group * len, 0.0);
            let unit = kv.vector_len();
            for_each_block(table, lo, pos, bs, |j, block, slots| {
                let keys = kv.keys(layer, block, kvh, slots.end);
                for (i, k) in keys[slots.start * unit..].chunks_exact(unit).enumerate() {
                    dot_multi(simd, qs, k, &mut scores[j + i..], len);
                }
            });
            for row in scores.chunks_exact_mut(len) {
                row.iter_mut().for_each(|v| *v *= s.attn_scale);
                if let Some(cap) = s.attn_softcap {
                    softcap_in(row, cap);
                }
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                // Exponentials first, then their sum in the same order: the
                // first loop vectorises, the in-order sum cannot.
                row.iter_mut().for_each(|v| *v = exp(*v - max));
                let sum: f32 = row.iter().sum();
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|v| *v *= inv);
            }
            // SAFETY: task (t, kvh) alone owns the heads h0..h0+group of
            // token t, which lie inside the n × nh × hd output.
            let o = unsafe {
                std::slice::from_raw_parts_mut(out.get().add((t * nh + h0) * hd), group * hd)
            };
            vals.clear();
            for_each_block(table, lo, pos, bs, |_, block, slots| {
                let values = kv.values(layer, block, kvh, slots.end);
                vals.extend(values[slots.start * unit..].chunks_exact(unit));
            });
            weighted_sum_multi(simd, o, &scores, &vals);
        }
    }
}
