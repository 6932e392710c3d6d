//! KServe v2 / Triton gRPC end to end: the real `tritonclient[grpc]` client
//! against a router process (tests/clients/triton_suite.py), gRPC health,
//! and malformed requests refused without harm.

use expertmesh_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use expertmesh_proto::inference::model_infer_request::InferInputTensor;
use expertmesh_proto::inference::{ModelInferRequest, ServerLiveRequest};
use std::path::PathBuf;
use std::process::Command;

mod common;
use common::{Procs, demo_checkpoint, http_get, http_post, python, router, runtime, scratch};

#[test]
fn tritonclient_works_and_bad_requests_are_refused() {
    let dir = scratch("kserve");
    let model = dir.0.join("model");
    demo_checkpoint(&model);
    let mut procs = Procs::default();
    let (grpc, http) = router(&mut procs, &model, &["--api-key", "k", "--served-model-name", "demo"]);
    let suite = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/clients/triton_suite.py");
    let out = Command::new(python()).args([suite.to_str().unwrap(), &grpc, "k", "demo"]).output().unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && log.contains("ALL OK"), "{log}");

    runtime().block_on(async {
        // grpc.health.v1: the router reports its services (open without a key).
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc}")).unwrap().connect().await.unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        let r = health
            .check(tonic_health::pb::HealthCheckRequest { service: "expertmesh.v1.GenerateService".into() })
            .await
            .unwrap();
        assert_eq!(r.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

        // Malformed tensors: INVALID_ARGUMENT, and the server keeps serving.
        let mut c = GrpcInferenceServiceClient::new(ch);
        let call = |req: ModelInferRequest| {
            let mut r = tonic::Request::new(req);
            r.metadata_mut().insert("authorization", "Bearer k".parse().unwrap());
            r
        };
        let input = |name: &str, dt: &str| InferInputTensor {
            name: name.into(),
            datatype: dt.into(),
            shape: vec![1],
            ..Default::default()
        };
        for (inputs, raw) in [
            (vec![input("text_input", "BYTES")], vec![vec![9u8, 0, 0, 0, b'x']]),
            (vec![input("text_input", "INT32")], vec![vec![1, 0, 0, 0]]),
            (vec![input("text_input", "BYTES")], vec![]),
            (vec![input("text_input", "BYTES"), input("stream", "BOOL")], vec![vec![1, 0, 0, 0, b'x'], vec![1, 1]]),
            (vec![input("text_input", "BYTES")], vec![vec![2, 0, 0, 0, 0xff, 0xfe]]),
        ] {
            let req = ModelInferRequest {
                model_name: "demo".into(),
                inputs,
                raw_input_contents: raw.into_iter().map(Into::into).collect(),
                ..Default::default()
            };
            let e = c.model_infer(call(req)).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        }
        let mut live = tonic::Request::new(ServerLiveRequest {});
        live.metadata_mut().insert("authorization", "Bearer k".parse().unwrap());
        assert!(c.server_live(live).await.unwrap().into_inner().live);
    });

    // Triton's HTTP generate extension.
    let (json, key) = (("Content-Type", "application/json"), ("Authorization", "Bearer k"));
    let body = br#"{"text_input": "Hello", "max_tokens": 6, "parameters": {"temperature": 0, "ignore_eos": true}}"#;
    let (status, text) = http_post(&http, "/v2/models/demo/generate", body, &[json, key]);
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["num_output_tokens"], 6, "{v}");
    assert_eq!(v["model_name"], "demo");
    let whole = v["text_output"].as_str().unwrap().to_string();
    let (status, events) = http_post(&http, "/v2/models/demo/generate_stream", body, &[json, key]);
    assert_eq!(status, 200);
    let chunks: Vec<serde_json::Value> =
        events.lines().filter_map(|l| l.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).collect();
    assert!(chunks.len() >= 7, "{events}");
    let streamed: String = chunks.iter().map(|c| c["text_output"].as_str().unwrap_or_default()).collect();
    assert_eq!(streamed, whole);
    assert_eq!(chunks.last().unwrap()["finish_reason"], "length");
    let (status, text) = http_post(&http, "/v2/models/nope/generate", body, &[json, key]);
    assert_eq!(status, 404, "{text}");
    assert!(serde_json::from_str::<serde_json::Value>(&text).unwrap()["error"].is_string());
    assert_eq!(http_post(&http, "/v2/models/demo/generate", body, &[json]).0, 401);
    assert_eq!(http_get(&http, "/v2/health/live").0, 200);
    assert_eq!(http_get(&http, "/v2/health/ready").0, 200);
}
