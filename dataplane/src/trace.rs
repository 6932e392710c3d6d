//! Trace ids across the data plane.
//!
//! Every request has a trace id: the one in a W3C `traceparent` header (or
//! gRPC metadata) when the client sends one, else a fresh one. Every engine
//! step has one too: the router logs each step's id with the ids of the
//! requests in it, and sends the step's id in every `DispatchRequest` of the
//! step (`trace_id`), so an expert node's log lines for a batch join the
//! router's. The current step's id is process-wide: a router runs one
//! engine, whose step may fan out over threads (two-micro-batch overlap).

use std::sync::RwLock;

static STEP: RwLock<String> = RwLock::new(String::new());

/// A fresh 128-bit trace id, as 32 lowercase hex digits (W3C's format).
pub fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`);
/// `None` for anything malformed or the all-zero id.
pub fn from_traceparent(v: &str) -> Option<String> {
    let mut parts = v.trim().split('-');
    let (version, id, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let ok = hex(version, 2) && hex(id, 32) && hex(parent, 16) && hex(flags, 2) && parts.next().is_none();
    (ok && id.bytes().any(|b| b != b'0')).then(|| id.to_ascii_lowercase())
}

/// A request's trace id: the one in its `traceparent` (header or gRPC
/// metadata value) when valid, else a fresh one.
pub fn of_request(traceparent: Option<&str>) -> String {
    traceparent.and_then(from_traceparent).unwrap_or_else(new_id)
}

/// Marks the start of an engine step with trace id `id`.
pub fn set_step(id: &str) {
    if let Ok(mut s) = STEP.write() {
        id.clone_into(&mut s);
    }
}

/// The current step's trace id (empty outside a step).
pub fn step() -> String {
    STEP.read().map(|s| s.clone()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parsing() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(from_traceparent(&format!("00-{id}-00f067aa0ba902b7-01")).as_deref(), Some(id));
        assert_eq!(from_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01").as_deref(), Some(id));
        for bad in [
            "",
            "00",
            "00-abc-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(from_traceparent(bad), None, "{bad}");
        }
        assert_eq!(new_id().len(), 32);
        assert_ne!(new_id(), new_id());
    }
}
