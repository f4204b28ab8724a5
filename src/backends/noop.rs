//! [`NoopBackend`]: a backend that runs nothing and says so.

use super::*;
use crate::error::Error;

/// A placeholder backend: every call that would need a model fails with
/// [`Error::NotImplemented`]. Useful as a default before a real backend is
/// chosen; [`create_backend`] returns the CPU backend instead.
pub struct NoopBackend;

fn refuse<T>() -> Result<T> {
    Err(Error::NotImplemented(
        "NoopBackend runs no model; use create_backend() for the CPU backend".into(),
    ))
}

impl LlmBackend for NoopBackend {
    fn load_model(&mut self, _model_id: &str, _config: ModelConfig) -> Result<()> {
        refuse()
    }

    fn generate(&self, _prompt: &str, _params: GenerateParams) -> Result<String> {
        refuse()
    }

    fn generate_stream(
        &self,
        _prompt: &str,
        _params: GenerateParams,
    ) -> Result<Box<dyn Iterator<Item = Result<GeneratedToken>> + Send + '_>> {
        refuse()
    }

    fn generate_stream_v2(&self, _prompt: &str, _params: GenerateParams) -> Result<TokenStream> {
        refuse()
    }

    fn get_embeddings(&self, _text: &str) -> Result<Vec<f32>> {
        refuse()
    }

    fn tokenizer(&self) -> Option<&dyn Tokenizer> {
        None
    }

    fn is_model_loaded(&self) -> bool {
        false
    }

    fn model_info(&self) -> Option<ModelInfo> {
        None
    }

    fn unload_model(&mut self) {}
}
