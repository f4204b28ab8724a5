//! What a caller asks of the engine, and what it hears back: the request,
//! the events of its sequence and the summary at the end.

use crate::error::{Error, Result};
use crate::sampling::SamplingParams;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, an end-of-turn token or a stop string.
    Stop,
    /// max_tokens or the context ran out.
    Length,
    /// The caller asked to stop.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Keep going past EOS / end-of-turn tokens (benchmarks).
    pub ignore_eos: bool,
    /// Report each token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// Return the mean of the final hidden states instead of generating.
    pub embed: bool,
    /// Report the log-probability of every prompt token after the first
    /// (and this many alternatives); the prompt is then computed in full,
    /// never taken from the prefix cache.
    pub prompt_logprobs: Option<usize>,
    /// Only prefixes cached under the same salt are reused (tenants do not
    /// share, or learn about, each other's prompts).
    pub cache_salt: Option<String>,
    /// Named adapters (loaded with [`crate::adapter_registry::LoraOption::name`]) to apply, with
    /// their weights, on top of the engine's always-on ones.
    pub adapters: Vec<(String, f32)>,
    /// The end user (OpenAI's `user`): adapters learned from that user's
    /// feedback apply on top of the global ones.
    pub user: Option<String>,
    /// What the output must match (a JSON schema, a regex, a choice, a
    /// grammar): tokens that would break it are never sampled, and the
    /// request ends when it is complete.
    pub constraint: Option<crate::constraint::Constraint>,
    /// `constraint` already compiled for the engine's vocabulary (the
    /// server compiles it on its blocking pool, not on the engine's
    /// thread); without it the engine compiles `constraint` itself.
    pub compiled: Option<crate::constraint::Compiled>,
}

/// Alternatives reported per token at most.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One generated token and the text it completes (possibly empty while a
/// multi-byte character or a possible stop string is pending).
#[derive(Debug, Clone)]
pub struct TokenEvent {
    pub id: u32,
    pub text: String,
    /// The token's log-probability under the model and the most likely
    /// alternatives, when asked for.
    pub logprobs: Option<TokenLogprobs>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// How likely the model found one prompt token, given the tokens before it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// 1 for the most likely token.
    pub rank: usize,
    pub top: Vec<(u32, f32)>,
}

/// What a request hears from the engine.
#[derive(Debug)]
pub enum SeqEvent {
    Token(TokenEvent),
    /// Unit-length mean of the prompt's final hidden states.
    Embedding {
        vector: Vec<f32>,
        tokens: usize,
    },
    /// Before the first token, when the request asked for prompt
    /// log-probabilities: one entry per prompt token after the first.
    PromptLogprobs(Vec<PromptTokenLogprob>),
    Finished(GenerationSummary),
    Failed(Error),
}

/// Receives a request's events; returning false cancels the request.
pub type Sink = Box<dyn FnMut(SeqEvent) -> bool + Send>;

#[derive(Debug, Clone)]
pub struct GenerationSummary {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
    /// From arrival to the first token.
    pub prefill_secs: f64,
    /// From the first token to the last.
    pub decode_secs: f64,
}

/// Checks a request against the engine's limits before it is queued.
pub fn validate(req: &GenerationRequest, context: usize, vocab: usize) -> Result<()> {
    req.sampling.validate(vocab)?;
    if req.prompt.is_empty() {
        return Err(Error::InvalidRequest("the prompt is empty".into()));
    }
    if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::InvalidRequest(format!(
            "token id {t} is outside the vocabulary of {vocab}"
        )));
    }
    let room = if req.embed { 0 } else { 1 };
    if req.prompt.len() + room > context {
        return Err(Error::InvalidRequest(format!(
            "the prompt has {} tokens, but the context holds {context}{}",
            req.prompt.len(),
            if req.embed {
                ""
            } else {
                " (including at least one generated token)"
            }
        )));
    }
    if req.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS)
        || req.prompt_logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS)
    {
        return Err(Error::InvalidRequest(format!(
            "at most {MAX_TOP_LOGPROBS} top log-probabilities per token"
        )));
    }
    Ok(())
}
