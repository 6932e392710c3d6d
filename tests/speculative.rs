//! MTP speculative decoding in the router (`--speculative mtp`), as
//! processes on loopback: in a running batch whose sequences accept
//! different counts, greedy output equals a router without speculation
//! (on the trained demo model, which accepts most drafts, and through a
//! cluster on a random checkpoint, which rejects most, so the KV cache rolls
//! back nearly every step); the limits hold exactly, a client that leaves
//! frees its slot, and the drafts are counted.

use expertmesh_model::config::Arch;
use expertmesh_model::genmodel::{GenSpec, generate_checkpoint};
use expertmesh_model::tokenizer::TextTokenizer;
use expertmesh_proto::v1::generate_request::Prompt;
use expertmesh_proto::v1::generate_service_client::GenerateServiceClient;
use expertmesh_proto::v1::{GenerateRequest, TokenIds};
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
