//! A framed-TCP dispatch transport: the same `DispatchRequest` and
//! `DispatchResponse` as the gRPC `Dispatch` stream, but framed by hand, so
//! a batch's rows go to the socket straight from the rows' own buffer and
//! come off it straight into the destination `Vec<f32>`. gRPC cannot do
//! that: prost copies a message into tonic's buffer, and the receiver
//! gathers HTTP/2 frames into one buffer before decoding (see
//! `docs/benchmarks.md`: gRPC moves 0.2–0.45× raw TCP's bytes/s).
//!
//! `router --transport tcp` selects it. It shares the expert node's gRPC
//! port: a connection that opens with [`MAGIC`] is a framed dispatch link,
//! anything else is handed to the gRPC server. It is plaintext, so it is
//! refused under internal mutual TLS (gRPC carries TLS).
//!
//! A frame is `[kind: u8][header length: u32][payload length: u64]` (little
//! endian), the header (protobuf, with the rows' `data` left empty), then
//! the payload: the rows' bytes. Kind 0 is a message; kind 1 an error whose
//! header is a gRPC status code byte and a UTF-8 message.

use crate::codec;
use crate::error::{DataPlaneError, Result};
use crate::metrics::DispatchMetrics;
use crate::placement::NodeId;
use crate::transport::{NodeBatch, Transport, check_response, dispatch_request, replace_addresses};
use expertmesh_proto::v1::{DispatchResponse, Dtype, PackedRows};
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// The first bytes of a framed dispatch connection.
pub const MAGIC: &[u8; 4] = b"EMT1";
const KIND_MESSAGE: u8 = 0;
const KIND_ERROR: u8 = 1;
/// Headers hold expert ids, row indices and gate weights: small next to
/// the payload, but bounded all the same.
const MAX_HEADER: usize = 64 << 20;

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// A frame's payload: f32 rows land in a `Vec<f32>` directly; other dtypes
/// as bytes.
pub enum Payload {
    F32(Vec<f32>),
    Bytes(Vec<u8>),
}

impl Payload {
    /// The rows as f32, decoding bf16 / fp8 through the codec.
    pub fn into_rows(self, mut packed: PackedRows, hidden: usize) -> Result<Vec<f32>> {
        match self {
            Payload::F32(v) => {
                let want = packed.num_rows as usize * hidden;
                if packed.hidden_size as usize != hidden || v.len() != want || packed.dtype != Dtype::F32 as i32 {
                    return Err(DataPlaneError::Invalid(format!(
                        "{} f32 values for {} rows of {} (expected hidden {hidden})",
                        v.len(),
                        packed.num_rows,
                        packed.hidden_size
                    )));
                }
                Ok(v)
            }
            Payload::Bytes(b) => {
                packed.data = b.into();
                codec::decode(&packed, hidden)
            }
        }
    }
}

/// Writes one message frame: `header` with its rows' data taken out and
/// sent as the payload, without copying it.
pub fn write_message(w: &mut impl Write, header: &impl Message, payload: &[u8]) -> std::io::Result<()> {
    let h = header.encode_to_vec();
    let mut prefix = Vec::with_capacity(13 + h.len());
    prefix.push(KIND_MESSAGE);
    prefix.extend_from_slice(&(h.len() as u32).to_le_bytes());
    prefix.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    prefix.extend_from_slice(&h);
    w.write_all(&prefix)?;
    w.write_all(payload)?;
    w.flush()
}

/// Writes an error frame (a gRPC code and a message).
pub fn write_error(w: &mut impl Write, code: tonic::Code, message: &str) -> std::io::Result<()> {
    let mut h = vec![code as i32 as u8];
    h.extend_from_slice(message.as_bytes());
    let mut frame = vec![KIND_ERROR];
    frame.extend_from_slice(&(h.len() as u32).to_le_bytes());
    frame.extend_from_slice(&0u64.to_le_bytes());
    frame.extend_from_slice(&h);
    w.write_all(&frame)?;
    w.flush()
}

/// What a frame carried.
pub enum Frame<M> {
    Message(M, Payload),
    Error(tonic::Code, String),
}

/// Reads one frame whose header is an `M`; `dtype_of` tells from the header
/// whether the payload is f32 rows (read straight into a `Vec<f32>`).
/// `max_payload` bounds what a peer can make us allocate.
pub fn read_frame<M: Message + Default>(
    r: &mut impl Read,
    max_payload: usize,
    dtype_of: impl Fn(&M) -> i32,
) -> std::io::Result<Frame<M>> {
    let mut prefix = [0u8; 13];
    r.read_exact(&mut prefix)?;
    let kind = prefix[0];
    let header_len = u32::from_le_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    let payload_len = u64::from_le_bytes(prefix[5..13].try_into().map_err(io_err)?) as usize;
    if header_len > MAX_HEADER || payload_len > max_payload {
        return Err(io_err(format!("frame of {header_len} + {payload_len} bytes is over the limit")));
    }
    let mut header = vec![0u8; header_len];
    r.read_exact(&mut header)?;
    match kind {
        KIND_ERROR => {
            let code = header.first().map_or(tonic::Code::Unknown, |&c| tonic::Code::from(c as i32));
            Ok(Frame::Error(code, String::from_utf8_lossy(header.get(1..).unwrap_or_default()).into_owned()))
        }
        KIND_MESSAGE => {
            let m = M::decode(header.as_slice()).map_err(io_err)?;
            let payload = if dtype_of(&m) == Dtype::F32 as i32 && payload_len.is_multiple_of(4) {
                let mut v = vec![0f32; payload_len / 4];
                r.read_exact(bytemuck::cast_slice_mut(&mut v))?;
                Payload::F32(v)
            } else {
                let mut v = vec![0u8; payload_len];
                r.read_exact(&mut v)?;
                Payload::Bytes(v)
            };
            Ok(Frame::Message(m, payload))
        }
        k => Err(io_err(format!("unknown frame kind {k}"))),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use expertmesh_proto::v1::DispatchRequest;
    use proptest::prelude::*;

    fn rows_dtype(m: &DispatchRequest) -> i32 {
        m.rows.as_ref().map_or(0, |r| r.dtype)
    }

    #[test]
    fn frames_round_trip_with_f32_rows_read_in_place() {
        let rows: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let b = NodeBatch { node: "n".into(), rows: Arc::new(rows.clone()), groups: vec![] };
        let mut req = dispatch_request(7, 1, 3, &b, Dtype::F32);
        let payload = req.rows.as_mut().map(|p| std::mem::take(&mut p.data)).unwrap_or_default();
        let mut wire = Vec::new();
        write_message(&mut wire, &req, &payload).unwrap();
        write_error(&mut wire, tonic::Code::InvalidArgument, "bad layer").unwrap();
        let mut r = wire.as_slice();
        match read_frame::<DispatchRequest>(&mut r, 1 << 20, rows_dtype).unwrap() {
            Frame::Message(m, Payload::F32(v)) => {
                assert_eq!((m.step, m.layer), (7, 1));
                assert_eq!(Payload::F32(v).into_rows(m.rows.unwrap(), 3).unwrap(), rows);
            }
            _ => panic!("expected an f32 message"),
        }
        match read_frame::<DispatchRequest>(&mut r, 1 << 20, rows_dtype).unwrap() {
            Frame::Error(code, msg) => assert_eq!((code, msg.as_str()), (tonic::Code::InvalidArgument, "bad layer")),
            _ => panic!("expected an error frame"),
        }
    }

    #[test]
    fn oversized_and_mismatched_frames_are_refused() {
        let b = NodeBatch { node: "n".into(), rows: Arc::new(vec![1.0; 8]), groups: vec![] };
        let mut req = dispatch_request(1, 1, 4, &b, Dtype::F32);
        let payload = req.rows.as_mut().map(|p| std::mem::take(&mut p.data)).unwrap_or_default();
        let mut wire = Vec::new();
        write_message(&mut wire, &req, &payload).unwrap();
        // Over the payload limit: refused before allocating.
        assert!(read_frame::<DispatchRequest>(&mut wire.as_slice(), 16, rows_dtype).is_err());
        // A payload that does not match the header's rows.
        match read_frame::<DispatchRequest>(&mut wire.as_slice(), 1 << 20, rows_dtype).unwrap() {
            Frame::Message(m, p) => assert!(p.into_rows(m.rows.unwrap(), 8).is_err()),
            _ => panic!("expected a message"),
        }
    }

    proptest! {
        // Arbitrary bytes: an error or a frame, never a panic or a huge allocation.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(Frame::Message(m, p)) = read_frame::<DispatchRequest>(&mut bytes.as_slice(), 1 << 16, rows_dtype)
                && let Some(rows) = m.rows
            {
                let _ = p.into_rows(rows, 16);
            }
        }
    }
}
