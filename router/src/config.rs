//! The router's configuration: every flag, also from `EXPERTMESH_…`,
//! checked at start so bad values exit naming the flag.

use crate::RouterError;
use crate::generation::auth::ApiKey;
use clap::{Parser, ValueEnum};
use expertmesh_cluster::args::MemberArgs;
use expertmesh_model::options::{SpeculativeArgs, WeightArgs};
use expertmesh_plumbing::internal_tls::InternalTlsArgs;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Storage of the KV cache (`--kv-cache-dtype`).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KvCacheDtype {
    F32,
    Bf16,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum WireDtype {
    F32,
    Bf16,
    Fp8,
}

/// How the router reaches expert nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// The gRPC `Dispatch` stream (TLS-capable).
    Grpc,
    /// Hand-framed TCP on the nodes' gRPC port: no protobuf or HTTP/2
    /// copies of the payload; plaintext only.
    Tcp,
    /// Headers over framed TCP, rows GPU to GPU over NCCL (the router
    /// stages them through `--nccl-device`; every node needs a GPU),
    /// falling back to framed TCP on any fault; plaintext only.
    Nccl,
}

#[derive(Parser, Debug, Clone)]
#[command(name = "router", version, about = "ExpertMesh router")]
pub struct Config {
    /// Checkpoint directory; the router reads only the dense weights.
    #[arg(long, env = "EXPERTMESH_MODEL")]
    pub model: PathBuf,
    /// gRPC listen address: the native GenerateService, KServe v2 / Triton
    /// inference (GRPCInferenceService), gRPC health and reflection.
    #[arg(long, env = "EXPERTMESH_GRPC", default_value = "127.0.0.1:50051")]
    pub grpc: SocketAddr,
    /// HTTP listen address: the OpenAI API (/v1/models, /v1/completions,
    /// /v1/chat/completions), Triton's generate extension
    /// (/v2/models/NAME/generate[_stream]), /health, /ready, /metrics and
    /// /v2/health/live|ready.
    #[arg(long, env = "EXPERTMESH_HTTP", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Placement file (JSON) naming the expert nodes. Without it the routed
    /// experts run in this process (the single-process baseline).
    #[arg(long, env = "EXPERTMESH_PLACEMENT", conflicts_with = "endpoints")]
    pub placement: Option<PathBuf>,
    /// Seconds a MoE layer's dispatch may take before the node counts as
    /// failed: the hard limit, which applies when an expert has no other
    /// replica to hedge to.
    #[arg(long, env = "EXPERTMESH_DISPATCH_TIMEOUT", default_value_t = 10.0)]
    pub dispatch_timeout: f64,
    /// A node's share of a layer is hedged to other replicas (and the node
    /// probed, with no real traffic until it answers) after this multiple
    /// of its recent p99 round trip; 0 turns hedging off.
    #[arg(long, env = "EXPERTMESH_HEDGE_MULTIPLE", default_value_t = 3.0)]
    pub hedge_multiple: f64,
    /// Seconds: the per-node hedging deadline is never shorter than this.
    #[arg(long, env = "EXPERTMESH_HEDGE_FLOOR", default_value_t = 0.05)]
    pub hedge_floor: f64,
    /// Dispatch transport to the expert nodes.
    #[arg(long, value_enum, env = "EXPERTMESH_TRANSPORT", default_value = "grpc")]
    pub transport: TransportArg,
    /// With `--transport nccl`: the GPU the router stages dispatch rows
    /// through (its dense model still runs on the CPU).
    #[arg(long, env = "EXPERTMESH_NCCL_DEVICE", default_value = "cuda:0", value_parser = parse_cuda)]
    pub nccl_device: usize,
    /// Activation encoding on the wire: f32 is exact.
    #[arg(long, value_enum, env = "EXPERTMESH_DISPATCH_DTYPE", default_value = "f32")]
    pub dispatch_dtype: WireDtype,
    #[arg(long, env = "EXPERTMESH_MAX_NUM_SEQS", default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Token budget of one forward step (decodes + prefill chunks).
    #[arg(long, env = "EXPERTMESH_MAX_BATCH_TOKENS", default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// KV-cache memory, in bytes: the block pool that running requests and
    /// the prefix cache share.
    #[arg(long, env = "EXPERTMESH_KV_CACHE_BYTES", default_value_t = 2 << 30)]
    pub kv_cache_bytes: usize,
    /// Positions per KV block (a power of two).
    #[arg(long, env = "EXPERTMESH_KV_BLOCK_TOKENS", default_value_t = expertmesh_model::cache::DEFAULT_BLOCK_TOKENS)]
    pub kv_block_tokens: usize,
    /// Do not reuse the KV blocks of prompt prefixes seen before.
    #[arg(long, env = "EXPERTMESH_NO_PREFIX_CACHE")]
    pub no_prefix_cache: bool,
    /// How cached keys and values are stored: f32 (exact) or bf16 (half
    /// the memory; see docs/benchmarks.md for what it costs).
    #[arg(long, value_enum, env = "EXPERTMESH_KV_CACHE_DTYPE", default_value = "f32")]
    pub kv_cache_dtype: KvCacheDtype,
    /// Requests that may wait for admission; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "EXPERTMESH_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// Compute threads (default: all cores).
    #[arg(long, env = "EXPERTMESH_THREADS")]
    pub threads: Option<usize>,
    /// 2 splits each step into two micro-batches that run concurrently, so
    /// one half's attention overlaps the other half's expert dispatch.
    #[arg(long, env = "EXPERTMESH_MICRO_BATCHES", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub micro_batches: u8,
    /// Precision and quantization of the weights (dense, and the routed
    /// experts when they run in this process).
    #[command(flatten)]
    pub weights: WeightArgs,
    /// Speculative decoding for every request (checked against the model
    /// once it is loaded).
    #[command(flatten)]
    pub spec: SpeculativeArgs,
    /// etcd, cluster and lease: register this router and follow the
    /// coordinator's placement instead of a `--placement` file.
    #[command(flatten)]
    pub member: MemberArgs,
    #[command(flatten)]
    pub internal_tls: InternalTlsArgs,
    /// Certificate chain (PEM) for TLS on the public --grpc and --http listeners.
    #[arg(long, env = "EXPERTMESH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "EXPERTMESH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// This router's id in the cluster (default: `router-<hostname>-<pid>`).
    #[arg(long, env = "EXPERTMESH_ROUTER_ID")]
    pub router_id: Option<String>,
    /// The model name the APIs serve (default: the model directory's name).
    #[arg(long, env = "EXPERTMESH_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Longest prompt + completion, in tokens (default: the model's
    /// `max_position_embeddings`).
    #[arg(long, env = "EXPERTMESH_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, env = "EXPERTMESH_MAX_TOKENS_LIMIT", default_value_t = 8192)]
    pub max_tokens_limit: usize,
    /// Seconds a public-API request may take in all (unset: no limit).
    #[arg(long, env = "EXPERTMESH_REQUEST_TIMEOUT")]
    pub request_timeout: Option<f64>,
    /// API keys (comma-separated) required on the public HTTP and gRPC APIs.
    #[arg(long, env = "EXPERTMESH_API_KEY", value_delimiter = ',', hide_env_values = true)]
    pub api_key: Vec<ApiKey>,
    /// Per-expert metric series (`{layer,expert}`); `false` folds each
    /// layer's experts into one series (`expert="all"`) for very large
    /// models (per-node totals stay in `expertmesh_node_tokens_total`).
    #[arg(long, env = "EXPERTMESH_PER_EXPERT_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub per_expert_metrics: bool,
    /// Log each request's prompt (token ids) at info; off by default, as
    /// prompts may hold what users would not want in logs.
    #[arg(long, env = "EXPERTMESH_LOG_PROMPTS")]
    pub log_prompts: bool,
    #[command(flatten)]
    pub log: expertmesh_plumbing::process::LogArgs,
    /// Split reasoning from content in chat responses.
    #[arg(long, value_enum, env = "EXPERTMESH_REASONING_PARSER")]
    pub reasoning_parser: Option<ReasoningParser>,
    /// Parse tool calls out of chat responses in this model's format
    /// (`deepseek_v3`, `qwen3`); without it, requests with `tools` are
    /// refused.
    #[arg(long, value_enum, env = "EXPERTMESH_TOOL_CALL_PARSER")]
    pub tool_call_parser: Option<crate::generation::tools::ToolParserKind>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReasoningParser {
    /// Text up to `</think>` is `reasoning_content` (DeepSeek-R1).
    #[value(name = "deepseek_r1")]
    DeepseekR1,
}

impl Config {
    pub fn validate(&self) -> Result<(), RouterError> {
        let bad = |flag, message: &str| Err(RouterError::Config { flag, message: message.to_string() });
        if !(self.dispatch_timeout > 0.0 && self.dispatch_timeout.is_finite()) {
            return bad("--dispatch-timeout", "must be a positive number of seconds");
        }
        if !(self.hedge_multiple >= 0.0 && self.hedge_multiple.is_finite()) {
            return bad("--hedge-multiple", "must be a non-negative number (0 turns hedging off)");
        }
        if !(self.hedge_floor > 0.0 && self.hedge_floor.is_finite()) {
            return bad("--hedge-floor", "must be a positive number of seconds");
        }
        if self.max_num_seqs == 0 {
            return bad("--max-num-seqs", "must be at least 1");
        }
        if self.max_batch_tokens == 0 {
            return bad("--max-batch-tokens", "must be at least 1");
        }
        if self.max_queue == 0 {
            return bad("--max-queue", "must be at least 1");
        }
        if self.threads == Some(0) {
            return bad("--threads", "must be at least 1");
        }
        if self.max_model_len == Some(0) {
            return bad("--max-model-len", "must be at least 1");
        }
        if self.max_tokens_limit == 0 {
            return bad("--max-tokens-limit", "must be at least 1");
        }
        if self.request_timeout.is_some_and(|t| !(t > 0.0 && t.is_finite())) {
            return bad("--request-timeout", "must be a positive number of seconds");
        }
        if self.api_key.iter().any(|k| k.0.trim().is_empty()) {
            return bad("--api-key", "keys must not be empty");
        }
        if let Err((flag, message)) = self.member.validate() {
            return bad(flag, &message);
        }
        if self.transport != TransportArg::Grpc && self.internal_tls.internal_ca.is_some() {
            return bad("--transport", "tcp and nccl are plaintext; use grpc with --internal-ca");
        }
        if self.transport == TransportArg::Nccl && !matches!(self.dispatch_dtype, WireDtype::F32) {
            return bad("--dispatch-dtype", "NCCL moves f32 rows; use f32 with --transport nccl");
        }
        if self.member.joins() && self.router_id.as_ref().is_some_and(|i| i.is_empty() || i.contains('/')) {
            return bad("--router-id", "must be a non-empty id without '/'");
        }
        Ok(())
    }
}

/// `cuda:N` (or `cuda`) to the device ordinal.
fn parse_cuda(s: &str) -> Result<usize, String> {
    match s.parse::<expertmesh_gpu::DeviceSpec>()? {
        expertmesh_gpu::DeviceSpec::Cuda(n) => Ok(n),
        expertmesh_gpu::DeviceSpec::Cpu => Err("NCCL needs a GPU: cuda:N".into()),
    }
}
