//! ruvllm: an LLM inference and serving runtime for GGUF and Hugging Face
//! models.
//!
//! Layers, each depending only on those above it:
//! - [`simd`]: which kernel copy (AVX-512 VNNI, AVX2, portable) this CPU runs;
//! - [`gguf`], [`gguf_writer`], [`quant`], [`tensor`]: model files, block
//!   formats, SIMD kernels;
//! - [`kv`]: the paged KV cache and its block manager (prefix caching);
//! - [`model`]: pure forward functions over a flat batch of tokens, reading
//!   and appending to the KV cache, with LoRA adapters ([`model::lora`]);
//! - [`tokenizer`], [`chat`], [`sampling`], [`tools`]: text in, tokens out
//!   (and tool calls read back out of the text);
//! - [`runner`]: the model with its KV cache and threads: a flat batch of
//!   sequences in, logits or hidden states out, adapters applied there;
//! - [`sequence`], [`scheduler`]: each request's one sequence state, and
//!   which tokens of which sequences run each step (token budget, chunked
//!   prefill, preemption); it knows no model;
//! - [`request`], [`output`], [`adapter_registry`], [`engine`]: what a
//!   request asks and hears, the output processor (sampling, log-probs,
//!   text, stop strings), the loaded adapters, and the engine that ties the
//!   scheduler, runner and output processor together;
//! - [`engine_loop`], [`metrics`]: the thread that owns the engine, and what
//!   it reports;
//! - [`server`], [`backends`]: the OpenAI-compatible HTTP server and the
//!   public `LlmBackend` API, both in front of the engine loop.

pub mod adapter_registry;
pub mod atomic_file;
pub mod backends;
pub mod chat;
pub mod constraint;
pub mod engine;
pub mod engine_loop;
pub mod error;
pub mod gguf;
pub mod gguf_writer;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod output;
pub mod progress;
pub mod quant;
pub mod request;
pub mod runner;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod server;
pub mod simd;
pub mod sona;
pub mod speculative;
pub mod tensor;
pub mod threadpool;
pub mod tokenizer;
pub mod tools;
pub mod train;

pub use error::{Error, Result, RuvLLMError};
