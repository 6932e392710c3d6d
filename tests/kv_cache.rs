//! The router's paged KV cache, as processes on loopback: prefix reuse is
//! exact across requests and front doors (gRPC and OpenAI HTTP), through a
//! cluster too, with `--no-prefix-cache` as the reference; a tiny budget
//! evicts cached blocks, and one that cannot hold every sequence preempts
//! and still completes every request with transformers' tokens; a bf16
//! cache holds twice the blocks in the same bytes.

use expertmesh_proto::v1::generate_request::Prompt;
use expertmesh_proto::v1::generate_service_client::GenerateServiceClient;
use expertmesh_proto::v1::{GenerateRequest, TokenIds};

mod common;
use common::{Procs, fixture, grpc, http_post, idle_metrics, reference, router, runtime};

/// The same, greedy, over OpenAI `/v1/completions` with a token-id
/// prompt: the chosen tokens' logprobs.
fn openai(http: &str, prompt: &[u32], max_tokens: u32) -> Vec<f64> {
    let body = serde_json::json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                  "logprobs": 0, "ignore_eos": true});
    let json = [("Content-Type", "application/json")];
    let (status, text) = http_post(http, "/v1/completions", body.to_string().as_bytes(), &json);
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
}

/// A 40-token prompt on the dense llama3 fixture (blocks of 16), and the
/// MLA fixture (blocks of 4) through a cluster of two expert nodes: the
/// second request reuses the first's blocks and gives the same greedy
/// tokens and logprobs as transformers and as a router without the prefix
/// cache; so does a seeded sampled request, and the HTTP door sees the
/// same hits.
#[test]
fn prefix_reuse_is_exact_across_requests_and_front_doors() {
    let rt = runtime();
    for (case, block) in [("llama3", "16"), ("deepseek_v3_yarn_bf16", "4")] {
        let (prompt, want) = reference(case);
        // The MoE fixture's cached router dispatches to two expert nodes.
        let scratch = common::scratch(&format!("kv-{case}"));
        let pfile = scratch.0.join("placement.json");
        let (mut procs, remote) = if case == "llama3" {
            (Procs::default(), vec![])
        } else {
            let (procs, placement, _) = common::start_nodes(&fixture(case), 2, 1);
            std::fs::write(&pfile, serde_json::to_string(&placement).unwrap()).unwrap();
            (procs, vec!["--placement", pfile.to_str().unwrap()])
        };
        let extra = &remote[..];
        let (on, on_http) = router(&mut procs, &fixture(case), &[&["--kv-block-tokens", block], extra].concat());
        let (off, off_http) = router(&mut procs, &fixture(case), &["--kv-block-tokens", block, "--no-prefix-cache"]);
        let n = want.len() as u32;
        let (cold, cold_lp) = rt.block_on(grpc(&on, &prompt, n, None));
        assert_eq!(cold, want, "{case}: transformers' tokens");
        let (warm, warm_lp) = rt.block_on(grpc(&on, &prompt, n, None));
        let (plain, plain_lp) = rt.block_on(grpc(&off, &prompt, n, None));
        assert_eq!((&warm, &plain), (&want, &want), "{case}");
        assert!(close(&warm_lp, &cold_lp) && close(&warm_lp, &plain_lp), "{case}: {warm_lp:?} {plain_lp:?}");
        let m = idle_metrics(&on_http);
        assert!(m["expertmesh_prefix_cache_hit_tokens_total"] > 0.0, "{case}: {m:?}");
        assert!(m["expertmesh_prefix_cache_blocks"] > 0.0, "{case}: {m:?}");
        assert_eq!(idle_metrics(&off_http)["expertmesh_prefix_cache_hit_tokens_total"], 0.0);
        // Seeded sampling: the same draws with and without the cache.
        let s_on = rt.block_on(grpc(&on, &prompt, n, Some(7)));
        let s_off = rt.block_on(grpc(&off, &prompt, n, Some(7)));
        assert_eq!(s_on.0, s_off.0, "{case}: seeded sampling");
        // The HTTP door hits the blocks the gRPC requests left.
        let hits = idle_metrics(&on_http)["expertmesh_prefix_cache_hit_tokens_total"];
        let lp = openai(&on_http, &prompt, n);
        assert!(lp.iter().zip(&plain_lp).all(|(a, b)| (a - *b as f64).abs() < 1e-5), "{case}: {lp:?}");
        assert!(idle_metrics(&on_http)["expertmesh_prefix_cache_hit_tokens_total"] > hits, "{case}");
        // A plain `echo` (no logprobs) needs no prompt scores, so it hits too.
        let hits = idle_metrics(&on_http)["expertmesh_prefix_cache_hit_tokens_total"];
        let body = serde_json::json!({"prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": true});
        let json = [("Content-Type", "application/json")];
        let (status, text) = http_post(&on_http, "/v1/completions", body.to_string().as_bytes(), &json);
        assert_eq!(status, 200, "{text}");
        assert!(idle_metrics(&on_http)["expertmesh_prefix_cache_hit_tokens_total"] > hits, "{case}: echo");
    }
}

/// A budget of four 16-token blocks on llama3 (512 bytes a position): a
/// second prompt needs the blocks the first left cached, so they are
/// evicted, and the first prompt, asked again, is recomputed correctly.
#[test]
fn a_tiny_budget_evicts_cached_blocks() {
    let rt = runtime();
    let mut procs = Procs::default();
    let (prompt, want) = reference("llama3");
    let (addr, http) = router(&mut procs, &fixture("llama3"), &["--kv-cache-bytes", &(4 * 16 * 512).to_string()]);
    let other: Vec<u32> = prompt.iter().map(|t| (t + 1) % 256).collect();
    let n = want.len() as u32;
    assert_eq!(rt.block_on(grpc(&addr, &prompt, n, None)).0, want);
    let m = idle_metrics(&http);
    assert_eq!((m["expertmesh_prefix_cache_blocks"], m["expertmesh_kv_cache_usage_ratio"]), (2.0, 0.0), "{m:?}");
    rt.block_on(grpc(&addr, &other, n, None));
    // Three blocks wanted, two free: the oldest cached block goes.
    assert!(idle_metrics(&http)["expertmesh_prefix_cache_evictions_total"] >= 1.0);
    assert_eq!(rt.block_on(grpc(&addr, &prompt, n, None)).0, want);
    // A request that could not fit even alone is refused, naming the budget.
    let e = rt.block_on(async {
        let mut c = GenerateServiceClient::connect(format!("http://{addr}")).await.unwrap();
        let req = GenerateRequest {
            prompt: Some(Prompt::TokenIds(TokenIds { ids: prompt.clone() })),
            max_tokens: 60,
            ..Default::default()
        };
        match c.generate(req).await {
            Err(e) => e,
            Ok(s) => s.into_inner().message().await.unwrap_err(),
        }
    });
    assert!(e.message().contains("KV blocks"), "{e:?}");
}

/// Eight 40-token prompts, each to 40 more tokens (5 blocks), in a pool of
/// 8 blocks: several are admitted, outgrow the pool and are preempted; all
/// finish with the tokens of a lone request, and the preemptions are counted.
#[test]
fn preemption_under_a_tiny_budget_completes_every_request() {
    let rt = runtime();
    let mut procs = Procs::default();
    let (prompt, _) = reference("llama3");
    let (lone, _) = router(&mut procs, &fixture("llama3"), &[]);
    let want = rt.block_on(grpc(&lone, &prompt, 40, None));
    let budget = (8 * 16 * 512).to_string();
    let (addr, http) = router(&mut procs, &fixture("llama3"), &["--kv-cache-bytes", &budget, "--no-prefix-cache"]);
    let got = rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (a, p) = (addr.clone(), prompt.clone());
                tokio::spawn(async move { grpc(&a, &p, 40, None).await })
            })
            .collect();
        let mut out = vec![];
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    for (i, (toks, lps)) in got.iter().enumerate() {
        assert_eq!(toks, &want.0, "request {i}");
        assert!(close(lps, &want.1), "request {i}: {lps:?}");
    }
    let m = idle_metrics(&http);
    assert!(m["expertmesh_kv_preemptions_total"] > 0.0, "{m:?}");
    assert_eq!(m["expertmesh_kv_cache_usage_ratio"], 0.0, "every block back when idle: {m:?}");
}

/// `--kv-cache-dtype bf16` halves a block's bytes: the budget of four f32
/// blocks of the eviction test holds eight, so both prompts stay cached
/// with no eviction, and the greedy tokens are still transformers'.
#[test]
fn a_bf16_cache_holds_twice_the_blocks() {
    let rt = runtime();
    let mut procs = Procs::default();
    let (prompt, want) = reference("llama3");
    let budget = (4 * 16 * 512).to_string();
    let (addr, http) =
        router(&mut procs, &fixture("llama3"), &["--kv-cache-bytes", &budget, "--kv-cache-dtype", "bf16"]);
    let other: Vec<u32> = prompt.iter().map(|t| (t + 1) % 256).collect();
    let n = want.len() as u32;
    assert_eq!(rt.block_on(grpc(&addr, &prompt, n, None)).0, want);
    rt.block_on(grpc(&addr, &other, n, None));
    let m = idle_metrics(&http);
    assert_eq!(
        (m["expertmesh_prefix_cache_blocks"], m["expertmesh_prefix_cache_evictions_total"]),
        (4.0, 0.0),
        "{m:?}"
    );
    assert_eq!(rt.block_on(grpc(&addr, &prompt, n, None)).0, want);
    assert!(idle_metrics(&http)["expertmesh_prefix_cache_hit_tokens_total"] >= 32.0);
}
