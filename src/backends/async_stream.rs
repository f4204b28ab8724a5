//! Async streaming: [`AsyncTokenStream`] and [`LlmBackendAsync`], for use
//! under any executor (tokio, `futures::executor`, ...).
//!
//! ```no_run
//! use futures::StreamExt;
//! use ruvllm::backends::{create_backend, GenerateParams, LlmBackendAsync, ModelConfig, StreamEvent};
//!
//! # async fn run() -> ruvllm::Result<()> {
//! let mut backend = create_backend();
//! backend.load_model("models/SmolLM2-135M-Instruct.Q4_1.gguf", ModelConfig::default())?;
//! let mut stream = backend.generate_stream_async("Hello", GenerateParams::default()).await?;
//! while let Some(event) = stream.next().await {
//!     if let StreamEvent::Token(t) = event? {
//!         print!("{}", t.text);
//!     }
//! }
//! # Ok(()) }
//! ```

use super::{GenerateParams, LlmBackend, StreamEvent, TokenStream};
use crate::error::Result;
use futures::future::BoxFuture;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A [`TokenStream`] as a `futures::Stream`. Its task is woken only when an
/// event is ready: nothing spins while the model computes. (`TokenStream`
/// itself is only an `Iterator`, so that `next()` is never ambiguous where
/// `futures::StreamExt` is in scope.)
pub struct AsyncTokenStream {
    inner: TokenStream,
}

impl AsyncTokenStream {
    pub fn new(inner: TokenStream) -> Self {
        AsyncTokenStream { inner }
    }

    pub fn is_finished(&self) -> bool {
        self.inner.is_finished()
    }

    pub fn tokens_received(&self) -> usize {
        self.inner.tokens_received()
    }

    pub fn tokens_per_second(&self) -> f64 {
        self.inner.tokens_per_second()
    }
}

impl futures::Stream for AsyncTokenStream {
    type Item = Result<StreamEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_event(cx)
    }
}

/// Async generation for every [`LlmBackend`]. The method returns a boxed
/// `Send` future, as an `#[async_trait]` method does.
pub trait LlmBackendAsync: Send + Sync {
    /// Starts generating and returns the stream of its events.
    fn generate_stream_async<'a>(
        &'a self,
        prompt: &'a str,
        params: GenerateParams,
    ) -> BoxFuture<'a, Result<AsyncTokenStream>>;
}

impl<T: LlmBackend + ?Sized> LlmBackendAsync for T {
    fn generate_stream_async<'a>(
        &'a self,
        prompt: &'a str,
        params: GenerateParams,
    ) -> BoxFuture<'a, Result<AsyncTokenStream>> {
        // Submitting only queues the request; the tokens arrive on the stream.
        Box::pin(async move {
            self.generate_stream_v2(prompt, params)
                .map(AsyncTokenStream::new)
        })
    }
}
