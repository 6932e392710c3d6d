//! The router's HTTP listener: `/health`, `/ready`, `/metrics`.
//! (The OpenAI-compatible API joins it on the same listener.)

use crate::RouterState;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub fn app(state: Arc<RouterState>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn ready(State(st): State<Arc<RouterState>>) -> impl IntoResponse {
    if st.ready.load(Ordering::Acquire) && st.covered.load(Ordering::Acquire) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(st): State<Arc<RouterState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, expertmesh_cluster::metrics::CONTENT_TYPE)],
        expertmesh_cluster::metrics::render(&st.metrics.registry),
    )
}
