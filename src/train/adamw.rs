//! AdamW with decoupled weight decay, step for step as `torch.optim.AdamW`
//! computes it (so a run here can be held to PyTorch's numbers).

use super::backprop::LoraGrads;
use crate::error::{Error, Result};
use crate::model::lora::{LoraAdapter, ALL_TARGETS};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults.
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// First and second moments of one tensor.
#[derive(Clone)]
struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Moments {
    fn new(len: usize) -> Self {
        Moments {
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }
}

/// The optimizer's state for one adapter: moments of each pair's `A` and
/// `B`, and the step count.
pub struct AdamW {
    pub config: AdamWConfig,
    steps: u32,
    /// Per `(layer, target)`: moments of A and of B.
    state: Vec<Option<(Moments, Moments)>>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Result<Self> {
        let c = config;
        let ok = c.lr.is_finite()
            && c.lr >= 0.0
            && (0.0..1.0).contains(&c.beta1)
            && (0.0..1.0).contains(&c.beta2)
            && c.eps.is_finite()
            && c.eps > 0.0
            && c.weight_decay.is_finite()
            && c.weight_decay >= 0.0;
        if !ok {
            return Err(Error::InvalidRequest(format!(
                "bad AdamW settings {c:?}: lr, eps and weight decay must be finite and \
                 non-negative (eps positive), betas in [0, 1)"
            )));
        }
        Ok(AdamW {
            config,
            steps: 0,
            state: Vec::new(),
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u32 {
        self.steps
    }

    /// One update of every pair of `adapter` that `grads` has a gradient
    /// for. Gradients shaped unlike their pair are an error and change
    /// nothing.
    pub fn step(&mut self, adapter: &mut LoraAdapter, grads: &LoraGrads) -> Result<()> {
        for (l, t, g) in grads.pairs() {
            let p = adapter.pair(l, t).ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "a gradient for layer {l} {t:?}, which the adapter lacks"
                ))
            })?;
            if p.a.len() != g.a.len() || p.b.len() != g.b.len() {
                return Err(Error::InvalidRequest(format!(
                    "the gradient of layer {l} {t:?} is not shaped like the adapter"
                )));
            }
        }
        self.steps += 1;
        let c = self.config;
        let t = self.steps as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = c.lr / bc1;
        let update = |p: &mut [f32], g: &[f32], s: &mut Moments| {
            for i in 0..p.len() {
                p[i] *= 1.0 - c.lr * c.weight_decay;
                s.m[i] = s.m[i] * c.beta1 + g[i] * (1.0 - c.beta1);
                s.v[i] = s.v[i] * c.beta2 + g[i] * g[i] * (1.0 - c.beta2);
                let denom = s.v[i].sqrt() / bc2_sqrt + c.eps;
                p[i] -= step_size * s.m[i] / denom;
            }
        };
        for (l, t, g) in grads.pairs() {
            let idx = l * ALL_TARGETS.len() + t as usize;
            if self.state.len() <= idx {
                self.state.resize(idx + 1, None);
            }
            let p = adapter.pair_mut(l, t).expect("checked above");
            let (sa, sb) = self.state[idx]
                .get_or_insert_with(|| (Moments::new(p.a.len()), Moments::new(p.b.len())));
            update(&mut p.a, &g.a, sa);
            update(&mut p.b, &g.b, sb);
        }
        Ok(())
    }
}
