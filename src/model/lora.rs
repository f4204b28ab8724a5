//! Low-rank adapters (LoRA), applied unmerged: `y = W x + s · B (A x)`.
//!
//! The base weights stay as loaded (quantized or not); each adapter keeps its
//! `A` (`rank × in`) and `B` (`out × rank`) in f32. A batch row may carry any
//! mix of adapters with weights, so requests with different adapters share
//! one forward pass: the low-rank part is computed row by row in one parallel
//! pass over the step's rows, and a row's result never depends on the other
//! rows of its batch.
//!
//! Two file formats load: PEFT folders (`adapter_config.json` +
//! `adapter_model.safetensors`) and llama.cpp's GGUF adapters
//! (`general.type = adapter`).

use super::spec::{Family, ModelSpec, RopeStyle};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::quant::GgmlType;
use crate::simd::{dispatch, Kernel, Simd};
use crate::threadpool::ThreadPool;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The projections of a layer an adapter can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Q = 0,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

const TARGETS: usize = 7;

/// Every target, in the order of their indices.
pub const ALL_TARGETS: [Target; TARGETS] = [
    Target::Q,
    Target::K,
    Target::V,
    Target::O,
    Target::Gate,
    Target::Up,
    Target::Down,
];

/// One adapted projection: `s · B (A x)`.
#[derive(Clone)]
pub struct LoraPair {
    pub rank: usize,
    /// Input width of the projection.
    pub cols: usize,
    /// Output width of the projection.
    pub rows: usize,
    /// `rank × cols`, row-major.
    pub a: Vec<f32>,
    /// `rows × rank`, row-major.
    pub b: Vec<f32>,
    pub scale: f32,
    /// Set when this pair is one output slice of a fused module (phi3's
    /// `qkv_proj`, `gate_up_proj`) whose `A` it shares with the pair of
    /// this target: training keeps the copies equal.
    pub shares_a_with: Option<Target>,
}

/// A loaded adapter. `id` is unique in the process, so two loads of the
/// same name (an unload and a reload of other weights) never share cached
/// prefixes.
pub struct LoraAdapter {
    pub name: String,
    pub id: u64,
    /// The largest rank of its projections.
    pub rank: usize,
    layers: Vec<[Option<LoraPair>; TARGETS]>,
}

/// An adapter with the weight it is applied with (1.0 alone; mixing weights
/// for several).
#[derive(Clone)]
pub struct WeightedAdapter {
    pub adapter: Arc<LoraAdapter>,
    pub weight: f32,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn bad(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Adapter(format!("{}: {what}", path.display()))
}

impl LoraAdapter {
    /// Loads a PEFT folder or a llama.cpp GGUF adapter for a base model of
    /// `spec`, checking every tensor against the base's shapes. Nothing is
    /// kept from a file that fails.
    pub fn load(path: &Path, name: &str, spec: &ModelSpec) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        // Only folders and regular files: a FIFO or device would block or
        // stream forever.
        if !meta.is_dir() && !meta.is_file() {
            return Err(bad(path, "not a folder or a regular file"));
        }
        let layers = if meta.is_dir() {
            load_peft(path, spec)?
        } else {
            load_gguf_adapter(path, spec)?
        };
        let rank = layers
            .iter()
            .flatten()
            .flatten()
            .map(|p| p.rank)
            .max()
            .ok_or_else(|| bad(path, "the adapter has no LoRA tensors"))?;
        Ok(LoraAdapter {
            name: name.to_string(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            rank,
            layers,
        })
    }

    pub fn pair(&self, layer: usize, target: Target) -> Option<&LoraPair> {
        self.layers.get(layer)?[target as usize].as_ref()
    }

    pub fn pair_mut(&mut self, layer: usize, target: Target) -> Option<&mut LoraPair> {
        self.layers.get_mut(layer)?[target as usize].as_mut()
    }

    /// Every adapted projection as `(layer, target, pair)`.
    pub fn pairs(&self) -> impl Iterator<Item = (usize, Target, &LoraPair)> {
        self.layers.iter().enumerate().flat_map(|(l, ts)| {
            ALL_TARGETS
                .iter()
                .zip(ts)
                .filter_map(move |(&t, p)| Some((l, t, p.as_ref()?)))
        })
    }

    /// A fresh adapter to train, initialised as PEFT does: `A` uniform in
    /// ±1/√cols (Kaiming-uniform with a = √5), `B` zero, so it starts as
    /// the base model. `scale` is α/r (or α/√r for rsLoRA) as the caller
    /// chooses. Every layer gets a pair on each of `targets` the model has
    /// (a model without a gate projection skips `Gate`).
    pub fn new_trainable(
        name: &str,
        spec: &ModelSpec,
        has_gate: bool,
        rank: usize,
        scale: f32,
        targets: &[Target],
        seed: u64,
    ) -> Result<Self> {
        if rank == 0 || targets.is_empty() || !scale.is_finite() {
            return Err(Error::Adapter(format!(
                "{name}: a trainable adapter needs a positive rank, a target and a finite scale"
            )));
        }
        // A module the base fuses (phi3's qkv_proj, gate_up_proj) is one
        // PEFT module: its slices train together or not at all.
        for module in PEFT_MODULES {
            if let Some(pieces) = module_targets(spec.family, module, spec) {
                let on = pieces.iter().filter(|(t, _)| targets.contains(t)).count();
                if on != 0 && on != pieces.len() {
                    return Err(Error::Adapter(format!(
                        "{name}: this model fuses {module}; its targets {:?} train together or not at all",
                        pieces.iter().map(|(t, _)| *t).collect::<Vec<_>>()
                    )));
                }
            }
        }
        let mut rng = crate::sampling::Rng::new(seed);
        let layers = (0..spec.n_layers)
            .map(|_| {
                let mut ts: [Option<LoraPair>; TARGETS] = Default::default();
                for &t in targets {
                    if t == Target::Gate && !has_gate {
                        continue;
                    }
                    let (cols, rows) = (target_cols(spec, t), target_rows(spec, t));
                    let bound = 1.0 / (cols as f32).sqrt();
                    let a = (0..rank * cols)
                        .map(|_| (rng.next_f32() * 2.0 - 1.0) * bound)
                        .collect();
                    ts[t as usize] = Some(LoraPair {
                        rank,
                        cols,
                        rows,
                        a,
                        b: vec![0.0; rows * rank],
                        scale,
                        shares_a_with: None,
                    });
                }
                // Slices of a module the base fuses (phi3) share one A, as
                // they would in PEFT.
                for module in PEFT_MODULES {
                    let Some(pieces) = module_targets(spec.family, module, spec) else {
                        continue;
                    };
                    let owner = pieces[0].0;
                    let Some(a) = ts[owner as usize].as_ref().map(|p| p.a.clone()) else {
                        continue;
                    };
                    for &(t, _) in &pieces[1..] {
                        if let Some(p) = ts[t as usize].as_mut() {
                            p.a.clone_from(&a);
                            p.shares_a_with = Some(owner);
                        }
                    }
                }
                ts
            })
            .collect();
        Ok(LoraAdapter {
            name: name.to_string(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            rank,
            layers,
        })
    }

    /// Removes the pairs of layers below `layer` (an adapter of the upper
    /// layers only: training it stops the backward pass there).
    pub fn drop_layers_below(&mut self, layer: usize) {
        for ts in self.layers.iter_mut().take(layer) {
            *ts = Default::default();
        }
    }

    /// A copy under a new id: what a trained version is published as, so
    /// that cached prefixes of the old weights are never reused for it.
    pub fn new_version(&self) -> Self {
        LoraAdapter {
            name: self.name.clone(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            rank: self.rank,
            layers: self
                .layers
                .iter()
                .map(|ts| ts.each_ref().map(|p| p.clone()))
                .collect(),
        }
    }

    /// Memory the adapter's tensors take.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|p| (p.a.len() + p.b.len()) * 4)
            .sum()
    }

    /// The projections it changes, e.g. `["q", "v", "down"]`.
    pub fn targets(&self) -> Vec<&'static str> {
        const NAMES: [&str; TARGETS] = ["q", "k", "v", "o", "gate", "up", "down"];
        (0..TARGETS)
            .filter(|&t| self.layers.iter().any(|l| l[t].is_some()))
            .map(|t| NAMES[t])
            .collect()
    }
}

/// Factors of row `r`'s adapter weights at `(layer, target)`: its
/// `factors` (laid out as [`factor_index`] says) for that projection, or
/// none (empty: every factor 1).
fn row_factors<'a>(
    factors: &'a [&'a [f32]],
    r: usize,
    n_mix: usize,
    layer: usize,
    target: Target,
) -> &'a [f32] {
    match factors.get(r) {
        Some(f) if !f.is_empty() => {
            let i = factor_index(layer, target, 0, n_mix);
            f.get(i..i + n_mix).unwrap_or(&[])
        }
        _ => &[],
    }
}

/// Where the factor of adapter `j` (of a mix of `n_mix`) at `(layer,
/// target)` sits in a row's factors: `layers × projections × n_mix`.
pub fn factor_index(layer: usize, target: Target, j: usize, n_mix: usize) -> usize {
    (layer * TARGETS + target as usize) * n_mix + j
}

/// Values in one row's factors for a model of `layers` layers.
pub fn factors_len(layers: usize, n_mix: usize) -> usize {
    layers * TARGETS * n_mix
}

/// The weight adapter `j` of a row's mix is applied with: its own times
/// the row's factor for the projection (X-LoRA's learned scalings).
#[inline(always)]
fn weight_of(wa: &WeightedAdapter, factors: &[f32], j: usize) -> f32 {
    wa.weight * factors.get(j).copied().unwrap_or(1.0)
}

/// Adds every row's adapters to the output of the projection `target` of
/// layer `layer`: `y[r] += Σ w · s · B (A x[r])` over the adapters of row
/// `r`'s sequence, `w` times the row's factor for this projection when
/// `factors[r]` has any. `x` is `n × cols`, `y` is `n × rows`. An adapter
/// whose weight comes to 0 for a row is skipped for it.
#[allow(clippy::too_many_arguments)]
pub(super) fn add_lora(
    adapters: &[&[WeightedAdapter]],
    factors: &[&[f32]],
    seq_index: &[usize],
    layer: usize,
    target: Target,
    x: &[f32],
    y: &mut [f32],
    pool: &ThreadPool,
) {
    let n = seq_index.len();
    if n == 0 || adapters.is_empty() {
        return;
    }
    let (cols, out) = (x.len() / n, y.len() / n);
    let mix = |r: usize| adapters.get(seq_index[r]).copied().unwrap_or(&[]);
    let fac = |r: usize| row_factors(factors, r, mix(r).len(), layer, target);
    if !(0..n).any(|r| {
        mix(r)
            .iter()
            .any(|w| w.adapter.pair(layer, target).is_some())
    }) {
        return;
    }
    if n < pool.n_threads() {
        // Fewer rows than threads (decode): each row's shrink is split over
        // the threads by rank, then its expansion by output element.
        let threads = pool.n_threads();
        for r in 0..n {
            let xr = &x[r * cols..(r + 1) * cols];
            let f = fac(r);
            let ts: Vec<Shrunk> = mix(r)
                .iter()
                .enumerate()
                .filter_map(|(j, wa)| {
                    let p = wa.adapter.pair(layer, target)?;
                    let w = weight_of(wa, f, j);
                    if w == 0.0 {
                        return None;
                    }
                    let mut t = vec![0f32; p.rank];
                    pool.par_chunks_mut(&mut t, p.rank.div_ceil(threads), &|off, ts| {
                        let a = &p.a[off * p.cols..(off + ts.len()) * p.cols];
                        dispatch(Shrink { a, x: xr, t: ts })
                    });
                    Some(Shrunk {
                        k: w * p.scale,
                        pair: p,
                        t,
                    })
                })
                .collect();
            if ts.is_empty() {
                continue;
            }
            let piece = out.div_ceil(threads).next_multiple_of(8);
            pool.par_chunks_mut(&mut y[r * out..(r + 1) * out], piece, &|off, ys| {
                dispatch(Expand {
                    ts: &ts,
                    off,
                    y: ys,
                })
            });
        }
        return;
    }
    // A chunk may hold several rows (a one-thread pool hands out all of
    // them at once).
    pool.par_chunks_mut(y, out, &|off, ys| {
        for (i, yr) in ys.chunks_exact_mut(out).enumerate() {
            let r = off / out + i;
            dispatch(LoraRow {
                mix: mix(r),
                factors: fac(r),
                layer,
                target,
                x: &x[r * cols..(r + 1) * cols],
                y: yr,
            })
        }
    });
}

/// One row's low-rank update, compiled once per instruction set.
struct LoraRow<'a> {
    mix: &'a [WeightedAdapter],
    factors: &'a [f32],
    layer: usize,
    target: Target,
    x: &'a [f32],
    y: &'a mut [f32],
}

impl Kernel for LoraRow<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let mut t = Vec::new();
        for (j, wa) in self.mix.iter().enumerate() {
            let Some(p) = wa.adapter.pair(self.layer, self.target) else {
                continue;
            };
            let w = weight_of(wa, self.factors, j);
            if w == 0.0 {
                continue;
            }
            // Shrink: t = A x, then expand: y += (w·s) B t.
            shrink(s, &p.a, p.cols, self.x, &mut t);
            expand(s, w * p.scale, &p.b, p.rank, &t, self.y);
        }
    }
}

/// One adapter's shrunk input `t = A x` of a row, with its weight × scale.
struct Shrunk<'a> {
    k: f32,
    pair: &'a LoraPair,
    t: Vec<f32>,
}

/// Elements of `t = A x` for the rows of `A` given (as many as `t` holds).
struct Shrink<'a> {
    a: &'a [f32],
    x: &'a [f32],
    t: &'a mut [f32],
}

impl Kernel for Shrink<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        let cols = self.a.len() / self.t.len().max(1);
        for (tv, a) in self.t.iter_mut().zip(self.a.chunks_exact(cols.max(1))) {
            *tv = dot(s, a, self.x);
        }
    }
}

/// Elements `off..off + y.len()` of a row's output, under every adapter in
/// turn: each element sees the same operations in the same order as in
/// [`LoraRow`], so splitting a row changes no bit.
struct Expand<'a> {
    ts: &'a [Shrunk<'a>],
    off: usize,
    y: &'a mut [f32],
}

impl Kernel for Expand<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self, s: S) {
        for sh in self.ts {
            let r = sh.pair.rank;
            let b = &sh.pair.b[self.off * r..(self.off + self.y.len()) * r];
            expand(s, sh.k, b, r, &sh.t, self.y);
        }
    }
}

// Plain loops, not iterator adaptors: a closure is compiled on its own,
// outside the kernel copy's instruction set, and `mul_add` there becomes
// a library call.

/// `t = A x` for `A` of rows of `cols`.
#[inline(always)]
fn shrink<S: Simd>(s: S, a: &[f32], cols: usize, x: &[f32], t: &mut Vec<f32>) {
    t.clear();
    for a in a.chunks_exact(cols) {
        t.push(dot(s, a, x));
    }
}

/// `y += k · B t` for `B` of rows of `rank`, one row per element of `y`.
#[inline(always)]
fn expand<S: Simd>(s: S, k: f32, b: &[f32], rank: usize, t: &[f32], y: &mut [f32]) {
    for (yv, b) in y.iter_mut().zip(b.chunks_exact(rank)) {
        *yv = s.mul_add(k, dot(s, b, t), *yv);
    }
}

/// Eight partial sums, so the kernel copies vectorise it; the same order
/// whatever the batch, so a row's result never depends on its neighbours.
#[inline(always)]
fn dot<S: Simd>(s: S, a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = 0f32;
    for (x, y) in ac.remainder().iter().zip(bc.remainder()) {
        tail = s.mul_add(*x, *y, tail);
    }
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] = s.mul_add(x[i], y[i], acc[i]);
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Every PEFT module name a decoder layer may have; a family keeps those
/// [`module_targets`] knows for it.
pub(super) const PEFT_MODULES: [&str; 12] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.qkv_proj",
    "self_attn.o_proj",
    "self_attn.dense",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.gate_up_proj",
    "mlp.down_proj",
    "mlp.fc1",
    "mlp.fc2",
];

/// The (projection, row range) pieces one module of `family` feeds: a fused
/// module (phi3's `qkv_proj`, `gate_up_proj`) is split along its outputs.
pub fn module_targets(
    family: Family,
    module: &str,
    spec: &ModelSpec,
) -> Option<Vec<(Target, usize)>> {
    let (qd, kd, f) = (spec.q_dim(), spec.kv_dim(), spec.ffn);
    let phi2 = family == Family::Phi2;
    let phi3 = family == Family::Phi3;
    Some(match module {
        "self_attn.q_proj" if !phi3 => vec![(Target::Q, qd)],
        "self_attn.k_proj" if !phi3 => vec![(Target::K, kd)],
        "self_attn.v_proj" if !phi3 => vec![(Target::V, kd)],
        "self_attn.qkv_proj" if phi3 => vec![(Target::Q, qd), (Target::K, kd), (Target::V, kd)],
        "self_attn.o_proj" if !phi2 => vec![(Target::O, spec.hidden)],
        "self_attn.dense" if phi2 => vec![(Target::O, spec.hidden)],
        "mlp.gate_proj" if !phi2 && !phi3 => vec![(Target::Gate, f)],
        "mlp.up_proj" if !phi2 && !phi3 => vec![(Target::Up, f)],
        "mlp.gate_up_proj" if phi3 => vec![(Target::Gate, f), (Target::Up, f)],
        "mlp.down_proj" if !phi2 => vec![(Target::Down, spec.hidden)],
        "mlp.fc1" if phi2 => vec![(Target::Up, f)],
        "mlp.fc2" if phi2 => vec![(Target::Down, spec.hidden)],
        _ => return None,
    })
}

/// Output width of a projection.
fn target_rows(spec: &ModelSpec, t: Target) -> usize {
    match t {
        Target::Q => spec.q_dim(),
        Target::K | Target::V => spec.kv_dim(),
        Target::O | Target::Down => spec.hidden,
        Target::Gate | Target::Up => spec.ffn,
    }
}

/// Input width of a projection.
fn target_cols(spec: &ModelSpec, t: Target) -> usize {
    match t {
        Target::O => spec.q_dim(),
        Target::Down => spec.ffn,
        _ => spec.hidden,
    }
}

/// llama.cpp stores Llama/Mistral q and k rows permuted so that RoPE rotates
/// adjacent pairs; a `B` must be in the row order of the base it applies
/// to. `to_interleaved` moves row `c·(d/2) + i` of each head to `2i + c`
/// (Hugging Face order to llama.cpp's); otherwise the reverse.
pub(super) fn permute_rows(b: &[f32], rank: usize, heads: usize, to_interleaved: bool) -> Vec<f32> {
    let rows = b.len() / rank;
    let d = rows / heads;
    let mut out = vec![0f32; b.len()];
    for h in 0..heads {
        for c in 0..2 {
            for i in 0..d / 2 {
                let hf = h * d + c * (d / 2) + i;
                let inter = h * d + 2 * i + c;
                let (src, dst) = if to_interleaved {
                    (hf, inter)
                } else {
                    (inter, hf)
                };
                out[dst * rank..(dst + 1) * rank].copy_from_slice(&b[src * rank..(src + 1) * rank]);
            }
        }
    }
    out
}

/// Places a checked (A, B) pair of one module into `layers`.
#[allow(clippy::too_many_arguments)]
fn place(
    layers: &mut [[Option<LoraPair>; TARGETS]],
    spec: &ModelSpec,
    path: &Path,
    name: &str,
    layer: usize,
    pieces: &[(Target, usize)],
    a: Vec<f32>,
    rank: usize,
    b: Vec<f32>,
    scale: f32,
    interleaved_rows: bool,
) -> Result<()> {
    if !scale.is_finite() {
        return Err(bad(path, format!("{name}: scale {scale} is not finite")));
    }
    if a.iter().chain(&b).any(|v| !v.is_finite()) {
        return Err(bad(
            path,
            format!("{name} (or its pair) holds NaN or infinite values"),
        ));
    }
    if layer >= spec.n_layers {
        return Err(bad(
            path,
            format!(
                "{name}: layer {layer}, but the base model has {}",
                spec.n_layers
            ),
        ));
    }
    let mut row0 = 0;
    for &(t, rows) in pieces {
        let cols = target_cols(spec, t);
        let mut piece = b[row0 * rank..(row0 + rows) * rank].to_vec();
        row0 += rows;
        let base_interleaved = spec.rope_style == RopeStyle::Interleaved;
        if interleaved_rows != base_interleaved {
            match t {
                Target::Q => piece = permute_rows(&piece, rank, spec.n_heads, base_interleaved),
                Target::K => piece = permute_rows(&piece, rank, spec.n_kv_heads, base_interleaved),
                _ => {}
            }
        }
        let slot = &mut layers[layer][t as usize];
        if slot.is_some() {
            return Err(bad(
                path,
                format!("{name}: a second adapter for the same projection"),
            ));
        }
        *slot = Some(LoraPair {
            rank,
            cols,
            rows,
            a: a.clone(),
            b: piece,
            scale,
            shares_a_with: (t != pieces[0].0).then_some(pieces[0].0),
        });
    }
    Ok(())
}

/// A tensor's values as f32 (F32, F16 or BF16 little-endian bytes), or
/// `None` for another type or a byte count that does not match `len`.
/// A safetensors tensor of F32/F16/BF16 as f32, or an error naming it.
pub(super) fn tensor_f32(
    t: &safetensors::tensor::TensorView,
    name: &str,
    path: &Path,
) -> Result<Vec<f32>> {
    let ty = match t.dtype() {
        safetensors::Dtype::F32 => GgmlType::F32,
        safetensors::Dtype::F16 => GgmlType::F16,
        safetensors::Dtype::BF16 => GgmlType::BF16,
        other => {
            return Err(bad(
                path,
                format!("{name}: dtype {other:?} is not f32/f16/bf16"),
            ))
        }
    };
    to_f32(ty, t.data(), t.shape().iter().product())
        .ok_or_else(|| bad(path, format!("{name}: data does not match its shape")))
}

fn to_f32(ty: GgmlType, bytes: &[u8], len: usize) -> Option<Vec<f32>> {
    if !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
        || bytes.len() != len.checked_mul(ty.type_size())?
    {
        return None;
    }
    let mut out = vec![0f32; len];
    crate::quant::dequantize(ty, bytes, &mut out);
    Some(out)
}

/// PEFT's per-module overrides (`rank_pattern`, `alpha_pattern`). PEFT
/// treats each key as a regular expression matched against the end of the
/// module's full name (`(.*\.)?KEY$`, e.g. `model.layers.0.self_attn.q_proj`)
/// and takes the first key that matches. Keys that are plain dotted names
/// are matched the same way here; any other key, or a module that two keys
/// match (where the first would depend on the file's key order), is refused
/// rather than guessed.
fn pattern_value(
    cfg: &serde_json::Value,
    field: &str,
    full_name: &str,
    path: &Path,
) -> Result<Option<f64>> {
    let Some(map) = cfg.get(field).and_then(|m| m.as_object()) else {
        return Ok(None);
    };
    let mut found = None;
    for (key, v) in map {
        let plain = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-');
        if !plain {
            return Err(Error::Unsupported(format!(
                "{}: {field} key {key:?} is a regular expression; only plain module names are supported",
                path.display()
            )));
        }
        let hit = full_name == key
            || full_name
                .strip_suffix(key.as_str())
                .is_some_and(|rest| rest.ends_with('.'));
        if hit {
            if found.is_some() {
                return Err(Error::Unsupported(format!(
                    "{}: several {field} keys match {full_name}",
                    path.display()
                )));
            }
            let v = v
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or_else(|| bad(path, format!("{field}[{key:?}] is not a finite number")))?;
            found = Some(v);
        }
    }
    Ok(found)
}

fn load_peft(dir: &Path, spec: &ModelSpec) -> Result<Vec<[Option<LoraPair>; TARGETS]>> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(&cfg_path, format!("not JSON: {e}")))?;
    let field = |k: &str| cfg.get(k).filter(|v| !v.is_null());
    let peft_type = field("peft_type")
        .and_then(|v| v.as_str())
        .unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(Error::Unsupported(format!(
            "{}: PEFT type {peft_type} (only LORA adapters load)",
            cfg_path.display()
        )));
    }
    let refuse = |what: &str| {
        Err(Error::Unsupported(format!(
            "{}: {what}",
            cfg_path.display()
        )))
    };
    if field("use_dora").and_then(|v| v.as_bool()) == Some(true) {
        return refuse("DoRA adapters (use_dora)");
    }
    if field("fan_in_fan_out").and_then(|v| v.as_bool()) == Some(true) {
        return refuse("fan_in_fan_out (Conv1D bases)");
    }
    if field("bias")
        .and_then(|v| v.as_str())
        .is_some_and(|b| b != "none")
    {
        return refuse("adapters that train biases (bias != \"none\")");
    }
    if field("modules_to_save")
        .and_then(|v| v.as_array())
        .is_some_and(|a| !a.is_empty())
    {
        return refuse("modules_to_save (whole replaced modules)");
    }
    let r = field("r")
        .and_then(|v| v.as_u64())
        .filter(|&r| r > 0)
        .ok_or_else(|| bad(&cfg_path, "`r` must be a positive integer"))?;
    let alpha = field("lora_alpha").and_then(|v| v.as_f64()).unwrap_or(8.0);
    let rslora = field("use_rslora").and_then(|v| v.as_bool()) == Some(true);

    let st_path = dir.join("adapter_model.safetensors");
    if st_path.exists() && !st_path.is_file() {
        return Err(bad(&st_path, "not a regular file"));
    }
    let bytes = std::fs::read(&st_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound && dir.join("adapter_model.bin").exists() {
            Error::Unsupported(format!(
                "{}: pickled adapter_model.bin; save the adapter as safetensors",
                dir.display()
            ))
        } else {
            Error::io(&st_path, e)
        }
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(&st_path, format!("not a safetensors file: {e}")))?;

    let mut layers: Vec<[Option<LoraPair>; TARGETS]> =
        (0..spec.n_layers).map(|_| Default::default()).collect();
    // (layer, module) → A name; B is looked up from it.
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut seen_b = 0usize;
    let mut pairs = 0usize;
    for name in &names {
        let rest = name
            .strip_prefix("base_model.model.")
            .unwrap_or(name)
            .strip_prefix("model.layers.")
            .ok_or_else(|| {
                bad(
                    &st_path,
                    format!("{name}: not a LoRA tensor of a decoder layer (unknown target module)"),
                )
            })?;
        let (idx, module) = rest
            .split_once('.')
            .ok_or_else(|| bad(&st_path, format!("{name}: no layer index")))?;
        let layer: usize = idx
            .parse()
            .map_err(|_| bad(&st_path, format!("{name}: bad layer index {idx:?}")))?;
        let (module, is_a) = if let Some(m) = module.strip_suffix(".lora_A.weight") {
            (m, true)
        } else if let Some(m) = module.strip_suffix(".lora_B.weight") {
            (m, false)
        } else {
            return Err(bad(
                &st_path,
                format!("{name}: not a lora_A/lora_B weight (unsupported adapter tensor)"),
            ));
        };
        let pieces = module_targets(spec.family, module, spec).ok_or_else(|| {
            bad(
                &st_path,
                format!(
                    "{name}: unknown target module {module:?} for a {} model",
                    spec.family.name()
                ),
            )
        })?;
        if !is_a {
            seen_b += 1;
            continue;
        }
        let b_name = name.replace(".lora_A.weight", ".lora_B.weight");
        let read = |n: &str| -> Result<(Vec<usize>, Vec<f32>)> {
            let t = st
                .tensor(n)
                .map_err(|_| bad(&st_path, format!("{n} is missing (its pair is present)")))?;
            Ok((t.shape().to_vec(), tensor_f32(&t, n, &st_path)?))
        };
        let (a_shape, a) = read(name)?;
        let (b_shape, b) = read(&b_name)?;
        let out: usize = pieces.iter().map(|p| p.1).sum();
        let cols = target_cols(spec, pieces[0].0);
        if a_shape.len() != 2 || a_shape[1] != cols || a_shape[0] == 0 {
            return Err(bad(
                &st_path,
                format!("{name} has shape {a_shape:?}, expected [rank, {cols}] for this base"),
            ));
        }
        let rank = a_shape[0];
        if b_shape != [out, rank] {
            return Err(bad(
                &st_path,
                format!(
                    "{b_name} has shape {b_shape:?}, expected [{out}, {rank}] (rank from lora_A)"
                ),
            ));
        }
        let full_name = format!("model.layers.{layer}.{module}");
        if let Some(pr) = pattern_value(&cfg, "rank_pattern", &full_name, &cfg_path)? {
            if pr != rank as f64 {
                return Err(bad(
                    &st_path,
                    format!("{name}: rank {rank}, but rank_pattern says {pr}"),
                ));
            }
        } else if rank as u64 != r {
            return Err(bad(
                &st_path,
                format!("{name}: rank {rank}, but the config's r is {r}"),
            ));
        }
        let alpha = pattern_value(&cfg, "alpha_pattern", &full_name, &cfg_path)?.unwrap_or(alpha);
        let scale = if rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        } as f32;
        // PEFT's rows are in Hugging Face order.
        place(
            &mut layers,
            spec,
            &st_path,
            name,
            layer,
            &pieces,
            a,
            rank,
            b,
            scale,
            false,
        )?;
        pairs += 1;
    }
    if seen_b != pairs {
        return Err(bad(&st_path, "a lora_B weight has no lora_A"));
    }
    Ok(layers)
}

fn load_gguf_adapter(path: &Path, spec: &ModelSpec) -> Result<Vec<[Option<LoraPair>; TARGETS]>> {
    let g = GgufFile::open(path)?;
    let ty = g.get("general.type").and_then(|v| v.as_str());
    if ty != Some("adapter") {
        return Err(bad(
            path,
            format!(
                "general.type is {:?}, not \"adapter\" (is this a model rather than a LoRA?)",
                ty.unwrap_or("missing")
            ),
        ));
    }
    let kind = g.get("adapter.type").and_then(|v| v.as_str());
    if kind != Some("lora") {
        return Err(Error::Unsupported(format!(
            "{}: adapter.type {kind:?} (only lora adapters load)",
            path.display()
        )));
    }
    let arch = g
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let same_arch =
        arch == spec.family.name() || (arch == "llama" && spec.family == Family::Mistral);
    if !same_arch {
        return Err(bad(
            path,
            format!(
                "an adapter for a {arch:?} model, but the base model is {}",
                spec.family.name()
            ),
        ));
    }
    let alpha = g
        .get("adapter.lora.alpha")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0);
    let mut layers: Vec<[Option<LoraPair>; TARGETS]> =
        (0..spec.n_layers).map(|_| Default::default()).collect();
    let mut pairs = 0;
    for t in &g.tensors {
        let Some(base) = t.name.strip_suffix(".lora_a") else {
            if t.name.ends_with(".lora_b") {
                let a_name = t.name.replace(".lora_b", ".lora_a");
                if g.tensor(&a_name).is_none() {
                    return Err(bad(path, format!("{} has no {a_name}", t.name)));
                }
                continue;
            }
            return Err(bad(path, format!("{}: not a lora_a/lora_b tensor", t.name)));
        };
        let rest = base.strip_prefix("blk.").ok_or_else(|| {
            bad(
                path,
                format!("{}: unknown target (only blk.N.* projections)", t.name),
            )
        })?;
        let (idx, module) = rest.split_once('.').unwrap_or((rest, ""));
        let layer: usize = idx
            .parse()
            .map_err(|_| bad(path, format!("{}: bad layer index", t.name)))?;
        let (qd, kd, f, h) = (spec.q_dim(), spec.kv_dim(), spec.ffn, spec.hidden);
        let pieces: Vec<(Target, usize)> = match module {
            "attn_q.weight" => vec![(Target::Q, qd)],
            "attn_k.weight" => vec![(Target::K, kd)],
            "attn_v.weight" => vec![(Target::V, kd)],
            "attn_qkv.weight" => vec![(Target::Q, qd), (Target::K, kd), (Target::V, kd)],
            "attn_output.weight" => vec![(Target::O, h)],
            "ffn_gate.weight" if spec.family != Family::Phi2 => vec![(Target::Gate, f)],
            "ffn_up.weight" if spec.family == Family::Phi3 => {
                vec![(Target::Gate, f), (Target::Up, f)]
            }
            "ffn_up.weight" => vec![(Target::Up, f)],
            "ffn_down.weight" => vec![(Target::Down, h)],
            _ => {
                return Err(bad(
                    path,
                    format!(
                        "{}: unknown target module for a {} model",
                        t.name,
                        spec.family.name()
                    ),
                ))
            }
        };
        let b_name = format!("{base}.lora_b");
        let bt = g
            .tensor(&b_name)
            .ok_or_else(|| bad(path, format!("{b_name} is missing (its pair is present)")))?;
        let read = |ti: &crate::gguf::TensorInfo| -> Result<Vec<f32>> {
            let len = ti.dims.iter().product();
            if !matches!(ti.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                return Err(bad(
                    path,
                    format!("{}: type {} (f32/f16/bf16 only)", ti.name, ti.ty.name()),
                ));
            }
            to_f32(ti.ty, g.tensor_data(ti), len)
                .ok_or_else(|| bad(path, format!("{}: data does not match its shape", ti.name)))
        };
        // GGML order: lora_a is [in, rank] (rank rows of `in`), lora_b is
        // [rank, out] (out rows of `rank`).
        let out: usize = pieces.iter().map(|p| p.1).sum();
        let cols = target_cols(spec, pieces[0].0);
        if t.dims.len() != 2 || t.dims[0] != cols || t.dims[1] == 0 {
            return Err(bad(
                path,
                format!(
                    "{} has GGML shape {:?}, expected [{cols}, rank] for this base",
                    t.name, t.dims
                ),
            ));
        }
        let rank = t.dims[1];
        if bt.dims != [rank, out] {
            return Err(bad(
                path,
                format!(
                    "{b_name} has GGML shape {:?}, expected [{rank}, {out}]",
                    bt.dims
                ),
            ));
        }
        // As llama.cpp: alpha 0 (or absent) means no scaling.
        let scale = if alpha != 0.0 {
            alpha as f32 / rank as f32
        } else {
            1.0
        };
        let (a, b) = (read(t)?, read(bt)?);
        // llama.cpp's converter permuted Llama/Mistral B rows as it does
        // the base's.
        let interleaved = matches!(spec.family, Family::Llama | Family::Mistral);
        place(
            &mut layers,
            spec,
            path,
            &t.name,
            layer,
            &pieces,
            a,
            rank,
            b,
            scale,
            interleaved,
        )?;
        pairs += 1;
    }
    tracing::debug!(arch, pairs, "loaded GGUF LoRA");
    Ok(layers)
}
