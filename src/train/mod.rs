//! Training LoRA adapters on the CPU: the loss of chosen tokens of a
//! sequence, its gradient with respect to an adapter's `A` and `B` by
//! backpropagation through the frozen (possibly quantized) base model, and
//! AdamW.
//!
//! This is what the learning loop trains with: its figures (losses,
//! gradients) are computed, never estimated, and `tests/train.rs` holds
//! them to PyTorch autograd with PEFT on every supported family.

mod adamw;
mod backprop;
pub mod data;

pub use adamw::{AdamW, AdamWConfig};
pub use backprop::{loss, loss_and_grads, LoraGrads, PairGrad};

use crate::error::{Error, Result};
use crate::model::lora::{LoraAdapter, WeightedAdapter};
use crate::model::Model;
use crate::threadpool::ThreadPool;

/// An adapter being trained over a frozen model (and any frozen adapters
/// under it), with its optimizer state.
pub struct Trainer<'a> {
    pub model: &'a Model,
    pub frozen: &'a [WeightedAdapter],
    pub adapter: &'a mut LoraAdapter,
    pub optimizer: &'a mut AdamW,
}

impl Trainer<'_> {
    /// One optimizer step on the mean gradient of `batch`; returns the
    /// batch's mean loss before the step. A failing example fails the step
    /// and changes nothing.
    pub fn step(&mut self, batch: &[&Example], pool: &ThreadPool) -> Result<f32> {
        let k = 1.0 / batch.len().max(1) as f32;
        let mut total: Option<LoraGrads> = None;
        let mut sum = 0f32;
        for ex in batch {
            let (l, g) = loss_and_grads(self.model, self.adapter, self.frozen, ex, pool)?;
            sum += l;
            match &mut total {
                Some(t) => t.add_scaled(&g, k),
                None => {
                    let mut t = g;
                    t.scale(k);
                    total = Some(t);
                }
            }
        }
        let Some(g) = total else {
            return Err(Error::InvalidRequest("an empty training batch".into()));
        };
        self.optimizer.step(self.adapter, &g)?;
        Ok(sum * k)
    }

    /// The mean loss of `examples` under the adapter as it stands.
    pub fn mean_loss(&self, examples: &[Example], pool: &ThreadPool) -> Result<f32> {
        let mut sum = 0f32;
        for ex in examples {
            sum += loss(self.model, self.adapter, self.frozen, ex, pool)?;
        }
        Ok(sum / examples.len().max(1) as f32)
    }
}

/// One training sequence: its tokens, and for each token the weight of
/// the loss on predicting it from the tokens before it. A positive weight
/// asks for the token (cross-entropy, `-log p`); a negative one asks the
/// model away from it (unlikelihood, `-log(1 - p)`); zero leaves it out
/// (prompt tokens). The first token is never predicted: its weight must be
/// zero. The loss is `Σ |w|·loss / n` over the `n` tokens whose weight is
/// not zero (with weights of 1, the mean cross-entropy PyTorch computes).
#[derive(Debug, Clone)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Example {
    /// Cross-entropy on every token from `first` on, the rest context
    /// (what Hugging Face computes with the labels before `first` set to
    /// -100).
    pub fn completion(tokens: Vec<u32>, first: usize) -> Example {
        let weights = (0..tokens.len())
            .map(|i| if i >= first.max(1) { 1.0 } else { 0.0 })
            .collect();
        Example { tokens, weights }
    }

    pub(crate) fn validate(&self, vocab: usize, context: usize) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        if self.tokens.len() < 2 {
            return bad("a training sequence needs at least two tokens".into());
        }
        if self.tokens.len() > context {
            return bad(format!(
                "a training sequence of {} tokens is longer than the context of {context}",
                self.tokens.len()
            ));
        }
        if self.weights.len() != self.tokens.len() {
            return bad(format!(
                "{} loss weights for {} tokens",
                self.weights.len(),
                self.tokens.len()
            ));
        }
        if let Some(t) = self.tokens.iter().find(|&&t| t as usize >= vocab) {
            return bad(format!("token id {t} is outside the vocabulary of {vocab}"));
        }
        if self.weights.iter().any(|w| !w.is_finite()) {
            return bad("loss weights must be finite".into());
        }
        if self.weights[0] != 0.0 {
            return bad("the first token has nothing before it: its weight must be 0".into());
        }
        if self.weights.iter().all(|&w| w == 0.0) {
            return bad("no token of the sequence has a loss weight".into());
        }
        Ok(())
    }
}
