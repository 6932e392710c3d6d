//! A framed-TCP dispatch transport (the wire format is [`crate::frame`]):
//! gRPC cannot put rows on the wire without copies (prost copies a message
//! into tonic's buffer, and the receiver gathers HTTP/2 frames into one
//! buffer before decoding; see `docs/benchmarks.md`).
//!
//! `router --transport tcp` selects it. It shares the expert node's gRPC
//! port: a connection that opens with [`crate::frame::MAGIC`] is a framed
//! dispatch link, anything else is handed to the gRPC server. It is
//! plaintext, so it is refused under internal mutual TLS (gRPC carries TLS).
//!
//! Each node's link is a thread of its own that takes batches in order, so
//! a hung node holds up only its own link (for at most the dispatch
//! timeout), never the caller: answers go to the executor's reply channel.

use crate::error::{DataPlaneError, Result};
use crate::frame::{Frame, MAGIC, Payload, read_frame, write_message};
use crate::metrics::DispatchMetrics;
use crate::nccl_transport::Headers;
use crate::placement::NodeId;
use crate::transport::{
    NodeBatch, Replies, Transport, check_response, dispatch_request, nccl_request, replace_addresses, reply,
};
use expertmesh_proto::v1::{DispatchResponse, Dtype, NcclMarker};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::Duration;

/// What every link needs.
struct LinkConfig {
    timeout: Duration,
    dtype: Dtype,
    metrics: Option<Arc<DispatchMetrics>>,
}

/// One batch for a link's thread.
struct Job {
    step: u64,
    layer: usize,
    hidden: usize,
    batch: NodeBatch,
    tag: usize,
    replies: Replies,
    /// Only the header goes on the socket: the rows travel over NCCL.
    nccl: Option<NcclMarker>,
}

/// A node's link: its thread ends when this (the job queue) is dropped.
type Link = mpsc::Sender<Job>;

pub struct TcpTransport {
    addrs: RwLock<BTreeMap<NodeId, String>>,
    links: Mutex<HashMap<NodeId, Link>>,
    cfg: Arc<LinkConfig>,
}

impl TcpTransport {
    pub fn new(addrs: BTreeMap<NodeId, String>, timeout: Duration, dtype: Dtype) -> Self {
        let cfg = Arc::new(LinkConfig { timeout, dtype, metrics: None });
        TcpTransport { addrs: RwLock::new(addrs), links: Mutex::new(HashMap::new()), cfg }
    }

    /// Counts activation bytes per node and direction.
    pub fn with_metrics(mut self, m: Arc<DispatchMetrics>) -> Self {
        self.cfg = Arc::new(LinkConfig { timeout: self.cfg.timeout, dtype: self.cfg.dtype, metrics: Some(m) });
        self
    }

    /// The node's link, started on first use.
    fn link(&self, node: &str) -> Result<Link> {
        let err = |m: String| DataPlaneError::Transport { node: node.to_string(), message: m };
        let addr = self
            .addrs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .cloned()
            .ok_or_else(|| err("no address".into()))?;
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = links.get(node) {
            return Ok(l.clone());
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let (cfg, name) = (self.cfg.clone(), node.to_string());
        std::thread::Builder::new()
            .name(format!("link-{node}"))
            .spawn(move || run_link(&cfg, &name, &addr, rx))
            .map_err(|e| err(format!("link thread: {e}")))?;
        links.insert(node.to_string(), tx.clone());
        Ok(tx)
    }
}

/// A link's thread: one round trip at a time, in order; any failure closes
/// the connection (reopened for the next batch).
fn run_link(cfg: &LinkConfig, node: &str, addr: &str, jobs: mpsc::Receiver<Job>) {
    let mut conn: Option<TcpStream> = None;
    for j in jobs {
        let r = match &mut conn {
            Some(s) => cfg.send_and_receive(s, &j),
            slot @ None => cfg.connect(node, addr).and_then(|s| cfg.send_and_receive(slot.insert(s), &j)),
        };
        if matches!(r, Err(DataPlaneError::Transport { .. } | DataPlaneError::Timeout { .. })) {
            conn = None;
        }
        reply(&j.replies, j.tag, r);
    }
}

impl LinkConfig {
    fn connect(&self, node: &str, addr: &str) -> Result<TcpStream> {
        let err = |m: String| DataPlaneError::Transport { node: node.to_string(), message: m };
        let sa = addr
            .to_socket_addrs()
            .map_err(|e| err(format!("resolve {addr}: {e}")))?
            .next()
            .ok_or_else(|| err(format!("no address for {addr}")))?;
        let mut s =
            TcpStream::connect_timeout(&sa, Duration::from_secs(2)).map_err(|e| err(format!("connect {addr}: {e}")))?;
        let setup = |s: &mut TcpStream| -> std::io::Result<()> {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(self.timeout))?;
            s.set_write_timeout(Some(self.timeout))?;
            s.write_all(MAGIC)
        };
        setup(&mut s).map_err(|e| err(format!("{addr}: {e}")))?;
        Ok(s)
    }

    fn send_and_receive(&self, s: &mut TcpStream, j: &Job) -> Result<Vec<f32>> {
        let (step, hidden, b) = (j.step, j.hidden, &j.batch);
        let io = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                DataPlaneError::Timeout { node: b.node.clone(), seconds: self.timeout.as_secs_f64() }
            }
            _ => DataPlaneError::Transport { node: b.node.clone(), message: e.to_string() },
        };
        let mut req = match &j.nccl {
            Some(m) => nccl_request(step, j.layer, hidden, b, m.clone()),
            None => dispatch_request(step, j.layer, hidden, b, self.dtype),
        };
        let payload = req.rows.as_mut().map(|p| std::mem::take(&mut p.data)).unwrap_or_default();
        self.count_bytes(&b.node, "tx", payload.len() + req.rows.as_ref().map_or(0, |p| p.scales.len()));
        write_message(s, &req, &payload).map_err(io)?;
        // The answer is one row per token in the combine dtype: at most 4 bytes a value.
        let max = b.rows.len() * 4 + 64;
        match read_frame::<DispatchResponse>(s, max, |m| m.combined.as_ref().map_or(0, |c| c.dtype)).map_err(io)? {
            Frame::Error(code, message) => Err(match code {
                tonic::Code::InvalidArgument => DataPlaneError::Invalid(message),
                _ => DataPlaneError::Transport { node: b.node.clone(), message: format!("{code:?}: {message}") },
            }),
            Frame::Message(resp, payload) => {
                let bytes = match &payload {
                    Payload::F32(v) => v.len() * 4,
                    Payload::Bytes(v) => v.len(),
                };
                let rows = check_response(resp, b, step, hidden)?;
                if j.nccl.is_some() {
                    // The combined rows came back over NCCL; this is the node's word that they are whole.
                    return Ok(Vec::new());
                }
                self.count_bytes(&b.node, "rx", bytes + rows.scales.len());
                payload.into_rows(rows, hidden)
            }
        }
    }

    fn count_bytes(&self, node: &str, direction: &str, n: usize) {
        if let Some(m) = &self.metrics {
            m.count_bytes(node, direction, n);
        }
    }
}

impl TcpTransport {
    /// Queues every batch on its node's link; with `nccl`, only headers.
    fn queue(
        &self,
        (step, layer, hidden): (u64, usize, usize),
        batches: &[NodeBatch],
        first_tag: usize,
        replies: &Replies,
        nccl: Option<&NcclMarker>,
    ) {
        for (i, b) in batches.iter().enumerate() {
            let tag = first_tag + i;
            let job = Job { step, layer, hidden, batch: b.clone(), tag, replies: replies.clone(), nccl: nccl.cloned() };
            let queued = self.link(&b.node).and_then(|l| {
                l.send(job)
                    .map_err(|_| DataPlaneError::Transport { node: b.node.clone(), message: "link closed".into() })
            });
            if let Err(e) = queued {
                reply(replies, tag, Err(e));
            }
        }
    }
}

impl Headers for TcpTransport {
    fn send_headers(
        &self,
        step: u64,
        layer: usize,
        hidden: usize,
        batches: &[NodeBatch],
        marker: &NcclMarker,
        replies: &Replies,
    ) {
        self.queue((step, layer, hidden), batches, 0, replies, Some(marker));
    }

    fn set_addresses(&self, addrs: BTreeMap<NodeId, String>) {
        replace_addresses(&self.addrs, &self.links, addrs);
    }
}

impl Transport for TcpTransport {
    fn send(&self, step: u64, layer: usize, hidden: usize, batches: &[NodeBatch], first_tag: usize, replies: &Replies) {
        self.queue((step, layer, hidden), batches, first_tag, replies, None);
    }

    fn set_addresses(&self, addrs: BTreeMap<NodeId, String>) {
        replace_addresses(&self.addrs, &self.links, addrs);
    }
}
