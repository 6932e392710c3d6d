//! ExpertMesh data plane: what moves token rows between a router and the
//! expert nodes.
//!
//! - [`codec`]: packing rows as f32, bf16 or fp8-e4m3 with per-128 scales.
//! - [`placement`]: which nodes hold which experts (the placement file;
//!   the format lives in `expertmesh-spec`, shared with the control plane).
//! - [`transport`]: the collective seam (`Transport::exchange`), with an
//!   in-process implementation; [`grpc_transport`] implements it over
//!   persistent bidirectional `Dispatch` streams.
//! - [`tcp_transport`]: the same dispatch over hand-framed TCP ([`frame`]),
//!   without gRPC's copies.
//! - [`nccl_transport`]: headers over framed TCP, rows GPU to GPU over
//!   NCCL, falling back to framed TCP on any fault.
//! - [`trace`]: request and step trace ids, carried to the expert nodes.
//! - [`executor`]: `RemoteExecutor`, the model's `ExpertExecutor` for a
//!   cluster: plans one batch per node per MoE layer, picks replicas by
//!   outstanding work, re-dispatches around failed nodes.

pub mod codec;
pub mod error;
pub mod executor;
pub mod frame;
pub mod grpc_transport;
pub mod metrics;
pub mod nccl_transport;
pub mod tcp_transport;
pub mod trace;
pub mod transport;

pub use error::{DataPlaneError, Result};
pub use expertmesh_spec::placement;
