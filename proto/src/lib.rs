//! ExpertMesh wire protocol: `expertmesh.v1` messages and services.
//!
//! `ExpertService` is the router → expert-node data plane (a persistent
//! bidirectional `Dispatch` stream per node) plus the coordinator's
//! `LoadExperts`/`UnloadExperts`; `GenerateService` is the router's own
//! streaming generation API. [`inference`] is the KServe v2 / Triton gRPC
//! protocol the router also serves.

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("expertmesh.v1");
}

/// KServe v2 / Open Inference Protocol (`inference.GRPCInferenceService`),
/// with Triton's `ModelStreamInfer`.
pub mod inference {
    tonic::include_proto!("inference");
}

/// Encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("expertmesh_descriptor");

/// Message size limit on both ends of every ExpertMesh channel: a dispatch
/// batch of 4096 tokens × 7168 f32 values is 117 MiB.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
