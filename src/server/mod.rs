//! The OpenAI-compatible HTTP server in front of the engine loop.
//!
//! Handlers parse requests on the async runtime, tokenize and render
//! templates on the blocking pool (so a large body never stalls the streams
//! of others), hand requests to the [`EngineHandle`] and relay its events. A
//! request's [`RequestGuard`] lives in the handler's future or the response
//! stream, so a client that goes away aborts its generation and frees its
//! blocks at once. [`conn`] serves connections with time limits.

pub mod conn;
mod feedback;
mod openai;
mod tool_calls;

use crate::chat::ChatMessage;
use crate::engine::{chat_prompt, encode_chat};
use crate::engine_loop::{EngineHandle, RequestGuard};
use crate::request::{FinishReason, GenerationRequest, PromptTokenLogprob, SeqEvent};
use crate::tools::{choice_constraint, ToolFormat};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Extension, Request, State};
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
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tool_calls::ChoiceOutput;

#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Names the model answers to besides its file name.
    pub served_model_name: Option<String>,
    /// Accepted bearer keys (none: no authentication). With several, each
    /// key is a tenant whose prefix-cache entries others cannot hit.
    pub api_keys: Vec<String>,
    /// Allowed CORS origins ("*" for any); none disables CORS.
    pub cors: Vec<String>,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    /// Requests that may be tokenizing or rendering at once (beyond: 429).
    pub max_preparing: usize,
    pub limits: conn::ConnLimits,
    /// Whether `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` are
    /// served (they read files named by the client: off unless asked for).
    pub allow_lora_updates: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            served_model_name: None,
            api_keys: Vec::new(),
            cors: Vec::new(),
            request_timeout: Duration::from_secs(600),
            max_body_bytes: 2 << 20,
            max_preparing: 288,
            limits: conn::ConnLimits::default(),
            allow_lora_updates: false,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        // The body was not read to its end: the connection cannot carry
        // another request (a client reusing it would see it cut).
        if matches!(
            self.status,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
        ) {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
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
    /// SHA-256 of each API key: compared in constant time, whatever the
    /// length of what a client sends.
    key_digests: Vec<[u8; 32]>,
    /// Room on the blocking pool for tokenizing and rendering.
    preparing: Arc<Semaphore>,
    /// Compiles output constraints on the blocking pool; made on first use
    /// (its token trie takes a while for a large vocabulary).
    grammars: Arc<std::sync::Mutex<Option<Arc<crate::constraint::Grammars>>>>,
    /// Learning from feedback (`--sona`), set with the engine.
    pub sona: OnceLock<Arc<crate::sona::SonaEngine>>,
}

/// Lowers the calling thread's scheduling priority, once: preparing
/// requests must not take the cores from the engine, whose steps every
/// running stream waits for.
fn lower_priority() {
    thread_local!(static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if !LOWERED.with(|l| l.replace(true)) {
        // SAFETY: gettid has no preconditions; setpriority on our own
        // thread id only changes this thread's nice value.
        unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
        }
    }
}

/// Which API key a request came with, when there are several (it salts the
/// request's prefix-cache entries).
#[derive(Debug, Clone, Copy)]
struct Tenant(Option<usize>);

/// The longest `user` id accepted (OpenAI documents no limit; ids are
/// kept with every recorded response under `--sona`).
const MAX_USER_BYTES: usize = 256;

fn sha256(b: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(b).into()
}

impl AppState {
    pub fn new(model_id: String, opts: ServerOptions) -> Arc<Self> {
        Arc::new(AppState {
            engine: OnceLock::new(),
            model_id,
            key_digests: opts.api_keys.iter().map(|k| sha256(k.as_bytes())).collect(),
            preparing: Arc::new(Semaphore::new(opts.max_preparing.max(1))),
            grammars: Arc::default(),
            sona: OnceLock::new(),
            opts,
        })
    }

    /// Compiles a request's output constraint, if it has one, on the
    /// blocking pool: a constraint that takes long to compile (within the
    /// library's limits) holds up its own request, not every stream the
    /// engine thread serves.
    async fn compile(&self, req: &mut GenerationRequest) -> ApiResult<()> {
        let Some(c) = req.constraint.clone() else {
            return Ok(());
        };
        let e = self.engine()?;
        let (tok, vocab, cell) = (
            e.tokenizer.clone(),
            e.model.spec.vocab_size,
            self.grammars.clone(),
        );
        let compiled = self
            .prepare(move || {
                let g = {
                    let mut g = cell.lock().unwrap_or_else(|p| p.into_inner());
                    match &*g {
                        Some(g) => g.clone(),
                        None => {
                            let made = Arc::new(crate::constraint::Grammars::new(tok, vocab)?);
                            *g = Some(made.clone());
                            made
                        }
                    }
                };
                Ok(g.compile(&c)?)
            })
            .await?;
        req.compiled = Some(compiled);
        Ok(())
    }

    /// Where a response's choices go for feedback, with `--sona`.
    fn recorder(&self, id: &str, tenant: Tenant) -> Option<Recorder> {
        self.sona.get().map(|s| Recorder {
            sona: s.clone(),
            id: id.to_string(),
            tenant: tenant.0,
        })
    }

    fn sona(&self) -> ApiResult<&Arc<crate::sona::SonaEngine>> {
        self.sona.get().ok_or_else(|| {
            ApiError::with(
                StatusCode::NOT_FOUND,
                "not_found_error",
                "learning from feedback is off: start the server with --sona".to_string(),
            )
        })
    }

    fn engine(&self) -> ApiResult<&EngineHandle> {
        let e = self.engine.get().ok_or_else(|| {
            ApiError::with(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "the model is still loading",
            )
        })?;
        if !e.is_alive() {
            return Err(ApiError::with(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "the engine has stopped; the server cannot serve requests",
            ));
        }
        Ok(e)
    }

    /// The index of the key `given` matches. Every key is compared, each in
    /// constant time, so timing tells nothing about how close a guess was.
    fn key_index(&self, given: &str) -> Option<usize> {
        let g = sha256(given.as_bytes());
        let mut found = None;
        for (i, k) in self.key_digests.iter().enumerate() {
            let diff = k.iter().zip(&g).fold(0u8, |d, (a, b)| d | (a ^ b));
            if diff == 0 {
                found = Some(i);
            }
        }
        found
    }

    /// The cache salt of a request: the client's own, and with several API
    /// keys always prefixed by the key's index, so that a tenant cannot
    /// choose a salt that reaches another tenant's entries.
    fn cache_salt(&self, tenant: Tenant, given: Option<String>) -> Option<String> {
        match tenant.0 {
            None => given,
            Some(k) => Some(format!("key{k}:{}", given.unwrap_or_default())),
        }
    }

    /// The `user` a request's learned adapters are keyed by: at most
    /// [`MAX_USER_BYTES`], and with several API keys prefixed by the key's
    /// index, so that one tenant's users never share another's adapters.
    fn user_key(&self, tenant: Tenant, given: Option<String>) -> ApiResult<Option<String>> {
        let Some(u) = given else { return Ok(None) };
        if u.len() > MAX_USER_BYTES {
            return Err(ApiError::bad_request(format!(
                "user is {} bytes long; at most {MAX_USER_BYTES} are accepted",
                u.len()
            ))
            .param("user"));
        }
        Ok(Some(match tenant.0 {
            None => u,
            Some(k) => format!("key{k}:{u}"),
        }))
    }

    /// Runs CPU-heavy preparation (tokenizing, rendering templates) on the
    /// blocking pool, so that the I/O threads keep streaming tokens to
    /// others meanwhile. At most `max_preparing` run or wait at once.
    async fn prepare<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> ApiResult<T> + Send + 'static,
    ) -> ApiResult<T> {
        let permit = self.preparing.clone().try_acquire_owned().map_err(|_| {
            ApiError::from(crate::Error::Overloaded(format!(
                "{} requests are being tokenized",
                self.opts.max_preparing
            )))
        })?;
        // A job whose client left before it started is skipped (blocking
        // work cannot be cancelled once it runs).
        struct Gone(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Gone {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let gone = Gone(Arc::default());
        let flag = gone.0.clone();
        let job = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            if flag.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(ApiError::with(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout_error",
                    "the client left",
                ));
            }
            lower_priority();
            f()
        });
        let timeout = self.opts.request_timeout;
        let r = tokio::time::timeout(timeout, job)
            .await
            .map_err(|_| timed_out(timeout))?
            .map_err(|e| {
                ApiError::from(crate::Error::Internal(format!(
                    "preparing the request failed: {e}"
                )))
            })?;
        drop(gone);
        r
    }

    /// Accepts the model's id, the served name, a named LoRA adapter, or no
    /// model at all; returns the adapter a request chose.
    fn check_model(&self, m: &Option<String>) -> ApiResult<Option<String>> {
        let Some(m) = m else { return Ok(None) };
        if *m == self.model_id || Some(m) == self.opts.served_model_name.as_ref() {
            return Ok(None);
        }
        let adapters = self.engine()?.adapters();
        if adapters.contains(m) {
            return Ok(Some(m.clone()));
        }
        let also = if adapters.is_empty() {
            String::new()
        } else {
            format!(" and the adapters {}", adapters.join(", "))
        };
        Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: Some("model_not_found"),
            ..ApiError::bad_request(format!(
                "the model '{m}' does not exist; this server serves '{}'{also}",
                self.model_id
            ))
            .param("model")
        })
    }

    /// The name responses give for the model a request used.
    fn response_model<'a>(&'a self, adapter: &'a Option<String>) -> &'a str {
        adapter.as_deref().unwrap_or(&self.model_id)
    }
}

impl AppState {
    /// The adapters of a request: the one `model` chose (weight 1) and the
    /// `adapters` weights, in name order so that equal requests sum in the
    /// same order (and share cached prefixes).
    fn adapter_mix(
        &self,
        chosen: &Option<String>,
        weights: &Option<std::collections::HashMap<String, f32>>,
    ) -> ApiResult<Vec<(String, f32)>> {
        let mut mix: std::collections::BTreeMap<String, f32> =
            chosen.iter().map(|a| (a.clone(), 1.0)).collect();
        if let Some(w) = weights.as_ref().filter(|w| !w.is_empty()) {
            let known = self.engine()?.adapters();
            for (name, &weight) in w {
                if !known.contains(name) {
                    return Err(ApiError {
                        status: StatusCode::NOT_FOUND,
                        code: Some("model_not_found"),
                        ..ApiError::bad_request(format!(
                            "no LoRA adapter named '{name}' (loaded: {})",
                            known.join(", ")
                        ))
                        .param("adapters")
                    });
                }
                if !weight.is_finite() || weight.abs() > 1e3 {
                    return Err(ApiError::bad_request(format!(
                        "adapter weight {weight} of '{name}' must be a finite number within ±1000"
                    ))
                    .param("adapters"));
                }
                mix.insert(name.clone(), weight);
            }
        }
        Ok(mix.into_iter().collect())
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
        .route("/v1/load_lora_adapter", post(load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(unload_lora_adapter))
        .route("/v1/feedback", post(feedback::feedback))
        .route("/v1/sona/consolidate", post(feedback::consolidate))
        .route("/v1/sona/stats", get(feedback::stats))
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

async fn auth(State(st): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let mut tenant = Tenant(None);
    if !st.key_digests.is_empty() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let index = given.and_then(|g| st.key_index(g));
        if st.key_digests.len() > 1 {
            tenant = Tenant(index);
        }
        if index.is_none() {
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
    req.extensions_mut().insert(tenant);
    next.run(req).await
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    match st.engine() {
        Ok(_) => (StatusCode::OK, "ok").into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> ApiResult<Response> {
    let mut body = st.engine()?.metrics.render();
    if let Some(s) = st.sona.get() {
        body.push_str(&s.stats().render_metrics());
    }
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

#[derive(serde::Deserialize)]
struct LoadLora {
    lora_name: String,
    lora_path: Option<String>,
    /// Weight the adapter is applied with (default 1).
    scale: Option<f32>,
}

impl AppState {
    /// Runtime adapter changes are refused unless the server allows them
    /// (as vLLM gates them): they read any file the client names.
    fn lora_updates(&self) -> ApiResult<()> {
        if self.opts.allow_lora_updates {
            Ok(())
        } else {
            Err(ApiError::with(
                StatusCode::FORBIDDEN,
                "permission_error",
                "loading and unloading LoRA adapters at run time is off (serve --allow-lora-updates)",
            ))
        }
    }

    /// A new adapter's name: one that responses and metrics can carry, and
    /// that does not hide the model's own names.
    fn check_adapter_name(&self, name: &str) -> ApiResult<()> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || "-_.:/@+".contains(c);
        if name.is_empty() || name.len() > 128 || !name.chars().all(ok_char) {
            return Err(ApiError::bad_request(
                "lora_name must be 1 to 128 characters of letters, digits and - _ . : / @ +",
            )
            .param("lora_name"));
        }
        if name == self.model_id || Some(name) == self.opts.served_model_name.as_deref() {
            return Err(
                ApiError::bad_request("lora_name is the base model's name").param("lora_name")
            );
        }
        Ok(())
    }
}

async fn load_lora_adapter(
    State(st): State<Arc<AppState>>,
    body: BodyResult,
) -> ApiResult<Response> {
    st.lora_updates()?;
    let req: LoadLora = parse(&body_bytes(body)?)?;
    st.check_adapter_name(&req.lora_name)?;
    let path = req
        .lora_path
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::bad_request("lora_path is required").param("lora_path"))?;
    let e = st.engine()?.clone();
    let name = req.lora_name.clone();
    let scale = req.scale.unwrap_or(1.0);
    let r = tokio::task::spawn_blocking(move || {
        e.load_adapter(&name, std::path::Path::new(&path), scale)
    })
    .await
    .map_err(|e| ApiError::from(crate::Error::Internal(format!("loading the adapter: {e}"))))?;
    match r {
        Ok(()) => Ok(format!(
            "Success: LoRA adapter '{}' added successfully.",
            req.lora_name
        )
        .into_response()),
        // The client named the file: whatever is wrong with it is theirs.
        Err(
            e @ (crate::Error::Io { .. }
            | crate::Error::Adapter(_)
            | crate::Error::Unsupported(_)
            | crate::Error::Gguf(_)
            | crate::Error::Safetensors(_)),
        ) => Err(ApiError::bad_request(e.to_string()).param("lora_path")),
        Err(e) => Err(e.into()),
    }
}

async fn unload_lora_adapter(
    State(st): State<Arc<AppState>>,
    body: BodyResult,
) -> ApiResult<Response> {
    st.lora_updates()?;
    let req: LoadLora = parse(&body_bytes(body)?)?;
    let e = st.engine()?.clone();
    let name = req.lora_name.clone();
    tokio::task::spawn_blocking(move || e.unload_adapter(&name))
        .await
        .map_err(|e| {
            ApiError::from(crate::Error::Internal(format!(
                "unloading the adapter: {e}"
            )))
        })??;
    Ok(format!(
        "Success: LoRA adapter '{}' removed successfully.",
        req.lora_name
    )
    .into_response())
}

async fn models(State(st): State<Arc<AppState>>) -> ApiResult<axum::Json<Value>> {
    let e = st.engine()?;
    let mut data = vec![json!({
        "id": st.model_id,
        "object": "model",
        "created": now_secs(),
        "owned_by": "ruvllm",
        "root": st.model_id,
        "parent": null,
        "max_model_len": e.model.context,
    })];
    data.extend(e.adapters().iter().map(|a| {
        json!({
            "id": a,
            "object": "model",
            "created": now_secs(),
            "owned_by": "ruvllm",
            "root": a,
            "parent": st.model_id,
            "max_model_len": e.model.context,
        })
    }));
    Ok(axum::Json(json!({"object": "list", "data": data})))
}

fn body_bytes(b: Result<Bytes, axum::extract::rejection::BytesRejection>) -> ApiResult<Bytes> {
    b.map_err(|e| {
        // A body that did not arrive in time (see `conn`) is 408, not 400.
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = source {
            if err.is::<conn::BodyTimeout>() {
                return ApiError::with(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout_error",
                    "the request body did not arrive in time",
                );
            }
            source = err.source();
        }
        ApiError::with(e.status(), "invalid_request_error", e.body_text())
    })
}

/// Where a response's choices are kept for feedback: SONA's store, under
/// the response's id.
#[derive(Clone)]
struct Recorder {
    sona: Arc<crate::sona::SonaEngine>,
    id: String,
    tenant: Option<usize>,
}

/// Events of all choices of one request, tagged with their choice index.
struct Submitted {
    rx: UnboundedReceiver<(usize, SeqEvent)>,
    _guards: Vec<RequestGuard>,
    choices: usize,
}

/// Submits every prompt's `n` siblings; choice `p * n + i` is sibling `i`
/// of prompt `p`.
fn submit(
    engine: &EngineHandle,
    groups: Vec<Vec<GenerationRequest>>,
    record: Option<Recorder>,
) -> ApiResult<Submitted> {
    let (tx, rx) = unbounded();
    let mut index = 0;
    let groups = groups
        .into_iter()
        .map(|reqs| {
            // Siblings (`n`) share their prompt: kept once.
            let prompt: Option<Arc<[u32]>> = record
                .as_ref()
                .and_then(|_| reqs.first())
                .map(|r| Arc::from(&r.prompt[..]));
            let sinks = reqs
                .iter()
                .map(|req| {
                    let (tx, i) = (tx.clone(), index);
                    index += 1;
                    let mut keep = record
                        .clone()
                        .zip(prompt.clone())
                        .map(|(r, p)| (r, p, req.user.clone()));
                    Box::new(move |ev: SeqEvent| {
                        // With --sona, each finished choice is kept for
                        // feedback to refer to by the response's id.
                        if let SeqEvent::Finished(sum) = &ev {
                            if let Some((r, prompt, user)) = keep.take() {
                                r.sona.record(
                                    &r.id,
                                    i,
                                    crate::sona::Recorded {
                                        prompt,
                                        output: sum.tokens.clone(),
                                        user,
                                        tenant: r.tenant,
                                    },
                                );
                            }
                        }
                        tx.unbounded_send((i, ev)).is_ok()
                    }) as crate::request::Sink
                })
                .collect();
            (reqs, sinks)
        })
        .collect();
    // All or nothing: one bad prompt of a batch queues none of them.
    let guards = engine.submit_groups(groups)?;
    Ok(Submitted {
        rx,
        _guards: guards,
        choices: index,
    })
}

/// Per-choice results of a non-streamed request.
struct Collected {
    text: Vec<String>,
    events: Vec<Vec<crate::request::TokenEvent>>,
    finish: Vec<FinishReason>,
    tokens: Vec<usize>,
    cached: Vec<usize>,
    prompt_lps: Vec<Option<Vec<PromptTokenLogprob>>>,
}

/// Waits for every choice to finish. When the request's time runs out,
/// the unfinished choices end as they are, with [`FinishReason::Cancelled`]
/// ("abort"), and dropping `s` stops their generation.
async fn collect(mut s: Submitted, timeout: Duration) -> ApiResult<Collected> {
    let n = s.choices;
    let mut c = Collected {
        text: vec![String::new(); n],
        events: vec![Vec::new(); n],
        finish: vec![FinishReason::Cancelled; n],
        tokens: vec![0; n],
        cached: vec![0; n],
        prompt_lps: vec![None; n],
    };
    let mut finished = vec![false; n];
    let deadline = Instant::now() + timeout;
    let mut done = 0;
    while done < n {
        let Ok(ev) = tokio::time::timeout_at(deadline, s.rx.next()).await else {
            for i in (0..n).filter(|&i| !finished[i]) {
                c.tokens[i] = c.events[i].len();
            }
            break;
        };
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
            SeqEvent::PromptLogprobs(l) => c.prompt_lps[i] = Some(l),
            SeqEvent::Finished(sum) => {
                c.finish[i] = sum.finish;
                c.tokens[i] = sum.tokens.len();
                c.cached[i] = sum.cached_tokens;
                finished[i] = true;
                done += 1;
            }
            SeqEvent::Failed(e) => return Err(e.into()),
            SeqEvent::Embedding { .. } => {
                finished[i] = true;
                done += 1;
            }
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

type BodyResult = Result<Bytes, axum::extract::rejection::BytesRejection>;

async fn completions(
    State(st): State<Arc<AppState>>,
    Extension(tenant): Extension<Tenant>,
    body: BodyResult,
) -> ApiResult<Response> {
    let mut req: CompletionRequest = parse(&body_bytes(body)?)?;
    let adapter = st.check_model(&req.common.model)?;
    let mix = st.adapter_mix(&adapter, &req.common.adapters)?;
    let e = st.engine()?.clone();
    let logprobs = top_count(req.logprobs, "logprobs")?;
    let prompt_lp = top_count(req.common.prompt_logprobs, "prompt_logprobs")?;
    // Legacy echo + logprobs reports the prompt's tokens in `logprobs` too.
    let echo_lp = req.echo && logprobs.is_some();
    let wanted_prompt_lp = prompt_lp.or(if echo_lp { logprobs } else { None });
    req.common.cache_salt = st.cache_salt(tenant, req.common.cache_salt.take());
    req.common.user = st.user_key(tenant, req.common.user.take())?;
    let (echo, input) = (req.echo, req.prompt.clone());
    let context = e.model.context;
    let tok = e.tokenizer.clone();
    let (prompts, echo_text) = st
        .prepare(move || {
            let prompts = input.tokenize(&tok, context)?;
            let echo_text: Vec<String> = prompts
                .iter()
                .map(|p| {
                    if echo {
                        tok.decode(p, false)
                    } else {
                        String::new()
                    }
                })
                .collect();
            Ok((prompts, echo_text))
        })
        .await?;
    let mut plans = Vec::new();
    for p in prompts {
        let mut p = plan(
            &req.common,
            p,
            logprobs,
            wanted_prompt_lp,
            Some(16),
            e.model.context,
        )?;
        p.base.adapters = mix.clone();
        plans.push(p);
    }
    check_choices(&plans)?;
    // Every prompt has the same constraint: compiled once, copied.
    st.compile(&mut plans[0].base).await?;
    let compiled = plans[0].base.compiled.clone();
    for p in &mut plans[1..] {
        p.base.compiled = compiled.clone();
    }
    let n = plans[0].n;
    let prompt_ids: Vec<Vec<u32>> = plans.iter().map(|p| p.base.prompt.clone()).collect();
    let prompt_tokens: usize = prompt_ids.iter().map(Vec::len).sum();
    if let Some(k) = wanted_prompt_lp {
        check_prompt_logprobs_size(prompt_tokens * n, k)?;
    }
    let envelope = Envelope::new("cmpl", "text_completion", st.response_model(&adapter));
    let sub = submit(
        &e,
        plans.iter().map(Plan::requests).collect(),
        st.recorder(&envelope.id, tenant),
    )?;
    // The prompt's part of a choice: echoed text, legacy logprobs entries
    // and vLLM's prompt_logprobs.
    let prompt_part = {
        let tok = e.tokenizer.clone();
        move |i: usize, lps: Option<&[PromptTokenLogprob]>, lp: &mut CompletionLogprobs| {
            let p = i / n;
            if echo_lp {
                lp.push_prompt(&tok, &prompt_ids[p], lps.unwrap_or(&[]));
            }
            let plp = prompt_lp.and(lps).map(|l| prompt_logprobs_json(&tok, l));
            (echo_text[p].clone(), plp)
        }
    };
    if req.common.stream {
        let usage_wanted = req.common.stream_options.is_some_and(|o| o.include_usage);
        let tok = e.tokenizer.clone();
        let mut offsets = vec![0usize; sub.choices];
        let usage = usage_wanted.then_some(prompt_tokens);
        // The first choice of each prompt hears its log-probabilities first
        // (its siblings wait for its prompt); they share them.
        let mut lead_lps: Vec<Option<Vec<PromptTokenLogprob>>> = vec![None; sub.choices / n];
        let stream = sse(
            sub,
            n,
            envelope,
            st.opts.request_timeout,
            usage,
            move |ev| match ev {
                StreamItem::Start(i, mut lps) => {
                    if lps.is_some() {
                        lead_lps[i / n] = lps.clone();
                    } else {
                        lps = lead_lps[i / n].clone();
                    }
                    let mut lp = CompletionLogprobs::default();
                    let (text, plp) = prompt_part(i, lps.as_deref(), &mut lp);
                    offsets[i] += text.len();
                    let mut c =
                        json!({"index": i, "text": text, "logprobs": null, "finish_reason": null});
                    if echo_lp {
                        c["logprobs"] = lp.to_json();
                    }
                    if let Some(p) = plp {
                        c["prompt_logprobs"] = p;
                    }
                    let any = !text.is_empty() || echo_lp || c.get("prompt_logprobs").is_some();
                    any.then_some(c).into_iter().collect()
                }
                StreamItem::Token(_, t) if t.text.is_empty() && t.logprobs.is_none() => vec![],
                StreamItem::Token(i, t) => {
                    let lp = t.logprobs.is_some().then(|| {
                        let mut l = CompletionLogprobs::default();
                        l.push(&tok, &t, offsets[i]);
                        l.to_json()
                    });
                    offsets[i] += t.text.len();
                    vec![json!({"index": i, "text": t.text, "logprobs": lp, "finish_reason": null})]
                }
                StreamItem::Finish(i, f) => vec![json!({
                    "index": i, "text": "", "logprobs": null, "finish_reason": finish_reason(f)
                })],
            },
        );
        return Ok(stream);
    }
    let c = collect(sub, st.opts.request_timeout).await?;
    let (mut completion, mut cached) = (0, 0);
    let mut choices = Vec::new();
    for i in 0..c.text.len() {
        completion += c.tokens[i];
        if i % n == 0 {
            cached += c.cached[i];
        }
        let mut lp = CompletionLogprobs::default();
        // Siblings share the first choice's prompt log-probabilities.
        let (prefix, plp) = prompt_part(i, c.prompt_lps[i / n * n].as_deref(), &mut lp);
        let mut off = prefix.len();
        for t in &c.events[i] {
            lp.push(&e.tokenizer, t, off);
            off += t.text.len();
        }
        let mut choice = json!({
            "index": i,
            "text": format!("{prefix}{}", c.text[i]),
            "logprobs": logprobs.map(|_| lp.to_json()),
            "finish_reason": finish_reason(c.finish[i]),
        });
        if let Some(p) = plp {
            choice["prompt_logprobs"] = p;
        }
        choices.push(choice);
    }
    let usage = usage(prompt_tokens, completion, cached);
    Ok(axum::Json(envelope.wrap(json!(choices), Some(usage))).into_response())
}

/// Prompt log-probability entries one response may carry (each is a token
/// id, a log-probability, a rank and a token's text in JSON).
const MAX_PROMPT_LOGPROB_ENTRIES: usize = 1 << 20;

/// Refuses prompt log-probabilities whose response would be huge: one entry
/// per prompt token and alternative, for every choice that repeats them.
fn check_prompt_logprobs_size(tokens: usize, k: usize) -> ApiResult<()> {
    let entries = tokens.saturating_mul(k + 1);
    if entries > MAX_PROMPT_LOGPROB_ENTRIES {
        return Err(ApiError::bad_request(format!(
            "prompt_logprobs would return {entries} entries (prompt tokens × choices × (alternatives + 1)); at most {MAX_PROMPT_LOGPROB_ENTRIES}"
        ))
        .param("prompt_logprobs"));
    }
    Ok(())
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

/// Checks roles and flattens content into the template's messages.
fn chat_messages(msgs: &[Message]) -> ApiResult<Vec<ChatMessage>> {
    let mut messages = Vec::new();
    for m in msgs {
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
        let mut cm = ChatMessage::new(role, m.text()?);
        cm.tool_calls = m.template_tool_calls()?;
        if role == "tool" {
            cm.tool_call_id = m.tool_call_id.clone();
            cm.name = m.name.clone();
        }
        messages.push(cm);
    }
    Ok(messages)
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    Extension(tenant): Extension<Tenant>,
    body: BodyResult,
) -> ApiResult<Response> {
    let mut req: ChatRequest = parse(&body_bytes(body)?)?;
    let tools = req.tool_request()?;
    let adapter = st.check_model(&req.common.model)?;
    let mix = st.adapter_mix(&adapter, &req.common.adapters)?;
    let e = st.engine()?.clone();
    if req.messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty").param("messages"));
    }
    let messages = chat_messages(&req.messages)?;
    let logprobs = match (req.logprobs, top_count(req.top_logprobs, "top_logprobs")?) {
        (false, Some(_)) => {
            return Err(
                ApiError::bad_request("top_logprobs needs logprobs: true").param("top_logprobs")
            )
        }
        (false, None) => None,
        (true, k) => Some(k.unwrap_or(0)),
    };
    let prompt_lp = top_count(req.common.prompt_logprobs, "prompt_logprobs")?;
    req.common.cache_salt = st.cache_salt(tenant, req.common.cache_salt.take());
    req.common.user = st.user_key(tenant, req.common.user.take())?;
    let (tok, template) = (e.tokenizer.clone(), e.template.clone());
    let format = ToolFormat::of_template(&template);
    let context = e.model.context;
    let offered = tools.offered.clone();
    let prompt = st
        .prepare(move || {
            let text = crate::tools::render_prompt(&template, &messages, &offered)?;
            check_text_fits(&tok, &text, context)?;
            Ok(encode_chat(&tok, &text)?)
        })
        .await?;
    let mut p = plan(
        &req.common,
        prompt,
        logprobs,
        prompt_lp,
        None,
        e.model.context,
    )?;
    if let Some(c) = choice_constraint(&tools.choice, &tools.offered, tools.parallel) {
        if p.base.constraint.is_some() {
            return Err(ApiError::bad_request(
                "tool_choice required or a named function constrains the output itself; it cannot be combined with response_format or guided_*",
            )
            .param("tool_choice"));
        }
        p.base.constraint = Some(c);
    }
    p.base.adapters = mix;
    if let Some(k) = prompt_lp {
        check_prompt_logprobs_size(p.base.prompt.len() * p.n, k)?;
    }
    let prompt_tokens = p.base.prompt.len();
    st.compile(&mut p.base).await?;
    let id = request_id("chatcmpl");
    let sub = submit(&e, vec![p.requests()], st.recorder(&id, tenant))?;
    let mut outputs: Vec<ChoiceOutput> = (0..sub.choices)
        .map(|_| ChoiceOutput::new(&tools, format))
        .collect();
    if req.common.stream {
        let usage_wanted = req.common.stream_options.is_some_and(|o| o.include_usage);
        let tok = e.tokenizer.clone();
        let envelope = Envelope::with_id(id, "chat.completion.chunk", st.response_model(&adapter));
        let usage = usage_wanted.then_some(prompt_tokens);
        let n = sub.choices;
        let stream = sse(
            sub,
            n,
            envelope,
            st.opts.request_timeout,
            usage,
            move |ev| match ev {
                StreamItem::Start(i, lps) => {
                    let mut c = json!({
                        "index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null
                    });
                    if let Some(l) = lps.filter(|_| prompt_lp.is_some()) {
                        c["prompt_logprobs"] = prompt_logprobs_json(&tok, &l);
                    }
                    vec![c]
                }
                StreamItem::Token(i, t) => {
                    let lp = chat_logprob(&tok, &t).map(|l| json!({"content": [l]}));
                    let delta = outputs[i].token_delta(&tok, &t);
                    if delta.is_none() && lp.is_none() {
                        return vec![];
                    }
                    let delta = delta.unwrap_or_else(|| json!({"content": ""}));
                    vec![json!({"index": i, "delta": delta, "logprobs": lp, "finish_reason": null})]
                }
                StreamItem::Finish(i, f) => {
                    let (rest, reason) = outputs[i].finish_delta(f);
                    let mut chunks: Vec<Value> = rest
                        .map(|d| json!({"index": i, "delta": d, "logprobs": null, "finish_reason": null}))
                        .into_iter()
                        .collect();
                    chunks.push(json!({
                        "index": i, "delta": {}, "logprobs": null, "finish_reason": reason
                    }));
                    chunks
                }
            },
        );
        return Ok(stream);
    }
    let c = collect(sub, st.opts.request_timeout).await?;
    let mut choices = Vec::new();
    for (i, out) in outputs.iter_mut().enumerate() {
        let lp = logprobs.map(|_| {
            let content: Vec<Value> = c.events[i]
                .iter()
                .filter_map(|t| chat_logprob(&e.tokenizer, t))
                .collect();
            json!({ "content": content })
        });
        let (message, finish) = out.message(&e.tokenizer, &c.events[i], c.finish[i]);
        choices.push(json!({
            "index": i,
            "message": message,
            "logprobs": lp,
            "finish_reason": finish,
        }));
    }
    let completion = c.tokens.iter().sum();
    let usage = usage(prompt_tokens, completion, c.cached[0]);
    let envelope = Envelope::with_id(id, "chat.completion", st.response_model(&adapter));
    let mut v = envelope.wrap(json!(choices), Some(usage));
    if let Some(l) = c.prompt_lps[0].as_deref().filter(|_| prompt_lp.is_some()) {
        v["prompt_logprobs"] = prompt_logprobs_json(&e.tokenizer, l);
    }
    Ok(axum::Json(v).into_response())
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
        Self::with_id(request_id(id_prefix), object, model)
    }

    fn with_id(id: String, object: &'static str, model: &str) -> Self {
        Envelope {
            id,
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
    /// Before the first token of choice i, with the prompt's
    /// log-probabilities when they were asked for.
    Start(usize, Option<Vec<PromptTokenLogprob>>),
    Token(usize, crate::request::TokenEvent),
    Finish(usize, FinishReason),
}

/// A server-sent-event response relaying the engine's events. The guards
/// travel inside the stream: when the client disconnects, the body is
/// dropped and the requests are aborted. When the request's time runs out,
/// unfinished choices end with finish_reason "abort".
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
    F: FnMut(StreamItem) -> Vec<Value> + Send + 'static,
{
    struct St<F> {
        sub: Submitted,
        envelope: Envelope,
        render: F,
        deadline: Instant,
        started: Vec<bool>,
        finished: Vec<bool>,
        generated: Vec<usize>,
        done: usize,
        completion: usize,
        cached: usize,
        /// Chunks ready to send.
        out: std::collections::VecDeque<String>,
        ended: bool,
    }
    impl<F: FnMut(StreamItem) -> Vec<Value>> St<F> {
        fn emit(&mut self, item: StreamItem) {
            for choice in (self.render)(item) {
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
        fn start(&mut self, i: usize, lps: Option<Vec<PromptTokenLogprob>>) {
            if !std::mem::replace(&mut self.started[i], true) {
                self.emit(StreamItem::Start(i, lps));
            }
        }
        fn finish(&mut self, i: usize, f: FinishReason, tokens: usize, cached: usize) {
            self.start(i, None);
            self.finished[i] = true;
            self.completion += tokens;
            self.done += 1;
            self.cached += cached;
            self.emit(StreamItem::Finish(i, f));
        }
    }
    let choices = sub.choices;
    let st = St {
        sub,
        envelope,
        render,
        deadline: Instant::now() + timeout,
        started: vec![false; choices],
        finished: vec![false; choices],
        generated: vec![0; choices],
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
                Err(_) => {
                    // Out of time: what was generated stands, the rest is
                    // aborted when the guards go with the stream.
                    for i in 0..st.sub.choices {
                        if !st.finished[i] {
                            let tokens = st.generated[i];
                            st.finish(i, FinishReason::Cancelled, tokens, 0);
                        }
                    }
                }
                Ok(None) => st.end_with(Some(
                    crate::Error::Internal("the engine dropped the request".into()).into(),
                )),
                Ok(Some((i, SeqEvent::PromptLogprobs(l)))) => st.start(i, Some(l)),
                Ok(Some((i, SeqEvent::Token(t)))) => {
                    st.start(i, None);
                    st.generated[i] += 1;
                    st.emit(StreamItem::Token(i, t));
                }
                Ok(Some((i, SeqEvent::Finished(s)))) => {
                    let cached = if i % per_prompt == 0 {
                        s.cached_tokens
                    } else {
                        0
                    };
                    st.finish(i, s.finish, s.tokens.len(), cached);
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
    Extension(tenant): Extension<Tenant>,
    body: BodyResult,
) -> ApiResult<Response> {
    let req: EmbeddingRequest = parse(&body_bytes(body)?)?;
    let adapter = st.check_model(&req.model)?;
    let mix = st.adapter_mix(&adapter, &None)?;
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
    let e = st.engine()?.clone();
    let tok = e.tokenizer.clone();
    let input = req.input;
    let context = e.model.context;
    let inputs = st.prepare(move || input.tokenize(&tok, context)).await?;
    if inputs.len() > 256 {
        return Err(ApiError::bad_request("at most 256 inputs per request").param("input"));
    }
    // Embeddings never read the prefix cache, but stay salted like the rest.
    let salt = st.cache_salt(tenant, None);
    let groups = inputs
        .into_iter()
        .map(|prompt| {
            vec![GenerationRequest {
                prompt,
                embed: true,
                cache_salt: salt.clone(),
                adapters: mix.clone(),
                ..Default::default()
            }]
        })
        .collect();
    let mut sub = submit(&e, groups, None)?;
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
        "model": st.response_model(&adapter),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

async fn tokenize(
    State(st): State<Arc<AppState>>,
    body: BodyResult,
) -> ApiResult<axum::Json<Value>> {
    let req: TokenizeRequest = parse(&body_bytes(body)?)?;
    st.check_model(&req.model)?;
    let e = st.engine()?.clone();
    let (tok, template) = (e.tokenizer.clone(), e.template.clone());
    let tokens = st
        .prepare(move || match (&req.prompt, &req.messages) {
            (Some(p), None) => Ok(tok.encode(p, req.add_special_tokens.unwrap_or(true))?),
            (None, Some(msgs)) => Ok(chat_prompt(&tok, &template, &chat_messages(msgs)?)?),
            _ => Err(ApiError::bad_request(
                "give exactly one of prompt or messages",
            )),
        })
        .await?;
    Ok(axum::Json(json!({
        "count": tokens.len(),
        "max_model_len": e.model.context,
        "tokens": tokens,
    })))
}

async fn detokenize(
    State(st): State<Arc<AppState>>,
    body: BodyResult,
) -> ApiResult<axum::Json<Value>> {
    let req: DetokenizeRequest = parse(&body_bytes(body)?)?;
    st.check_model(&req.model)?;
    let e = st.engine()?.clone();
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
    let tok = e.tokenizer.clone();
    let prompt = st.prepare(move || Ok(tok.decode(&ids, true))).await?;
    Ok(axum::Json(json!({ "prompt": prompt })))
}
