//! `expertmesh.v1.GenerateService` on the router's gRPC listener.

use crate::RouterState;
use crate::engine::{Event, Submit, event_channel};
use expertmesh_dataplane::trace;
use expertmesh_model::ModelError;
use expertmesh_model::generate::{FinishReason, SamplingParams};
use expertmesh_model::tokenizer::{ChatMessage, IncrementalDecoder};
use expertmesh_proto::v1::generate_request::Prompt;
use expertmesh_proto::v1::generate_service_server::GenerateService;
use expertmesh_proto::v1::{
    FinishReason as WireFinish, GenerateRequest, GenerateResponse, ModelInfoRequest, ModelInfoResponse,
};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct GenerateApi {
    pub state: Arc<RouterState>,
}

pub fn status_of(e: &ModelError) -> Status {
    match e {
        ModelError::InvalidInput(m) => Status::invalid_argument(m.clone()),
        ModelError::Unavailable(m) => Status::unavailable(m.clone()),
        ModelError::Tokenizer(m) | ModelError::Template(m) => Status::invalid_argument(m.clone()),
        other => Status::internal(other.to_string()),
    }
}

type GenerateStream = ReceiverStream<Result<GenerateResponse, Status>>;

impl GenerateApi {
    async fn start(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let arrived = Instant::now();
        let trace_id = trace::of_request(request.metadata().get("traceparent").and_then(|v| v.to_str().ok()));
        let req = request.into_inner();
        let st = &self.state;
        let tok = st.tokenizer.clone();
        let prompt = match req.prompt {
            Some(Prompt::TokenIds(t)) => t.ids,
            Some(Prompt::Text(text)) => {
                let tok = tok
                    .as_ref()
                    .ok_or_else(|| Status::invalid_argument("this model has no tokenizer.json; send token_ids"))?;
                let text = if req.chat {
                    tok.apply_chat_template(&[ChatMessage { role: "user".into(), content: text }], true)
                        .map_err(|e| status_of(&e))?
                } else {
                    text
                };
                tok.encode(&text).map_err(|e| status_of(&e))?
            }
            None => return Err(Status::invalid_argument("prompt is required (text or token_ids)")),
        };
        let s = req.sampling.unwrap_or_default();
        let params = SamplingParams {
            temperature: s.temperature,
            top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
            top_k: s.top_k as usize,
            seed: s.seed,
        };
        params.validate().map_err(|e| status_of(&e))?;
        let max_tokens = req.max_tokens as usize;
        if max_tokens == 0 {
            return Err(Status::invalid_argument("max_tokens must be at least 1"));
        }
        crate::log_prompt(st, &trace_id, &prompt);
        let (events, mut rx) = event_channel(max_tokens);
        let submit = Submit {
            prompt: prompt.clone(),
            params,
            max_tokens,
            ignore_eos: req.ignore_eos,
            top_logprobs: 0,
            events,
            arrived,
            trace_id,
        };
        st.submit(submit)?;
        let (out, out_rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut first = Some(prompt);
            let mut decoder = IncrementalDecoder::default();
            while let Some(ev) = rx.recv().await {
                let msg = match ev {
                    Event::Token { id, logprob, .. } => Ok(GenerateResponse {
                        token_ids: vec![id],
                        logprobs: vec![logprob],
                        text: tok.as_ref().and_then(|t| decoder.push(t, id)).unwrap_or_default(),
                        finish_reason: WireFinish::Unspecified as i32,
                        prompt_token_ids: first.take().unwrap_or_default(),
                    }),
                    Event::Finished(r) => Ok(GenerateResponse {
                        finish_reason: match r {
                            FinishReason::Stop => WireFinish::Stop,
                            FinishReason::Length => WireFinish::Length,
                        } as i32,
                        prompt_token_ids: first.take().unwrap_or_default(),
                        ..Default::default()
                    }),
                    Event::Failed(e) => Err(status_of(&e)),
                };
                let end = !matches!(msg, Ok(GenerateResponse { finish_reason: 0, .. }));
                // A send error means the client went away: dropping `rx` tells
                // the engine to cancel the request and free its cache.
                if out.send(msg).await.is_err() || end {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }
}

#[tonic::async_trait]
impl GenerateService for GenerateApi {
    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let r = self.start(request).await;
        let code = r.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        self.state.metrics.grpc_requests.with_label_values(&["Generate", &format!("{code:?}")]).inc();
        r
    }

    async fn model_info(&self, _: Request<ModelInfoRequest>) -> Result<Response<ModelInfoResponse>, Status> {
        let c = &self.state.model_cfg;
        Ok(Response::new(ModelInfoResponse {
            name: self.state.model_name.clone(),
            architecture: c.arch.name().into(),
            vocab_size: c.vocab_size as u32,
            max_position_embeddings: c.max_position_embeddings as u32,
            num_layers: c.num_layers as u32,
            num_routed_experts: c.moe.n_routed_experts as u32,
            experts_per_token: c.moe.experts_per_tok as u32,
        }))
    }
}
