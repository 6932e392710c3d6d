//! The spec crate's one error type.

use thiserror::Error;

/// A checkpoint config or placement that cannot be read or is not valid;
/// each variant names the field, file or entry at fault.
#[derive(Debug, Error)]
pub enum SpecError {
    #[error("config: {0}")]
    Config(String),
    #[error("config: unsupported {field} = {value}")]
    Unsupported { field: String, value: String },
    #[error("io error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("placement: {0}")]
    Placement(String),
}

impl SpecError {
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        SpecError::Io { path: path.as_ref().display().to_string(), source }
    }
}

pub type Result<T> = std::result::Result<T, SpecError>;
