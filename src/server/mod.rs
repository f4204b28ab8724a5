//! The OpenAI-compatible HTTP server in front of the engine loop.
//!
//! Handlers tokenize and validate on the async runtime, hand requests to the
//! [`EngineHandle`] and relay its events. A request's [`RequestGuard`] lives
//! in the handler's future or the response stream, so a client that goes
//! away aborts its generation and frees its blocks at once.

mod openai;

use crate::chat::ChatMessage;
use crate::engine::{chat_prompt, GenerationRequest, GenerationSummary, SeqEvent};
use crate::engine_loop::{EngineHandle, RequestGuard};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::channel::mpsc::{unbounded, UnboundedReceiver};
use futures::StreamExt;
use openai::*;
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Names the model answers to besides its file name.
    pub served_model_name: Option<String>,
    pub api_key: Option<String>,
    /// Allowed CORS origins ("*" for any); none disables CORS.
    pub cors: Vec<String>,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub struct AppState {
    /// Set once the model has loaded; until then /health answers 503.
    pub engine: OnceLock<EngineHandle>,
    /// The model's id in /v1/models and in responses.
    pub model_id: String,
    pub opts: ServerOptions,
}

impl AppState {
    pub fn new(model_id: String, opts: ServerOptions) -> Arc<Self> {
        Arc::new(AppState {
            engine: OnceLock::new(),
            model_id,
            opts,
        })
    }

    fn engine(&self) -> ApiResult<&EngineHandle> {
        self.engine.get().ok_or_else(|| {
            ApiError::with(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "the model is still loading",
            )
        })
    }

    /// Accepts the model's id, the served name, or no model at all.
    fn check_model(&self, m: &Option<String>) -> ApiResult<()> {
        match m {
            None => Ok(()),
            Some(m) if *m == self.model_id || Some(m) == self.opts.served_model_name.as_ref() => {
                Ok(())
            }
            Some(m) => Err(ApiError {
                code: Some("model_not_found"),
                ..ApiError::bad_request(format!(
                    "the model '{m}' does not exist; this server serves '{}'",
                    self.model_id
                ))
                .param("model")
            }),
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let mut app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async {
            ApiError::with(StatusCode::NOT_FOUND, "not_found_error", "no such endpoint")
        })
        .layer(DefaultBodyLimit::max(state.opts.max_body_bytes));
    if !state.opts.cors.is_empty() {
        use tower_http::cors::{AllowOrigin, Any, CorsLayer};
        let origins = if state.opts.cors.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(
                state
                    .opts
                    .cors
                    .iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok()),
            )
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
                .allow_headers(Any),
        );
    }
    app.with_state(state)
}

async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.opts.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError {
                code: Some("invalid_api_key"),
                ..ApiError::with(
                    StatusCode::UNAUTHORIZED,
                    "authentication_error",
                    "missing or wrong API key (send 'Authorization: Bearer <key>')",
                )
            }
            .into_response();
        }
    }
    next.run(req).await
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    match st.engine() {
        Ok(_) => (StatusCode::OK, "ok").into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> ApiResult<Response> {
    let body = st.engine()?.metrics.render();
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}{n:06x}", now_secs())
}

async fn models(State(st): State<Arc<AppState>>) -> ApiResult<axum::Json<Value>> {
    let e = st.engine()?;
    Ok(axum::Json(json!({
        "object": "list",
        "data": [{
            "id": st.model_id,
            "object": "model",
            "created": now_secs(),
            "owned_by": "ruvllm",
            "max_model_len": e.model.context,
        }],
    })))
}

fn body_bytes(b: Result<Bytes, axum::extract::rejection::BytesRejection>) -> ApiResult<Bytes> {
    b.map_err(|e| ApiError::with(e.status(), "invalid_request_error", e.body_text()))
}

/// Events of all choices of one request, tagged with their choice index.
struct Submitted {
    rx: UnboundedReceiver<(usize, SeqEvent)>,
    _guards: Vec<RequestGuard>,
    choices: usize,
}

/// Submits every prompt's `n` siblings; choice `p * n + i` is sibling `i`
/// of prompt `p`.
fn submit(engine: &EngineHandle, groups: Vec<Vec<GenerationRequest>>) -> ApiResult<Submitted> {
    let (tx, rx) = unbounded();
    let mut guards = Vec::new();
    let mut index = 0;
    for reqs in groups {
        let sinks = reqs
            .iter()
            .map(|_| {
                let (tx, i) = (tx.clone(), index);
                index += 1;
                Box::new(move |ev| tx.unbounded_send((i, ev)).is_ok()) as crate::engine::Sink
            })
            .collect();
        // On failure the guards so far abort what was already queued.
        guards.push(engine.submit(reqs, sinks)?);
    }
    Ok(Submitted {
        rx,
        _guards: guards,
        choices: index,
    })
}

/// Per-choice results of a non-streamed request.
struct Collected {
    text: Vec<String>,
    summary: Vec<Option<GenerationSummary>>,
    events: Vec<Vec<crate::engine::TokenEvent>>,
}

async fn collect(mut s: Submitted, timeout: Duration) -> ApiResult<Collected> {
    let mut c = Collected {
        text: vec![String::new(); s.choices],
        summary: (0..s.choices).map(|_| None).collect(),
        events: vec![Vec::new(); s.choices],
    };
    let deadline = Instant::now() + timeout;
    let mut done = 0;
    while done < s.choices {
        let ev = tokio::time::timeout_at(deadline, s.rx.next())
            .await
            .map_err(|_| timed_out(timeout))?;
        let Some((i, ev)) = ev else {
            return Err(ApiError::from(crate::Error::Internal(
                "the engine dropped the request".into(),
            )));
        };
        match ev {
            SeqEvent::Token(t) => {
                c.text[i].push_str(&t.text);
                c.events[i].push(t);
            }
            SeqEvent::Finished(sum) => {
                c.summary[i] = Some(sum);
                done += 1;
            }
            SeqEvent::Failed(e) => return Err(e.into()),
            SeqEvent::Embedding { .. } => done += 1,
        }
    }
    Ok(c)
}

fn timed_out(t: Duration) -> ApiError {
    ApiError::with(
        StatusCode::REQUEST_TIMEOUT,
        "timeout_error",
        format!(
            "the request took longer than {} s and was stopped",
            t.as_secs()
        ),
    )
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Response> {
    let req: CompletionRequest = parse(&body_bytes(body)?)?;
    st.check_model(&req.common.model)?;
    let e = st.engine()?;
    let logprobs = match req.logprobs {
        None => None,
        Some(k) if k >= 0 => Some(k as usize),
        Some(k) => {
            return Err(
                ApiError::bad_request(format!("logprobs must be ≥ 0, got {k}")).param("logprobs"),
            )
        }
    };
    let prompts = req.prompt.tokenize(&e.tokenizer)?;
    let mut plans = Vec::new();
    for p in prompts {
        plans.push(plan(&req.common, p, logprobs, Some(16), e.model.context)?);
    }
    let echo: Vec<String> = plans
        .iter()
        .map(|p| {
            if req.echo {
                e.tokenizer.decode(&p.base.prompt, false)
            } else {
                String::new()
            }
        })
        .collect();
    check_choices(&plans)?;
    let n = plans[0].n;
    let prompt_tokens: usize = plans.iter().map(|p| p.base.prompt.len()).sum();
    let sub = submit(e, plans.iter().map(Plan::requests).collect())?;
    let envelope = Envelope::new("cmpl", "text_completion", &st.model_id);
    if req.common.stream {
        let usage_wanted = req.common.stream_options.is_some_and(|o| o.include_usage);
        let tok = e.tokenizer.clone();
        let mut offsets = vec![0usize; sub.choices];
        let usage = usage_wanted.then_some(prompt_tokens);
        let stream = sse(
            sub,
            n,
            envelope,
            st.opts.request_timeout,
            usage,
            move |ev| match ev {
                StreamItem::Start(i) => {
                    let text = &echo[i / n];
                    (!text.is_empty()).then(|| {
                        offsets[i] += text.len();
                        json!({"index": i, "text": text, "logprobs": null, "finish_reason": null})
                    })
                }
                StreamItem::Token(i, t) => {
                    let lp = t.logprobs.is_some().then(|| {
                        let mut l = CompletionLogprobs::default();
                        l.push(&tok, &t, offsets[i]);
                        l.to_json()
                    });
                    offsets[i] += t.text.len();
                    Some(json!({"index": i, "text": t.text, "logprobs": lp, "finish_reason": null}))
                }
                StreamItem::Finish(i, s) => Some(json!({
                    "index": i, "text": "", "logprobs": null, "finish_reason": finish_reason(s.finish)
                })),
            },
        );
        return Ok(stream);
    }
    let c = collect(sub, st.opts.request_timeout).await?;
    let (mut completion, mut cached) = (0, 0);
    let mut choices = Vec::new();
    for i in 0..c.text.len() {
        let s = c.summary[i].as_ref().expect("every choice finished");
        completion += s.tokens.len();
        if i % n == 0 {
            cached += s.cached_tokens;
        }
        let prefix = &echo[i / n];
        let lp = logprobs.map(|_| {
            let mut l = CompletionLogprobs::default();
            let mut off = prefix.len();
            for t in &c.events[i] {
                l.push(&e.tokenizer, t, off);
                off += t.text.len();
            }
            l.to_json()
        });
        choices.push(json!({
            "index": i,
            "text": format!("{prefix}{}", c.text[i]),
            "logprobs": lp,
            "finish_reason": finish_reason(s.finish),
        }));
    }
    let usage = usage(prompt_tokens, completion, cached);
    Ok(axum::Json(envelope.wrap(json!(choices), Some(usage))).into_response())
}

fn check_choices(plans: &[Plan]) -> ApiResult<()> {
    let total: usize = plans.iter().map(|p| p.n).sum();
    if total > MAX_CHOICES {
        return Err(ApiError::bad_request(format!(
            "{total} choices asked for (prompts × n); at most {MAX_CHOICES}"
        ))
        .param("n"));
    }
    Ok(())
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Response> {
    let req: ChatRequest = parse(&body_bytes(body)?)?;
    st.check_model(&req.common.model)?;
    let e = st.engine()?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty").param("messages"));
    }
    let mut messages = Vec::new();
    for m in &req.messages {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer" | "tool"
        ) {
            return Err(
                ApiError::bad_request(format!("unknown message role '{}'", m.role))
                    .param("messages"),
            );
        }
        let role = if m.role == "developer" {
            "system"
        } else {
            m.role.as_str()
        };
        messages.push(ChatMessage::new(role, m.text()?));
    }
    let prompt = chat_prompt(&e.tokenizer, &e.template, &messages)?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (false, Some(_)) => {
            return Err(
                ApiError::bad_request("top_logprobs needs logprobs: true").param("top_logprobs")
            )
        }
        (false, None) => None,
        (true, None) => Some(0),
        (true, Some(k)) if k >= 0 => Some(k as usize),
        (true, Some(k)) => {
            return Err(
                ApiError::bad_request(format!("top_logprobs must be ≥ 0, got {k}"))
                    .param("top_logprobs"),
            )
        }
    };
    let p = plan(&req.common, prompt, logprobs, None, e.model.context)?;
    let prompt_tokens = p.base.prompt.len();
    let sub = submit(e, vec![p.requests()])?;
    if req.common.stream {
        let usage_wanted = req.common.stream_options.is_some_and(|o| o.include_usage);
        let tok = e.tokenizer.clone();
        let envelope = Envelope::new("chatcmpl", "chat.completion.chunk", &st.model_id);
        let usage = usage_wanted.then_some(prompt_tokens);
        let n = sub.choices;
        let stream = sse(
            sub,
            n,
            envelope,
            st.opts.request_timeout,
            usage,
            move |ev| match ev {
                StreamItem::Start(i) => Some(json!({
                    "index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null
                })),
                StreamItem::Token(i, t) => {
                    let lp = chat_logprob(&tok, &t).map(|l| json!({"content": [l]}));
                    Some(
                        json!({"index": i, "delta": {"content": t.text}, "logprobs": lp, "finish_reason": null}),
                    )
                }
                StreamItem::Finish(i, s) => Some(json!({
                    "index": i, "delta": {}, "logprobs": null, "finish_reason": finish_reason(s.finish)
                })),
            },
        );
        return Ok(stream);
    }
    let c = collect(sub, st.opts.request_timeout).await?;
    let mut completion = 0;
    let mut choices = Vec::new();
    for i in 0..c.text.len() {
        let s = c.summary[i].as_ref().expect("every choice finished");
        completion += s.tokens.len();
        let lp = logprobs.map(|_| {
            let content: Vec<Value> = c.events[i]
                .iter()
                .filter_map(|t| chat_logprob(&e.tokenizer, t))
                .collect();
            json!({ "content": content })
        });
        choices.push(json!({
            "index": i,
            "message": {"role": "assistant", "content": c.text[i]},
            "logprobs": lp,
            "finish_reason": finish_reason(s.finish),
        }));
    }
    let cached = c.summary[0].as_ref().map_or(0, |s| s.cached_tokens);
    let usage = usage(prompt_tokens, completion, cached);
    let envelope = Envelope::new("chatcmpl", "chat.completion", &st.model_id);
    Ok(axum::Json(envelope.wrap(json!(choices), Some(usage))).into_response())
}

/// The fields every completion response and streamed chunk carries.
struct Envelope {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
}

impl Envelope {
    fn new(id_prefix: &str, object: &'static str, model: &str) -> Self {
        Envelope {
            id: request_id(id_prefix),
            object,
            created: now_secs(),
            model: model.to_string(),
        }
    }

    fn wrap(&self, choices: Value, usage: Option<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        v
    }
}

/// What a streamed response reports about a choice, turned into that
/// choice's JSON by the caller.
enum StreamItem {
    /// Before the first token of choice i.
    Start(usize),
    Token(usize, crate::engine::TokenEvent),
    Finish(usize, GenerationSummary),
}

/// A server-sent-event response relaying the engine's events. The guards
/// travel inside the stream: when the client disconnects, the body is
/// dropped and the requests are aborted.
///
/// `per_prompt` choices share each prompt (the first of them reports its
/// cached tokens); with `usage_prompt_tokens`, a usage chunk comes last.
fn sse<F>(
    sub: Submitted,
    per_prompt: usize,
    envelope: Envelope,
    timeout: Duration,
    usage_prompt_tokens: Option<usize>,
    render: F,
) -> Response
where
    F: FnMut(StreamItem) -> Option<Value> + Send + 'static,
{
    struct St<F> {
        sub: Submitted,
        envelope: Envelope,
        render: F,
        deadline: Instant,
        started: Vec<bool>,
        done: usize,
        completion: usize,
        cached: usize,
        /// Chunks ready to send.
        out: std::collections::VecDeque<String>,
        ended: bool,
    }
    impl<F: FnMut(StreamItem) -> Option<Value>> St<F> {
        fn emit(&mut self, item: StreamItem) {
            if let Some(choice) = (self.render)(item) {
                let v = self.envelope.wrap(json!([choice]), None);
                self.out.push_back(format!("data: {v}\n\n"));
            }
        }
        fn end_with(&mut self, error: Option<ApiError>) {
            if let Some(e) = error {
                self.out.push_back(format!("data: {}\n\n", e.body()));
            }
            self.out.push_back("data: [DONE]\n\n".into());
            self.ended = true;
        }
        fn start(&mut self, i: usize) {
            if !std::mem::replace(&mut self.started[i], true) {
                self.emit(StreamItem::Start(i));
            }
        }
    }
    let choices = sub.choices;
    let st = St {
        sub,
        envelope,
        render,
        deadline: Instant::now() + timeout,
        started: vec![false; choices],
        done: 0,
        completion: 0,
        cached: 0,
        out: Default::default(),
        ended: false,
    };
    let stream = futures::stream::unfold(st, move |mut st| async move {
        loop {
            if let Some(chunk) = st.out.pop_front() {
                return Some((Ok::<_, std::convert::Infallible>(Bytes::from(chunk)), st));
            }
            if st.ended {
                return None;
            }
            if st.done == st.sub.choices {
                if let Some(p) = usage_prompt_tokens {
                    let u = usage(p, st.completion, st.cached);
                    let v = st.envelope.wrap(json!([]), Some(u));
                    st.out.push_back(format!("data: {v}\n\n"));
                }
                st.end_with(None);
                continue;
            }
            match tokio::time::timeout_at(st.deadline, st.sub.rx.next()).await {
                Err(_) => st.end_with(Some(timed_out(timeout))),
                Ok(None) => st.end_with(Some(
                    crate::Error::Internal("the engine dropped the request".into()).into(),
                )),
                Ok(Some((i, SeqEvent::Token(t)))) => {
                    st.start(i);
                    if !t.text.is_empty() || t.logprobs.is_some() {
                        st.emit(StreamItem::Token(i, t));
                    }
                }
                Ok(Some((i, SeqEvent::Finished(s)))) => {
                    st.start(i);
                    st.completion += s.tokens.len();
                    if i % per_prompt == 0 {
                        st.cached += s.cached_tokens;
                    }
                    st.done += 1;
                    st.emit(StreamItem::Finish(i, s));
                }
                Ok(Some((_, SeqEvent::Failed(e)))) => st.end_with(Some(e.into())),
                Ok(Some((_, SeqEvent::Embedding { .. }))) => {}
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("static headers are valid")
}

async fn embeddings(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Response> {
    let req: EmbeddingRequest = parse(&body_bytes(body)?)?;
    st.check_model(&req.model)?;
    let as_base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(f) => {
            return Err(ApiError::bad_request(format!(
                "encoding_format must be 'float' or 'base64', got '{f}'"
            ))
            .param("encoding_format"))
        }
    };
    let e = st.engine()?;
    let inputs = req.input.tokenize(&e.tokenizer)?;
    if inputs.len() > 256 {
        return Err(ApiError::bad_request("at most 256 inputs per request").param("input"));
    }
    let groups = inputs
        .into_iter()
        .map(|prompt| {
            vec![GenerationRequest {
                prompt,
                embed: true,
                ..Default::default()
            }]
        })
        .collect();
    let mut sub = submit(e, groups)?;
    let n = sub.choices;
    let mut data = vec![Value::Null; n];
    let mut tokens = 0;
    let deadline = Instant::now() + st.opts.request_timeout;
    for _ in 0..n {
        match tokio::time::timeout_at(deadline, sub.rx.next())
            .await
            .map_err(|_| timed_out(st.opts.request_timeout))?
        {
            Some((i, SeqEvent::Embedding { vector, tokens: t })) => {
                tokens += t;
                let embedding = if as_base64 {
                    use base64::Engine as _;
                    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(vector)
                };
                data[i] = json!({"object": "embedding", "index": i, "embedding": embedding});
            }
            Some((_, SeqEvent::Failed(err))) => return Err(err.into()),
            _ => return Err(crate::Error::Internal("unexpected engine event".into()).into()),
        }
    }
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": st.model_id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

async fn tokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<axum::Json<Value>> {
    let req: TokenizeRequest = parse(&body_bytes(body)?)?;
    st.check_model(&req.model)?;
    let e = st.engine()?;
    let tokens = match (&req.prompt, &req.messages) {
        (Some(p), None) => e
            .tokenizer
            .encode(p, req.add_special_tokens.unwrap_or(true))?,
        (None, Some(msgs)) => {
            let m: Vec<ChatMessage> = msgs
                .iter()
                .map(|m| Ok(ChatMessage::new(m.role.clone(), m.text()?)))
                .collect::<ApiResult<_>>()?;
            chat_prompt(&e.tokenizer, &e.template, &m)?
        }
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of prompt or messages",
            ))
        }
    };
    Ok(axum::Json(json!({
        "count": tokens.len(),
        "max_model_len": e.model.context,
        "tokens": tokens,
    })))
}

async fn detokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<axum::Json<Value>> {
    let req: DetokenizeRequest = parse(&body_bytes(body)?)?;
    st.check_model(&req.model)?;
    let e = st.engine()?;
    let vocab = e.model.spec.vocab_size;
    let mut ids = Vec::with_capacity(req.tokens.len());
    for &t in &req.tokens {
        if t < 0 || t as usize >= vocab {
            return Err(ApiError::bad_request(format!(
                "token id {t} is outside the vocabulary of {vocab}"
            ))
            .param("tokens"));
        }
        ids.push(t as u32);
    }
    Ok(axum::Json(
        json!({ "prompt": e.tokenizer.decode(&ids, true) }),
    ))
}
