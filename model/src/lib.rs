//! ExpertMesh model engine.
//!
//! Loads Hugging Face Mixture-of-Experts checkpoints (DeepSeek-V3/V2,
//! Qwen3-MoE, Mixtral) from safetensors and runs them on CPU with a KV cache,
//! matching transformers' float32 results. The routed experts sit behind the
//! [`ExpertExecutor`] seam so the cluster can move them into other processes
//! without touching the model code.

pub mod attention;
pub mod cache;
pub mod error;
pub mod eval;
pub mod generate;
pub mod genmodel;
pub mod kernels;
pub mod model;
pub mod moe;
pub mod mtp;
pub mod ops;
pub mod options;
pub mod perplexity;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

pub use error::{ModelError, Result};
/// The checkpoint's `config.json`, parsed (shared with the control plane).
pub use expertmesh_spec::model_config as config;
