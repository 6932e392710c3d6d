//! The framed-TCP dispatch link (`expertmesh_dataplane::frame`) on the node's
//! gRPC port: connections that open with its magic bytes are served here,
//! all others go to the gRPC server. Each framed link gets its own thread,
//! which reads a batch straight into its rows, computes it and writes the
//! answer from the result's buffer (or, for a batch marked `nccl`, moves
//! the rows over the router's communicator: [`crate::nccl`]); under
//! internal TLS every connection goes to gRPC (which requires the client
//! certificate).

use crate::metrics::NodeMetrics;
use crate::service::process;
use expertmesh_dataplane::frame::{Frame, MAGIC, read_frame, write_error, write_message};
use expertmesh_model::config::ModelConfig;
use expertmesh_model::moe::ExpertBank;
use expertmesh_proto::MAX_MESSAGE_BYTES;
use expertmesh_proto::v1::DispatchRequest;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long an idle link waits between checks for shutdown.
const IDLE_POLL: Duration = Duration::from_millis(200);
/// A frame, once begun, must arrive within this.
const FRAME_TIMEOUT: Duration = Duration::from_secs(60);
/// A new connection must say what it is within this.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// What a framed link needs to compute batches.
#[derive(Clone)]
pub struct LinkContext {
    pub experts: Arc<RwLock<Box<dyn ExpertBank>>>,
    pub cfg: Arc<ModelConfig>,
    pub metrics: Arc<NodeMetrics>,
    pub nccl: Arc<crate::nccl::NcclSide>,
    pub stop: CancellationToken,
}

/// The threads serving framed links, joined at shutdown so batches in hand
/// are answered before the node exits.
#[derive(Clone, Default)]
pub struct LinkThreads(Arc<Mutex<Vec<JoinHandle<()>>>>);

impl LinkThreads {
    pub fn join(&self) {
        let handles = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            if h.join().is_err() {
                tracing::error!("a framed link thread panicked");
            }
        }
    }
}

/// Accepts on `listener` until `stop`; framed links go to their threads,
/// the rest to the returned stream (the gRPC server's incoming). `raw:
/// None` (internal TLS) sends everything to gRPC.
pub fn split_incoming(
    listener: TcpListener,
    raw: Option<LinkContext>,
    links: LinkThreads,
    stop: CancellationToken,
) -> impl tokio_stream::Stream<Item = std::io::Result<TcpStream>> {
    let (tx, rx) = mpsc::channel::<std::io::Result<TcpStream>>(64);
    tokio::spawn(async move {
        loop {
            let s = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => r,
            };
            let s = match s {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Err(e) = s.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY");
            }
            let Some(ctx) = raw.clone() else {
                if tx.send(Ok(s)).await.is_err() {
                    return;
                }
                continue;
            };
            let (tx, links) = (tx.clone(), links.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(SNIFF_TIMEOUT, is_framed(&s)).await {
                    Ok(Ok(true)) => start_link(s, ctx, &links),
                    Ok(Ok(false)) => {
                        if tx.send(Ok(s)).await.is_err() {
                            tracing::debug!("gRPC server gone; connection closed");
                        }
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "connection closed before speaking"),
                    Err(_) => tracing::debug!("connection silent for {SNIFF_TIMEOUT:?}; closed"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Whether the first bytes are the framed link's magic (without consuming
/// anything a gRPC client sent).
async fn is_framed(s: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; 4];
    loop {
        let n = s.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if buf[..n] != MAGIC[..n] {
            return Ok(false);
        }
        if n == MAGIC.len() {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn start_link(s: TcpStream, ctx: LinkContext, links: &LinkThreads) {
    let std = match s.into_std().and_then(|s| s.set_nonblocking(false).map(|_| s)) {
        Ok(s) => s,
        Err(e) => return tracing::warn!(error = %e, "framed link setup failed"),
    };
    tracing::debug!(peer = ?std.peer_addr().ok(), "framed dispatch link opened");
    let h = std::thread::Builder::new().name("dispatch-link".into()).spawn(move || serve_link(std, &ctx));
    match h {
        Ok(h) => {
            let mut v = links.0.lock().unwrap_or_else(|e| e.into_inner());
            v.retain(|h| !h.is_finished());
            v.push(h);
        }
        Err(e) => tracing::warn!(error = %e, "framed link thread"),
    }
}

/// Serves one framed link until the peer closes it or the node drains
/// (finishing the batch in hand).
fn serve_link(mut s: std::net::TcpStream, ctx: &LinkContext) {
    use std::io::Read;
    let mut magic = [0u8; 4];
    if s.read_exact(&mut magic).is_err() {
        return;
    }
    loop {
        // Idle: wait for the next frame's first byte, watching for shutdown.
        if s.set_read_timeout(Some(IDLE_POLL)).is_err() {
            return;
        }
        match s.peek(&mut [0u8; 1]) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if ctx.stop.is_cancelled() {
                    return;
                }
                continue;
            }
            Err(_) => return,
        }
        if s.set_read_timeout(Some(FRAME_TIMEOUT)).is_err() || s.set_write_timeout(Some(FRAME_TIMEOUT)).is_err() {
            return;
        }
        let frame =
            read_frame::<DispatchRequest>(&mut s, MAX_MESSAGE_BYTES, |m| m.rows.as_ref().map_or(0, |r| r.dtype));
        let (req, payload) = match frame {
            Ok(Frame::Message(req, payload)) => (req, payload),
            Ok(Frame::Error(..)) => return,
            Err(e) => {
                // A broken frame leaves the stream out of step: close it.
                tracing::warn!(error = %e, "framed link: unreadable frame; closing");
                if let Err(w) = write_error(&mut s, tonic::Code::InvalidArgument, &e.to_string()) {
                    tracing::debug!(error = %w, "the peer left before the error frame");
                }
                return;
            }
        };
        let (step, layer) = (req.step, req.layer);
        let span = tracing::info_span!("dispatch", trace_id = %req.trace_id, step, layer);
        let _entered = span.enter();
        let result = match req.nccl.clone() {
            // The rows come over NCCL; the answer's rows go back the same way.
            Some(m) => ctx.nccl.serve(&m, &ctx.experts, &ctx.cfg, &ctx.metrics, req),
            None => req
                .rows
                .clone()
                .ok_or_else(|| expertmesh_dataplane::DataPlaneError::Invalid("missing rows".into()))
                .and_then(|packed| payload.into_rows(packed, ctx.cfg.hidden_size))
                .and_then(|rows| process(&ctx.experts, &ctx.cfg, &ctx.metrics, req, rows)),
        };
        let sent = match result {
            Ok(mut resp) => {
                tracing::debug!(seconds = resp.compute_seconds, "dispatch batch computed");
                let data = resp.combined.as_mut().map(|c| std::mem::take(&mut c.data)).unwrap_or_default();
                write_message(&mut s, &resp, &data)
            }
            Err(e) => {
                tracing::warn!(error = %e, "refused dispatch batch");
                write_error(&mut s, e.code(), &e.to_string())
            }
        };
        if sent.is_err() {
            return;
        }
    }
}
