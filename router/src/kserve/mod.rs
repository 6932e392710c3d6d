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
use crate::openai::error::ApiError;
use crate::openai::generation::{Piece, TextParams, start};
use expertmesh_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use expertmesh_proto::inference::model_metadata_response::TensorMetadata;
use expertmesh_proto::inference::*;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tensors::Output;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone)]
pub struct KServeApi {
    pub state: Arc<RouterState>,
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        use axum::http::StatusCode as S;
        match e.status {
            S::BAD_REQUEST | S::PAYLOAD_TOO_LARGE => Status::invalid_argument(e.message),
            S::UNAUTHORIZED => Status::unauthenticated(e.message),
            S::NOT_FOUND => Status::not_found(e.message),
            S::TOO_MANY_REQUESTS => Status::resource_exhausted(e.message),
            S::SERVICE_UNAVAILABLE => Status::unavailable(e.message),
            S::GATEWAY_TIMEOUT => Status::deadline_exceeded(e.message),
            _ => Status::internal(e.message),
        }
    }
}

fn traceparent(m: &tonic::metadata::MetadataMap) -> String {
    expertmesh_dataplane::trace::of_request(m.get("traceparent").and_then(|v| v.to_str().ok()))
}

/// One inference request, checked and started.
struct Started {
    id: String,
    stream: bool,
    requested: Vec<String>,
    empty_final: bool,
    pieces: mpsc::Receiver<Result<Piece, ApiError>>,
}

impl KServeApi {
    fn check_model(&self, name: &str) -> Result<(), Status> {
        if name == self.state.served_model_name {
            Ok(())
        } else {
            Err(Status::not_found(format!(
                "model {name:?} is not served here (try {:?})",
                self.state.served_model_name
            )))
        }
    }

    fn count<T>(&self, method: &str, r: Result<T, Status>) -> Result<T, Status> {
        let code = match &r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.state.metrics.grpc_requests.with_label_values(&[method, &format!("{code:?}")]).inc();
        r
    }

    async fn begin(&self, req: ModelInferRequest, trace_id: String) -> Result<Started, Status> {
        self.check_model(&req.model_name)?;
        let text = tensors::text_input(&req)?;
        let stream = tensors::stream_input(&req)?;
        let p: TextParams = serde_json::from_value(serde_json::Value::Object(tensors::sampling(&req)?))
            .map_err(|e| Status::invalid_argument(format!("sampling parameters: {e}")))?;
        let tok = self.state.tokenizer.as_ref().ok_or_else(|| Status::failed_precondition("no tokenizer.json"))?;
        let prompt = tok.encode(&text).map_err(|e| Status::from(ApiError::from(e)))?;
        let pieces = start(&self.state, p.request(prompt, trace_id)?).await?;
        Ok(Started {
            id: req.id,
            stream,
            requested: req.outputs.into_iter().map(|o| o.name).collect(),
            empty_final: tensors::bool_param(&req.parameters, "triton_enable_empty_final_response"),
            pieces,
        })
    }

    fn response(&self, s: &Started, outputs: Vec<Output>, final_flag: Option<bool>) -> ModelInferResponse {
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
async fn drive(api: &KServeApi, mut s: Started, out: &mpsc::Sender<Result<ModelStreamInferResponse, Status>>) {
    let ok = |r| Ok(ModelStreamInferResponse { error_message: String::new(), infer_response: Some(r) });
    let mut text = String::new();
    while let Some(p) = s.pieces.recv().await {
        let msg = match p {
            Ok(Piece::Token(t)) if s.stream => {
                ok(api.response(&s, vec![Output::Bytes("text_output", t.text.into_bytes())], Some(false)))
            }
            Ok(Piece::Tail(t)) if s.stream => {
                ok(api.response(&s, vec![Output::Bytes("text_output", t.into_bytes())], Some(false)))
            }
            Ok(Piece::Token(t)) => {
                text += &t.text;
                continue;
            }
            Ok(Piece::Tail(t)) => {
                text += &t;
                continue;
            }
            Ok(Piece::Done { reason, prompt_tokens, completion_tokens }) => {
                let body = if s.stream { String::new() } else { std::mem::take(&mut text) };
                let outputs = done_outputs(body, reason.as_str(), prompt_tokens, completion_tokens);
                if s.empty_final {
                    let _ = out.send(ok(api.response(&s, outputs, Some(false)))).await;
                    let _ = out.send(ok(api.response(&s, vec![], Some(true)))).await;
                } else {
                    let _ = out.send(ok(api.response(&s, outputs, Some(true)))).await;
                }
                return;
            }
            Err(e) => Ok(ModelStreamInferResponse { error_message: e.message, infer_response: None }),
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
        let ready = self.state.ready.load(Ordering::Acquire) && self.state.covered.load(Ordering::Acquire);
        self.count("ServerReady", Ok(Response::new(ServerReadyResponse { ready })))
    }

    async fn model_ready(&self, r: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let r = self.check_model(&r.into_inner().name).map(|_| {
            let ready = self.state.ready.load(Ordering::Acquire) && self.state.covered.load(Ordering::Acquire);
            Response::new(ModelReadyResponse { ready })
        });
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
        let r = self.check_model(&r.into_inner().name).map(|_| {
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
            if s.stream {
                return Err(Status::invalid_argument("stream=true needs ModelStreamInfer"));
            }
            let (tx, mut rx) = mpsc::channel(4);
            drive(self, s, &tx).await;
            drop(tx);
            match rx.recv().await {
                Some(Ok(ModelStreamInferResponse { infer_response: Some(mut resp), .. })) => {
                    resp.parameters.remove("triton_final_response");
                    Ok(Response::new(resp))
                }
                Some(Ok(m)) => Err(Status::internal(m.error_message)),
                Some(Err(e)) => Err(e),
                None => Err(Status::unavailable("the generation ended early")),
            }
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
                            let msg = ModelStreamInferResponse {
                                error_message: e.message().to_string(),
                                infer_response: None,
                            };
                            let _ = tx.send(Ok(msg)).await;
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
