//! ExpertMesh's shared formats, with no engine behind them:
//!
//! - [`model_config`]: a Hugging Face `config.json` for the supported MoE
//!   architectures, normalised into one `ModelConfig` (the model's shape:
//!   layers, experts, dimensions, routing).
//! - [`placement`]: which expert nodes hold which routed experts (the
//!   placement file, and the `placement` key in etcd).
//!
//! Everything that must agree on these (the engine, the data plane, the
//! coordinator, the CLI) reads them from here, so a control-plane process
//! never links tokenizers or kernels only to learn a model's shape.

pub mod error;
pub mod model_config;
pub mod placement;

pub use error::{Result, SpecError};
