//! One generation core behind four doors: the same over-limit, bad-sampling
//! and unauthenticated requests through OpenAI HTTP, Triton's HTTP generate
//! extension, KServe v2 gRPC and the native GenerateService get the same
//! refusal (the same message), each in its protocol's own form; and every
//! door answers a valid request.

use expertmesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use expertmesh_proto::inference::model_infer_request::InferInputTensor;
use expertmesh_proto::inference::{InferTensorContents, ModelInferRequest};
use expertmesh_proto::v1::generate_request::Prompt;
use expertmesh_proto::v1::generate_service_client::GenerateServiceClient;
use expertmesh_proto::v1::{GenerateRequest, SamplingParams};
use serde_json::{Value, json};

mod common;
use common::{Procs, demo_checkpoint, http_post, router, runtime, scratch};

/// What a door answered: an HTTP status or gRPC code, and the message.
#[derive(Debug, PartialEq)]
struct Refusal {
    status: String,
    message: String,
}

/// A request every door can carry: a text prompt, `max_tokens`, a temperature.
#[derive(Clone, Copy)]
struct Ask {
    max_tokens: u32,
    temperature: f32,
    key: Option<&'static str>,
}

fn openai(http: &str, a: Ask) -> Option<Refusal> {
    let body = json!({"prompt": "hello there", "max_tokens": a.max_tokens, "temperature": a.temperature}).to_string();
    let auth = a.key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(h) = &auth {
        headers.push(("Authorization", h));
    }
    let (status, body) = http_post(http, "/v1/completions", body.as_bytes(), &headers);
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{status}: {body}"));
    (status != 200)
        .then(|| Refusal { status: status.to_string(), message: v["error"]["message"].as_str().unwrap().into() })
}

fn triton(http: &str, a: Ask) -> Option<Refusal> {
    let body =
        json!({"text_input": "hello there", "max_tokens": a.max_tokens, "parameters": {"temperature": a.temperature}})
            .to_string();
    let auth = a.key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(h) = &auth {
        headers.push(("Authorization", h));
    }
    let (status, body) = http_post(http, "/v2/models/demo/generate", body.as_bytes(), &headers);
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{status}: {body}"));
    (status != 200).then(|| Refusal { status: status.to_string(), message: v["error"].as_str().unwrap().into() })
}

fn grpc_request<T>(msg: T, key: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(k) = key {
        r.metadata_mut().insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    r
}

fn refusal(s: tonic::Status) -> Refusal {
    Refusal { status: format!("{:?}", s.code()), message: s.message().into() }
}

async fn kserve(grpc: &str, a: Ask) -> Option<Refusal> {
    let mut c = GrpcInferenceServiceClient::connect(format!("http://{grpc}")).await.unwrap();
    let bytes = |b: &[u8]| InferTensorContents { bytes_contents: vec![b.to_vec().into()], ..Default::default() };
    let input = |name: &str, v: &[u8]| InferInputTensor {
        name: name.into(),
        datatype: "BYTES".into(),
        shape: vec![1],
        contents: Some(bytes(v)),
        ..Default::default()
    };
    let params = json!({"max_tokens": a.max_tokens, "temperature": a.temperature}).to_string();
    let req = ModelInferRequest {
        model_name: "demo".into(),
        inputs: vec![input("text_input", b"hello there"), input("sampling_parameters", params.as_bytes())],
        ..Default::default()
    };
    c.model_infer(grpc_request(req, a.key)).await.err().map(refusal)
}

async fn native(grpc: &str, a: Ask) -> Option<Refusal> {
    let mut c = GenerateServiceClient::connect(format!("http://{grpc}")).await.unwrap();
    let req = GenerateRequest {
        prompt: Some(Prompt::Text("hello there".into())),
        sampling: Some(SamplingParams { temperature: a.temperature, ..Default::default() }),
        max_tokens: a.max_tokens,
        ..Default::default()
    };
    match c.generate(grpc_request(req, a.key)).await {
        Err(s) => Some(refusal(s)),
        Ok(r) => {
            let mut s = r.into_inner();
            match s.message().await {
                Err(e) => Some(refusal(e)),
                Ok(_) => None,
            }
        }
    }
}

#[test]
fn four_doors_refuse_alike_and_serve_alike() {
    let dir = scratch("doors");
    let model = dir.0.join("model");
    demo_checkpoint(&model);
    let mut procs = Procs::default();
    let flags = ["--api-key", "k", "--served-model-name", "demo", "--max-tokens-limit", "50"];
    let (grpc, http) = router(&mut procs, &model, &flags);
    let rt = runtime();
    let doors = |a: Ask| -> [Option<Refusal>; 4] {
        [openai(&http, a), triton(&http, a), rt.block_on(kserve(&grpc, a)), rt.block_on(native(&grpc, a))]
    };
    let good = Ask { max_tokens: 4, temperature: 0.0, key: Some("k") };
    for (door, r) in ["openai", "triton", "kserve", "native"].iter().zip(doors(good)) {
        assert_eq!(r, None, "{door} refused a valid request");
    }
    let cases = [
        (
            "over --max-tokens-limit",
            Ask { max_tokens: 100, ..good },
            ["400", "400", "InvalidArgument", "InvalidArgument"],
        ),
        ("bad sampling", Ask { temperature: -1.0, ..good }, ["400", "400", "InvalidArgument", "InvalidArgument"]),
        ("no API key", Ask { key: None, ..good }, ["401", "401", "Unauthenticated", "Unauthenticated"]),
        ("a wrong API key", Ask { key: Some("nope"), ..good }, ["401", "401", "Unauthenticated", "Unauthenticated"]),
    ];
    for (what, ask, statuses) in cases {
        let got = doors(ask);
        let refusals: Vec<&Refusal> =
            got.iter().map(|r| r.as_ref().unwrap_or_else(|| panic!("{what}: accepted"))).collect();
        let codes: Vec<&str> = refusals.iter().map(|r| r.status.as_str()).collect();
        assert_eq!(codes, statuses, "{what}: {refusals:?}");
        assert!(refusals.iter().all(|r| r.message == refusals[0].message), "{what}: messages differ: {refusals:#?}");
        assert!(!refusals[0].message.is_empty());
    }
    let over = doors(Ask { max_tokens: 100, ..good });
    assert!(over[0].as_ref().unwrap().message.contains("at most 50"), "{over:?}");
}

#[test]
fn a_corrupt_tokenizer_stops_the_router_at_start_and_a_missing_one_leaves_token_ids() {
    let dir = scratch("tokenizer");
    let model = dir.0.join("model");
    demo_checkpoint(&model);
    std::fs::write(model.join("tokenizer.json"), b"{\"version\": \"1.0\", \"model\": ").unwrap();
    let out = common::command("router")
        .args(["--model", model.to_str().unwrap(), "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a corrupt tokenizer: {err}");
    assert!(err.contains("tokenizer.json"), "the error names the file: {err}");

    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    let mut procs = Procs::default();
    let (_, http) = router(&mut procs, &model, &[]);
    let ids = br#"{"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}"#;
    let (status, body) = http_post(&http, "/v1/completions", ids, &[("Content-Type", "application/json")]);
    assert_eq!(status, 200, "token ids without a tokenizer: {body}");
    let text = br#"{"prompt": "hello", "max_tokens": 3}"#;
    let (status, body) = http_post(&http, "/v1/completions", text, &[("Content-Type", "application/json")]);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("no tokenizer.json"), "{body}");
}
