//! The gRPC transport: one persistent bidirectional `Dispatch` stream per
//! expert node, owned by a tokio task ("link"). `send` is called from the
//! model's compute thread: it hands each batch to its node's link, and the
//! answer (or a timeout after the dispatch timeout) goes to the executor's
//! reply channel. A broken stream fails its in-flight batches (which the
//! executor re-dispatches) and is reopened on the next batch. Responses are
//! matched to requests in order, so an answer that comes after the executor
//! stopped waiting for it lands on a closed reply and is discarded.

use crate::codec;
use crate::error::{DataPlaneError, Result};
use crate::metrics::DispatchMetrics;
use crate::placement::NodeId;
use crate::transport::{NodeBatch, Replies, Transport, check_response, dispatch_request, replace_addresses, reply};
use expertmesh_plumbing::internal_tls::InternalTls;
use expertmesh_proto::MAX_MESSAGE_BYTES;
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::v1::{DispatchRequest, DispatchResponse, Dtype};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

type Reply = oneshot::Sender<Result<DispatchResponse>>;

/// HTTP/2 flow-control window on both ends of a dispatch stream.
pub const WINDOW: u32 = 64 << 20;
/// HTTP/2 frame size on both ends: the protocol's maximum, so a megabyte
/// batch is a few frames instead of sixty-four 16 KiB ones.
pub const FRAME: u32 = (1 << 24) - 1;

struct Call {
    req: DispatchRequest,
    reply: Reply,
}

pub struct GrpcTransport {
    rt: tokio::runtime::Handle,
    addrs: RwLock<BTreeMap<NodeId, String>>,
    links: Mutex<HashMap<NodeId, mpsc::Sender<Call>>>,
    timeout: Duration,
    dtype: Dtype,
    metrics: Option<Arc<DispatchMetrics>>,
    tls: Option<InternalTls>,
}

impl GrpcTransport {
    /// `rt` runs the links; `send` must be called from outside it.
    pub fn new(rt: tokio::runtime::Handle, addrs: BTreeMap<NodeId, String>, timeout: Duration, dtype: Dtype) -> Self {
        GrpcTransport {
            rt,
            addrs: RwLock::new(addrs),
            links: Mutex::new(HashMap::new()),
            timeout,
            dtype,
            metrics: None,
            tls: None,
        }
    }

    /// Dials nodes over mutual TLS.
    pub fn with_tls(mut self, tls: Option<InternalTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Counts activation bytes per node and direction.
    pub fn with_metrics(mut self, m: Arc<DispatchMetrics>) -> Self {
        self.metrics = Some(m);
        self
    }

    fn count_bytes(&self, node: &str, direction: &str, n: usize) {
        if let Some(m) = &self.metrics {
            m.count_bytes(node, direction, n);
        }
    }

    fn link(&self, node: &str) -> Result<mpsc::Sender<Call>> {
        let err = |m: &str| DataPlaneError::Transport { node: node.to_string(), message: m.to_string() };
        // The maps are replaced whole; one a panic poisoned is still consistent.
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = links.get(node).filter(|tx| !tx.is_closed()) {
            return Ok(tx.clone());
        }
        let addrs = self.addrs.read().unwrap_or_else(|e| e.into_inner());
        let addr = addrs.get(node).cloned().ok_or_else(|| err("no address"))?;
        let (tx, rx) = mpsc::channel(64);
        self.rt.spawn(run_link(node.to_string(), addr, self.tls.clone(), rx));
        links.insert(node.to_string(), tx.clone());
        Ok(tx)
    }
}

impl Transport for GrpcTransport {
    fn set_addresses(&self, addrs: BTreeMap<NodeId, String>) {
        replace_addresses(&self.addrs, &self.links, addrs);
    }

    /// Hands each batch to its node's link; a task per batch waits (up to
    /// the dispatch timeout) for the answer and sends it on.
    fn send(&self, step: u64, layer: usize, hidden: usize, batches: &[NodeBatch], first_tag: usize, replies: &Replies) {
        for (i, b) in batches.iter().enumerate() {
            let tag = first_tag + i;
            let queued = self.link(&b.node).and_then(|tx| {
                let (reply_tx, rx) = oneshot::channel();
                let req = dispatch_request(step, layer, hidden, b, self.dtype);
                self.count_bytes(&b.node, "tx", req.rows.as_ref().map_or(0, codec::wire_bytes));
                tx.blocking_send(Call { req, reply: reply_tx })
                    .map_err(|_| DataPlaneError::Transport { node: b.node.clone(), message: "link closed".into() })?;
                Ok(rx)
            });
            let rx = match queued {
                Ok(rx) => rx,
                Err(e) => {
                    reply(replies, tag, Err(e));
                    continue;
                }
            };
            let (b, to, timeout, metrics) = (b.clone(), replies.clone(), self.timeout, self.metrics.clone());
            self.rt.spawn(async move {
                let r = match tokio::time::timeout(timeout, rx).await {
                    Err(_) => Err(DataPlaneError::Timeout { node: b.node.clone(), seconds: timeout.as_secs_f64() }),
                    Ok(Err(_)) => {
                        Err(DataPlaneError::Transport { node: b.node.clone(), message: "link dropped the call".into() })
                    }
                    Ok(Ok(r)) => r.and_then(|resp| {
                        let rows = check_response(resp, &b, step, hidden)?;
                        if let Some(m) = &metrics {
                            m.count_bytes(&b.node, "rx", codec::wire_bytes(&rows));
                        }
                        codec::decode(&rows, hidden)
                    }),
                };
                reply(&to, tag, r);
            });
        }
    }
}

/// Fails every call in flight on a broken stream. A call whose caller has
/// stopped waiting has nobody to tell.
fn fail_all(inflight: &mut VecDeque<Reply>, e: &DataPlaneError) {
    for r in inflight.drain(..) {
        answer(r, Err(e.clone()));
    }
}

/// Answers one call; its waiter may be gone (it timed out).
fn answer(r: Reply, v: Result<DispatchResponse>) {
    if r.send(v).is_err() {
        tracing::trace!("a dispatch answer came after its waiter gave up");
    }
}

/// Owns one node's stream: sends calls in order, matches responses in order.
async fn run_link(node: NodeId, addr: String, tls: Option<InternalTls>, mut calls: mpsc::Receiver<Call>) {
    let transport_err = |m: String| DataPlaneError::Transport { node: node.clone(), message: m };
    let mut next: Option<Call> = None;
    loop {
        let call = match next.take() {
            Some(c) => c,
            None => match calls.recv().await {
                Some(c) => c,
                None => return,
            },
        };
        let channel = match expertmesh_plumbing::internal_tls::endpoint(tls.as_ref(), &addr) {
            // Batches are megabytes: HTTP/2's default 64 KiB windows would cost
            // a round trip per window.
            Ok(ep) => {
                ep.connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .initial_stream_window_size(WINDOW)
                    .initial_connection_window_size(WINDOW)
                    .max_frame_size(FRAME)
                    .connect()
                    .await
            }
            Err(e) => {
                answer(call.reply, Err(transport_err(e)));
                continue;
            }
        };
        let channel = match channel {
            Ok(c) => c,
            Err(e) => {
                answer(call.reply, Err(transport_err(format!("connect {addr}: {e}"))));
                continue;
            }
        };
        let mut client = ExpertServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel::<DispatchRequest>(64);
        let mut inflight: VecDeque<Reply> = VecDeque::new();
        if tx.send(call.req).await.is_ok() {
            inflight.push_back(call.reply);
        }
        let mut responses = match client.dispatch(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                fail_all(&mut inflight, &status_error(&node, s));
                continue;
            }
        };
        loop {
            tokio::select! {
                c = calls.recv() => match c {
                    Some(c) => {
                        if tx.send(c.req).await.is_err() {
                            answer(c.reply, Err(transport_err("stream closed".into())));
                            fail_all(&mut inflight, &transport_err("stream closed".into()));
                            break;
                        }
                        inflight.push_back(c.reply);
                    }
                    None => return,
                },
                m = responses.message() => match m {
                    Ok(Some(resp)) => {
                        if let Some(r) = inflight.pop_front() {
                            answer(r, Ok(resp));
                        }
                    }
                    Ok(None) => {
                        fail_all(&mut inflight, &transport_err("stream ended".into()));
                        break;
                    }
                    Err(s) => {
                        fail_all(&mut inflight, &status_error(&node, s));
                        break;
                    }
                },
            }
        }
    }
}

fn status_error(node: &str, s: tonic::Status) -> DataPlaneError {
    match s.code() {
        tonic::Code::InvalidArgument => DataPlaneError::Invalid(format!("{node}: {}", s.message())),
        _ => DataPlaneError::Transport { node: node.to_string(), message: format!("{:?}: {}", s.code(), s.message()) },
    }
}
