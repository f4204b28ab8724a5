//! X-LoRA: a mixture of LoRA experts whose weights a small classifier
//! picks per token (and optionally per layer), as PEFT's
//! `peft.tuners.xlora` defines it.
//!
//! Each token runs twice. The *scaling pass* runs the model with every
//! expert at one fixed weight (`scaling_pass_value`, 0 by default: the
//! base model); the classifier reads that pass's final hidden state of
//! the token and gives, for each adapted module, one weight per expert.
//! The real pass then applies each expert with its weight. Both passes
//! are causal, so with a KV cache of its own for the scaling pass a
//! sequence decodes token by token and gets what PEFT's cache-less
//! recomputation gets.
//!
//! A checkpoint is a folder: `adapter_config.json` (`peft_type` XLORA,
//! `adapters` naming the experts in order, the classifier's settings),
//! `adapter_model.safetensors` (the classifier's layers) and one PEFT LoRA
//! folder per expert, named by its key in `adapters` (or at the path given
//! there, relative to the checkpoint).

use super::lora::{factor_index, factors_len, tensor_f32, LoraAdapter, Target, WeightedAdapter};
use super::spec::{Family, ModelSpec};
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::Arc;

const TARGETS: [Target; 7] = [
    Target::Q,
    Target::K,
    Target::V,
    Target::O,
    Target::Gate,
    Target::Up,
    Target::Down,
];

/// Experts at most: each costs a weight per module per token.
const MAX_EXPERTS: usize = 64;
/// Classifier layers at most, and the widest one (a crafted config must
/// not make a loader allocate without bound before the file is read).
const MAX_DEPTH: usize = 16;
const MAX_WIDTH: usize = 1 << 16;

/// The classifier's settings (PEFT's `XLoraConfig` names).
#[derive(Debug, Clone, PartialEq)]
pub struct XLoraSettings {
    pub enable_softmax: bool,
    pub softmax_temperature: f32,
    pub layerwise_scalings: bool,
    pub top_k_lora: Option<usize>,
    pub enable_softmax_topk: bool,
    pub scaling_pass_value: f32,
    pub global_scaling_weight: f32,
}

/// One dense layer of the classifier: `out × in` weights and `out` biases.
struct Dense {
    w: Vec<f32>,
    b: Vec<f32>,
    cols: usize,
}

/// A loaded X-LoRA checkpoint: its experts, classifier and settings.
pub struct XLora {
    pub name: String,
    pub settings: XLoraSettings,
    /// The experts, in the checkpoint's order.
    pub experts: Vec<Arc<LoraAdapter>>,
    classifier: Vec<Dense>,
    /// The classifier's index of each layer's projections (PEFT counts the
    /// adapted modules in model order; a fused module counts once).
    module: Vec<[Option<usize>; 7]>,
    n_modules: usize,
}

fn bad(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Adapter(format!("{}: {what}", path.display()))
}

/// The projections of a layer in the order the model builds their modules
/// (PEFT numbers the classifier's modules in that order), each with its
/// module: phi3 builds `o_proj` before `qkv_proj`, and fuses q/k/v and
/// gate/up into one module each.
fn module_order(family: Family) -> [(Target, usize); 7] {
    use Target::*;
    match family {
        Family::Phi3 => [
            (O, 0),
            (Q, 1),
            (K, 1),
            (V, 1),
            (Gate, 2),
            (Up, 2),
            (Down, 3),
        ],
        _ => [
            (Q, 0),
            (K, 1),
            (V, 2),
            (O, 3),
            (Gate, 4),
            (Up, 5),
            (Down, 6),
        ],
    }
}

/// Reads a checkpoint's `adapter_config.json`, a regular file (a FIFO
/// would block the reader).
fn read_config(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(bad(path, "not a regular file"));
    }
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Whether `path` is an X-LoRA checkpoint (a folder whose
/// `adapter_config.json` says `"peft_type": "XLORA"`), not a LoRA adapter.
pub fn is_checkpoint(path: &Path) -> bool {
    let Ok(text) = read_config(&path.join("adapter_config.json")) else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .is_ok_and(|v| v.get("peft_type").and_then(|t| t.as_str()) == Some("XLORA"))
}

impl XLora {
    /// Loads the checkpoint at `dir` for a base model of `spec`.
    pub fn load(dir: &Path, name: &str, spec: &ModelSpec) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        if !dir.is_dir() {
            return Err(bad(dir, "an X-LoRA checkpoint is a folder"));
        }
        let text = read_config(&cfg_path)?;
        let cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(&cfg_path, format!("not JSON: {e}")))?;
        let field = |k: &str| cfg.get(k).filter(|v| !v.is_null());
        let peft_type = field("peft_type").and_then(|v| v.as_str()).unwrap_or("");
        if peft_type != "XLORA" {
            return Err(bad(
                &cfg_path,
                format!(
                    "peft_type is {peft_type:?}, not \"XLORA\" (a plain LoRA loads with --lora)"
                ),
            ));
        }
        let flag = |k: &str, default: bool| -> Result<bool> {
            match field(k) {
                None => Ok(default),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| bad(&cfg_path, format!("`{k}` is not true or false"))),
            }
        };
        let number = |k: &str, default: f64| -> Result<f32> {
            let v = match field(k) {
                None => default,
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| bad(&cfg_path, format!("`{k}` is not a number")))?,
            };
            let v = v as f32;
            if !v.is_finite() || v.abs() > crate::adapter_registry::MAX_ADAPTER_WEIGHT {
                return Err(bad(&cfg_path, format!("`{k}` = {v} is out of range")));
            }
            Ok(v)
        };
        let count = |k: &str, default: usize, max: usize| -> Result<usize> {
            match field(k) {
                None => Ok(default),
                Some(v) => v
                    .as_u64()
                    .map(|n| n as usize)
                    .filter(|&n| (1..=max).contains(&n))
                    .ok_or_else(|| {
                        bad(&cfg_path, format!("`{k}` must be an integer in 1..={max}"))
                    }),
            }
        };
        let settings = XLoraSettings {
            enable_softmax: flag("enable_softmax", true)?,
            softmax_temperature: number("softmax_temperature", 1.0)?,
            layerwise_scalings: flag("layerwise_scalings", false)?,
            top_k_lora: match field("top_k_lora") {
                None => None,
                Some(_) => Some(count("top_k_lora", 1, MAX_EXPERTS)?),
            },
            enable_softmax_topk: flag("enable_softmax_topk", false)?,
            scaling_pass_value: number("scaling_pass_value", 0.0)?,
            global_scaling_weight: number("global_scaling_weight", 1.0)?,
        };
        if settings.enable_softmax && settings.softmax_temperature < 1e-3 {
            return Err(bad(
                &cfg_path,
                format!(
                    "softmax_temperature {} is not at least 0.001",
                    settings.softmax_temperature
                ),
            ));
        }
        if flag("use_trainable_adapters", false)? {
            tracing::debug!("use_trainable_adapters only matters for training");
        }
        let hidden = count("hidden_size", 0, MAX_WIDTH)?;
        if hidden != spec.hidden {
            return Err(bad(
                &cfg_path,
                format!(
                    "hidden_size is {hidden}, but the base model's is {}",
                    spec.hidden
                ),
            ));
        }
        let depth = count("xlora_depth", 1, MAX_DEPTH)?;
        let size = count("xlora_size", 2048, MAX_WIDTH)?;

        // The experts, in PEFT's order: it loads them as "0", "1", … and
        // activates them by the keys of `adapters`, so only those keys
        // work there; each is a sub-folder of the checkpoint (a key is a
        // number, so it names nothing outside it).
        let listed = field("adapters")
            .and_then(|v| v.as_object())
            .filter(|m| !m.is_empty())
            .ok_or_else(|| bad(&cfg_path, "`adapters` must name at least one LoRA adapter"))?;
        if listed.len() > MAX_EXPERTS {
            return Err(bad(
                &cfg_path,
                format!("{} adapters, more than {MAX_EXPERTS}", listed.len()),
            ));
        }
        let mut experts = Vec::with_capacity(listed.len());
        for i in 0..listed.len() {
            let key = i.to_string();
            if !listed.contains_key(&key) {
                return Err(bad(
                    &cfg_path,
                    format!(
                        "the keys of `adapters` must be \"0\" to \"{}\", as PEFT names the \
                         experts it loads (found {:?})",
                        listed.len() - 1,
                        listed.keys().collect::<Vec<_>>()
                    ),
                ));
            }
            let path = dir.join(&key);
            if !path.is_dir() {
                return Err(bad(
                    &cfg_path,
                    format!("adapter {key:?}: no PEFT LoRA folder at {}", path.display()),
                ));
            }
            let expert = LoraAdapter::load(&path, &format!("{name}/{key}"), spec)?;
            experts.push(Arc::new(expert));
        }

        let mut module = vec![[None; 7]; spec.n_layers];
        let mut n_modules = 0;
        for (layer, slots) in module.iter_mut().enumerate() {
            let mut group_index: [Option<usize>; 7] = [None; 7];
            for (t, g) in module_order(spec.family) {
                if !experts.iter().any(|e| e.pair(layer, t).is_some()) {
                    continue;
                }
                let i = *group_index[g].get_or_insert_with(|| {
                    n_modules += 1;
                    n_modules - 1
                });
                slots[t as usize] = Some(i);
            }
        }

        let n = experts.len();
        let outputs = if settings.layerwise_scalings {
            n * n_modules
        } else {
            n
        };
        let widths: Vec<usize> = std::iter::once(hidden)
            .chain(std::iter::repeat_n(size, depth - 1))
            .chain(std::iter::once(outputs))
            .collect();
        let classifier = load_classifier(&dir.join("adapter_model.safetensors"), &widths)?;
        tracing::info!(
            name,
            experts = n,
            modules = n_modules,
            depth,
            layerwise = settings.layerwise_scalings,
            "loaded X-LoRA"
        );
        Ok(XLora {
            name: name.to_string(),
            settings,
            experts,
            classifier,
            module,
            n_modules,
        })
    }

    /// Adapted modules the classifier gives weights for.
    pub fn n_modules(&self) -> usize {
        self.n_modules
    }

    /// Memory the experts and the classifier take.
    pub fn bytes(&self) -> usize {
        self.experts.iter().map(|e| e.bytes()).sum::<usize>()
            + self
                .classifier
                .iter()
                .map(|d| (d.w.len() + d.b.len()) * 4)
                .sum::<usize>()
    }

    /// The experts as a sequence's adapters, each at the global scaling
    /// weight (the factors carry the rest).
    pub fn weighted(&self) -> Vec<WeightedAdapter> {
        self.experts
            .iter()
            .map(|e| WeightedAdapter {
                adapter: e.clone(),
                weight: self.settings.global_scaling_weight,
            })
            .collect()
    }

    /// PEFT's scalings of `n` rows of final hidden states of the scaling
    /// pass: `n × modules × experts`, after the classifier's softmax (what
    /// `get_latest_scalings` returns), before top-k.
    pub fn scalings(&self, hidden: &[f32]) -> Vec<f32> {
        let n_exp = self.experts.len();
        let h = self.classifier.first().map_or(1, |d| d.cols);
        let mut out = Vec::with_capacity(hidden.len() / h * self.n_modules * n_exp);
        let mut a = Vec::new();
        let mut b = Vec::new();
        for x in hidden.chunks_exact(h) {
            a.clear();
            a.extend_from_slice(x);
            for (i, d) in self.classifier.iter().enumerate() {
                b.clear();
                b.extend(
                    d.w.chunks_exact(d.cols)
                        .zip(&d.b)
                        .map(|(w, bias)| w.iter().zip(&a).map(|(w, x)| w * x).sum::<f32>() + bias),
                );
                if i + 1 < self.classifier.len() {
                    b.iter_mut().for_each(|v| *v = v.max(0.0));
                }
                std::mem::swap(&mut a, &mut b);
            }
            let per_module = |m: usize| {
                if self.settings.layerwise_scalings {
                    &a[m * n_exp..(m + 1) * n_exp]
                } else {
                    &a[..n_exp]
                }
            };
            for m in 0..self.n_modules {
                let s = per_module(m);
                if self.settings.enable_softmax {
                    let t = self.settings.softmax_temperature;
                    out.extend(softmax(s.iter().map(|v| v / t)));
                } else {
                    out.extend_from_slice(s);
                }
            }
        }
        out
    }

    /// The weight factors of one row for a mix of `lead` other adapters
    /// followed by the experts, from its `scalings` (`modules × experts`),
    /// laid out as [`factor_index`] says; `out` gets them appended.
    fn expand(&self, layers: usize, lead: usize, scalings: &[f32], out: &mut Vec<f32>) {
        let n_exp = self.experts.len();
        let n_mix = lead + n_exp;
        let at = out.len();
        out.resize(at + factors_len(layers, n_mix), 1.0);
        let row = &mut out[at..];
        let mut w = vec![0f32; n_exp];
        for (layer, slots) in self.module.iter().enumerate().take(layers) {
            for t in TARGETS {
                let Some(m) = slots[t as usize] else {
                    continue;
                };
                w.copy_from_slice(&scalings[m * n_exp..(m + 1) * n_exp]);
                self.top_k(&mut w);
                let i = factor_index(layer, t, lead, n_mix);
                row[i..i + n_exp].copy_from_slice(&w);
            }
        }
    }

    /// PEFT's per-module post-processing of the scalings: keep the `top_k`
    /// largest (ties to the lower index), then, if asked, a softmax over
    /// the kept non-zero ones.
    fn top_k(&self, w: &mut [f32]) {
        if let Some(k) = self.settings.top_k_lora.filter(|&k| k < w.len()) {
            let mut order: Vec<usize> = (0..w.len()).collect();
            order.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
            for &i in &order[k..] {
                w[i] = 0.0;
            }
        }
        if self.settings.enable_softmax_topk {
            let kept: Vec<f32> = softmax(w.iter().copied().filter(|&v| v != 0.0)).collect();
            let mut kept = kept.into_iter();
            for v in w.iter_mut().filter(|v| **v != 0.0) {
                *v = kept.next().unwrap_or(0.0);
            }
        }
    }

    /// One row's factors for the scaling pass: every expert at
    /// `scaling_pass_value` in every module (the same for every row).
    pub fn scaling_pass_factors(&self, layers: usize, lead: usize) -> Vec<f32> {
        let dummy = vec![self.settings.scaling_pass_value; self.n_modules * self.experts.len()];
        let mut out = Vec::new();
        self.expand(layers, lead, &dummy, &mut out);
        out
    }

    /// Each row's factors for the real pass, from the scaling pass's final
    /// hidden states of those rows: `rows × factors_len(layers, lead +
    /// experts)`.
    pub fn factors(&self, layers: usize, lead: usize, hidden: &[f32]) -> Vec<f32> {
        let scalings = self.scalings(hidden);
        let per_row = self.n_modules * self.experts.len();
        let mut out = Vec::new();
        for s in scalings.chunks_exact(per_row.max(1)) {
            self.expand(layers, lead, s, &mut out);
        }
        out
    }
}

/// Softmax of `v` (an empty input gives nothing).
fn softmax(v: impl Iterator<Item = f32> + Clone) -> impl Iterator<Item = f32> {
    let max = v.clone().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = v.clone().map(|x| (x - max).exp()).sum();
    v.map(move |x| (x - max).exp() / sum)
}

/// Reads the classifier's dense layers (`…internal_xlora_classifier.layers.N.{weight,bias}`,
/// N counting PEFT's ReLU and dropout modules too) and checks them against
/// `widths` (input, hidden layers, output).
fn load_classifier(path: &Path, widths: &[usize]) -> Result<Vec<Dense>> {
    if path.exists() && !path.is_file() {
        return Err(bad(path, "not a regular file"));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
    // A weight and a bias per layer: more tensors is not a classifier (and
    // the search below is quadratic in them).
    if st.len() > 2 * MAX_DEPTH {
        return Err(bad(
            path,
            format!(
                "{} tensors, more than a classifier of depth {MAX_DEPTH} has",
                st.len()
            ),
        ));
    }
    // Sequential index → (weight name, bias name).
    let mut found: Vec<(usize, String, Option<String>)> = Vec::new();
    for name in st.names() {
        let Some(rest) = name
            .split_once("internal_xlora_classifier.layers.")
            .map(|(_, r)| r)
        else {
            return Err(bad(
                path,
                format!("{name}: not an X-LoRA classifier tensor"),
            ));
        };
        let (idx, what) = rest
            .split_once('.')
            .ok_or_else(|| bad(path, format!("{name}: no layer index")))?;
        let idx: usize = idx
            .parse()
            .map_err(|_| bad(path, format!("{name}: bad layer index {idx:?}")))?;
        let i = match found.iter().position(|f| f.0 == idx) {
            Some(i) => i,
            None => {
                found.push((idx, String::new(), None));
                found.len() - 1
            }
        };
        match what {
            "weight" => found[i].1 = name.to_string(),
            "bias" => found[i].2 = Some(name.to_string()),
            _ => return Err(bad(path, format!("{name}: not a weight or a bias"))),
        }
    }
    found.sort_by_key(|f| f.0);
    if found.len() != widths.len() - 1 {
        return Err(bad(
            path,
            format!(
                "{} classifier layers, but xlora_depth says {}",
                found.len(),
                widths.len() - 1
            ),
        ));
    }
    let read = |n: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let t = st.tensor(n).map_err(|e| bad(path, format!("{n}: {e}")))?;
        if t.shape() != shape {
            return Err(bad(
                path,
                format!("{n} has shape {:?}, expected {shape:?}", t.shape()),
            ));
        }
        tensor_f32(&t, n, path)
    };
    let mut layers = Vec::with_capacity(found.len());
    for (k, (idx, w_name, b_name)) in found.iter().enumerate() {
        let (cols, rows) = (widths[k], widths[k + 1]);
        if w_name.is_empty() {
            return Err(bad(
                path,
                format!("classifier layer {idx} has a bias but no weight"),
            ));
        }
        let w = read(w_name, &[rows, cols])?;
        let b = match b_name {
            Some(n) => read(n, &[rows])?,
            None => vec![0.0; rows],
        };
        if w.iter().chain(&b).any(|v| !v.is_finite()) {
            return Err(bad(
                path,
                format!("classifier layer {idx} holds a non-finite value"),
            ));
        }
        layers.push(Dense { w, b, cols });
    }
    Ok(layers)
}
