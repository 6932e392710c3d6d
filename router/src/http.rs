//! The router's HTTP listener: the OpenAI-compatible API under `/v1`,
//! Triton's generate extension under `/v2/models`, and `/health`, `/ready`,
//! `/metrics`, `/v2/health/*` (open even with API keys).

use crate::RouterState;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;

/// Largest request body the API reads.
const MAX_BODY_BYTES: usize = 8 << 20;

pub fn app(state: Arc<RouterState>) -> Router {
    let (generate, v2_health) = crate::triton_http::routes(state.clone());
    Router::new()
        .merge(crate::openai::routes(state.clone()))
        .merge(generate)
        .merge(v2_health)
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { crate::openai::error::ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// `expertmesh_http_requests_total{route,status}`, by matched route (not
/// raw path, so unknown paths do not grow the label set).
async fn count(
    State(st): State<Arc<RouterState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    st.metrics.http_requests.with_label_values(&[&route, resp.status().as_str()]).inc();
    resp
}

async fn ready(State(st): State<Arc<RouterState>>) -> impl IntoResponse {
    if st.is_ready() { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
}

async fn metrics(State(st): State<Arc<RouterState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, expertmesh_plumbing::metrics::CONTENT_TYPE)],
        expertmesh_plumbing::metrics::render(&st.metrics.registry),
    )
}
