//! `expertmesh.v1.GenerateService` on the router's gRPC listener: the
//! native API, a thin adapter over [`crate::generation`] like the others.

use crate::RouterState;
use crate::generation::{self, GenerationRequest, Piece, Prompt, Sampling};
use expertmesh_model::generate::FinishReason;
use expertmesh_model::tokenizer::ChatMessage;
use expertmesh_proto::v1::generate_request::Prompt as WirePrompt;
use expertmesh_proto::v1::generate_service_server::GenerateService;
use expertmesh_proto::v1::{
    FinishReason as WireFinish, GenerateRequest, GenerateResponse, ModelInfoRequest, ModelInfoResponse,
};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct GenerateApi {
    pub state: Arc<RouterState>,
}

type GenerateStream = ReceiverStream<Result<GenerateResponse, Status>>;

/// The wire request as the core's. Proto3 zeros mean "unset": temperature 0
/// is greedy (the field's documented meaning), top_p 0 is no filtering;
/// `max_tokens` 0 is refused as every API refuses it.
fn translate(req: GenerateRequest, trace_id: String) -> Result<GenerationRequest, generation::GenerationError> {
    let prompt = match req.prompt {
        Some(WirePrompt::TokenIds(t)) => Prompt::TokenIds(t.ids),
        Some(WirePrompt::Text(text)) if req.chat => Prompt::Chat(vec![ChatMessage::new("user", text)]),
        Some(WirePrompt::Text(text)) => Prompt::Text(text),
        None => return Err(generation::GenerationError::invalid("prompt", "prompt is required (text or token_ids)")),
    };
    let s = req.sampling.unwrap_or_default();
    let sampling = Sampling {
        temperature: Some(s.temperature),
        top_p: Some(if s.top_p == 0.0 { 1.0 } else { s.top_p }),
        top_k: Some(i64::from(s.top_k)),
        seed: s.seed,
        n: None,
    };
    Ok(GenerationRequest {
        sampling,
        max_tokens: Some(i64::from(req.max_tokens)),
        ignore_eos: req.ignore_eos,
        ..GenerationRequest::new(prompt, trace_id)
    })
}

fn wire_finish(r: FinishReason) -> i32 {
    match r {
        FinishReason::Stop => WireFinish::Stop as i32,
        FinishReason::Length => WireFinish::Length as i32,
    }
}

impl GenerateApi {
    async fn start(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let st = &self.state;
        let trace_id = expertmesh_dataplane::trace::of_request(
            request.metadata().get("traceparent").and_then(|v| v.to_str().ok()),
        );
        let req = translate(request.into_inner(), trace_id).map_err(|e| st.refused(e))?;
        let mut g = generation::start(st, req).await?;
        let (out, out_rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut first = Some(std::mem::take(&mut g.prompt));
            while let Some(p) = g.next().await {
                let prompt_token_ids = first.take().unwrap_or_default();
                let (msg, end) = match p {
                    Ok(Piece::Token(t)) => {
                        let r = GenerateResponse {
                            token_ids: vec![t.id],
                            logprobs: vec![t.logprob],
                            text: t.text,
                            finish_reason: WireFinish::Unspecified as i32,
                            prompt_token_ids,
                        };
                        (Ok(r), false)
                    }
                    Ok(Piece::Tail { text, .. }) => {
                        (Ok(GenerateResponse { text, prompt_token_ids, ..Default::default() }), false)
                    }
                    Ok(Piece::Done { reason, .. }) => (
                        Ok(GenerateResponse {
                            finish_reason: wire_finish(reason),
                            prompt_token_ids,
                            ..Default::default()
                        }),
                        true,
                    ),
                    Err(e) => (Err(Status::from(e)), true),
                };
                // A send error means the client went away: dropping `g`
                // cancels the request and frees its cache.
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
