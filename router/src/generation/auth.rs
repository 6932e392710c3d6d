//! API keys (`--api-key`) for the public APIs: `Authorization: Bearer <key>`
//! on HTTP, `authorization: Bearer <key>` metadata on gRPC. Health and
//! metrics stay open. Keys are compared in constant time and never logged.

use super::GenerationError;
use crate::RouterState;
use std::sync::Arc;

/// One `--api-key`; its `Debug` is redacted so a logged config shows none.
#[derive(Clone)]
pub struct ApiKey(pub String);

impl std::str::FromStr for ApiKey {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(ApiKey(s.to_string()))
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Whether `given` is one of `keys`, without an early exit on the first
/// differing byte (no timing hint about how much of a key matched).
pub fn key_matches(keys: &[String], given: &str) -> bool {
    let g = given.as_bytes();
    keys.iter().fold(false, |found, k| {
        let k = k.as_bytes();
        let mut diff = (k.len() != g.len()) as u8;
        for (i, b) in k.iter().enumerate() {
            diff |= b ^ g.get(i).copied().unwrap_or(0);
        }
        found | (diff == 0)
    })
}

/// Checks an `authorization` value (HTTP header or gRPC metadata) against
/// `--api-key`; no keys configured means open. A refusal is counted under
/// `expertmesh_request_errors_total{reason="unauthorized"}`.
pub fn authorize(st: &RouterState, authorization: Option<&str>) -> Result<(), GenerationError> {
    if st.api_keys.is_empty() {
        return Ok(());
    }
    let given = authorization.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
    if key_matches(&st.api_keys, given) {
        return Ok(());
    }
    let e = GenerationError::Unauthenticated;
    st.metrics.errors.with_label_values(&[e.reason()]).inc();
    Err(e)
}

/// A tonic interceptor refusing calls without a valid key (`UNAUTHENTICATED`).
#[derive(Clone)]
pub struct GrpcAuth {
    pub state: Arc<RouterState>,
}

impl tonic::service::Interceptor for GrpcAuth {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let given = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        authorize(&self.state, given)?;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exact_keys_match() {
        let keys = vec!["alpha".to_string(), "beta-2".to_string()];
        assert!(key_matches(&keys, "alpha"));
        assert!(key_matches(&keys, "beta-2"));
        for bad in ["", "alph", "alphaa", "beta", "ALPHA", "beta-3"] {
            assert!(!key_matches(&keys, bad), "{bad}");
        }
        assert!(!key_matches(&[], "alpha"));
    }
}
