//! The public HTTP API end to end: the real `openai` Python client against a
//! router process (tests/clients/openai_suite.py), plus the error statuses,
//! API keys on HTTP and gRPC, limits and timeouts, checked from Rust.

use expertmesh_proto::v1::generate_request::Prompt;
use expertmesh_proto::v1::generate_service_client::GenerateServiceClient;
use expertmesh_proto::v1::{GenerateRequest, TokenIds};
use std::path::PathBuf;
use std::process::Command;

mod common;
use common::{Procs, demo_checkpoint, http_get, http_post, python, router, runtime, scratch};

const JSON: (&str, &str) = ("Content-Type", "application/json");
const KEY: (&str, &str) = ("Authorization", "Bearer key-2");

#[test]
fn the_openai_client_works_and_errors_have_their_statuses() {
    let dir = scratch("client");
    let model = dir.0.join("model");
    demo_checkpoint(&model);
    // What offline generation produces, for the exactness check.
    let prompt = [5u32, 17, 33, 8, 61];
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let out = common::command("expertmesh")
        .args(["generate", "--model", model.to_str().unwrap(), "--prompt-ids", &ids.join(",")])
        .args(["--max-tokens", "10", "--ignore-eos", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let offline: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let expected = dir.0.join("expected.json");
    let body = serde_json::json!({"prompt_ids": prompt, "greedy_ids": offline["token_ids"]});
    std::fs::write(&expected, body.to_string()).unwrap();

    let mut procs = Procs::default();
    let (grpc, http) = router(
        &mut procs,
        &model,
        &[
            "--api-key",
            "key-1,key-2",
            "--reasoning-parser",
            "deepseek_r1",
            "--tool-call-parser",
            "deepseek_v3",
            "--served-model-name",
            "demo",
        ],
    );
    let suite = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/clients/openai_suite.py");
    let out = Command::new(python())
        .args([suite.to_str().unwrap(), &format!("http://{http}"), "key-2", expected.to_str().unwrap()])
        .output()
        .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && log.contains("ALL OK"), "{log}");

    // Health and metrics stay open; the API needs a key.
    assert_eq!(http_get(&http, "/health").0, 200);
    let (status, body) = http_post(&http, "/v1/completions", br#"{"prompt":"x","max_tokens":1}"#, &[JSON]);
    assert_eq!(status, 401, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"]["type"], "authentication_error");
    // Malformed JSON, wrong types, huge bodies: refused with OpenAI-shaped errors.
    for (bad, want) in [
        (&br#"{"prompt": "x", "max_tokens": "#[..], 400),
        (br#"{"prompt": {"a": 1}}"#, 400),
        (br#"{"prompt": "x", "max_tokens": "ten"}"#, 400),
        (br#"{"prompt": [4294967296]}"#, 400),
        (br#"{"messages": []}"#, 400),
    ] {
        let path = if bad.starts_with(b"{\"messages") { "/v1/chat/completions" } else { "/v1/completions" };
        let (status, body) = http_post(&http, path, bad, &[JSON, KEY]);
        assert_eq!(status, want, "{}: {body}", String::from_utf8_lossy(bad));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
    }
    let huge = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(9 << 20));
    assert_eq!(http_post(&http, "/v1/completions", huge.as_bytes(), &[JSON, KEY]).0, 413);
    assert_eq!(http_get(&http, "/v1/nope").0, 404);
    // Out-of-vocabulary token ids are the engine's refusal, still a 400.
    let (status, body) = http_post(&http, "/v1/completions", br#"{"prompt":[999999],"max_tokens":2}"#, &[JSON, KEY]);
    assert_eq!(status, 400, "{body}");
    // The server is unharmed: a good request still works.
    let (status, body) = http_post(&http, "/v1/completions", br#"{"prompt":"ok","max_tokens":2}"#, &[JSON, KEY]);
    assert_eq!(status, 200, "{body}");
    let metrics = http_get(&http, "/metrics").1;
    assert!(metrics.contains(r#"expertmesh_http_requests_total{route="/v1/completions",status="401"}"#), "{metrics}");
    assert!(metrics.contains(r#"expertmesh_request_errors_total{reason="unauthorized"}"#));

    // gRPC: the same keys in `authorization` metadata.
    runtime().block_on(async {
        let mut c = GenerateServiceClient::connect(format!("http://{grpc}")).await.unwrap();
        let req = || {
            let mut r = tonic::Request::new(GenerateRequest {
                prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![5, 6, 7] })),
                max_tokens: 2,
                ..Default::default()
            });
            r.metadata_mut().insert("x-unrelated", "1".parse().unwrap());
            r
        };
        let e = c.generate(req()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut ok = req();
        ok.metadata_mut().insert("authorization", "Bearer key-1".parse().unwrap());
        let mut s = c.generate(ok).await.unwrap().into_inner();
        let mut n = 0;
        while let Some(m) = s.message().await.unwrap() {
            n += m.token_ids.len();
        }
        assert_eq!(n, 2);
    });
}

#[test]
fn timeouts_full_queues_and_missing_experts_have_their_statuses() {
    let dir = scratch("limits");
    let model = dir.0.join("model");
    demo_checkpoint(&model);
    let mut procs = Procs::default();
    let (_, http) = router(
        &mut procs,
        &model,
        &["--request-timeout", "0.5", "--max-num-seqs", "1", "--max-queue", "1", "--max-tokens-limit", "4000"],
    );
    let long = br#"{"prompt":"a","max_tokens":3000,"ignore_eos":true}"#;
    // Three long requests at once: one runs (and times out), one waits, one finds the queue full.
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3).map(|_| s.spawn(|| http_post(&http, "/v1/completions", long, &[JSON]).0)).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.contains(&504), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    let (status, body) = http_post(&http, "/v1/completions", br#"{"prompt":"a","max_tokens":5000}"#, &[JSON]);
    assert_eq!(status, 400, "over --max-tokens-limit: {body}");

    // Experts on a node that does not exist: 503, quickly.
    let cfg = expertmesh_model::config::ModelConfig::from_dir(&model).unwrap();
    let nodes = vec![("gone".to_string(), "127.0.0.1:1".to_string())];
    let p = expertmesh_dataplane::placement::Placement::round_robin(&cfg, &nodes, 1).unwrap();
    let pfile = dir.0.join("placement.json");
    std::fs::write(&pfile, serde_json::to_string(&p).unwrap()).unwrap();
    let timeout = std::time::Duration::from_secs(2);
    let flag = timeout.as_secs().to_string();
    let (_, http) = router(&mut procs, &model, &["--placement", pfile.to_str().unwrap(), "--dispatch-timeout", &flag]);
    let t0 = std::time::Instant::now();
    let (status, body) = http_post(&http, "/v1/completions", br#"{"prompt":"a","max_tokens":2}"#, &[JSON]);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no live replica"), "{body}");
    // A refused connection fails at once; the bound is the dispatch timeout
    // (a hung node's worst case) with room for a slow runner.
    assert!(t0.elapsed() < timeout * 3, "took {:?}", t0.elapsed());
}

/// Random and mutated JSON bodies on every HTTP generation endpoint: each
/// gets a response (never a 5xx other than 503, never a dropped connection
/// or a hang), and the router serves a valid request afterwards.
#[test]
fn random_json_bodies_never_break_the_http_handlers() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use serde_json::{Value, json};

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e12f64..1e12).prop_map(Value::from),
            "[ -~]{0,12}".prop_map(Value::from),
            Just(json!(-1)),
            Just(json!(0)),
            Just(json!(1e308)),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
    const FIELDS: &[&str] = &[
        "prompt",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "n",
        "stop",
        "logprobs",
        "top_logprobs",
        "stream",
        "stream_options",
        "ignore_eos",
        "return_token_ids",
        "model",
        "text_input",
        "parameters",
        "echo",
    ];
    let body = prop_oneof![
        // A valid request with a few fields replaced by anything.
        prop::collection::vec((prop::sample::select(FIELDS), value()), 0..5).prop_map(|kv| {
            let mut b = json!({"prompt": [5, 6, 7], "messages": [{"role": "user", "content": "hi"}],
                               "text_input": "hi", "max_tokens": 4});
            for (k, v) in kv {
                b[k] = v;
            }
            serde_json::to_vec(&b).unwrap()
        }),
        value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        prop::collection::vec(any::<u8>(), 0..64),
    ];
    const PATHS: &[&str] =
        &["/v1/completions", "/v1/chat/completions", "/v2/models/demo/generate", "/v2/models/demo/generate_stream"];

    let dir = scratch("fuzz");
    let model = dir.0.join("model");
    demo_checkpoint(&model);
    let mut procs = Procs::default();
    // A low --max-tokens-limit keeps the valid ones short.
    let (_, http) = router(&mut procs, &model, &["--served-model-name", "demo", "--max-tokens-limit", "8"]);
    let mut runner = TestRunner::new(Config { cases: 200, failure_persistence: None, ..Config::default() });
    runner
        .run(&(prop::sample::select(PATHS), body), |(path, body)| {
            let (status, text) = http_post(&http, path, &body, &[JSON]);
            prop_assert!(
                matches!(status, 200 | 400 | 404 | 413 | 415 | 422 | 429 | 503),
                "{path} {:?} -> {status} {text}",
                String::from_utf8_lossy(&body)
            );
            Ok(())
        })
        .unwrap();
    let (status, text) = http_post(&http, "/v1/completions", br#"{"prompt":[5,6],"max_tokens":2}"#, &[JSON]);
    assert_eq!(status, 200, "{text}");
}

/// Qwen3's `<tool_call>` format on a random Qwen3-MoE checkpoint: a
/// required call is forced into the markup, parsed back into `tool_calls`
/// (whole and streamed) with arguments that fit the schema.
#[test]
fn qwen3_tool_calls_are_forced_and_parsed() {
    let dir = scratch("qwen3-tools");
    let model = dir.0.join("model");
    let out = common::command("expertmesh")
        .args(["gen-model", "--arch", "qwen3-moe", "--hidden-size", "64", "--layers", "2"])
        .args(["--out", model.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut procs = Procs::default();
    let (_, http) = router(&mut procs, &model, &["--tool-call-parser", "qwen3"]);
    let params = serde_json::json!({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                    "b": {"type": "integer", "minimum": 0, "maximum": 9}},
                                    "required": ["a", "b"], "additionalProperties": false});
    for stream in [false, true] {
        let body = serde_json::json!({"messages": [{"role": "user", "content": "add 2 and 3"}], "max_tokens": 200,
            "temperature": 1.0, "seed": 4, "stream": stream, "tool_choice": "required", "parallel_tool_calls": false,
            "tools": [{"type": "function", "function": {"name": "add", "parameters": params}}]});
        let (status, text) = http_post(&http, "/v1/chat/completions", body.to_string().as_bytes(), &[JSON]);
        assert_eq!(status, 200, "{text}");
        let (call, finish) = if stream {
            let chunks: Vec<serde_json::Value> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter(|l| *l != "[DONE]")
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let calls: Vec<&serde_json::Value> =
                chunks.iter().filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array()).flatten().collect();
            assert_eq!(calls.len(), 1, "{text}");
            let finish = chunks.iter().rev().find_map(|c| c["choices"][0]["finish_reason"].as_str());
            (calls[0].clone(), finish.map(str::to_string))
        } else {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            let c = &v["choices"][0];
            (c["message"]["tool_calls"][0].clone(), c["finish_reason"].as_str().map(str::to_string))
        };
        assert_eq!(finish.as_deref(), Some("tool_calls"), "{text}");
        assert_eq!(call["function"]["name"], "add", "{text}");
        let args: serde_json::Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert!(args["a"].as_u64().is_some_and(|a| a <= 9) && args["b"].as_u64().is_some_and(|b| b <= 9), "{args}");
    }
}

/// Prompt scoring (`echo` + `logprobs`, `max_tokens: 0`, lm-eval's
/// request) under chunked prefill: with a step budget of one token (what
/// a prompt gets beside a batch of decodes that leave one) the 40-token
/// prompt runs a token a step, and every token 1.. is still scored with
/// transformers' log-probability, as in one chunk.
#[test]
fn a_prompt_scored_in_small_chunks_scores_every_token() {
    let (prompt, _) = common::reference("llama3");
    let want = common::reference_prompt_logprobs("llama3");
    let mut procs = Procs::default();
    let f32 = ["--precision", "f32"];
    let (_, whole) = router(&mut procs, &common::fixture("llama3"), &f32);
    let (_, chunked) =
        router(&mut procs, &common::fixture("llama3"), &[&f32[..], &["--max-batch-tokens", "1"]].concat());
    let body = serde_json::json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 1});
    let greedy = serde_json::json!({"prompt": &prompt[..20], "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    let post =
        |http: &str, b: &serde_json::Value| http_post(http, "/v1/completions", b.to_string().as_bytes(), &[JSON]);
    let text_of = |(status, text): (u16, String)| {
        assert_eq!(status, 200, "{text}");
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["choices"][0]["text"].clone()
    };
    for http in [whole, chunked] {
        // Generations beside the scoring (steps shared or not) keep their
        // tokens: each sequence gets its own logits rows.
        let alone = text_of(post(&http, &greedy));
        let (status, text) = std::thread::scope(|sc| {
            let side: Vec<_> = (0..2).map(|_| sc.spawn(|| text_of(post(&http, &greedy)))).collect();
            let scored = post(&http, &body);
            for t in side {
                assert_eq!(t.join().unwrap(), alone, "a generation beside a scored prompt");
            }
            scored
        });
        assert_eq!(status, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let got = v["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap();
        assert_eq!(got.len(), prompt.len(), "{text}");
        assert!(got[0].is_null(), "{text}");
        for (t, (g, w)) in got.iter().zip(&want).enumerate().skip(1) {
            let g = g.as_f64().unwrap_or_else(|| panic!("token {t} unscored: {text}"));
            assert!((g - w).abs() < 1e-4, "token {t}: {g} vs transformers' {w}");
        }
    }
}
