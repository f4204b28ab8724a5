//! The original's `MistralBackend` names, over the CPU backend: its paged
//! attention settings, round-to-nearest ISQ and X-LoRA are honoured.
//! X-LoRA mixes either with weights given through
//! [`MistralBackend::set_xlora_adapters`] (additive mixing,
//! `y = W x + Σ wᵢ sᵢ Bᵢ Aᵢ x`), or, with `use_learned_routing`, by a
//! learned classifier that picks the weights per token and layer: load an
//! X-LoRA checkpoint (PEFT's format, see [`crate::model::xlora`]) with
//! [`MistralBackend::load_xlora_adapter`]. The other mixing modes and the
//! other ISQ methods are not implemented, and every call that needs them
//! says so.
//!
//! ```
//! use ruvllm::backends::{MistralBackend, MistralBackendConfig, XLoraMixingMode};
//!
//! let config = MistralBackendConfig::default()
//!     .with_paged_attention(16, 4096)
//!     .with_xlora_adapters(vec!["code", "chat"]);
//! let backend = MistralBackend::with_config(config)?;
//! // Mixing modes other than additive are refused up front:
//! let mut gated = MistralBackendConfig::default().with_xlora_adapters(vec!["code"]);
//! gated.xlora.as_mut().unwrap().mixing_mode = XLoraMixingMode::Gated;
//! assert!(MistralBackend::with_config(gated).is_err());
//! # Ok::<(), ruvllm::Error>(())
//! ```

use super::cpu::{forward_backend, CpuBackend, Paging};
use super::*;
use crate::error::Error;
use std::collections::HashMap;
use std::path::Path;

/// Largest KV pool [`PagedAttentionConfigExt`] may ask for, in tokens.
const MAX_KV_TOKENS: usize = 1 << 24;

/// How a [`MistralBackend`] runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MistralBackendConfig {
    /// The paged KV cache's block size and pool size; `None` keeps the
    /// engine's defaults (16-token blocks, four full contexts at most 1 GiB).
    pub paged_attention: Option<PagedAttentionConfigExt>,
    /// X-LoRA adapters, loaded with [`MistralBackend::load_xlora_adapter`]
    /// and mixed with the weights of [`MistralBackend::set_xlora_adapters`]
    /// (or `adapter_scales`).
    pub xlora: Option<XLoraConfig>,
    /// In-situ quantization at load: 8-bit round-to-nearest (Q8_0) is
    /// implemented, other bit widths and methods are refused.
    pub isq: Option<IsqConfig>,
}

impl MistralBackendConfig {
    /// Blocks of `block_size` tokens, `max_pages` of them in the KV pool.
    pub fn with_paged_attention(mut self, block_size: usize, max_pages: usize) -> Self {
        self.paged_attention = Some(PagedAttentionConfigExt {
            block_size,
            max_pages,
        });
        self
    }

    pub fn with_xlora_adapters(mut self, adapter_names: Vec<&str>) -> Self {
        self.xlora = Some(XLoraConfig {
            adapter_names: adapter_names.into_iter().map(String::from).collect(),
            ..Default::default()
        });
        self
    }

    /// ISQ to `bits` with the default method ([`IsqMethod::AWQ`], not
    /// implemented); set `method: IsqMethod::RTN` for the implemented one.
    pub fn with_isq(mut self, bits: u8) -> Self {
        self.isq = Some(IsqConfig {
            bits,
            ..Default::default()
        });
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagedAttentionConfigExt {
    /// Tokens per KV block (1..=1024).
    pub block_size: usize,
    /// Blocks in the KV pool, shared by all sequences.
    pub max_pages: usize,
}

impl Default for PagedAttentionConfigExt {
    fn default() -> Self {
        PagedAttentionConfigExt {
            block_size: 16,
            max_pages: 4096,
        }
    }
}

/// X-LoRA (mixture of LoRA experts) settings. `adapter_names` lists the
/// adapters that may be loaded (empty: any); `adapter_scales`, in the same
/// order, are the weights used until [`MistralBackend::set_xlora_adapters`]
/// gives others. Only `Additive` mixing is implemented. With
/// `use_learned_routing` (and no `adapter_scales`), a classifier picks the
/// weights per token: generation is refused until an X-LoRA checkpoint is
/// loaded (or weights are given). The classifier's shape, top-k and
/// temperature come from the checkpoint's own config, as PEFT saves it;
/// `router_hidden_dim`, `router_layers`, `top_k` and `temperature` are kept
/// for the original's users and not read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct XLoraConfig {
    pub adapter_names: Vec<String>,
    pub base_adapter: Option<String>,
    pub adapter_scales: Option<Vec<f32>>,
    pub router_hidden_dim: usize,
    pub router_layers: usize,
    pub top_k: usize,
    pub temperature: f32,
    pub use_learned_routing: bool,
    pub mixing_mode: XLoraMixingMode,
}

impl Default for XLoraConfig {
    fn default() -> Self {
        XLoraConfig {
            adapter_names: Vec::new(),
            base_adapter: None,
            adapter_scales: None,
            router_hidden_dim: 64,
            router_layers: 2,
            top_k: 2,
            temperature: 1.0,
            use_learned_routing: true,
            mixing_mode: XLoraMixingMode::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum XLoraMixingMode {
    #[default]
    Additive,
    Concatenate,
    Gated,
    Attention,
}

/// In-situ quantization settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsqConfig {
    /// 4, 5 and 8 are implemented with [`IsqMethod::RTN`] (Q4_0, Q5_0, Q8_0).
    pub bits: u8,
    pub method: IsqMethod,
}

impl Default for IsqConfig {
    fn default() -> Self {
        IsqConfig {
            bits: 4,
            method: IsqMethod::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum IsqMethod {
    /// Activation-aware weight quantization (per-channel scales searched on
    /// calibration data): not implemented. The engine's activation-aware
    /// method, llama.cpp's importance matrix, is
    /// [`crate::engine::EngineOptions::calibration`] (`--calibrate`).
    #[default]
    AWQ,
    /// Not implemented (needs calibration data).
    GPTQ,
    /// Round to nearest, per 32-weight block with one scale, bit for bit as
    /// llama.cpp's quantizer (Q4_0, Q5_0, Q8_0).
    RTN,
    /// Not implemented.
    SmoothQuant,
}

impl IsqConfig {
    /// The weight format this ISQ produces, or why it cannot be had.
    fn quantization(&self) -> Result<Quantization> {
        match (self.bits, self.method) {
            (8, IsqMethod::RTN) => Ok(Quantization::Q8),
            (5, IsqMethod::RTN) => Ok(Quantization::Q5_0),
            (4, IsqMethod::RTN) => Ok(Quantization::Q4),
            (bits, method) => Err(Error::NotImplemented(format!(
                "ISQ with {bits} bits by {method:?} (round to nearest, IsqMethod::RTN, \
                 is available with 4, 5 or 8 bits: Q4_0, Q5_0, Q8_0; the engine's \
                 activation-aware method is EngineOptions::calibration, --calibrate)"
            ))),
        }
    }
}

fn no_xlora<T>() -> Result<T> {
    Err(Error::NotImplemented("X-LoRA adapters".into()))
}

/// X-LoRA adapter management apart from a backend. Not implemented:
/// adapters are checked against the model they apply to, so they load
/// into a backend. Every operation fails with [`Error::NotImplemented`];
/// a [`MistralBackend`] configured with X-LoRA loads adapters and
/// checkpoints and mixes them itself.
pub struct XLoraManager {
    config: XLoraConfig,
}

impl XLoraManager {
    pub fn new(config: XLoraConfig) -> Self {
        XLoraManager { config }
    }

    pub fn config(&self) -> &XLoraConfig {
        &self.config
    }

    pub fn load_adapter(&self, _name: &str, _path: &Path) -> Result<()> {
        no_xlora()
    }

    pub fn unload_adapter(&self, _name: &str) -> Result<()> {
        no_xlora()
    }

    pub fn set_active(&self, _adapters: Vec<(&str, f32)>) -> Result<()> {
        no_xlora()
    }

    /// Always empty: nothing can be loaded.
    pub fn stats(&self) -> XLoraManagerStats {
        XLoraManagerStats::default()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct XLoraManagerStats {
    pub loaded_adapters: usize,
    pub forward_count: u64,
    pub adapter_usage: HashMap<String, u64>,
}

/// The CPU backend under the original's `MistralBackend` name and config.
pub struct MistralBackend {
    config: MistralBackendConfig,
    inner: CpuBackend,
}

impl MistralBackend {
    pub fn new() -> Result<Self> {
        Self::with_config(MistralBackendConfig::default())
    }

    /// Checks `config` now, so that what cannot be honoured fails here.
    pub fn with_config(config: MistralBackendConfig) -> Result<Self> {
        if let Some(x) = &config.xlora {
            if x.mixing_mode != XLoraMixingMode::Additive {
                return Err(Error::NotImplemented(format!(
                    "X-LoRA mixing mode {:?} (Additive is implemented)",
                    x.mixing_mode
                )));
            }
            if let Some(s) = &x.adapter_scales {
                if s.len() != x.adapter_names.len() {
                    return Err(Error::InvalidRequest(format!(
                        "{} adapter_scales for {} adapter_names",
                        s.len(),
                        x.adapter_names.len()
                    )));
                }
            }
            if x.base_adapter.is_some() {
                return Err(Error::NotImplemented("X-LoRA base_adapter".into()));
            }
        }
        if let Some(isq) = &config.isq {
            isq.quantization()?;
        }
        let paging = match config.paged_attention {
            None => None,
            Some(p) => {
                if !(1..=1024).contains(&p.block_size) {
                    return Err(Error::InvalidRequest(format!(
                        "paged attention block size must be within 1..=1024, got {}",
                        p.block_size
                    )));
                }
                if p.max_pages == 0 || p.max_pages.saturating_mul(p.block_size) > MAX_KV_TOKENS {
                    return Err(Error::InvalidRequest(format!(
                        "paged attention pages must hold 1 to {MAX_KV_TOKENS} tokens, got {} × {}",
                        p.max_pages, p.block_size
                    )));
                }
                Some(Paging {
                    block_size: p.block_size,
                    blocks: p.max_pages,
                })
            }
        };
        let mut inner = CpuBackend::with_paging(paging);
        if config
            .xlora
            .as_ref()
            .is_some_and(|x| x.use_learned_routing && x.adapter_scales.is_none())
        {
            inner = inner.needing_mix();
        }
        Ok(MistralBackend { config, inner })
    }

    pub fn config(&self) -> &MistralBackendConfig {
        &self.config
    }

    fn xlora(&self) -> Result<&XLoraConfig> {
        self.config.xlora.as_ref().ok_or_else(|| {
            Error::InvalidRequest(
                "X-LoRA is not configured (MistralBackendConfig::with_xlora_adapters)".into(),
            )
        })
    }

    fn check_name(&self, name: &str) -> Result<()> {
        let x = self.xlora()?;
        if !x.adapter_names.is_empty() && !x.adapter_names.iter().any(|n| n == name) {
            return Err(Error::InvalidRequest(format!(
                "'{name}' is not one of the configured X-LoRA adapters ({})",
                x.adapter_names.join(", ")
            )));
        }
        Ok(())
    }

    /// Loads a LoRA adapter (PEFT folder or GGUF) for the loaded model under
    /// `name`, one of the configured `adapter_names`. With `adapter_scales`
    /// configured, the loaded ones are mixed with those weights.
    ///
    /// An X-LoRA checkpoint (a PEFT folder of type XLORA: classifier and
    /// experts) loads the same way; with `use_learned_routing` and no
    /// `adapter_scales`, every later generation runs under it, its
    /// classifier choosing the experts' weights per token.
    pub fn load_xlora_adapter(&self, name: &str, path: &Path) -> Result<()> {
        self.check_name(name)?;
        self.inner.load_adapter(name, path)?;
        let x = self.xlora()?;
        if crate::model::xlora::is_checkpoint(path)
            && x.use_learned_routing
            && x.adapter_scales.is_none()
        {
            return self.inner.set_mix(vec![(name.to_string(), 1.0)]);
        }
        if let Some(scales) = &x.adapter_scales {
            let loaded = self.inner.adapters();
            let mix = x
                .adapter_names
                .iter()
                .zip(scales)
                .filter(|(n, _)| loaded.contains(n))
                .map(|(n, &w)| (n.clone(), w))
                .collect();
            self.inner.set_mix(mix)?;
        }
        Ok(())
    }

    /// The weights every later generation mixes the loaded adapters with
    /// (`y = W x + Σ wᵢ sᵢ Bᵢ Aᵢ x`); an empty list turns the adapters off.
    pub fn set_xlora_adapters(&self, adapters: Vec<(&str, f32)>) -> Result<()> {
        for (name, _) in &adapters {
            self.check_name(name)?;
        }
        self.inner.set_mix(
            adapters
                .into_iter()
                .map(|(n, w)| (n.to_string(), w))
                .collect(),
        )
    }

    /// Loaded adapters and how often generations used each; `None` when
    /// X-LoRA is not configured.
    pub fn xlora_stats(&self) -> Option<XLoraManagerStats> {
        self.config.xlora.as_ref()?;
        let (forward_count, adapter_usage) = self.inner.usage();
        Some(XLoraManagerStats {
            loaded_adapters: self.inner.adapters().len(),
            forward_count,
            adapter_usage,
        })
    }

    /// The config's ISQ joins `config.quantization`; the two must agree.
    fn load(&mut self, model_id: &str, mut config: ModelConfig) -> Result<()> {
        if let Some(isq) = &self.config.isq {
            let q = isq.quantization()?;
            match config.quantization {
                None => config.quantization = Some(q),
                Some(c) if c == q => {}
                Some(c) => {
                    return Err(Error::InvalidRequest(format!(
                        "ModelConfig.quantization {c:?} contradicts the backend's ISQ ({q:?})"
                    )))
                }
            }
        }
        self.inner.load_model(model_id, config)
    }
}

forward_backend!(MistralBackend, inner);
