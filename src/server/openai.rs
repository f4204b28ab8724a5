//! OpenAI request bodies, their validation into engine requests, and the
//! JSON shapes of responses and errors.

use crate::constraint::Constraint;
use crate::request::{FinishReason, GenerationRequest, PromptTokenLogprob, TokenEvent};
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use crate::tools::{parse_choice, parse_tools, Tool, ToolChoice};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;

/// Choices one request may ask for (`n` × prompts).
pub const MAX_CHOICES: usize = 16;

/// An error in OpenAI's shape, with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            param: None,
            message: message.into(),
        }
    }

    pub fn param(mut self, p: &'static str) -> Self {
        self.param = Some(p);
        self
    }

    pub fn with(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            code: None,
            param: None,
            message: message.into(),
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        use crate::Error as E;
        match e {
            E::InvalidRequest(m) | E::Tokenizer(m) | E::Template(m) => ApiError::bad_request(m),
            E::Overloaded(m) => ApiError::with(
                StatusCode::TOO_MANY_REQUESTS,
                "server_overloaded",
                format!("the server is at capacity ({m}); retry later"),
            ),
            E::NotImplemented(m) => ApiError::bad_request(format!("not implemented: {m}")),
            E::NotFound(m) => ApiError::with(StatusCode::NOT_FOUND, "not_found_error", m),
            other => ApiError::with(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                other.to_string(),
            ),
        }
    }
}

/// A string or a list of strings.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// What a completion or embedding request may give as input.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields completions and chat share.
#[derive(Deserialize, Debug, Clone, Default)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub seed: Option<i64>,
    pub stop: Option<OneOrMany>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub ignore_eos: bool,
    /// vLLM's: prompt tokens' log-probabilities with this many alternatives.
    pub prompt_logprobs: Option<i64>,
    /// vLLM's: prefix-cache hits only among requests with the same salt.
    pub cache_salt: Option<String>,
    /// Named LoRA adapters mixed with these weights (on top of the one
    /// `model` names, whose weight this may override).
    pub adapters: Option<HashMap<String, f32>>,
    /// OpenAI's: `{"type": "text" | "json_object" | "json_schema",
    /// "json_schema": {"name", "schema", "strict"}}`.
    pub response_format: Option<Value>,
    /// vLLM's output constraints (one at most, and not with
    /// `response_format`): a JSON schema, a regex, a list of strings, a
    /// Lark grammar; or the same under `structured_outputs` as `json`,
    /// `regex`, `choice`, `grammar`.
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    pub structured_outputs: Option<Value>,
    /// OpenAI's end-user id: with `--sona`, adapters learned from this
    /// user's feedback apply to the request.
    pub user: Option<String>,
}

/// The output constraint a request asks for, if any.
pub fn constraint(c: &Common) -> Result<Option<Constraint>, ApiError> {
    let bad = |m: &str, p: &'static str| ApiError::bad_request(m.to_string()).param(p);
    let string = |v: &Value, p: &'static str| -> Result<String, ApiError> {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| bad(&format!("{p} must be a string"), p))
    };
    let schema = |v: &Value, p: &'static str| -> Result<Value, ApiError> {
        // A schema may come as JSON text (vLLM takes both).
        let v = match v {
            Value::String(s) => {
                serde_json::from_str(s).map_err(|e| bad(&format!("{p} is not JSON: {e}"), p))?
            }
            v => v.clone(),
        };
        if !(v.is_object() || v.is_boolean()) {
            return Err(bad(&format!("{p} must be a JSON schema (an object)"), p));
        }
        Ok(v)
    };
    let choice = |v: &Value, p: &'static str| -> Result<Vec<String>, ApiError> {
        let a = v
            .as_array()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| bad(&format!("{p} must be a non-empty list of strings"), p))?;
        a.iter().map(|s| string(s, p)).collect()
    };
    let mut found: Vec<(Constraint, &'static str)> = Vec::new();
    if let Some(rf) = &c.response_format {
        let p = "response_format";
        match rf.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => {
                found.push((Constraint::JsonSchema(json!({"type": "object"})), p))
            }
            Some("json_schema") => {
                let s = rf
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .ok_or_else(|| bad("response_format.json_schema.schema is missing", p))?;
                found.push((Constraint::JsonSchema(schema(s, p)?), p));
            }
            _ => {
                return Err(bad(
                    "response_format.type must be text, json_object or json_schema",
                    p,
                ))
            }
        }
    }
    let vllm = [
        (&c.guided_json, "guided_json"),
        (&c.guided_regex, "guided_regex"),
        (&c.guided_choice, "guided_choice"),
        (&c.guided_grammar, "guided_grammar"),
    ];
    let so = c.structured_outputs.as_ref();
    if so.is_some_and(|v| !v.is_object()) {
        return Err(bad(
            "structured_outputs must be an object",
            "structured_outputs",
        ));
    }
    let so_field = |k: &str| so.and_then(|v| v.get(k)).filter(|v| !v.is_null());
    for (i, (v, p)) in vllm.into_iter().enumerate() {
        let key = ["json", "regex", "choice", "grammar"][i];
        for (v, p) in [
            (v.as_ref().filter(|v| !v.is_null()), p),
            (so_field(key), "structured_outputs"),
        ] {
            let Some(v) = v else { continue };
            let c = match i {
                0 => Constraint::JsonSchema(schema(v, p)?),
                1 => Constraint::Regex(string(v, p)?),
                2 => Constraint::Choice(choice(v, p)?),
                _ => {
                    let g = string(v, p)?;
                    if g.contains("::=") {
                        return Err(bad(
                            &format!("{p} takes llguidance's Lark dialect (`start: ...`); GBNF grammars (`root ::= ...`) are not supported"),
                            p,
                        ));
                    }
                    Constraint::Lark(g)
                }
            };
            found.push((c, p));
        }
    }
    if found.len() > 1 {
        return Err(bad(
            "at most one output constraint (response_format, guided_*, structured_outputs)",
            found[1].1,
        ));
    }
    Ok(found.pop().map(|(c, _)| c))
}

#[derive(Deserialize, Debug, Clone)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: Common,
    pub prompt: PromptInput,
    /// Alternatives per token (0 = only the chosen token's log-probability).
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
}

/// Message content: a string or a list of text parts.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug, Clone)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
    /// An assistant turn's calls: `[{"id", "type": "function", "function":
    /// {"name", "arguments"}}]`.
    pub tool_calls: Option<Value>,
    /// A tool result's call id and function name.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: Common,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    /// Functions the model may call, `tool_choice` (none, auto, required or
    /// a named function) and whether it may call several at once.
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
}

/// What a chat request's tools ask of the model.
pub struct ToolRequest {
    /// The tools offered (none with `tool_choice: "none"`).
    pub offered: Vec<Tool>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

impl ChatRequest {
    /// Reads and checks `tools`, `tool_choice` and `parallel_tool_calls`.
    pub fn tool_request(&self) -> Result<ToolRequest, ApiError> {
        let tools = match &self.tools {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => parse_tools(v).map_err(|m| ApiError::bad_request(m).param("tools"))?,
        };
        let choice = parse_choice(self.tool_choice.as_ref(), &tools)
            .map_err(|m| ApiError::bad_request(m).param("tool_choice"))?;
        let offered = if choice == ToolChoice::None {
            Vec::new()
        } else {
            tools
        };
        Ok(ToolRequest {
            offered,
            choice,
            parallel: self.parallel_tool_calls.unwrap_or(true),
        })
    }
}

#[derive(Deserialize, Debug, Clone)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    pub input: PromptInput,
    pub encoding_format: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<Message>>,
    pub add_special_tokens: Option<bool>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<i64>,
}

/// Parses a JSON body into `T`, with OpenAI-style errors for bad JSON and
/// wrong types.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    serde_json::from_value(v).map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))
}

impl PromptInput {
    /// Token lists, one per prompt (the engine checks each when it is
    /// submitted).
    /// Texts too long to fit `context` tokens are refused before they are
    /// tokenized.
    pub fn tokenize(self, tok: &Tokenizer, context: usize) -> Result<Vec<Vec<u32>>, ApiError> {
        let lists = match self {
            PromptInput::Text(s) => vec![encode(tok, &s, context)?],
            PromptInput::Texts(v) => v
                .iter()
                .map(|s| encode(tok, s, context))
                .collect::<Result<_, _>>()?,
            PromptInput::Tokens(t) => vec![t],
            PromptInput::TokenLists(l) => l,
        };
        if lists.is_empty() {
            return Err(ApiError::bad_request("no prompt was given").param("prompt"));
        }
        Ok(lists)
    }
}

fn encode(tok: &Tokenizer, s: &str, context: usize) -> Result<Vec<u32>, ApiError> {
    check_text_fits(tok, s, context)?;
    tok.encode(s, true).map_err(ApiError::from)
}

/// Refuses, without tokenizing it, a text that must encode to more than
/// `context` tokens (each token stands for at most so many bytes).
pub fn check_text_fits(tok: &Tokenizer, s: &str, context: usize) -> Result<(), ApiError> {
    let most = context.saturating_mul(tok.max_token_bytes());
    if s.len() > most {
        return Err(ApiError::bad_request(format!(
            "the prompt has {} bytes, more than the {context} tokens of this model's context can hold",
            s.len()
        ))
        .param("prompt"));
    }
    Ok(())
}

impl Message {
    pub fn text(&self) -> Result<String, ApiError> {
        match &self.content {
            None => Ok(String::new()),
            Some(Content::Text(s)) => Ok(s.clone()),
            Some(Content::Parts(parts)) => {
                let mut out = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => out.push_str(t),
                        (k, _) => {
                            return Err(ApiError::bad_request(format!(
                                "content parts of type '{k}' are not supported (text only)"
                            ))
                            .param("messages"))
                        }
                    }
                }
                Ok(out)
            }
        }
    }

    /// An assistant turn's tool calls as templates read them: checked, with
    /// each call's `arguments` text parsed into its JSON value (templates
    /// write them with `tojson`), as vLLM passes them.
    pub fn template_tool_calls(&self) -> Result<Option<Value>, ApiError> {
        let bad = |m: String| ApiError::bad_request(m).param("messages");
        let Some(v) = self.tool_calls.as_ref().filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        if self.role != "assistant" {
            return Err(bad(format!(
                "a '{}' message cannot carry tool_calls",
                self.role
            )));
        }
        let list = v
            .as_array()
            .ok_or_else(|| bad("tool_calls must be a list".into()))?;
        let mut out = Vec::with_capacity(list.len());
        for (i, c) in list.iter().enumerate() {
            let f = c.get("function");
            let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
            let (Some(f), Some(name)) = (f, name) else {
                return Err(bad(format!(
                    "tool_calls[{i}] must have function.name and function.arguments"
                )));
            };
            let arguments = match f.get("arguments") {
                Some(Value::String(s)) => {
                    serde_json::from_str::<Value>(s).unwrap_or_else(|_| Value::String(s.clone()))
                }
                Some(a @ Value::Object(_)) => a.clone(),
                None | Some(Value::Null) => json!({}),
                Some(_) => {
                    return Err(bad(format!(
                        "tool_calls[{i}].function.arguments must be JSON text"
                    )))
                }
            };
            let mut call = json!({
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            });
            if let Some(id) = c.get("id").filter(|id| id.is_string()) {
                call["id"] = id.clone();
            }
            out.push(call);
        }
        Ok(Some(Value::Array(out)))
    }
}

/// A count of alternatives in 0..=20 (`None` when absent).
pub fn top_count(v: Option<i64>, param: &'static str) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(k) if (0..=crate::request::MAX_TOP_LOGPROBS as i64).contains(&k) => {
            Ok(Some(k as usize))
        }
        Some(k) => Err(ApiError::bad_request(format!(
            "{param} must be within 0..={}, got {k}; at most {} top log-probabilities per token",
            crate::request::MAX_TOP_LOGPROBS,
            crate::request::MAX_TOP_LOGPROBS
        ))
        .param(param)),
    }
}

/// vLLM's `prompt_logprobs` list: null for the first token, then for each
/// prompt token a map from token id to its log-probability, rank and text
/// (the token itself and the top alternatives).
pub fn prompt_logprobs_json(tok: &Tokenizer, lps: &[PromptTokenLogprob]) -> Value {
    let mut out = vec![Value::Null];
    for e in lps {
        let mut m = serde_json::Map::new();
        for (r, &(id, l)) in e.top.iter().enumerate() {
            m.insert(
                id.to_string(),
                json!({"logprob": l, "rank": r + 1, "decoded_token": token_str(tok, id)}),
            );
        }
        m.insert(
            e.id.to_string(),
            json!({"logprob": e.logprob, "rank": e.rank, "decoded_token": token_str(tok, e.id)}),
        );
        out.push(Value::Object(m));
    }
    Value::Array(out)
}

/// The engine request(s) for one prompt and the shared settings.
pub struct Plan {
    pub n: usize,
    pub base: GenerationRequest,
}

/// Checks what only the API knows (n, max_tokens against the context, the
/// shapes of top_k, logit_bias and stop) and builds the engine request for
/// `prompt`; the engine validates the rest on submission. `default_max`
/// applies when the client gives no limit.
pub fn plan(
    c: &Common,
    prompt: Vec<u32>,
    logprobs: Option<usize>,
    prompt_logprobs: Option<usize>,
    default_max: Option<usize>,
    context: usize,
) -> Result<Plan, ApiError> {
    let bad = |m: String, p: &'static str| ApiError::bad_request(m).param(p);
    let n = c.n.unwrap_or(1);
    if !(1..=MAX_CHOICES as i64).contains(&n) {
        return Err(bad(
            format!("n must be within 1..={MAX_CHOICES}, got {n}"),
            "n",
        ));
    }
    let given = c.max_completion_tokens.or(c.max_tokens);
    if let Some(m) = given {
        if m < 1 {
            return Err(bad(
                format!("max_tokens must be at least 1, got {m}"),
                "max_tokens",
            ));
        }
    }
    let room = context.saturating_sub(prompt.len());
    if room == 0 {
        return Err(bad(
            format!(
                "This model's maximum context length is {context} tokens. However, your prompt has {} tokens, leaving no room for output.",
                prompt.len()
            ),
            "prompt",
        ));
    }
    let max_tokens = match given {
        Some(m) if m as u64 > room as u64 => {
            return Err(bad(
                format!(
                    "This model's maximum context length is {context} tokens. However, you requested {} tokens ({} in the prompt, {m} in the completion). Please reduce the prompt or max_tokens.",
                    prompt.len() as u64 + m as u64,
                    prompt.len()
                ),
                "max_tokens",
            ))
        }
        Some(m) => m as usize,
        None => default_max.unwrap_or(room).min(room),
    };
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(bad(
                format!("top_k must be -1, 0 or positive, got {k}"),
                "top_k",
            ))
        }
    };
    let mut logit_bias = Vec::new();
    for (k, &b) in c.logit_bias.iter().flatten() {
        let t: u32 = k.parse().map_err(|_| {
            bad(
                format!("logit_bias key '{k}' is not a token id"),
                "logit_bias",
            )
        })?;
        logit_bias.push((t, b));
    }
    logit_bias.sort_by_key(|&(t, _)| t);
    let sampling = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_k,
        top_p: c.top_p.unwrap_or(1.0),
        min_p: c.min_p.unwrap_or(0.0),
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        logit_bias,
        seed: c.seed.map(|s| s as u64),
    };
    let stop = c.stop.clone().map(OneOrMany::into_vec).unwrap_or_default();
    if stop.len() > 16 || stop.iter().any(|s| s.len() > 1024) {
        return Err(bad(
            "at most 16 stop strings of up to 1024 bytes".into(),
            "stop",
        ));
    }
    Ok(Plan {
        n: n as usize,
        base: GenerationRequest {
            prompt,
            sampling,
            max_tokens,
            stop,
            ignore_eos: c.ignore_eos,
            logprobs,
            prompt_logprobs,
            cache_salt: c.cache_salt.clone(),
            user: c.user.clone(),
            constraint: constraint(c)?,
            ..Default::default()
        },
    })
}

impl Plan {
    /// The `n` sibling requests; with a seed, sibling i samples from seed + i
    /// so that they differ yet stay reproducible. Only the first computes
    /// prompt log-probabilities (they are the same for all); the others
    /// then take the prompt's blocks from the prefix cache.
    pub fn requests(&self) -> Vec<GenerationRequest> {
        (0..self.n)
            .map(|i| {
                let mut r = self.base.clone();
                r.sampling.seed = r.sampling.seed.map(|s| s.wrapping_add(i as u64));
                if i > 0 {
                    r.prompt_logprobs = None;
                }
                r
            })
            .collect()
    }
}

pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        // The server cut the request short (its timeout ran out).
        FinishReason::Cancelled => "abort",
    }
}

pub fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

fn token_str(tok: &Tokenizer, id: u32) -> String {
    String::from_utf8_lossy(tok.token_bytes(id)).into_owned()
}

/// Log-probabilities of some tokens in the completions shape.
#[derive(Default)]
pub struct CompletionLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top: Vec<Value>,
    offsets: Vec<usize>,
}

impl CompletionLogprobs {
    /// Adds a token; `offset` is where its text starts in the choice's text.
    pub fn push(&mut self, tok: &Tokenizer, t: &TokenEvent, offset: usize) {
        let Some(lp) = &t.logprobs else { return };
        self.tokens.push(token_str(tok, t.id));
        self.token_logprobs.push(Some(lp.logprob));
        let top: serde_json::Map<String, Value> = lp
            .top
            .iter()
            .map(|&(id, l)| (token_str(tok, id), json!(l)))
            .collect();
        self.top.push(Value::Object(top));
        self.offsets.push(offset);
    }

    /// Adds the prompt's tokens (legacy `echo` with `logprobs`): the first
    /// has no log-probability, the others come from `lps`.
    pub fn push_prompt(&mut self, tok: &Tokenizer, prompt: &[u32], lps: &[PromptTokenLogprob]) {
        let mut offset = 0;
        for (i, &id) in prompt.iter().enumerate() {
            self.tokens.push(token_str(tok, id));
            self.offsets.push(offset);
            offset += tok.token_bytes(id).len();
            match i.checked_sub(1).and_then(|j| lps.get(j)) {
                None => {
                    self.token_logprobs.push(None);
                    self.top.push(Value::Null);
                }
                Some(e) => {
                    self.token_logprobs.push(Some(e.logprob));
                    let top: serde_json::Map<String, Value> = e
                        .top
                        .iter()
                        .map(|&(id, l)| (token_str(tok, id), json!(l)))
                        .collect();
                    self.top.push(Value::Object(top));
                }
            }
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top,
            "text_offset": self.offsets,
        })
    }
}

/// One token's entry in the chat `logprobs.content` list.
pub fn chat_logprob(tok: &Tokenizer, t: &TokenEvent) -> Option<Value> {
    let lp = t.logprobs.as_ref()?;
    let entry = |id: u32, l: f32| json!({"token": token_str(tok, id), "logprob": l, "bytes": tok.token_bytes(id)});
    let mut e = entry(t.id, lp.logprob);
    e["top_logprobs"] = Value::Array(lp.top.iter().map(|&(id, l)| entry(id, l)).collect());
    Some(e)
}
