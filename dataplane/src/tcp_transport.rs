//! A framed-TCP dispatch transport (the wire format is [`crate::frame`]):
//! gRPC cannot put rows on the wire without copies (prost copies a message
//! into tonic's buffer, and the receiver gathers HTTP/2 frames into one
//! buffer before decoding; see `docs/benchmarks.md`).
//!
//! `router --transport tcp` selects it. It shares the expert node's gRPC
//! port: a connection that opens with [`crate::frame::MAGIC`] is a framed
//! dispatch link, anything else is handed to the gRPC server. It is
//! plaintext, so it is refused under internal mutual TLS (gRPC carries TLS).

use crate::error::{DataPlaneError, Result};
use crate::frame::{Frame, MAGIC, Payload, read_frame, write_message};
use crate::metrics::DispatchMetrics;
use crate::placement::NodeId;
use crate::transport::{NodeBatch, Transport, check_response, dispatch_request, replace_addresses};
use expertmesh_proto::v1::{DispatchResponse, Dtype};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// One link to a node: a connection, reopened after any failure.
type Link = Arc<Mutex<Option<TcpStream>>>;

pub struct TcpTransport {
    addrs: RwLock<BTreeMap<NodeId, String>>,
    links: Mutex<HashMap<NodeId, Link>>,
    timeout: Duration,
    dtype: Dtype,
    metrics: Option<Arc<DispatchMetrics>>,
}

impl TcpTransport {
    pub fn new(addrs: BTreeMap<NodeId, String>, timeout: Duration, dtype: Dtype) -> Self {
        TcpTransport { addrs: RwLock::new(addrs), links: Mutex::new(HashMap::new()), timeout, dtype, metrics: None }
    }

    /// Counts activation bytes per node and direction.
    pub fn with_metrics(mut self, m: Arc<DispatchMetrics>) -> Self {
        self.metrics = Some(m);
        self
    }

    fn link(&self, node: &str) -> Result<(Link, String)> {
        let err = |m: &str| DataPlaneError::Transport { node: node.to_string(), message: m.to_string() };
        let addr = self.addrs.read().ok().and_then(|a| a.get(node).cloned()).ok_or_else(|| err("no address"))?;
        let mut links = self.links.lock().map_err(|_| err("link table poisoned"))?;
        Ok((links.entry(node.to_string()).or_default().clone(), addr))
    }

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

    /// One node's round trip; any failure closes the link (reopened next time).
    fn round_trip(&self, step: u64, layer: usize, hidden: usize, b: &NodeBatch) -> Result<Vec<f32>> {
        let (link, addr) = self.link(&b.node)?;
        let mut guard = link
            .lock()
            .map_err(|_| DataPlaneError::Transport { node: b.node.clone(), message: "link poisoned".into() })?;
        let s = match &mut *guard {
            Some(s) => s,
            slot @ None => slot.insert(self.connect(&b.node, &addr)?),
        };
        let r = self.send_and_receive(s, step, layer, hidden, b);
        if matches!(r, Err(DataPlaneError::Transport { .. } | DataPlaneError::Timeout { .. })) {
            *guard = None;
        }
        r
    }

    fn send_and_receive(
        &self,
        s: &mut TcpStream,
        step: u64,
        layer: usize,
        hidden: usize,
        b: &NodeBatch,
    ) -> Result<Vec<f32>> {
        let io = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                DataPlaneError::Timeout { node: b.node.clone(), seconds: self.timeout.as_secs_f64() }
            }
            _ => DataPlaneError::Transport { node: b.node.clone(), message: e.to_string() },
        };
        let mut req = dispatch_request(step, layer, hidden, b, self.dtype);
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

impl Transport for TcpTransport {
    /// Every node's round trip runs on its own scoped thread, so the step
    /// waits for the slowest node, not for their sum (one node: this thread).
    fn exchange(&self, step: u64, layer: usize, hidden: usize, batches: &[NodeBatch]) -> Vec<Result<Vec<f32>>> {
        if let [b] = batches {
            return vec![self.round_trip(step, layer, hidden, b)];
        }
        std::thread::scope(|scope| {
            let calls: Vec<_> =
                batches.iter().map(|b| scope.spawn(move || self.round_trip(step, layer, hidden, b))).collect();
            calls
                .into_iter()
                .zip(batches)
                .map(|(c, b)| {
                    c.join().unwrap_or_else(|_| {
                        Err(DataPlaneError::Transport { node: b.node.clone(), message: "link thread panicked".into() })
                    })
                })
                .collect()
        })
    }

    fn set_addresses(&self, addrs: BTreeMap<NodeId, String>) {
        replace_addresses(&self.addrs, &self.links, addrs);
    }
}
