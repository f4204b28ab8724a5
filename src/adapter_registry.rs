//! The LoRA adapters an engine holds: the always-on ones every sequence
//! gets, and the named ones requests ask for, loaded at start or at run
//! time (at most `max_loras`, the least recently used idle one making
//! room). What each sequence ends up with is resolved here once, at
//! admission; the runner applies it.
//!
//! Adapters are paid for out of the KV budget (as S-LoRA pools adapter
//! weights with the KV cache): each holds as many KV blocks as its bytes
//! fill, leased from the scheduler, so keys, values and adapters together
//! stay within one budget. A removed adapter's blocks go back when the
//! last sequence using it lets go of it.

use crate::error::{Error, Result};
use crate::model::lora::{LoraAdapter, WeightedAdapter};
use crate::model::xlora::XLora;
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

/// An X-LoRA checkpoint to load with the model (see
/// [`crate::model::xlora`]).
#[derive(Debug, Clone)]
pub struct XLoraOption {
    /// `None`: applied to every request. `Some(name)`: to requests that
    /// name it.
    pub name: Option<String>,
    pub path: PathBuf,
}

/// What a sequence is given: LoRA adapters with their weights and, when it
/// runs under an X-LoRA, that X-LoRA (whose experts end `adapters`).
#[derive(Clone, Default)]
pub struct AdapterMix {
    pub adapters: Vec<WeightedAdapter>,
    pub xlora: Option<Arc<XLora>>,
}

/// A loaded X-LoRA and the KV blocks its memory holds.
struct XEntry {
    name: Option<String>,
    x: Arc<XLora>,
    blocks: Vec<u32>,
}

/// A named adapter: when a request last asked for it (`None`: loaded at
/// start, never evicted) and the KV blocks its memory holds.
struct Named {
    w: WeightedAdapter,
    used: Option<Instant>,
    blocks: Vec<u32>,
}

#[derive(Default)]
pub struct AdapterRegistry {
    /// Adapters applied to every sequence.
    always: Vec<WeightedAdapter>,
    /// The KV blocks the always-on adapters' memory holds.
    always_blocks: Vec<u32>,
    /// Adapters requests may name, in load order.
    named: Vec<Named>,
    /// Removed adapters that sequences still hold, with their blocks.
    retired: Vec<(Arc<LoraAdapter>, Vec<u32>)>,
    /// Removed X-LoRAs that sequences still hold, with their blocks.
    retired_x: Vec<(Arc<XLora>, Vec<u32>)>,
    max_loras: Option<usize>,
    /// X-LoRA checkpoints (given at start or loaded at run time).
    xloras: Vec<XEntry>,
    /// Adapters learned from feedback (the learning loop's versions):
    /// applied to every request after the always-on ones, and those of a
    /// request's user after them. Replaced whole; sequences keep the
    /// versions they started with.
    learned: Vec<WeightedAdapter>,
    learned_users: std::collections::HashMap<String, Vec<WeightedAdapter>>,
}

/// KV blocks of `block_bytes` that `adapter`'s memory fills.
pub fn blocks_for(adapter: &LoraAdapter, block_bytes: usize) -> usize {
    adapter.bytes().div_ceil(block_bytes.max(1))
}

impl AdapterRegistry {
    /// Loads `options` and `xloras` for a model of `spec`; named LoRA
    /// adapters may not exceed `max_loras`.
    pub fn load(
        options: &[LoraOption],
        xloras: &[XLoraOption],
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
                Some(_) => r.named.push(Named {
                    w,
                    used: None,
                    blocks: Vec::new(),
                }),
                None => r.always.push(w),
            }
        }
        for o in xloras {
            let label = o
                .name
                .clone()
                .unwrap_or_else(|| o.path.display().to_string());
            if let Some(n) = o.name.as_deref().filter(|n| r.name_taken(n)) {
                return Err(Error::Config(format!("two adapters are named {n}")));
            }
            if o.name.is_none() && r.xloras.iter().any(|x| x.name.is_none()) {
                return Err(Error::Config(
                    "only one X-LoRA can apply to every request".into(),
                ));
            }
            let x = XLora::load(&o.path, &label, spec)?;
            r.xloras.push(XEntry {
                name: o.name.clone(),
                x: Arc::new(x),
                blocks: Vec::new(),
            });
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
        self.named.iter().position(|n| n.w.adapter.name == name)
    }

    fn find_xlora(&self, name: &str) -> Option<&XEntry> {
        self.xloras.iter().find(|x| x.name.as_deref() == Some(name))
    }

    /// Whether a LoRA adapter or an X-LoRA goes by `name`.
    pub fn name_taken(&self, name: &str) -> bool {
        self.find(name).is_some() || self.find_xlora(name).is_some()
    }

    /// Names requests may ask for: LoRA adapters, then X-LoRAs.
    pub fn names(&self) -> Vec<String> {
        self.named()
            .map(|a| a.name.clone())
            .chain(self.xloras.iter().filter_map(|x| x.name.clone()))
            .collect()
    }

    /// The named X-LoRAs, in load order.
    pub fn named_xloras(&self) -> impl Iterator<Item = (&str, &Arc<XLora>)> {
        self.xloras
            .iter()
            .filter_map(|x| Some((x.name.as_deref()?, &x.x)))
    }

    /// Whether any X-LoRA is loaded (its sequences keep two KV caches).
    pub fn has_xlora(&self) -> bool {
        !self.xloras.is_empty()
    }

    /// The X-LoRA every request gets, if any.
    pub fn always_on_xlora(&self) -> Option<&Arc<XLora>> {
        self.xloras.iter().find(|x| x.name.is_none()).map(|x| &x.x)
    }

    /// The named adapters requests may ask for, in load order.
    pub fn named(&self) -> impl Iterator<Item = &Arc<LoraAdapter>> {
        self.named.iter().map(|n| &n.w.adapter)
    }

    /// KV blocks of `block_bytes` the adapters loaded by [`Self::load`]
    /// need, all together.
    pub fn blocks_needed(&self, block_bytes: usize) -> usize {
        self.always
            .iter()
            .chain(self.named.iter().map(|n| &n.w))
            .map(|w| blocks_for(&w.adapter, block_bytes))
            .sum::<usize>()
            + self
                .xloras
                .iter()
                .map(|x| x.x.bytes().div_ceil(block_bytes.max(1)))
                .sum::<usize>()
    }

    /// Gives every adapter loaded by [`Self::load`] its blocks, from
    /// `lease(n)`; `false` if a lease failed.
    pub fn hold_blocks(
        &mut self,
        block_bytes: usize,
        mut lease: impl FnMut(usize) -> Option<Vec<u32>>,
    ) -> bool {
        for w in &self.always {
            match lease(blocks_for(&w.adapter, block_bytes)) {
                Some(b) => self.always_blocks.extend(b),
                None => return false,
            }
        }
        for n in &mut self.named {
            match lease(blocks_for(&n.w.adapter, block_bytes)) {
                Some(b) => n.blocks = b,
                None => return false,
            }
        }
        for x in &mut self.xloras {
            match lease(x.x.bytes().div_ceil(block_bytes.max(1))) {
                Some(b) => x.blocks = b,
                None => return false,
            }
        }
        true
    }

    /// KV blocks held for adapters, removed ones still in use included.
    pub fn blocks_held(&self) -> usize {
        self.always_blocks.len()
            + self.named.iter().map(|n| n.blocks.len()).sum::<usize>()
            + self.retired.iter().map(|(_, b)| b.len()).sum::<usize>()
            + self.xloras.iter().map(|x| x.blocks.len()).sum::<usize>()
            + self.retired_x.iter().map(|(_, b)| b.len()).sum::<usize>()
    }

    /// The blocks of removed adapters no sequence holds any more, to give
    /// back to the pool.
    pub fn reap(&mut self) -> Vec<u32> {
        let mut free = Vec::new();
        self.retired.retain_mut(|(a, blocks)| {
            let gone = Arc::strong_count(a) == 1;
            if gone {
                free.append(blocks);
            }
            !gone
        });
        self.retired_x.retain_mut(|(x, blocks)| {
            let gone = Arc::strong_count(x) == 1;
            if gone {
                free.append(blocks);
            }
            !gone
        });
        free
    }

    fn retire(&mut self, i: usize) {
        let n = self.named.remove(i);
        self.retired.push((n.w.adapter, n.blocks));
    }

    /// The adapters every request gets.
    pub fn always_on(&self) -> &[WeightedAdapter] {
        &self.always
    }

    /// Replaces the learned adapters every request gets (`user` None) or
    /// those of one user (an empty list removes the user's).
    pub fn set_learned(&mut self, user: Option<String>, adapters: Vec<WeightedAdapter>) {
        match user {
            None => self.learned = adapters,
            Some(u) if adapters.is_empty() => {
                self.learned_users.remove(&u);
            }
            Some(u) => {
                self.learned_users.insert(u, adapters);
            }
        }
    }

    /// Checks that `adapter` may be added with `scale` and finds what must
    /// make room for it: at `max_loras`, the least recently used adapter
    /// loaded at run time whose `users` count is 0 (adapters given at
    /// start stay), returned with the blocks it holds. Nothing changes
    /// here: [`Self::evict`] the victim and [`Self::insert`] the adapter
    /// once everything else about the load has been checked.
    pub fn make_room(
        &self,
        adapter: &LoraAdapter,
        scale: f32,
        users: impl Fn(&Arc<LoraAdapter>) -> usize,
    ) -> Result<Option<(usize, usize)>> {
        if !scale.is_finite() || scale.abs() > MAX_ADAPTER_WEIGHT {
            return Err(Error::InvalidRequest(format!(
                "LoRA scale {scale} is not a finite number within ±{MAX_ADAPTER_WEIGHT}"
            )));
        }
        if self.name_taken(&adapter.name) {
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
                .filter(|(_, n)| n.used.is_some() && users(&n.w.adapter) == 0)
                .min_by_key(|(_, n)| n.used)
                .map(|(i, _)| i);
            return match idle {
                Some(i) => Ok(Some((i, self.named[i].blocks.len()))),
                None => Err(Error::Overloaded(format!(
                    "{max} LoRA adapters are loaded (--max-loras): those loaded at run \
                     time are all in use, and those given at start stay"
                ))),
            };
        }
        Ok(None)
    }

    /// Unloads the victim [`Self::make_room`] chose (no sequence holds it,
    /// so [`Self::reap`] gives its blocks back at once).
    pub fn evict(&mut self, i: usize) {
        tracing::info!(
            evicted = %self.named[i].w.adapter.name,
            "LoRA adapter unloaded to make room"
        );
        self.retire(i);
    }

    /// Adds `adapter` (checked by [`Self::make_room`]) under its name,
    /// holding `blocks` of the KV pool.
    pub fn insert(&mut self, adapter: LoraAdapter, scale: f32, blocks: Vec<u32>) {
        self.named.push(Named {
            w: WeightedAdapter {
                adapter: Arc::new(adapter),
                weight: scale,
            },
            used: Some(Instant::now()),
            blocks,
        });
    }

    /// Removes a named adapter or X-LoRA; sequences holding it keep it
    /// until they end.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        if let Some(i) = self
            .xloras
            .iter()
            .position(|x| x.name.as_deref() == Some(name))
        {
            let x = self.xloras.remove(i);
            self.retired_x.push((x.x, x.blocks));
            return Ok(());
        }
        let i = self
            .find(name)
            .ok_or_else(|| Error::NotFound(format!("no LoRA adapter named '{name}'")))?;
        self.retire(i);
        Ok(())
    }

    /// Whether `max_loras` adapters and X-LoRAs are named already (an
    /// X-LoRA loaded at run time is refused then: it is never evicted).
    pub fn full(&self) -> bool {
        self.max_loras.is_some_and(|m| {
            self.named.len() + self.xloras.iter().filter(|x| x.name.is_some()).count() >= m
        })
    }

    /// Adds a named X-LoRA loaded at run time, holding `blocks` of the KV
    /// pool (its name checked free with [`Self::name_taken`]).
    pub fn insert_xlora(&mut self, x: XLora, blocks: Vec<u32>) {
        self.xloras.push(XEntry {
            name: Some(x.name.clone()),
            x: Arc::new(x),
            blocks,
        });
    }

    /// The always-on adapters, the learned ones (global, then `user`'s;
    /// none when `learned` is false), then the named ones `wanted` asks for (their weight multiplies the scale they were loaded with), then
    /// the experts of the X-LoRA, if one applies (the always-on one or
    /// one `wanted` names; their weight multiplies its global scaling
    /// weight). Each named LoRA adapter counts as just used.
    pub fn resolve(
        &mut self,
        wanted: &[(String, f32)],
        user: Option<&str>,
        learned: bool,
    ) -> Result<AdapterMix> {
        let mut v = self.always.clone();
        if learned {
            v.extend(self.learned.iter().cloned());
            if let Some(mine) = user.and_then(|u| self.learned_users.get(u)) {
                v.extend(mine.iter().cloned());
            }
        }
        let mut xlora = self.always_on_xlora().map(|x| (x.clone(), 1.0f32));
        for (name, weight) in wanted {
            if !weight.is_finite() {
                return Err(Error::InvalidRequest(format!(
                    "adapter weight {weight} is not a finite number"
                )));
            }
            if let Some(x) = self.find_xlora(name) {
                if xlora.is_some() {
                    return Err(Error::InvalidRequest(format!(
                        "X-LoRA '{name}': a request runs under one X-LoRA at most"
                    )));
                }
                xlora = Some((x.x.clone(), *weight));
                continue;
            }
            let Named { w, used, .. } =
                self.named
                    .iter_mut()
                    .find(|n| n.w.adapter.name == *name)
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
        if let Some((x, weight)) = &xlora {
            let global = x.settings.global_scaling_weight * weight;
            if !global.is_finite() {
                return Err(Error::InvalidRequest(format!(
                    "X-LoRA '{}': weight × global_scaling_weight is not a finite number",
                    x.name
                )));
            }
            v.extend(x.weighted().into_iter().map(|mut e| {
                e.weight *= weight;
                e
            }));
        }
        Ok(AdapterMix {
            adapters: v,
            xlora: xlora.map(|(x, _)| x),
        })
    }
}
