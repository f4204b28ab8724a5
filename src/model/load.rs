//! Building a [`Model`] from a GGUF file or a Hugging Face folder.

use super::ops::Norm;
use super::spec::{Family, ModelSpec};
use super::{Layer, Linear, Model};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::quant::GgmlType;
use crate::tensor::{Matrix, Storage};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A loaded model together with what it was loaded from.
pub struct LoadedModel {
    pub model: Model,
    pub gguf: Option<GgufFile>,
    pub hf_dir: Option<PathBuf>,
}

/// Where raw tensors come from: the names differ, the shapes do not.
trait TensorSource {
    /// (type, dims in GGML order, storage) of a tensor, if present.
    fn raw(&self, name: &str) -> Result<Option<(GgmlType, Vec<usize>, Storage)>>;
}

/// All values of a tensor, as f32, whatever its shape.
fn read_vector(src: &dyn TensorSource, name: &str) -> Result<Option<Vec<f32>>> {
    let Some((ty, dims, storage)) = src.raw(name)? else {
        return Ok(None);
    };
    let len = dims.iter().product::<usize>();
    let m = Matrix::new(ty, 1, len, storage)
        .ok_or_else(|| Error::Config(format!("tensor {name}: bad data size")))?;
    Ok(Some(m.to_f32()))
}

struct Loader<'a> {
    src: &'a dyn TensorSource,
    spec: &'a ModelSpec,
    /// HF gemma norms are stored as w and applied as 1 + w; GGUF stores 1 + w.
    norm_shift: f32,
    names: &'a dyn Fn(&str) -> String,
}

impl Loader<'_> {
    /// (type, dims, storage, file name) of the tensor `key` names.
    #[allow(clippy::type_complexity)]
    fn find(&self, key: &str) -> Result<Option<(GgmlType, Vec<usize>, Storage, String)>> {
        let name = (self.names)(key);
        Ok(self.src.raw(&name)?.map(|(t, d, s)| (t, d, s, name)))
    }

    fn matrix(&self, key: &str, rows: usize, cols: usize) -> Result<Option<Matrix>> {
        let Some((ty, dims, storage, name)) = self.find(key)? else {
            return Ok(None);
        };
        let n: usize = dims.iter().product();
        if dims[0] != cols || n != rows * cols {
            return Err(Error::Config(format!(
                "tensor {name} has shape {dims:?}, expected [{cols}, {rows}]"
            )));
        }
        Matrix::new(ty, rows, cols, storage)
            .map(Some)
            .ok_or_else(|| {
                Error::Config(format!("tensor {name}: data size does not match its shape"))
            })
    }

    fn req_matrix(&self, key: &str, rows: usize, cols: usize) -> Result<Matrix> {
        self.matrix(key, rows, cols)?
            .ok_or_else(|| Error::Config(format!("missing tensor {}", (self.names)(key))))
    }

    fn vector(&self, key: &str, len: usize) -> Result<Option<Vec<f32>>> {
        let name = (self.names)(key);
        let v = read_vector(self.src, &name)?;
        match v {
            Some(v) if v.len() != len => Err(Error::Config(format!(
                "tensor {name} has {} values, expected {len}",
                v.len()
            ))),
            v => Ok(v),
        }
    }

    fn linear(&self, key: &str, rows: usize, cols: usize) -> Result<Linear> {
        Ok(Linear::new(
            self.req_matrix(&format!("{key}.weight"), rows, cols)?,
            self.vector(&format!("{key}.bias"), rows)?,
        ))
    }

    fn norm(&self, key: &str, len: usize) -> Result<Option<Norm>> {
        let Some(mut w) = self.vector(&format!("{key}.weight"), len)? else {
            return Ok(None);
        };
        if self.norm_shift != 0.0 {
            w.iter_mut().for_each(|v| *v += self.norm_shift);
        }
        Ok(Some(Norm {
            weight: w,
            bias: self.vector(&format!("{key}.bias"), len)?,
            layer_norm: self.spec.layer_norm,
            eps: self.spec.norm_eps,
        }))
    }

    fn req_norm(&self, key: &str, len: usize) -> Result<Norm> {
        self.norm(key, len)?.ok_or_else(|| {
            Error::Config(format!(
                "missing tensor {}",
                (self.names)(&format!("{key}.weight"))
            ))
        })
    }

    fn build(&self) -> Result<Model> {
        let s = self.spec;
        let (h, qd, kd, f) = (s.hidden, s.q_dim(), s.kv_dim(), s.ffn);
        let embed = self.req_matrix("token_embd.weight", s.vocab_size, h)?;
        let mut layers = Vec::with_capacity(s.n_layers);
        for i in 0..s.n_layers {
            let p = |n: &str| format!("blk.{i}.{n}");
            let (q, k, v) = match self.matrix(&p("attn_qkv.weight"), qd + 2 * kd, h)? {
                Some(qkv) => (
                    Linear::new(qkv.slice_rows(0, qd), None),
                    Linear::new(qkv.slice_rows(qd, kd), None),
                    Linear::new(qkv.slice_rows(qd + kd, kd), None),
                ),
                None => (
                    self.linear(&p("attn_q"), qd, h)?,
                    self.linear(&p("attn_k"), kd, h)?,
                    self.linear(&p("attn_v"), kd, h)?,
                ),
            };
            let (gate, up) = match self.matrix(&p("ffn_gate.weight"), f, h)? {
                Some(g) => (Some(Linear::new(g, None)), self.linear(&p("ffn_up"), f, h)?),
                None if s.family == Family::Phi3 => {
                    let gu = self.req_matrix(&p("ffn_up.weight"), 2 * f, h)?;
                    (
                        Some(Linear::new(gu.slice_rows(0, f), None)),
                        Linear::new(gu.slice_rows(f, f), None),
                    )
                }
                None => (None, self.linear(&p("ffn_up"), f, h)?),
            };
            layers.push(Layer {
                attn_norm: self.req_norm(&p("attn_norm"), h)?,
                q,
                k,
                v,
                q_norm: self.norm(&p("attn_q_norm"), s.head_dim)?,
                k_norm: self.norm(&p("attn_k_norm"), s.head_dim)?,
                o: self.linear(&p("attn_output"), h, qd)?,
                post_attn_norm: self.norm(&p("post_attention_norm"), h)?,
                ffn_norm: self.norm(&p("ffn_norm"), h)?,
                gate,
                up,
                down: self.linear(&p("ffn_down"), h, f)?,
                post_ffn_norm: self.norm(&p("post_ffw_norm"), h)?,
            });
        }
        if s.family != Family::Phi2 && layers.iter().any(|l| l.ffn_norm.is_none()) {
            return Err(Error::Config("missing ffn_norm tensors".into()));
        }
        let output = match self.matrix("output.weight", s.vocab_size, h)? {
            Some(w) => Linear::new(w, self.vector("output.bias", s.vocab_size)?),
            None => Linear::new(embed.clone(), None),
        };
        Ok(Model::new(
            s.clone(),
            embed,
            layers,
            self.req_norm("output_norm", h)?,
            output,
        ))
    }
}

struct GgufSource<'a>(&'a GgufFile);

impl TensorSource for GgufSource<'_> {
    fn raw(&self, name: &str) -> Result<Option<(GgmlType, Vec<usize>, Storage)>> {
        Ok(self.0.tensor(name).map(|t| {
            (
                t.ty,
                t.dims.clone(),
                Storage::Mapped {
                    map: self.0.mmap().clone(),
                    offset: t.offset,
                    len: t.size,
                },
            )
        }))
    }
}

pub fn load_gguf(path: &Path) -> Result<LoadedModel> {
    let g = GgufFile::open(path)?;
    let src = GgufSource(&g);
    let spec = ModelSpec::from_gguf(&g, &|name| read_vector(&src, name))?;
    let id = |n: &str| n.to_string();
    let model = Loader {
        src: &src,
        spec: &spec,
        norm_shift: 0.0,
        names: &id,
    }
    .build()?;
    Ok(LoadedModel {
        model,
        gguf: Some(g),
        hf_dir: None,
    })
}

/// Safetensors files of a folder, memory-mapped, with each tensor's location.
struct SafetensorsSource {
    maps: Vec<Arc<Mmap>>,
    /// name → (file index, type, HF shape, byte range)
    tensors: HashMap<String, (usize, GgmlType, Vec<usize>, usize, usize)>,
}

impl SafetensorsSource {
    fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Safetensors(format!("{}: {e}", index.display())))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Safetensors("index has no weight_map".into()))?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            names.sort();
            names.dedup();
            names.iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut src = SafetensorsSource {
            maps: Vec::new(),
            tensors: HashMap::new(),
        };
        for (fi, path) in files.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: read-only map of a file treated as immutable while loaded.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| Error::Safetensors(format!("{}: {e}", path.display())))?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let ty = match info.dtype {
                    safetensors::Dtype::F32 => GgmlType::F32,
                    safetensors::Dtype::F16 => GgmlType::F16,
                    safetensors::Dtype::BF16 => GgmlType::BF16,
                    other => {
                        return Err(Error::Unsupported(format!(
                            "safetensors dtype {other:?} of {name}"
                        )))
                    }
                };
                let (a, b) = info.data_offsets;
                src.tensors.insert(
                    name.clone(),
                    (fi, ty, info.shape.clone(), data_start + a, b - a),
                );
            }
            src.maps.push(Arc::new(map));
        }
        Ok(src)
    }
}

impl TensorSource for SafetensorsSource {
    fn raw(&self, name: &str) -> Result<Option<(GgmlType, Vec<usize>, Storage)>> {
        let Some((fi, ty, shape, offset, len)) = self.tensors.get(name) else {
            return Ok(None);
        };
        let map = &self.maps[*fi];
        let dims: Vec<usize> = shape.iter().rev().copied().collect();
        // F32 data is read in place only when aligned for f32 loads; a
        // misaligned tensor is copied once.
        let storage = if *ty == GgmlType::F32 && !(map.as_ptr() as usize + offset).is_multiple_of(4)
        {
            let v = map[*offset..offset + len]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Storage::F32(Arc::new(v))
        } else {
            Storage::Mapped {
                map: map.clone(),
                offset: *offset,
                len: *len,
            }
        };
        Ok(Some((
            *ty,
            if dims.is_empty() { vec![1] } else { dims },
            storage,
        )))
    }
}

/// Maps a GGUF tensor name to its Hugging Face name for `family`.
fn hf_name(family: Family, gguf: &str) -> String {
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return match gguf {
            "token_embd.weight" => "model.embed_tokens.weight".into(),
            "output.weight" => "lm_head.weight".into(),
            "output.bias" => "lm_head.bias".into(),
            other => {
                let final_norm = if family == Family::Phi2 {
                    "model.final_layernorm"
                } else {
                    "model.norm"
                };
                other.replacen("output_norm", final_norm, 1)
            }
        };
    };
    let (idx, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let (part, suffix) = tail.rsplit_once('.').unwrap_or((tail, ""));
    let gemma_sandwich = matches!(family, Family::Gemma2 | Family::Gemma3);
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_qkv" => "self_attn.qkv_proj",
        "attn_output" if family == Family::Phi2 => "self_attn.dense",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "post_attention_norm" if gemma_sandwich => "post_attention_layernorm",
        "ffn_norm" if gemma_sandwich => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_ffw_norm" if gemma_sandwich => "post_feedforward_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" if family == Family::Phi2 => "mlp.fc1",
        "ffn_up" if family == Family::Phi3 => "mlp.gate_up_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" if family == Family::Phi2 => "mlp.fc2",
        "ffn_down" => "mlp.down_proj",
        _ => return format!("unmapped.{gguf}"),
    };
    format!("model.layers.{idx}.{hf}.{suffix}")
}

pub fn load_hf_folder(dir: &Path) -> Result<LoadedModel> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: {e}", cfg_path.display())))?;
    let spec = ModelSpec::from_hf_config(&cfg)?;
    let src = SafetensorsSource::open(dir)?;
    let family = spec.family;
    let names = move |n: &str| hf_name(family, n);
    let model = Loader {
        src: &src,
        spec: &spec,
        norm_shift: if family.is_gemma() { 1.0 } else { 0.0 },
        names: &names,
    }
    .build()?;
    Ok(LoadedModel {
        model,
        gguf: None,
        hf_dir: Some(dir.to_path_buf()),
    })
}
