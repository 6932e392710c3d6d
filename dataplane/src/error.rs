//! The data plane's error type, with its gRPC mapping.

use thiserror::Error;

#[derive(Debug, Error, Clone)]
pub enum DataPlaneError {
    /// A malformed batch: the sender's fault.
    #[error("invalid dispatch: {0}")]
    Invalid(String),
    /// The peer is unreachable or broke the stream.
    #[error("transport to {node}: {message}")]
    Transport { node: String, message: String },
    #[error("dispatch to {node} timed out after {seconds:.1}s")]
    Timeout { node: String, seconds: f64 },
    /// No live replica holds these experts.
    #[error("experts without a live replica: {0}")]
    Uncovered(String),
    #[error("expert computation: {0}")]
    Compute(String),
}

impl DataPlaneError {
    pub fn code(&self) -> tonic::Code {
        match self {
            DataPlaneError::Invalid(_) => tonic::Code::InvalidArgument,
            DataPlaneError::Transport { .. } | DataPlaneError::Uncovered(_) => tonic::Code::Unavailable,
            DataPlaneError::Timeout { .. } => tonic::Code::DeadlineExceeded,
            DataPlaneError::Compute(_) => tonic::Code::Internal,
        }
    }
}

impl From<DataPlaneError> for tonic::Status {
    fn from(e: DataPlaneError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, DataPlaneError>;
