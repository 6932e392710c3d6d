//! Why a generation was refused or failed, independent of any protocol.
//! Each API renders it in its own form: OpenAI's error body with an HTTP
//! status, Triton's `{"error": …}`, a gRPC status for KServe and the native
//! `GenerateService`. The message is the same through every door.

use axum::http::StatusCode;
use expertmesh_model::ModelError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerationError {
    /// The request is malformed or over a limit; `param` names the field.
    #[error("{message}")]
    Invalid { param: Option<&'static str>, message: String },
    #[error("Missing or invalid API key (Authorization: Bearer <key>).")]
    Unauthenticated,
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("The request queue is full; retry later.")]
    QueueFull,
    /// Experts without a live replica, or the router shutting down.
    #[error("{0}")]
    Unavailable(String),
    #[error("The request did not finish within {0} s.")]
    Timeout(f64),
    /// A fault of the model or machinery (not the caller's).
    #[error("{0}")]
    Internal(String),
    /// The model produced non-finite values.
    #[error("{0}")]
    Numerical(String),
}

impl GenerationError {
    /// Every value of [`GenerationError::reason`], for metrics that start
    /// at 0.
    pub const REASONS: [&'static str; 8] = [
        "invalid_request",
        "unauthorized",
        "not_found",
        "queue_full",
        "unavailable",
        "timeout",
        "numerical",
        "internal",
    ];

    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        GenerationError::Invalid { param: Some(param), message: message.into() }
    }

    pub fn bad(message: impl Into<String>) -> Self {
        GenerationError::Invalid { param: None, message: message.into() }
    }

    /// The reason label of a model error, as its [`GenerationError`] has.
    pub fn reason_of(e: &ModelError) -> &'static str {
        match e {
            ModelError::Unavailable(_) | ModelError::KvCacheFull(_) => "unavailable",
            ModelError::InvalidInput(_) | ModelError::Tokenizer(_) | ModelError::Template(_) => "invalid_request",
            ModelError::Numerical(_) => "numerical",
            _ => "internal",
        }
    }

    /// The `expertmesh_request_errors_total{reason}` label.
    pub fn reason(&self) -> &'static str {
        match self {
            GenerationError::Invalid { .. } => "invalid_request",
            GenerationError::Unauthenticated => "unauthorized",
            GenerationError::ModelNotFound(_) => "not_found",
            GenerationError::QueueFull => "queue_full",
            GenerationError::Unavailable(_) => "unavailable",
            GenerationError::Timeout(_) => "timeout",
            GenerationError::Numerical(_) => "numerical",
            GenerationError::Internal(_) => "internal",
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            GenerationError::Invalid { .. } => StatusCode::BAD_REQUEST,
            GenerationError::Unauthenticated => StatusCode::UNAUTHORIZED,
            GenerationError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            GenerationError::QueueFull => StatusCode::TOO_MANY_REQUESTS,
            GenerationError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            GenerationError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GenerationError::Numerical(_) | GenerationError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The field at fault, if any.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            GenerationError::Invalid { param, .. } => *param,
            GenerationError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }
}

impl From<&GenerationError> for tonic::Status {
    fn from(e: &GenerationError) -> Self {
        let m = e.to_string();
        match e {
            GenerationError::Invalid { .. } => tonic::Status::invalid_argument(m),
            GenerationError::Unauthenticated => tonic::Status::unauthenticated(m),
            GenerationError::ModelNotFound(_) => tonic::Status::not_found(m),
            GenerationError::QueueFull => tonic::Status::resource_exhausted(m),
            GenerationError::Unavailable(_) => tonic::Status::unavailable(m),
            GenerationError::Timeout(_) => tonic::Status::deadline_exceeded(m),
            GenerationError::Numerical(_) | GenerationError::Internal(_) => tonic::Status::internal(m),
        }
    }
}

impl From<GenerationError> for tonic::Status {
    fn from(e: GenerationError) -> Self {
        (&e).into()
    }
}

impl From<ModelError> for GenerationError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Unavailable(m) | ModelError::KvCacheFull(m) => GenerationError::Unavailable(m),
            ModelError::InvalidInput(m) | ModelError::Tokenizer(m) | ModelError::Template(m) => GenerationError::bad(m),
            ModelError::Numerical(m) => GenerationError::Numerical(m),
            other => GenerationError::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_reason_listed_for_metrics_and_one_status_per_protocol() {
        let all = [
            GenerationError::bad("x"),
            GenerationError::Unauthenticated,
            GenerationError::ModelNotFound("m".into()),
            GenerationError::QueueFull,
            GenerationError::Unavailable("u".into()),
            GenerationError::Timeout(1.0),
            GenerationError::Numerical("n".into()),
            GenerationError::Internal("i".into()),
        ];
        let reasons: Vec<_> = all.iter().map(GenerationError::reason).collect();
        assert_eq!(reasons, GenerationError::REASONS);
        let http: Vec<u16> = all.iter().map(|e| e.http_status().as_u16()).collect();
        assert_eq!(http, [400, 401, 404, 429, 503, 504, 500, 500]);
        let grpc: Vec<tonic::Code> = all.iter().map(|e| tonic::Status::from(e).code()).collect();
        use tonic::Code::*;
        assert_eq!(
            grpc,
            [
                InvalidArgument,
                Unauthenticated,
                NotFound,
                ResourceExhausted,
                Unavailable,
                DeadlineExceeded,
                Internal,
                Internal
            ]
        );
    }
}
