//! SONA's endpoints (`--sona`): ratings of earlier responses, the
//! background loop on demand, and the learning figures.

use super::openai::parse;
use super::{body_bytes, ApiResult, AppState, BodyResult, Tenant};
use crate::server::ApiError;
use crate::sona::Trajectory;
use axum::extract::{Extension, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Feedback {
    id: String,
    #[serde(default)]
    choice: usize,
    rating: f64,
    preferred: Option<String>,
}

/// `POST /v1/feedback {"id", "choice", "rating", "preferred"}`: rates a
/// kept response; the instant loop trains on it at once.
pub(super) async fn feedback(
    State(st): State<Arc<AppState>>,
    Extension(tenant): Extension<Tenant>,
    body: BodyResult,
) -> ApiResult<Json<Value>> {
    let sona = st.sona()?.clone();
    let e = st.engine()?.clone();
    let f: Feedback = parse(&body_bytes(body)?)?;
    if !(f.rating.is_finite() && (-1.0..=1.0).contains(&f.rating)) {
        return Err(ApiError::bad_request(format!(
            "rating must be a number in [-1, 1], not {}",
            f.rating
        ))
        .param("rating"));
    }
    // Another API key's responses are as unknown as expired ones: a
    // tenant can neither rate them nor learn that they exist.
    let rec = sona
        .response(&f.id, f.choice)
        .filter(|r| r.tenant == tenant.0);
    let rec = rec.ok_or_else(|| {
        ApiError::with(
            axum::http::StatusCode::NOT_FOUND,
            "not_found_error",
            format!(
                "no response '{}' with choice {} is kept (unknown, or older than the last {} responses)",
                f.id, f.choice, sona.config.max_responses
            ),
        )
    })?;
    let preferred = match f.preferred {
        None => None,
        Some(text) => {
            let tok = e.tokenizer.clone();
            let last = rec.output.last().copied();
            let ids = st
                .prepare(move || {
                    let mut ids = tok.encode(&text, false)?;
                    if ids.is_empty() {
                        return Err(ApiError::bad_request("preferred is empty").param("preferred"));
                    }
                    // The answer ends as the model's own did, when that
                    // was a stop token (end of turn, EOS).
                    ids.extend(last.filter(|t| tok.special.stop.contains(t)));
                    Ok(ids)
                })
                .await?;
            let room = e.model.context.saturating_sub(rec.prompt.len());
            if ids.len() > room {
                return Err(ApiError::bad_request(format!(
                    "preferred takes {} tokens; the context leaves {room} after the prompt",
                    ids.len()
                ))
                .param("preferred"));
            }
            Some(ids)
        }
    };
    sona.end_trajectory(Trajectory {
        prompt: rec.prompt.to_vec(),
        output: rec.output,
        rating: f.rating as f32,
        preferred,
        user: rec.user,
    })?;
    Ok(Json(json!({"accepted": true})))
}

/// `POST /v1/sona/consolidate`: runs the background loop now; answers with
/// its figures when it is done.
pub(super) async fn consolidate(State(st): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    let sona = st.sona()?.clone();
    let report = tokio::task::spawn_blocking(move || sona.background_consolidate())
        .await
        .map_err(|e| crate::Error::Internal(format!("the consolidation task failed: {e}")))??;
    Ok(Json(serde_json::to_value(report).expect("serializable")))
}

/// `GET /v1/sona/stats`.
pub(super) async fn stats(State(st): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    Ok(Json(
        serde_json::to_value(st.sona()?.stats()).expect("serializable"),
    ))
}
