//! KServe v2 / Triton gRPC (`inference.GRPCInferenceService`) on the
//! router's gRPC listener, with the text-generation tensor convention of
//! Triton's vLLM and TensorRT-LLM backends: input `text_input` (BYTES [1]),
//! optional `stream` (BOOL [1]) and `sampling_parameters` (BYTES [1], JSON);
//! outputs `text_output`, `finish_reason`, `num_input_tokens`,
//! `num_output_tokens`. `ModelStreamInfer` is decoupled: one response per
//! token, and with `triton_enable_empty_final_response` a last, empty
//! response flagged `triton_final_response`.

pub mod tensors;

use crate::RouterState;
use crate::generation::{self, Generation, GenerationError, Piece};
use crate::triton_params::TextParams;
use expertmesh_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use expertmesh_proto::inference::model_metadata_response::TensorMetadata;
use expertmesh_proto::inference::*;
use std::pin::Pin;
use std::sync::Arc;
use tensors::Output;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone)]
pub struct KServeApi {
    pub state: Arc<RouterState>,
}

fn traceparent(m: &tonic::metadata::MetadataMap) -> String {
    expertmesh_dataplane::trace::of_request(m.get("traceparent").and_then(|v| v.to_str().ok()))
}

/// How to answer one inference request.
struct Reply {
    id: String,
    stream: bool,
    requested: Vec<String>,
    empty_final: bool,
}

/// One inference request, checked and started.
struct Started {
    reply: Reply,
    generation: Generation,
}

impl KServeApi {
    fn count<T>(&self, method: &str, r: Result<T, Status>) -> Result<T, Status> {
        let code = match &r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.state.metrics.grpc_requests.with_label_values(&[method, &format!("{code:?}")]).inc();
        r
    }

    /// The request's tensors as the core's request, started.
    async fn begin(&self, req: ModelInferRequest, trace_id: String) -> Result<Started, GenerationError> {
        let st = &self.state;
        let translate = || -> Result<_, GenerationError> {
            let text = tensors::text_input(&req)?;
            let stream = tensors::stream_input(&req)?;
            let p = TextParams::parse(tensors::sampling(&req)?, "sampling parameters")?;
            Ok((p.request(&req.model_name, text, trace_id)?, stream))
        };
        let (request, stream) = translate().map_err(|e| st.refused(e))?;
        let generation = generation::start(st, request).await?;
        let reply = Reply {
            id: req.id,
            stream,
            requested: req.outputs.into_iter().map(|o| o.name).collect(),
            empty_final: tensors::bool_param(&req.parameters, "triton_enable_empty_final_response"),
        };
        Ok(Started { reply, generation })
    }

    fn response(&self, s: &Reply, outputs: Vec<Output>, final_flag: Option<bool>) -> ModelInferResponse {
        let mut r = ModelInferResponse {
            model_name: self.state.served_model_name.clone(),
            model_version: "1".into(),
            id: s.id.clone(),
            ..Default::default()
        };
        for o in outputs.into_iter().filter(|o| s.requested.is_empty() || s.requested.iter().any(|n| n == o.name())) {
            let (t, raw) = o.into_tensor();
            r.outputs.push(t);
            r.raw_output_contents.push(raw.into());
        }
        if let Some(f) = final_flag {
            r.parameters.insert("triton_final_response".into(), tensors::bool_parameter(f));
        }
        r
    }
}

fn done_outputs(text: String, reason: &str, prompt: usize, completion: usize) -> Vec<Output> {
    vec![
        Output::Bytes("text_output", text.into_bytes()),
        Output::Bytes("finish_reason", reason.as_bytes().to_vec()),
        Output::Int32("num_input_tokens", prompt as i32),
        Output::Int32("num_output_tokens", completion as i32),
    ]
}

/// Runs one started request, sending its responses (one per token when
/// streaming, else one) to `out`. Returns when done or the client left.
async fn drive(api: &KServeApi, s: Started, out: &mpsc::Sender<Result<ModelStreamInferResponse, Status>>) {
    let ok = |r| Ok(ModelStreamInferResponse { error_message: String::new(), infer_response: Some(r) });
    let (r, mut g) = (s.reply, s.generation);
    let mut text = String::new();
    while let Some(p) = g.next().await {
        let msg = match p {
            Ok(Piece::Token(t)) if r.stream => {
                ok(api.response(&r, vec![Output::Bytes("text_output", t.text.into_bytes())], Some(false)))
            }
            Ok(Piece::Tail { text: t, .. }) if r.stream => {
                ok(api.response(&r, vec![Output::Bytes("text_output", t.into_bytes())], Some(false)))
            }
            Ok(Piece::Token(t)) => {
                text += &t.text;
                continue;
            }
            Ok(Piece::Tail { text: t, .. }) => {
                text += &t;
                continue;
            }
            Ok(Piece::Done { reason, prompt_tokens, completion_tokens }) => {
                let body = if r.stream { String::new() } else { std::mem::take(&mut text) };
                let outputs = done_outputs(body, reason.as_str(), prompt_tokens, completion_tokens);
                let sent = if r.empty_final {
                    out.send(ok(api.response(&r, outputs, Some(false)))).await.is_ok()
                        && out.send(ok(api.response(&r, vec![], Some(true)))).await.is_ok()
                } else {
                    out.send(ok(api.response(&r, outputs, Some(true)))).await.is_ok()
                };
                if !sent {
                    tracing::debug!("the client left before the last response");
                }
                return;
            }
            Err(e) => Ok(ModelStreamInferResponse { error_message: e.to_string(), infer_response: None }),
        };
        if out.send(msg).await.is_err() {
            return;
        }
    }
}

type InferStream = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcInferenceService for KServeApi {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        self.count("ServerLive", Ok(Response::new(ServerLiveResponse { live: true })))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        self.count("ServerReady", Ok(Response::new(ServerReadyResponse { ready: self.state.is_ready() })))
    }

    async fn model_ready(&self, r: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let r = generation::request::check_model(&self.state, Some(&r.into_inner().name))
            .map(|_| Response::new(ModelReadyResponse { ready: self.state.is_ready() }))
            .map_err(Status::from);
        self.count("ModelReady", r)
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        self.count(
            "ServerMetadata",
            Ok(Response::new(ServerMetadataResponse {
                name: "expertmesh".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                extensions: vec![],
            })),
        )
    }

    async fn model_metadata(
        &self,
        r: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let t = |name: &str, datatype: &str| TensorMetadata {
            name: name.into(),
            datatype: datatype.into(),
            shape: vec![1],
        };
        let r =
            generation::request::check_model(&self.state, Some(&r.into_inner().name)).map_err(Status::from).map(|_| {
                Response::new(ModelMetadataResponse {
                    name: self.state.served_model_name.clone(),
                    versions: vec!["1".into()],
                    platform: "expertmesh".into(),
                    inputs: vec![t("text_input", "BYTES"), t("stream", "BOOL"), t("sampling_parameters", "BYTES")],
                    outputs: vec![
                        t("text_output", "BYTES"),
                        t("finish_reason", "BYTES"),
                        t("num_input_tokens", "INT32"),
                        t("num_output_tokens", "INT32"),
                    ],
                })
            });
        self.count("ModelMetadata", r)
    }

    async fn model_infer(&self, r: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let result = async {
            let trace_id = traceparent(r.metadata());
            let s = self.begin(r.into_inner(), trace_id).await?;
            if s.reply.stream {
                let e = GenerationError::invalid("stream", "stream=true needs ModelStreamInfer");
                return Err(self.state.refused(e).into());
            }
            let c = s.generation.collect().await?;
            let outputs = done_outputs(c.text, c.reason.as_str(), c.prompt_tokens, c.completion_tokens);
            Ok(Response::new(self.response(&s.reply, outputs, None)))
        }
        .await;
        self.count("ModelInfer", result)
    }

    type ModelStreamInferStream = InferStream;

    async fn model_stream_infer(
        &self,
        r: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        // One trace for the stream: its requests share the call's traceparent.
        let given = r.metadata().get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let mut requests = r.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let api = self.clone();
        tokio::spawn(async move {
            // Requests on one stream run concurrently, as Triton's decoupled models do.
            while let Some(Ok(req)) = requests.next().await {
                let (api, tx) = (api.clone(), tx.clone());
                let trace_id = expertmesh_dataplane::trace::of_request(given.as_deref());
                tokio::spawn(async move {
                    match api.begin(req, trace_id).await {
                        Ok(s) => drive(&api, s, &tx).await,
                        Err(e) => {
                            let msg = ModelStreamInferResponse { error_message: e.to_string(), infer_response: None };
                            if tx.send(Ok(msg)).await.is_err() {
                                tracing::debug!("the client left before the error");
                            }
                        }
                    }
                });
            }
        });
        self.count(
            "ModelStreamInfer",
            Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as InferStream)),
        )
    }

    async fn model_config(&self, _: Request<ModelConfigRequest>) -> Result<Response<ModelConfigResponse>, Status> {
        self.count("ModelConfig", Err(Status::unimplemented("ModelConfig")))
    }
    async fn model_statistics(
        &self,
        _: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        self.count("ModelStatistics", Err(Status::unimplemented("ModelStatistics")))
    }
    async fn repository_index(
        &self,
        _: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        self.count("RepositoryIndex", Err(Status::unimplemented("RepositoryIndex")))
    }
    async fn repository_model_load(
        &self,
        _: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        self.count("RepositoryModelLoad", Err(Status::unimplemented("RepositoryModelLoad")))
    }
    async fn repository_model_unload(
        &self,
        _: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        self.count("RepositoryModelUnload", Err(Status::unimplemented("RepositoryModelUnload")))
    }
    async fn system_shared_memory_status(
        &self,
        _: Request<SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<SystemSharedMemoryStatusResponse>, Status> {
        self.count("SystemSharedMemoryStatus", Err(Status::unimplemented("SystemSharedMemoryStatus")))
    }
    async fn system_shared_memory_register(
        &self,
        _: Request<SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<SystemSharedMemoryRegisterResponse>, Status> {
        self.count("SystemSharedMemoryRegister", Err(Status::unimplemented("SystemSharedMemoryRegister")))
    }
    async fn system_shared_memory_unregister(
        &self,
        _: Request<SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<SystemSharedMemoryUnregisterResponse>, Status> {
        self.count("SystemSharedMemoryUnregister", Err(Status::unimplemented("SystemSharedMemoryUnregister")))
    }
    async fn cuda_shared_memory_status(
        &self,
        _: Request<CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<CudaSharedMemoryStatusResponse>, Status> {
        self.count("CudaSharedMemoryStatus", Err(Status::unimplemented("CudaSharedMemoryStatus")))
    }
    async fn cuda_shared_memory_register(
        &self,
        _: Request<CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<CudaSharedMemoryRegisterResponse>, Status> {
        self.count("CudaSharedMemoryRegister", Err(Status::unimplemented("CudaSharedMemoryRegister")))
    }
    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<CudaSharedMemoryUnregisterResponse>, Status> {
        self.count("CudaSharedMemoryUnregister", Err(Status::unimplemented("CudaSharedMemoryUnregister")))
    }
    async fn trace_setting(&self, _: Request<TraceSettingRequest>) -> Result<Response<TraceSettingResponse>, Status> {
        self.count("TraceSetting", Err(Status::unimplemented("TraceSetting")))
    }
    async fn log_settings(&self, _: Request<LogSettingsRequest>) -> Result<Response<LogSettingsResponse>, Status> {
        self.count("LogSettings", Err(Status::unimplemented("LogSettings")))
    }
}
