//! MTP speculative decoding in the router (`--speculative mtp`), as
//! processes on loopback: in a running batch whose sequences accept
//! different counts, greedy output equals a router without speculation
//! (on the trained demo model, which accepts most drafts, and through a
//! cluster on a random checkpoint, which rejects most, so the KV cache rolls
//! back nearly every step); the limits hold exactly, a client that leaves
//! frees its slot, and the drafts are counted. Structured outputs
//! speculate too (drafts masked by their grammar) and keep their output.
//! The MTP module's cache is counted in `--kv-cache-bytes`.

use expertmesh_model::config::Arch;
use expertmesh_model::genmodel::{GenSpec, generate_checkpoint};
use expertmesh_model::tokenizer::TextTokenizer;
use expertmesh_proto::v1::generate_request::Prompt;
use expertmesh_proto::v1::generate_service_client::GenerateServiceClient;
use expertmesh_proto::v1::{GenerateRequest, TokenIds};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;
use common::{Procs, grpc, metrics, router, runtime};

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/demo")
}

/// BOS and the text's tokens, for 16 texts of different lengths.
fn prompts(dir: &Path) -> Vec<Vec<u32>> {
    let tok = TextTokenizer::from_dir(dir).unwrap();
    let texts = [
        "The cursor",
        "When a buffer is",
        "<｜User｜>How do I delete a line?<｜Assistant｜><think>\n",
        "To insert text",
        "The GNU General Public License",
        "Permission is hereby granted",
        "In Normal mode, typing",
        "A window is",
        "This program is free software; you can redistribute it",
        "Use the command",
        "The file",
        "Search for the pattern",
        "<｜User｜>What is a register?<｜Assistant｜><think>\n",
        "Each",
        "Copyright",
        "Options can be set with",
    ];
    texts.iter().map(|t| [vec![0], tok.encode(t).unwrap()].concat()).collect()
}

/// Every prompt at once, request i asking for `max_tokens(i)` tokens.
fn run_all(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    prompts: &[Vec<u32>],
    max_tokens: impl Fn(usize) -> u32,
) -> Vec<(Vec<u32>, Vec<f32>)> {
    rt.block_on(async {
        let tasks: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (a, p, n) = (addr.to_string(), p.clone(), max_tokens(i));
                tokio::spawn(async move { grpc(&a, &p, n, None).await })
            })
            .collect();
        let mut out = vec![];
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    })
}

fn assert_same(spec: &[(Vec<u32>, Vec<f32>)], plain: &[(Vec<u32>, Vec<f32>)]) {
    for (i, ((st, sl), (pt, pl))) in spec.iter().zip(plain).enumerate() {
        assert_eq!(st, pt, "request {i}: tokens");
        let d = sl.iter().zip(pl).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(d < 1e-4, "request {i}: logprobs differ by {d}");
    }
}

/// 16 concurrent greedy requests of 8 to 38 tokens on the trained demo
/// model: the same tokens and logprobs as without speculation, each
/// exactly as long as asked, and most drafts accepted.
#[test]
fn speculation_in_a_running_batch_keeps_greedy_output() {
    let rt = runtime();
    let mut procs = Procs::default();
    let ps = prompts(&demo());
    let (spec, spec_http) = router(&mut procs, &demo(), &["--speculative", "mtp"]);
    let (plain, plain_http) = router(&mut procs, &demo(), &[]);
    let n = |i: usize| 8 + 2 * i as u32;
    let (a, b) = (run_all(&rt, &spec, &ps, n), run_all(&rt, &plain, &ps, n));
    assert_same(&a, &b);
    for (i, (t, _)) in a.iter().enumerate() {
        assert_eq!(t.len() as u32, n(i), "request {i}");
    }
    let m = metrics(&spec_http);
    let (drafts, tokens, accepted) = (
        m["expertmesh_spec_decode_drafts_total"],
        m["expertmesh_spec_decode_draft_tokens_total"],
        m["expertmesh_spec_decode_accepted_tokens_total"],
    );
    assert!(drafts > 100.0 && tokens == drafts, "{m:?}");
    assert!(accepted > 0.5 * tokens && accepted < tokens, "{accepted} of {tokens} accepted");
    // Every generated token counted once, however many a step gave.
    let total: f64 = a.iter().map(|(t, _)| t.len() as f64).sum();
    assert_eq!(m["expertmesh_generation_tokens_total"], total);
    assert_eq!(metrics(&plain_http)["expertmesh_spec_decode_drafts_total"], 0.0);
}

/// A random checkpoint with an MTP module, every routed expert (the MTP
/// layer's too) on two expert nodes: the speculating router gives the
/// in-process plain router's tokens while most drafts are rejected.
#[test]
fn through_a_cluster_rejected_drafts_roll_back() {
    let rt = runtime();
    let scratch = common::scratch("spec-cluster");
    let model = scratch.0.join("model");
    let mut g = GenSpec::demo(Arch::DeepseekV3);
    (g.hidden_size, g.num_layers, g.mtp) = (64, 2, true);
    generate_checkpoint(&g, &model).unwrap();
    let (mut procs, placement, _) = common::start_nodes(&model, 2, 1);
    assert!(placement.layers.contains_key(&2), "the MTP layer's experts are placed");
    let pfile = scratch.0.join("placement.json");
    std::fs::write(&pfile, serde_json::to_string(&placement).unwrap()).unwrap();
    let (spec, spec_http) =
        router(&mut procs, &model, &["--speculative", "mtp", "--placement", pfile.to_str().unwrap()]);
    let (plain, _) = router(&mut procs, &model, &[]);
    let ps: Vec<Vec<u32>> = prompts(&model).into_iter().take(6).collect();
    let n = |i: usize| 10 + 3 * i as u32;
    assert_same(&run_all(&rt, &spec, &ps, n), &run_all(&rt, &plain, &ps, n));
    let m = metrics(&spec_http);
    let (tokens, accepted) =
        (m["expertmesh_spec_decode_draft_tokens_total"], m["expertmesh_spec_decode_accepted_tokens_total"]);
    assert!(tokens > 20.0 && accepted < 0.5 * tokens, "{accepted} of {tokens} accepted");
}

/// With a 64-token `--max-model-len`: 1 to 5 tokens end exactly there
/// (a verifying step can give two), a prompt that leaves room for 9 gets
/// 9, one more is refused; a client that leaves mid-stream frees its slot;
/// seeded sampling repeats.
#[test]
fn speculation_keeps_the_limits_and_cancellation() {
    let rt = runtime();
    let mut procs = Procs::default();
    let (addr, http) = router(&mut procs, &demo(), &["--speculative", "mtp", "--max-model-len", "64"]);
    let p = &prompts(&demo())[2];
    for n in 1..=5 {
        assert_eq!(rt.block_on(grpc(&addr, p, n, None)).0.len(), n as usize);
    }
    let long: Vec<u32> = p.iter().cycle().take(55).copied().collect();
    assert_eq!(rt.block_on(grpc(&addr, &long, 9, None)).0.len(), 9);
    let refused = rt.block_on(async {
        let mut c = GenerateServiceClient::connect(format!("http://{addr}")).await.unwrap();
        let req = GenerateRequest {
            prompt: Some(Prompt::TokenIds(TokenIds { ids: long.clone() })),
            max_tokens: 10,
            ..Default::default()
        };
        match c.generate(req).await {
            Err(e) => e.code(),
            Ok(s) => s.into_inner().message().await.map(|_| tonic::Code::Ok).unwrap_or_else(|e| e.code()),
        }
    });
    assert_eq!(refused, tonic::Code::InvalidArgument);
    // A stream dropped after three messages.
    rt.block_on(async {
        let mut c = GenerateServiceClient::connect(format!("http://{addr}")).await.unwrap();
        let req = GenerateRequest {
            prompt: Some(Prompt::TokenIds(TokenIds { ids: p.clone() })),
            max_tokens: 50,
            ignore_eos: true,
            ..Default::default()
        };
        let mut s = c.generate(req).await.unwrap().into_inner();
        for _ in 0..3 {
            s.message().await.unwrap();
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while metrics(&http)["expertmesh_requests_running"] > 0.0 {
        assert!(Instant::now() < deadline, "the abandoned request still runs");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(rt.block_on(grpc(&addr, p, 12, None)).0.len(), 12);
    let (s1, s2) = (rt.block_on(grpc(&addr, p, 20, Some(7))), rt.block_on(grpc(&addr, p, 20, Some(7))));
    assert_eq!(s1, s2, "seeded sampling with speculation repeats");
}

/// Structured outputs with speculation (their drafts masked by the
/// grammar), beside an unconstrained speculating request: the same text
/// as a router without speculation, through OpenAI completions and Triton's
/// generate extension; the text obeys the grammar, and guided drafts are
/// verified (counted).
#[test]
fn structured_outputs_are_unchanged_by_speculation() {
    let mut procs = Procs::default();
    let (_, spec) = router(&mut procs, &demo(), &["--speculative", "mtp"]);
    let (_, plain) = router(&mut procs, &demo(), &[]);
    let schema = json!({"type": "object", "properties": {"word": {"type": "string", "maxLength": 10},
                        "n": {"type": "integer", "minimum": 0, "maximum": 99}},
                        "required": ["word", "n"], "additionalProperties": false});
    let format = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}});
    let asks = [
        (
            "/v1/completions",
            json!({"prompt": "The cursor", "max_tokens": 60, "temperature": 0, "response_format": format}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "Answer:", "max_tokens": 8, "temperature": 1, "seed": 5,
                                   "guided_choice": ["yes", "no", "it depends"]}),
        ),
        (
            "/v2/models/demo/generate",
            json!({"text_input": "Date:", "max_tokens": 20,
                                            "parameters": {"temperature": 0, "guided_regex": "[0-9]{4}-[0-9]{2}"}}),
        ),
        // Unconstrained, long: it speculates beside the others.
        (
            "/v1/completions",
            json!({"prompt": "When a buffer is", "max_tokens": 64, "temperature": 0, "ignore_eos": true}),
        ),
    ];
    let run = |http: &str| -> Vec<String> {
        std::thread::scope(|sc| {
            let handles: Vec<_> = asks
                .iter()
                .map(|(path, body)| {
                    sc.spawn(move || {
                        let h = [("Content-Type", "application/json")];
                        let (status, text) = common::http_post(http, path, body.to_string().as_bytes(), &h);
                        assert_eq!(status, 200, "{path}: {text}");
                        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                        v["choices"][0]["text"].as_str().or(v["text_output"].as_str()).unwrap().to_string()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let (a, b) = (run(&spec), run(&plain));
    assert_eq!(a, b);
    // The JSON request alone: its own drafts are verified, and it is the same.
    let before = metrics(&spec)["expertmesh_spec_decode_draft_tokens_total"];
    let h = [("Content-Type", "application/json")];
    let (status, text) = common::http_post(&spec, asks[0].0, asks[0].1.to_string().as_bytes(), &h);
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["choices"][0]["text"].as_str(), Some(a[0].as_str()));
    assert!(metrics(&spec)["expertmesh_spec_decode_draft_tokens_total"] > before, "a guided request speculates");
    let v: serde_json::Value = serde_json::from_str(&a[0]).unwrap();
    assert!(v["word"].is_string() && v["n"].as_u64().is_some_and(|n| n <= 99), "{v}");
    assert!(["yes", "no", "it depends"].contains(&a[1].as_str()), "{}", a[1]);
    let d = a[2].as_bytes();
    assert!(
        d.len() == 7 && d[4] == b'-' && d.iter().enumerate().all(|(i, c)| i == 4 || c.is_ascii_digit()),
        "{}",
        a[2]
    );
}

/// The MTP module's cache comes out of `--kv-cache-bytes` too: a budget of
/// five blocks of the demo model's 4 layers holds 4 blocks when each block
/// also has an MTP layer's rows, so a request needing 5 blocks is refused
/// by the speculating router, naming the budget, and served by a plain one;
/// a 4-block request speculates and keeps greedy output.
#[test]
fn the_mtp_cache_is_counted_in_the_kv_budget() {
    let rt = runtime();
    let mut procs = Procs::default();
    let cfg = expertmesh_model::config::ModelConfig::from_dir(&demo()).unwrap();
    let layer = expertmesh_model::cache::KvCache::layer_bytes_per_token(&cfg, Default::default());
    let budget = (5 * 16 * layer * cfg.num_layers).to_string();
    let flags = ["--kv-cache-bytes", budget.as_str(), "--no-prefix-cache"];
    let (spec, spec_http) = router(&mut procs, &demo(), &[&flags[..], &["--speculative", "mtp"]].concat());
    let (plain, _) = router(&mut procs, &demo(), &flags);
    let p = prompts(&demo()).swap_remove(0);
    let five = 80 - p.len() as u32; // prompt + max_tokens fill 5 blocks of 16
    assert_eq!(rt.block_on(grpc(&plain, &p, five, None)).0.len(), five as usize);
    let refused = rt.block_on(async {
        let mut c = GenerateServiceClient::connect(format!("http://{spec}")).await.unwrap();
        let req = GenerateRequest {
            prompt: Some(Prompt::TokenIds(TokenIds { ids: p.clone() })),
            max_tokens: five,
            ..Default::default()
        };
        match c.generate(req).await {
            Err(e) => e,
            Ok(s) => s.into_inner().message().await.unwrap_err(),
        }
    });
    assert!(refused.message().contains("the budget holds 4"), "{refused:?}");
    let four = 64 - p.len() as u32;
    let one = std::slice::from_ref(&p);
    let (a, b) = (run_all(&rt, &spec, one, |_| four), run_all(&rt, &plain, one, |_| four));
    assert_same(&a, &b);
    assert!(metrics(&spec_http)["expertmesh_spec_decode_drafts_total"] > 0.0);
}
