//! Writing an adapter as a PEFT folder (`adapter_config.json` +
//! `adapter_model.safetensors`), the reverse of the loader in `lora.rs`:
//! what a trained adapter is kept as, loadable here with `--lora` and by
//! PEFT itself.

use super::lora::{module_targets, permute_rows, LoraAdapter, LoraPair, Target, PEFT_MODULES};
use super::spec::{ModelSpec, RopeStyle};
use crate::error::{Error, Result};
use std::path::Path;

fn unsupported(what: String) -> Error {
    Error::Unsupported(format!("writing the adapter as PEFT: {what}"))
}

impl LoraAdapter {
    /// Writes the adapter into `dir` (created if missing; its two files
    /// replaced) for a base of `spec`. Every pair must have the same rank
    /// and scale (PEFT's `r` and `lora_alpha`), and the slices of a fused
    /// module (phi3) must all be present and share one `A`.
    pub fn save_peft(&self, dir: &Path, spec: &ModelSpec) -> Result<()> {
        let first = self
            .pairs()
            .next()
            .ok_or_else(|| unsupported("the adapter has no pairs".into()))?;
        let (rank, scale) = (first.2.rank, first.2.scale);
        if self
            .pairs()
            .any(|(_, _, p)| p.rank != rank || p.scale != scale)
        {
            return Err(unsupported(
                "its pairs differ in rank or scale (one r and lora_alpha are written)".into(),
            ));
        }
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut short_names: Vec<&str> = Vec::new();
        let mut written = 0usize;
        for l in 0..spec.n_layers {
            for module in PEFT_MODULES {
                let Some(pieces) = module_targets(spec.family, module, spec) else {
                    continue;
                };
                let pairs: Vec<Option<&LoraPair>> =
                    pieces.iter().map(|&(t, _)| self.pair(l, t)).collect();
                if pairs.iter().all(Option::is_none) {
                    continue;
                }
                let all: Vec<&LoraPair> = pairs.iter().flatten().copied().collect();
                if all.len() != pieces.len() || all.iter().any(|p| p.a != all[0].a) {
                    return Err(unsupported(format!(
                        "layer {l} {module} is fused in the base: all of its slices must be \
                         adapted and share one A"
                    )));
                }
                let a = &all[0].a;
                let mut b = Vec::new();
                for (&(t, _), p) in pieces.iter().zip(&all) {
                    // Back to Hugging Face's row order where the base has
                    // llama.cpp's permuted q/k rows.
                    let interleaved = spec.rope_style == RopeStyle::Interleaved;
                    match t {
                        Target::Q if interleaved => {
                            b.extend(permute_rows(&p.b, rank, spec.n_heads, false))
                        }
                        Target::K if interleaved => {
                            b.extend(permute_rows(&p.b, rank, spec.n_kv_heads, false))
                        }
                        _ => b.extend_from_slice(&p.b),
                    }
                }
                let prefix = format!("base_model.model.model.layers.{l}.{module}");
                let cols = a.len() / rank;
                let rows = b.len() / rank;
                tensors.push((
                    format!("{prefix}.lora_A.weight"),
                    vec![rank, cols],
                    bytes(a),
                ));
                tensors.push((
                    format!("{prefix}.lora_B.weight"),
                    vec![rows, rank],
                    bytes(&b),
                ));
                written += all.len();
                let short = module.rsplit('.').next().unwrap_or(module);
                if !short_names.contains(&short) {
                    short_names.push(short);
                }
            }
        }
        let total = self.pairs().count();
        if written != total {
            return Err(unsupported(format!(
                "{} of its {total} pairs have no PEFT module in a {} model",
                total - written,
                spec.family.name()
            )));
        }
        let views = tensors
            .iter()
            .map(|(name, shape, data)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .map(|v| (name.clone(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Internal(format!("safetensors view: {e}")))?;
        let st = safetensors::serialize(views, None)
            .map_err(|e| Error::Internal(format!("safetensors: {e}")))?;
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": rank,
            "lora_alpha": scale * rank as f32,
            "use_rslora": false,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "target_modules": short_names,
            "base_model_name_or_path": null,
            "inference_mode": true,
        });
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::atomic_file::write_atomic(&dir.join("adapter_model.safetensors"), &st)?;
        let text = serde_json::to_string_pretty(&config).expect("a JSON value");
        crate::atomic_file::write_atomic(&dir.join("adapter_config.json"), text.as_bytes())
    }
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
