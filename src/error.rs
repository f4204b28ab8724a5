//! The crate's error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid GGUF file: {0}")]
    Gguf(String),
    #[error("invalid safetensors model: {0}")]
    Safetensors(String),
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("invalid adapter: {0}")]
    Adapter(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("no model is loaded")]
    NoModel,
    #[error("not implemented: {0}")]
    NotImplemented(String),
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The original ruvllm's name for [`Error`], kept so its users' code compiles.
pub type RuvLLMError = Error;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
