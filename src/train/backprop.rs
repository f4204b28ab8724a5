//! The gradient of an [`Example`]'s loss with respect to one adapter's
//! LoRA weights, by hand.
//!
//! The forward pass runs over the one sequence with dense causal attention
//! (no KV cache) and keeps only each layer's input; the backward pass
//! recomputes a layer's activations from that input before carrying the
//! gradient through it (activation checkpointing: a second forward costs
//! less than holding every activation of a long sequence). The math is
//! that of [`Model::forward`], family differences included: norms before
//! and after blocks, parallel blocks, soft-capping, sliding windows, QK
//! norms, partial rotary, biases. Base weights stay frozen and as loaded;
//! gradients pass through them by products with their transposes.

use super::Example;
use crate::error::{Error, Result};
use crate::model::lora::{LoraAdapter, LoraPair, Target, WeightedAdapter, ALL_TARGETS};
use crate::model::ops::{activate, activate_grad, exp};
use crate::model::rope::Rope;
use crate::model::{Layer, Linear, Model, ModelSpec};
use crate::tensor::{matmul, matmul_t, Matrix};
use crate::threadpool::ThreadPool;

/// The gradient of one pair's `A` (`rank × cols`) and `B` (`rows × rank`).
#[derive(Debug, Clone)]
pub struct PairGrad {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// Gradients shaped like the trained adapter's pairs.
#[derive(Clone)]
pub struct LoraGrads {
    layers: Vec<[Option<PairGrad>; 7]>,
}

impl LoraGrads {
    fn zeros_like(adapter: &LoraAdapter, n_layers: usize) -> Self {
        let mut layers: Vec<[Option<PairGrad>; 7]> =
            (0..n_layers).map(|_| Default::default()).collect();
        for (l, t, p) in adapter.pairs() {
            layers[l][t as usize] = Some(PairGrad {
                a: vec![0.0; p.a.len()],
                b: vec![0.0; p.b.len()],
            });
        }
        LoraGrads { layers }
    }

    pub fn pair(&self, layer: usize, target: Target) -> Option<&PairGrad> {
        self.layers.get(layer)?[target as usize].as_ref()
    }

    /// Every gradient as `(layer, target, gradient)`.
    pub fn pairs(&self) -> impl Iterator<Item = (usize, Target, &PairGrad)> {
        self.layers.iter().enumerate().flat_map(|(l, ts)| {
            ALL_TARGETS
                .iter()
                .zip(ts)
                .filter_map(move |(&t, g)| Some((l, t, g.as_ref()?)))
        })
    }

    /// Adds `other` (of the same adapter) times `k`: how the gradients of
    /// several examples are averaged.
    pub fn add_scaled(&mut self, other: &LoraGrads, k: f32) {
        for (mine, theirs) in self.layers.iter_mut().zip(&other.layers) {
            for (m, t) in mine.iter_mut().zip(theirs) {
                if let (Some(m), Some(t)) = (m, t) {
                    m.a.iter_mut().zip(&t.a).for_each(|(x, y)| *x += k * y);
                    m.b.iter_mut().zip(&t.b).for_each(|(x, y)| *x += k * y);
                }
            }
        }
    }

    /// Applies `f` to every element.
    pub fn map(&mut self, f: impl Fn(f32) -> f32) {
        for g in self.layers.iter_mut().flatten().flatten() {
            g.a.iter_mut().chain(&mut g.b).for_each(|v| *v = f(*v));
        }
    }

    /// Adds EWC's pull `λ · F ⊙ (θ - θ*)`: the gradient of
    /// `λ/2 · Σ F (θ - θ*)²`, which keeps weights the Fisher `fisher` says
    /// mattered near their values `anchor` while `now` trains.
    pub fn add_pull(
        &mut self,
        fisher: &LoraGrads,
        now: &LoraAdapter,
        anchor: &LoraAdapter,
        lambda: f32,
    ) {
        for (l, t, f) in fisher.pairs() {
            let (Some(p), Some(q)) = (now.pair(l, t), anchor.pair(l, t)) else {
                continue;
            };
            let Some(g) = self.layers[l][t as usize].as_mut() else {
                continue;
            };
            let pull = |g: &mut [f32], f: &[f32], p: &[f32], q: &[f32]| {
                for i in 0..g.len().min(f.len()).min(p.len()).min(q.len()) {
                    g[i] += lambda * f[i] * (p[i] - q[i]);
                }
            };
            pull(&mut g.a, &f.a, &p.a, &q.a);
            pull(&mut g.b, &f.b, &p.b, &q.b);
        }
    }

    /// Multiplies every gradient by `k`.
    pub fn scale(&mut self, k: f32) {
        for g in self.layers.iter_mut().flatten().flatten() {
            g.a.iter_mut().chain(&mut g.b).for_each(|v| *v *= k);
        }
    }

    /// The largest absolute value of any gradient element.
    pub fn max_abs(&self) -> f32 {
        self.pairs()
            .flat_map(|(_, _, g)| g.a.iter().chain(&g.b))
            .fold(0.0, |m, v| m.max(v.abs()))
    }

    /// Pairs that share one `A` (slices of a fused module) get the sum of
    /// their `A` gradients, as the shared tensor's gradient is.
    fn tie(&mut self, adapter: &LoraAdapter) {
        for (l, t, p) in adapter.pairs() {
            let Some(owner) = p.shares_a_with else {
                continue;
            };
            let ts = &mut self.layers[l];
            let mine = ts[t as usize].as_ref().map(|g| g.a.clone());
            if let (Some(mine), Some(o)) = (mine, ts[owner as usize].as_mut()) {
                o.a.iter_mut().zip(&mine).for_each(|(x, y)| *x += y);
            }
        }
        for (l, t, p) in adapter.pairs() {
            if let Some(owner) = p.shares_a_with {
                let ts = &mut self.layers[l];
                if let Some(total) = ts[owner as usize].as_ref().map(|g| g.a.clone()) {
                    if let Some(g) = ts[t as usize].as_mut() {
                        g.a = total;
                    }
                }
            }
        }
    }
}

/// The adapters a pass applies: the trained one (weight 1) and any frozen
/// ones under it, with their weights.
struct Adapters<'a> {
    trained: &'a LoraAdapter,
    frozen: &'a [WeightedAdapter],
}

impl<'a> Adapters<'a> {
    /// `(pair, weight × scale, trained)` of every adapter at a projection.
    fn at(&self, layer: usize, t: Target) -> Vec<(&'a LoraPair, f32, bool)> {
        let mut v: Vec<_> = self
            .frozen
            .iter()
            .filter_map(|w| Some((w.adapter.pair(layer, t)?, w.weight, false)))
            .collect();
        v.extend(self.trained.pair(layer, t).map(|p| (p, 1.0, true)));
        v.into_iter()
            .map(|(p, w, tr)| (p, w * p.scale, tr))
            .collect()
    }
}

/// `data` (`rows × cols`) as an f32 matrix, so the pool's SIMD products
/// apply to adapter tensors and activations alike.
fn f32_matrix(rows: usize, cols: usize, data: &[f32]) -> Matrix {
    Matrix::from_f32(rows, cols, data.to_vec())
}

/// The `cols × rows` transpose of a `rows × cols` array.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

/// A projection's output with its adapters, and their shrunk inputs `A x`
/// (`n × rank` each, in the order of [`Adapters::at`]).
fn project(
    lin: &Linear,
    x: &[f32],
    n: usize,
    pairs: &[(&LoraPair, f32, bool)],
    pool: &ThreadPool,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut y = lin.forward(x, n, pool);
    let mut shrunk = Vec::with_capacity(pairs.len());
    for &(p, k, _) in pairs {
        let mut u = vec![0f32; n * p.rank];
        matmul(&f32_matrix(p.rank, p.cols, &p.a), x, n, &mut u, pool);
        let mut bu = vec![0f32; n * p.rows];
        matmul(&f32_matrix(p.rows, p.rank, &p.b), &u, n, &mut bu, pool);
        y.iter_mut().zip(&bu).for_each(|(y, v)| *y += k * v);
        shrunk.push(u);
    }
    (y, shrunk)
}

/// Carries `dy` back through [`project`]: adds the input's gradient to
/// `dx` and the trained pair's gradients to `grad`.
#[allow(clippy::too_many_arguments)]
fn project_back(
    lin: &Linear,
    x: &[f32],
    shrunk: &[Vec<f32>],
    dy: &[f32],
    n: usize,
    pairs: &[(&LoraPair, f32, bool)],
    grad: Option<&mut PairGrad>,
    dx: &mut [f32],
    pool: &ThreadPool,
) {
    matmul_t(&lin.w, dy, n, dx, pool);
    let mut grad = grad;
    for (&(p, k, trained), u) in pairs.iter().zip(shrunk) {
        let r = p.rank;
        // gu = k · dy B  (n × rank)
        let mut gu = vec![0f32; n * r];
        matmul_t(&f32_matrix(p.rows, r, &p.b), dy, n, &mut gu, pool);
        gu.iter_mut().for_each(|g| *g *= k);
        if trained {
            if let Some(gr) = grad.as_deref_mut() {
                // dB = k · dyᵀ u  (rows × rank): rows of dyᵀ against rows of uᵀ.
                let mut db = vec![0f32; p.rows * r];
                let ut = f32_matrix(r, n, &transpose(u, n, r));
                matmul(&ut, &transpose(dy, n, p.rows), p.rows, &mut db, pool);
                gr.b.iter_mut().zip(&db).for_each(|(g, v)| *g += k * v);
                // dA = guᵀ x  (rank × cols): rows of guᵀ against rows of xᵀ.
                let mut da = vec![0f32; r * p.cols];
                let xt = f32_matrix(p.cols, n, &transpose(x, n, p.cols));
                matmul(&xt, &transpose(&gu, n, r), r, &mut da, pool);
                gr.a.iter_mut().zip(&da).for_each(|(g, v)| *g += v);
            }
        }
        // dx += gu A
        matmul_t(&f32_matrix(r, p.cols, &p.a), &gu, n, dx, pool);
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// What the backward pass of one layer needs, recomputed from its input.
struct Tape {
    normed: Vec<f32>,
    sq: Vec<Vec<f32>>,
    sk: Vec<Vec<f32>>,
    sv: Vec<Vec<f32>>,
    /// Q and K before their norms (only kept when the layer has them).
    q_raw: Option<Vec<f32>>,
    k_raw: Option<Vec<f32>>,
    /// Q and K after norms and RoPE, and V: what attention read.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    so: Vec<Vec<f32>>,
    /// The output projection before the post-attention norm.
    o_raw: Vec<f32>,
    /// The residual stream after attention (sequential blocks).
    mid: Vec<f32>,
    /// The MLP's input: the FFN norm's output, or `normed` (parallel).
    ffn_in: Vec<f32>,
    up: Vec<f32>,
    su: Vec<Vec<f32>>,
    gate: Option<Vec<f32>>,
    sg: Vec<Vec<f32>>,
    act: Vec<f32>,
    sd: Vec<Vec<f32>>,
    down_raw: Vec<f32>,
}

/// Everything one pass over a sequence shares.
struct Pass<'a> {
    model: &'a Model,
    adapters: Adapters<'a>,
    n: usize,
    pool: &'a ThreadPool,
}

impl Pass<'_> {
    fn spec(&self) -> &ModelSpec {
        &self.model.spec
    }

    fn rope(&self, li: usize) -> Rope {
        let positions: Vec<usize> = (0..self.n).collect();
        Rope::new(&positions, self.model.rope_freqs(li))
    }

    fn window(&self, li: usize) -> Option<usize> {
        let s = self.spec();
        if s.sliding_layers[li] {
            s.sliding_window
        } else {
            None
        }
    }

    /// One layer: its output, and what its backward pass needs.
    fn layer(&self, li: usize, x: &[f32]) -> (Vec<f32>, Tape) {
        let (s, n, pool) = (self.spec(), self.n, self.pool);
        let layer: &Layer = &self.model.layers[li];
        let at = |t| self.adapters.at(li, t);
        let mut normed = vec![0f32; x.len()];
        layer.attn_norm.apply(x, &mut normed);
        let (mut q, sq) = project(&layer.q, &normed, n, &at(Target::Q), pool);
        let (mut k, sk) = project(&layer.k, &normed, n, &at(Target::K), pool);
        let (v, sv) = project(&layer.v, &normed, n, &at(Target::V), pool);
        let q_raw = layer.q_norm.as_ref().map(|qn| {
            let raw = q.clone();
            qn.apply_in_place(&mut q);
            raw
        });
        let k_raw = layer.k_norm.as_ref().map(|kn| {
            let raw = k.clone();
            kn.apply_in_place(&mut k);
            raw
        });
        let rope = self.rope(li);
        rope.apply(s.rope_style, &mut q, s.q_dim(), s.head_dim);
        rope.apply(s.rope_style, &mut k, s.kv_dim(), s.head_dim);
        let attn = attention(s, &q, &k, &v, n, self.window(li));
        let (o_raw, so) = project(&layer.o, &attn, n, &at(Target::O), pool);
        let mut o = o_raw.clone();
        if let Some(pn) = &layer.post_attn_norm {
            pn.apply_in_place(&mut o);
        }
        let (mid, ffn_in) = match &layer.ffn_norm {
            Some(fnorm) => {
                let mid: Vec<f32> = x.iter().zip(&o).map(|(x, o)| x + o).collect();
                let mut f = vec![0f32; mid.len()];
                fnorm.apply(&mid, &mut f);
                (mid, f)
            }
            None => (Vec::new(), normed.clone()),
        };
        let act_fn = s.activation;
        let (up, su) = project(&layer.up, &ffn_in, n, &at(Target::Up), pool);
        let (gate, sg) = match &layer.gate {
            Some(g) => {
                let (g, sg) = project(g, &ffn_in, n, &at(Target::Gate), pool);
                (Some(g), sg)
            }
            None => (None, Vec::new()),
        };
        let act: Vec<f32> = match &gate {
            Some(g) => up
                .iter()
                .zip(g)
                .map(|(u, g)| activate(act_fn, *g) * u)
                .collect(),
            None => up.iter().map(|u| activate(act_fn, *u)).collect(),
        };
        let (down_raw, sd) = project(&layer.down, &act, n, &at(Target::Down), pool);
        let mut f = down_raw.clone();
        if let Some(pn) = &layer.post_ffn_norm {
            pn.apply_in_place(&mut f);
        }
        let out = match layer.ffn_norm {
            Some(_) => mid.iter().zip(&f).map(|(m, f)| m + f).collect(),
            None => (0..x.len()).map(|i| x[i] + o[i] + f[i]).collect(),
        };
        let tape = Tape {
            normed,
            sq,
            sk,
            sv,
            q_raw,
            k_raw,
            q,
            k,
            v,
            attn,
            so,
            o_raw,
            mid,
            ffn_in,
            up,
            su,
            gate,
            sg,
            act,
            sd,
            down_raw,
        };
        (out, tape)
    }

    /// Carries `dout` (the gradient of the layer's output) back to its
    /// input, adding the trained adapter's gradients to `grads`.
    fn layer_back(
        &self,
        li: usize,
        x: &[f32],
        tape: Option<Tape>,
        dout: &[f32],
        grads: &mut LoraGrads,
    ) -> Vec<f32> {
        let (s, n, pool) = (self.spec(), self.n, self.pool);
        let layer = &self.model.layers[li];
        let tp = tape.unwrap_or_else(|| self.layer(li, x).1);
        let at = |t| self.adapters.at(li, t);
        let h = s.hidden;
        let f_dim = layer.up.w.rows;

        // The MLP, from the gradient of its (post-normed) output.
        let mut d_down = vec![0f32; n * h];
        match &layer.post_ffn_norm {
            Some(pn) => pn.backward(&tp.down_raw, dout, &mut d_down),
            None => d_down.copy_from_slice(dout),
        }
        let mut d_act = vec![0f32; n * f_dim];
        project_back(
            &layer.down,
            &tp.act,
            &tp.sd,
            &d_down,
            n,
            &at(Target::Down),
            grads.layers[li][Target::Down as usize].as_mut(),
            &mut d_act,
            pool,
        );
        let act_fn = s.activation;
        let mut d_up = vec![0f32; n * f_dim];
        let mut d_gate = vec![0f32; if tp.gate.is_some() { n * f_dim } else { 0 }];
        match &tp.gate {
            Some(gv) => {
                for i in 0..d_up.len() {
                    d_up[i] = d_act[i] * activate(act_fn, gv[i]);
                    d_gate[i] = d_act[i] * tp.up[i] * activate_grad(act_fn, gv[i]);
                }
            }
            None => {
                for i in 0..d_up.len() {
                    d_up[i] = d_act[i] * activate_grad(act_fn, tp.up[i]);
                }
            }
        }
        let mut d_ffn_in = vec![0f32; n * h];
        project_back(
            &layer.up,
            &tp.ffn_in,
            &tp.su,
            &d_up,
            n,
            &at(Target::Up),
            grads.layers[li][Target::Up as usize].as_mut(),
            &mut d_ffn_in,
            pool,
        );
        if let Some(gate) = &layer.gate {
            project_back(
                gate,
                &tp.ffn_in,
                &tp.sg,
                &d_gate,
                n,
                &at(Target::Gate),
                grads.layers[li][Target::Gate as usize].as_mut(),
                &mut d_ffn_in,
                pool,
            );
        }

        // The gradient reaching the attention block's output, and the
        // gradient of the attention norm's output so far.
        let mut d_normed = vec![0f32; n * h];
        let d_mid = match &layer.ffn_norm {
            Some(fnorm) => {
                let mut d_mid = dout.to_vec();
                fnorm.backward(&tp.mid, &d_ffn_in, &mut d_mid);
                d_mid
            }
            None => {
                // Parallel block: the MLP read the attention norm's output.
                d_normed.copy_from_slice(&d_ffn_in);
                dout.to_vec()
            }
        };

        // Attention.
        let mut d_oraw = vec![0f32; n * h];
        match &layer.post_attn_norm {
            Some(pn) => pn.backward(&tp.o_raw, &d_mid, &mut d_oraw),
            None => d_oraw.copy_from_slice(&d_mid),
        }
        let mut d_attn = vec![0f32; n * s.q_dim()];
        project_back(
            &layer.o,
            &tp.attn,
            &tp.so,
            &d_oraw,
            n,
            &at(Target::O),
            grads.layers[li][Target::O as usize].as_mut(),
            &mut d_attn,
            pool,
        );
        let (mut dq, mut dk, dv) =
            attention_back(s, &tp.q, &tp.k, &tp.v, &d_attn, n, self.window(li));
        let rope_t = self.rope(li).transposed();
        rope_t.apply(s.rope_style, &mut dq, s.q_dim(), s.head_dim);
        rope_t.apply(s.rope_style, &mut dk, s.kv_dim(), s.head_dim);
        if let (Some(qn), Some(raw)) = (&layer.q_norm, &tp.q_raw) {
            let mut d = vec![0f32; dq.len()];
            qn.backward(raw, &dq, &mut d);
            dq = d;
        }
        if let (Some(kn), Some(raw)) = (&layer.k_norm, &tp.k_raw) {
            let mut d = vec![0f32; dk.len()];
            kn.backward(raw, &dk, &mut d);
            dk = d;
        }
        for (lin, shrunk, dy, t) in [
            (&layer.q, &tp.sq, &dq, Target::Q),
            (&layer.k, &tp.sk, &dk, Target::K),
            (&layer.v, &tp.sv, &dv, Target::V),
        ] {
            project_back(
                lin,
                &tp.normed,
                shrunk,
                dy,
                n,
                &at(t),
                grads.layers[li][t as usize].as_mut(),
                &mut d_normed,
                pool,
            );
        }
        let mut dx = d_mid;
        layer.attn_norm.backward(x, &d_normed, &mut dx);
        dx
    }
}

/// Softmax probabilities of query `i` of head `h` over keys `lo..=i`
/// (scaled, soft-capped scores), written to `p`; also returns the capped
/// scores' `tanh` when the model soft-caps (for the backward pass).
#[allow(clippy::too_many_arguments)]
fn probs(
    s: &ModelSpec,
    q: &[f32],
    k: &[f32],
    i: usize,
    h: usize,
    lo: usize,
    p: &mut Vec<f32>,
    tanh: &mut Vec<f32>,
) {
    let (hd, qd, kd) = (s.head_dim, s.q_dim(), s.kv_dim());
    let kvh = h / (s.n_heads / s.n_kv_heads);
    let qi = &q[i * qd + h * hd..i * qd + (h + 1) * hd];
    p.clear();
    tanh.clear();
    for j in lo..=i {
        let kj = &k[j * kd + kvh * hd..j * kd + (kvh + 1) * hd];
        let mut v = dot(qi, kj) * s.attn_scale;
        if let Some(cap) = s.attn_softcap {
            let t = 1.0 - 2.0 / (exp(2.0 * v / cap) + 1.0);
            tanh.push(t);
            v = t * cap;
        }
        p.push(v);
    }
    let max = p.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    p.iter_mut().for_each(|v| *v = exp(*v - max));
    let sum: f32 = p.iter().sum();
    p.iter_mut().for_each(|v| *v /= sum);
}

fn window_start(i: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (i + 1).saturating_sub(w))
}

/// Dense causal attention of `n` queries over the same `n` keys.
fn attention(
    s: &ModelSpec,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    window: Option<usize>,
) -> Vec<f32> {
    let (hd, qd, kd) = (s.head_dim, s.q_dim(), s.kv_dim());
    let group = s.n_heads / s.n_kv_heads;
    let mut out = vec![0f32; n * qd];
    let (mut p, mut tanh) = (Vec::new(), Vec::new());
    for i in 0..n {
        let lo = window_start(i, window);
        for h in 0..s.n_heads {
            probs(s, q, k, i, h, lo, &mut p, &mut tanh);
            let kvh = h / group;
            let o = &mut out[i * qd + h * hd..i * qd + (h + 1) * hd];
            for (j, pj) in (lo..=i).zip(&p) {
                let vj = &v[j * kd + kvh * hd..j * kd + (kvh + 1) * hd];
                o.iter_mut().zip(vj).for_each(|(o, v)| *o += pj * v);
            }
        }
    }
    out
}

/// Gradients of [`attention`]'s Q, K and V given that of its output.
fn attention_back(
    s: &ModelSpec,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_out: &[f32],
    n: usize,
    window: Option<usize>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (hd, qd, kd) = (s.head_dim, s.q_dim(), s.kv_dim());
    let group = s.n_heads / s.n_kv_heads;
    let (mut dq, mut dk, mut dv) = (vec![0f32; n * qd], vec![0f32; n * kd], vec![0f32; n * kd]);
    let (mut p, mut tanh, mut ds) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let lo = window_start(i, window);
        for h in 0..s.n_heads {
            probs(s, q, k, i, h, lo, &mut p, &mut tanh);
            let kvh = h / group;
            let (qo, ko) = (i * qd + h * hd, kvh * hd);
            let doi = &d_out[qo..qo + hd];
            // dp_j = do·v_j, dv_j += p_j·do; ds_j = p_j (dp_j - Σ p dp).
            ds.clear();
            let mut sum = 0f32;
            for (j, pj) in (lo..=i).zip(&p) {
                let vj = &v[j * kd + ko..j * kd + ko + hd];
                let dp = dot(doi, vj);
                ds.push(dp);
                sum += pj * dp;
                dv[j * kd + ko..j * kd + ko + hd]
                    .iter_mut()
                    .zip(doi)
                    .for_each(|(d, o)| *d += pj * o);
            }
            for (jj, j) in (lo..=i).enumerate() {
                let mut g = p[jj] * (ds[jj] - sum);
                if !tanh.is_empty() {
                    g *= 1.0 - tanh[jj] * tanh[jj];
                }
                g *= s.attn_scale;
                let kj = &k[j * kd + ko..j * kd + ko + hd];
                dq[qo..qo + hd]
                    .iter_mut()
                    .zip(kj)
                    .for_each(|(d, k)| *d += g * k);
                let qi = &q[qo..qo + hd];
                dk[j * kd + ko..j * kd + ko + hd]
                    .iter_mut()
                    .zip(qi)
                    .for_each(|(d, q)| *d += g * q);
            }
        }
    }
    (dq, dk, dv)
}

/// Bytes of activations a pass keeps for its backward pass rather than
/// recomputing them (a sequence whose activations need more recomputes
/// each layer's).
const TAPE_BUDGET: usize = 256 << 20;

/// Rows of the final hidden states whose logits one step of the loss takes
/// at once (a bound on the `rows × vocab` buffer).
const LOSS_ROWS: usize = 32;

/// The example's loss under `trained` (over any `frozen` adapters, which
/// are applied but not trained) and its gradient with respect to every
/// pair of `trained`. Pairs that share an `A` (a fused module) get the
/// shared tensor's gradient.
pub fn loss_and_grads(
    model: &Model,
    trained: &LoraAdapter,
    frozen: &[WeightedAdapter],
    ex: &Example,
    pool: &ThreadPool,
) -> Result<(f32, LoraGrads)> {
    let (loss, grads) = run(model, trained, frozen, ex, true, TAPE_BUDGET, pool)?;
    Ok((loss, grads.expect("asked for")))
}

/// The example's loss alone (a forward pass, no gradients).
pub fn loss(
    model: &Model,
    trained: &LoraAdapter,
    frozen: &[WeightedAdapter],
    ex: &Example,
    pool: &ThreadPool,
) -> Result<f32> {
    Ok(run(model, trained, frozen, ex, false, 0, pool)?.0)
}

fn run(
    model: &Model,
    trained: &LoraAdapter,
    frozen: &[WeightedAdapter],
    ex: &Example,
    want_grads: bool,
    tape_budget: usize,
    pool: &ThreadPool,
) -> Result<(f32, Option<LoraGrads>)> {
    let s = &model.spec;
    ex.validate(s.vocab_size, s.context_length)?;
    for a in std::iter::once(trained).chain(frozen.iter().map(|w| &*w.adapter)) {
        for (l, t, p) in a.pairs() {
            let lin = projection(&model.layers, l, t)?;
            if p.cols != lin.w.cols || p.rows != lin.w.rows || p.rank == 0 {
                return Err(Error::Adapter(format!(
                    "{}: layer {l} {t:?} is {}×{} (rank {}), the model's projection {}×{}",
                    a.name, p.rows, p.cols, p.rank, lin.w.rows, lin.w.cols
                )));
            }
        }
    }
    let n = ex.tokens.len();
    let h = s.hidden;
    let pass = Pass {
        model,
        adapters: Adapters { trained, frozen },
        n,
        pool,
    };

    // Forward, keeping each layer's input.
    let mut x = vec![0f32; n * h];
    for (t, row) in x.chunks_exact_mut(h).enumerate() {
        model.embed.dequantize_row(ex.tokens[t] as usize, row);
        if let Some(sc) = s.embed_scale {
            row.iter_mut().for_each(|v| *v *= sc);
        }
    }
    // Activations are kept for the backward pass when they fit the
    // budget, recomputed layer by layer otherwise.
    let per_token = 4 * (6 * h + 3 * s.q_dim() + 3 * s.kv_dim() + 4 * s.ffn);
    let keep = want_grads && n * per_token * model.layers.len() <= tape_budget;
    // Layers below the lowest trained pair pass no gradient to anything
    // trained: the backward pass stops there, and their activations are
    // not kept.
    let lowest = trained.pairs().map(|(l, _, _)| l).min().unwrap_or(0);
    let mut inputs = Vec::with_capacity(model.layers.len());
    let mut tapes = Vec::new();
    for li in 0..model.layers.len() {
        let (out, tape) = pass.layer(li, &x);
        let input = std::mem::replace(&mut x, out);
        let needed = want_grads && li >= lowest;
        inputs.push(if needed { input } else { Vec::new() });
        tapes.push((keep && needed).then_some(tape));
    }

    // The loss and the gradient of the final hidden states.
    // A mean over the weighted tokens: a weight's size scales its token's
    // part (a rating of 0.1 teaches a tenth as hard as 1).
    let total = ex.weights.iter().filter(|w| **w != 0.0).count() as f32;
    let rows: Vec<usize> = (1..n)
        .filter(|&i| ex.weights[i] != 0.0)
        .map(|i| i - 1)
        .collect();
    let mut dx = vec![0f32; n * h];
    let mut loss = 0f64;
    let vocab = model.output.w.rows;
    for chunk in rows.chunks(LOSS_ROWS) {
        let m = chunk.len();
        let mut xs = vec![0f32; m * h];
        for (i, &r) in chunk.iter().enumerate() {
            xs[i * h..(i + 1) * h].copy_from_slice(&x[r * h..(r + 1) * h]);
        }
        let mut normed = vec![0f32; m * h];
        model.final_norm.apply(&xs, &mut normed);
        let mut logits = model.output.forward(&normed, m, pool);
        let mut dz = vec![0f32; m * vocab];
        for (i, &r) in chunk.iter().enumerate() {
            let z = &mut logits[i * vocab..(i + 1) * vocab];
            let dzr = &mut dz[i * vocab..(i + 1) * vocab];
            if let Some(cap) = s.final_softcap {
                z.iter_mut().for_each(|v| {
                    *v = cap * (1.0 - 2.0 / (exp(2.0 * *v / cap) + 1.0));
                });
            }
            let target = ex.tokens[r + 1] as usize;
            let w = ex.weights[r + 1];
            let k = w.abs() / total;
            let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let sum: f64 = z.iter().map(|&v| ((v - max) as f64).exp()).sum();
            let e_t = ((z[target] - max) as f64).exp();
            let log_p = (z[target] - max) as f64 - sum.ln();
            let pt = e_t / sum;
            for (d, &v) in dzr.iter_mut().zip(z.iter()) {
                *d = (((v - max) as f64).exp() / sum) as f32;
            }
            if w > 0.0 {
                // Cross-entropy: dz = p - onehot.
                loss += k as f64 * -log_p;
                dzr[target] -= 1.0;
                dzr.iter_mut().for_each(|d| *d *= k);
            } else {
                // Unlikelihood, -log(1 - p_t), with 1 - p_t summed from the
                // other tokens (exact where p_t rounds to 1):
                // dz_j = p_t (δ_jt - p_j) / (1 - p_t).
                let rest = (sum - e_t) / sum;
                if rest > 0.0 {
                    loss += k as f64 * -rest.ln();
                    let c = (k as f64 * pt / rest) as f32;
                    dzr.iter_mut().for_each(|d| *d *= -c);
                    dzr[target] += c;
                } else {
                    // Every other token underflowed in f64: the loss is
                    // that of the smallest positive 1 - p_t and carries no
                    // usable gradient.
                    loss += k as f64 * -f64::MIN_POSITIVE.ln();
                    dzr.iter_mut().for_each(|d| *d = 0.0);
                }
            }
            if let Some(cap) = s.final_softcap {
                // d(cap·tanh(u/cap))/du = 1 - (z/cap)².
                dzr.iter_mut()
                    .zip(z.iter())
                    .for_each(|(d, v)| *d *= 1.0 - (v / cap) * (v / cap));
            }
        }
        if !want_grads {
            continue;
        }
        let mut dn = vec![0f32; m * h];
        matmul_t(&model.output.w, &dz, m, &mut dn, pool);
        let mut dxs = vec![0f32; m * h];
        model.final_norm.backward(&xs, &dn, &mut dxs);
        for (i, &r) in chunk.iter().enumerate() {
            dx[r * h..(r + 1) * h]
                .iter_mut()
                .zip(&dxs[i * h..(i + 1) * h])
                .for_each(|(d, v)| *d += v);
        }
    }

    if !want_grads {
        return if loss.is_finite() {
            Ok((loss as f32, None))
        } else {
            Err(Error::Internal("the loss is not finite".into()))
        };
    }
    // Backward through the layers.
    let mut grads = LoraGrads::zeros_like(trained, model.layers.len());
    for li in (lowest..model.layers.len()).rev() {
        let tape = tapes.pop().flatten();
        dx = pass.layer_back(li, &inputs[li], tape, &dx, &mut grads);
    }
    grads.tie(trained);
    if !loss.is_finite() || !grads.max_abs().is_finite() {
        return Err(Error::Internal(
            "training produced a non-finite loss or gradient".into(),
        ));
    }
    Ok((loss as f32, Some(grads)))
}

/// The base projection an adapter pair applies to.
fn projection(layers: &[Layer], l: usize, t: Target) -> Result<&Linear> {
    let layer = layers
        .get(l)
        .ok_or_else(|| Error::Adapter(format!("layer {l} is past the model's {}", layers.len())))?;
    Ok(match t {
        Target::Q => &layer.q,
        Target::K => &layer.k,
        Target::V => &layer.v,
        Target::O => &layer.o,
        Target::Gate => layer
            .gate
            .as_ref()
            .ok_or_else(|| Error::Adapter("a gate adapter on a model without a gate".into()))?,
        Target::Up => &layer.up,
        Target::Down => &layer.down,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::ALL_TARGETS;

    #[test]
    fn stopping_below_the_lowest_trained_layer_changes_no_gradient() {
        // Pairs of layer 0 with B = 0 change nothing forward; the layer-1
        // gradients must then be the same whether the backward pass goes
        // through layer 0 (to reach its pairs) or stops above it.
        let pool = ThreadPool::new(2);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
        let model = crate::model::load_hf_folder(&dir.join("qwen2"))
            .unwrap()
            .model;
        let mut all =
            LoraAdapter::new_trainable("t", &model.spec, true, 2, 1.0, &ALL_TARGETS, 1).unwrap();
        for t in ALL_TARGETS {
            let p = all.pair_mut(1, t).unwrap();
            p.b.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i % 5) as f32 * 0.02);
        }
        let mut top = all.new_version();
        top.drop_layers_below(1);
        assert_eq!(top.pairs().map(|(l, _, _)| l).min(), Some(1));
        let ex = Example::completion((0..16).map(|i| (i * 31 % 500) as u32).collect(), 4);
        let (l1, g1) = loss_and_grads(&model, &all, &[], &ex, &pool).unwrap();
        let (l2, g2) = loss_and_grads(&model, &top, &[], &ex, &pool).unwrap();
        assert_eq!(l1, l2);
        assert!(g1.pair(0, Target::Q).is_some() && g2.pair(0, Target::Q).is_none());
        for t in ALL_TARGETS {
            let (x, y) = (g1.pair(1, t).unwrap(), g2.pair(1, t).unwrap());
            assert!(x.a == y.a && x.b == y.b, "{t:?}");
            assert!(x.b.iter().any(|v| *v != 0.0), "{t:?}");
        }
    }

    #[test]
    fn recomputing_activations_gives_the_same_gradients_as_keeping_them() {
        let pool = ThreadPool::new(2);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
        for arch in ["llama", "gemma2", "phi"] {
            let model = crate::model::load_hf_folder(&dir.join(arch)).unwrap().model;
            let has_gate = model.layers[0].gate.is_some();
            let mut a =
                LoraAdapter::new_trainable("t", &model.spec, has_gate, 2, 1.0, &ALL_TARGETS, 1)
                    .unwrap();
            for l in 0..model.spec.n_layers {
                for t in ALL_TARGETS {
                    if let Some(p) = a.pair_mut(l, t) {
                        p.b.iter_mut()
                            .enumerate()
                            .for_each(|(i, b)| *b = (i % 7) as f32 * 0.01);
                    }
                }
            }
            let ex = Example::completion((0..20).map(|i| (i * 37 % 500) as u32).collect(), 5);
            let (l1, g1) = run(&model, &a, &[], &ex, true, usize::MAX, &pool).unwrap();
            let (l2, g2) = run(&model, &a, &[], &ex, true, 0, &pool).unwrap();
            assert_eq!(l1, l2, "{arch}");
            let (g1, g2) = (g1.unwrap(), g2.unwrap());
            assert!(g1.max_abs() > 0.0, "{arch}");
            for ((_, _, x), (_, _, y)) in g1.pairs().zip(g2.pairs()) {
                assert!(x.a == y.a && x.b == y.b, "{arch}");
            }
        }
    }
}
