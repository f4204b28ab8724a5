//! ruvllm: an LLM inference runtime for GGUF and Hugging Face models.
//!
//! Layers, each depending only on those above it:
//! - [`gguf`], [`quant`], [`tensor`]: model files, block formats, SIMD kernels;
//! - [`model`]: pure forward functions over a flat batch of tokens;
//! - [`kv`]: the paged KV cache those forwards read and append to;
//! - [`tokenizer`], [`chat`], [`sampling`]: text in, tokens out;
//! - [`engine`]: a loaded model with its tokenizer, running generations;
//! - [`backends`]: the public `LlmBackend` API.

pub mod backends;
pub mod chat;
pub mod engine;
pub mod engine_loop;
pub mod error;
pub mod gguf;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod quant;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod tensor;
pub mod threadpool;
pub mod tokenizer;

pub use error::{Error, Result};
