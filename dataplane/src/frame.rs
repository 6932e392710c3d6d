//! The framed-TCP dispatch wire format, shared by the router's
//! [`crate::tcp_transport`] and the expert node's server: the same
//! `DispatchRequest`/`DispatchResponse` as the gRPC `Dispatch` stream, framed
//! by hand so a batch's rows go to the socket straight from their own buffer
//! and come off it straight into the destination `Vec<f32>`.
//!
//! A connection opens with [`MAGIC`]. A frame is `[kind: u8][header length:
//! u32][payload length: u64]` (little endian), the header (protobuf, with the
//! rows' `data` left empty), then the payload: the rows' bytes. Kind 0 is a
//! message; kind 1 an error whose header is a gRPC status code byte and a
//! UTF-8 message.

use crate::codec;
use crate::error::{DataPlaneError, Result};
use expertmesh_proto::v1::{Dtype, PackedRows};
use prost::Message;
use std::io::{Read, Write};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{NodeBatch, dispatch_request};
    use expertmesh_proto::v1::DispatchRequest;
    use proptest::prelude::*;
    use std::sync::Arc;

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

        // A valid frame reads back as written; every strict prefix of it
        // (a peer that stopped mid-frame) is an error, not a short frame.
        #[test]
        fn frames_round_trip_and_truncations_are_refused(
            step in any::<u64>(),
            layer in 0u32..100,
            hidden in 1usize..40,
            n in 0usize..6,
            experts in proptest::collection::vec((0u32..256, 0.0f32..1.0), 0..5),
            seed in any::<u32>(),
        ) {
            let rows: Vec<f32> = (0..n * hidden).map(|i| (i as u32 ^ seed) as f32 * 1e-3).collect();
            let groups = experts
                .iter()
                .map(|&(e, w)| expertmesh_model::moe::ExpertGroup { expert: e, rows: (0..n).collect(), weights: vec![w; n] })
                .collect();
            let b = NodeBatch { node: "n".into(), rows: Arc::new(rows.clone()), groups };
            let mut req = dispatch_request(step, layer as usize, hidden, &b, Dtype::F32);
            let payload = req.rows.as_mut().map(|p| std::mem::take(&mut p.data)).unwrap_or_default();
            let mut wire = Vec::new();
            write_message(&mut wire, &req, &payload).unwrap();
            match read_frame::<DispatchRequest>(&mut wire.as_slice(), 1 << 20, rows_dtype).unwrap() {
                Frame::Message(m, p) => {
                    prop_assert_eq!((m.step, m.layer), (step, layer));
                    prop_assert_eq!(m.experts.clone(), req.experts.clone());
                    prop_assert_eq!(p.into_rows(m.rows.unwrap(), hidden).unwrap(), rows);
                }
                Frame::Error(..) => prop_assert!(false, "a message read back as an error"),
            }
            for cut in [0, 1, 12, 13, wire.len() / 2, wire.len() - 1] {
                if cut < wire.len() {
                    prop_assert!(read_frame::<DispatchRequest>(&mut &wire[..cut], 1 << 20, rows_dtype).is_err(), "prefix {}", cut);
                }
            }
        }
    }
}
