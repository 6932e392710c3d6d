//! Prometheus exposition shared by every service.

use crate::listen::Listeners;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A registry holding what every component exports besides its own
/// metrics: `expertmesh_build_info{component,version}` (always 1) and, on
/// Linux, the standard `process_*` metrics (CPU seconds, resident memory,
/// open file descriptors, start time).
pub fn registry(component: &str) -> prometheus::Result<prometheus::Registry> {
    let r = prometheus::Registry::new();
    let info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new("expertmesh_build_info", "Build of this component (always 1)"),
        &["component", "version"],
    )?;
    info.with_label_values(&[component, env!("CARGO_PKG_VERSION")]).set(1);
    r.register(Box::new(info))?;
    #[cfg(target_os = "linux")]
    r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
    Ok(r)
}

/// The text exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Everything in `registry`, in the text exposition format. A family that
/// cannot be encoded (it never should) is logged and left out.
pub fn render(registry: &prometheus::Registry) -> String {
    let mut buf = String::new();
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut buf) {
        tracing::error!(error = %e, "encoding metrics");
    }
    buf
}

/// Serves `registry` at `/metrics` on `addr` until `stop`; returns the bound
/// address (port 0 picks a free one). A server that fails later is logged
/// and recorded in `listeners`.
pub async fn serve(
    addr: SocketAddr,
    registry: prometheus::Registry,
    stop: CancellationToken,
    listeners: Arc<Listeners>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let r = registry.clone();
            async move { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], render(&r)) }
        }),
    );
    tokio::spawn(async move {
        let s = stop.clone();
        let server = axum::serve(listener, app).with_graceful_shutdown(async move { s.cancelled().await });
        listeners.run("metrics", server.into_future(), &stop).await;
    });
    Ok(bound)
}
