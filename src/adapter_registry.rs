//! The LoRA adapters an engine holds: the always-on ones every sequence
//! gets, and the named ones requests ask for, loaded at start or at run
//! time (at most `max_loras`, the least recently used idle one making
//! room). What each sequence ends up with is resolved here once, at
//! admission; the runner applies it.

use crate::error::{Error, Result};
use crate::model::lora::{LoraAdapter, WeightedAdapter};
use crate::model::ModelSpec;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Largest weight an adapter may be applied with (its scale, or a
/// request's mixing weight).
pub const MAX_ADAPTER_WEIGHT: f32 = 1000.0;

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

#[derive(Default)]
pub struct AdapterRegistry {
    /// Adapters applied to every sequence.
    always: Vec<WeightedAdapter>,
    /// Adapters requests may name, in load order, with when a request last
    /// asked for each (`None`: loaded at start, never evicted).
    named: Vec<(WeightedAdapter, Option<Instant>)>,
    max_loras: Option<usize>,
}

impl AdapterRegistry {
    /// Loads `options` for a model of `spec`; named ones may not exceed
    /// `max_loras`.
    pub fn load(
        options: &[LoraOption],
        spec: &ModelSpec,
        max_loras: Option<usize>,
    ) -> Result<Self> {
        let mut r = AdapterRegistry {
            max_loras,
            ..Default::default()
        };
        for o in options {
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
            if o.name.as_deref().is_some_and(|n| r.find(n).is_some()) {
                return Err(Error::Config(format!(
                    "two LoRA adapters are named {label}"
                )));
            }
            let adapter = LoraAdapter::load(&o.path, &label, spec)?;
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
                Some(_) => r.named.push((w, None)),
                None => r.always.push(w),
            }
        }
        if max_loras == Some(0) {
            return Err(Error::Config("--max-loras must be at least 1".into()));
        }
        if let Some(max) = max_loras.filter(|&m| r.named.len() > m) {
            return Err(Error::Config(format!(
                "{} named LoRA adapters, more than --max-loras {max}",
                r.named.len()
            )));
        }
        Ok(r)
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.named.iter().position(|(w, _)| w.adapter.name == name)
    }

    /// The named adapters requests may ask for, in load order.
    pub fn named(&self) -> impl Iterator<Item = &Arc<LoraAdapter>> {
        self.named.iter().map(|(w, _)| &w.adapter)
    }

    /// The adapters every request gets.
    pub fn always_on(&self) -> &[WeightedAdapter] {
        &self.always
    }

    /// Makes `adapter` available under its name, applied with `scale`. At
    /// `max_loras`, the least recently used adapter loaded at run time
    /// whose `users` count is 0 goes first (adapters given at start stay).
    pub fn add(
        &mut self,
        adapter: LoraAdapter,
        scale: f32,
        users: impl Fn(&Arc<LoraAdapter>) -> usize,
    ) -> Result<()> {
        if !scale.is_finite() || scale.abs() > MAX_ADAPTER_WEIGHT {
            return Err(Error::InvalidRequest(format!(
                "LoRA scale {scale} is not a finite number within ±{MAX_ADAPTER_WEIGHT}"
            )));
        }
        if self.find(&adapter.name).is_some() {
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
                .filter(|(_, (w, used))| used.is_some() && users(&w.adapter) == 0)
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

    /// Removes a named adapter; sequences holding it keep it until they end.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        let i = self
            .find(name)
            .ok_or_else(|| Error::NotFound(format!("no LoRA adapter named '{name}'")))?;
        self.named.remove(i);
        Ok(())
    }

    /// The always-on adapters followed by the named ones `wanted` asks
    /// for (their weight multiplies the scale they were loaded with); each
    /// named one counts as just used.
    pub fn resolve(&mut self, wanted: &[(String, f32)]) -> Result<Vec<WeightedAdapter>> {
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
}
