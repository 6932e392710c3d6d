//! The model crate's single error type.

use thiserror::Error;

/// Everything that can go wrong loading or running a model. Each variant says
/// which field, tensor or input is at fault so the caller can report it as is.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A checkpoint config (or placement) that is missing, malformed or
    /// unsupported.
    #[error(transparent)]
    Spec(#[from] expertmesh_spec::SpecError),
    #[error("io error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("weights: {0}")]
    Weights(String),
    #[error("tensor {name}: expected shape {expected:?}, found {found:?}")]
    Shape { name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("tensor {0} not found in checkpoint")]
    MissingTensor(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("numerical error: {0}")]
    Numerical(String),
    #[error("expert executor: {0}")]
    Executor(String),
    /// The KV block pool has no free block (the engine preempts on it).
    #[error("KV cache full: {0}")]
    KvCacheFull(String),
    /// Experts the step needs have no reachable replica.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl ModelError {
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        ModelError::Io { path: path.as_ref().display().to_string(), source }
    }

    /// True when the error is the caller's fault (bad request), as opposed to
    /// a fault of the model files or the serving machinery. Services map this
    /// to `INVALID_ARGUMENT` / HTTP 400.
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, ModelError::InvalidInput(_))
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;
