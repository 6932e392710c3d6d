//! Expert nodes as real processes on loopback, driven by the model through
//! `RemoteExecutor` + `GrpcTransport`: generation equals offline
//! generation, survives a node killed with SIGKILL, fails cleanly when an
//! expert has no replica left, and a malformed batch gets INVALID_ARGUMENT
//! without harming the node; the framed-TCP transport is exact too, and a
//! garbage frame closes only its own link.

use expertmesh_dataplane::executor::RemoteExecutor;
use expertmesh_dataplane::grpc_transport::GrpcTransport;
use expertmesh_dataplane::placement::Placement;
use expertmesh_model::config::ModelConfig;
use expertmesh_model::generate::{SamplingParams, generate};
use expertmesh_model::model::Model;
use expertmesh_model::tensor::Precision;
use expertmesh_model::weights::WeightStore;
use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
use expertmesh_proto::v1::{DispatchRequest, Dtype, ExpertTokens, PackedRows};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

mod common;
use common::{fixture, http_get, reference, runtime, start_nodes as start};

fn cluster_model(model: &Path, p: &Placement, rt: &tokio::runtime::Runtime, timeout: Duration) -> Model {
    let cfg = ModelConfig::from_dir(model).unwrap();
    // f32 activations, as the nodes run (`common::command`).
    let ws = WeightStore::for_model(model, &cfg, Precision::F32).unwrap();
    let transport = GrpcTransport::new(rt.handle().clone(), p.nodes.clone(), timeout, Dtype::F32);
    let exec = RemoteExecutor::new(Arc::new(p.clone()), Arc::new(transport));
    Model::load_dense(cfg, &ws, Arc::new(exec), &mut |_, _| {}).unwrap()
}

#[test]
fn cluster_generates_exactly_what_transformers_does_on_every_fixture() {
    let rt = runtime();
    for case in [
        "deepseek_v3_yarn_bf16",
        "deepseek_v3_qnull",
        "deepseek_v3_fp8",
        "deepseek_v2_lite",
        "deepseek_v2_group",
        "qwen3_moe",
        "mixtral",
    ] {
        let model = fixture(case);
        let (_nodes, p, _) = start(&model, 3, 2);
        let m = cluster_model(&model, &p, &rt, Duration::from_secs(10));
        let (prompt, want) = reference(case);
        let local = Model::load(&model, Precision::F32, &mut |_, _| {}).unwrap();
        let offline = generate(&local, &prompt, want.len(), SamplingParams::default(), true, |_, _| {}).unwrap();
        let g = generate(&m, &prompt, want.len(), SamplingParams::default(), true, |_, _| {}).unwrap();
        assert_eq!(g.token_ids, want, "{case}");
        assert_eq!(g.logprobs.len(), offline.logprobs.len(), "{case}");
        for (a, b) in g.logprobs.iter().zip(&offline.logprobs) {
            assert!((a - b).abs() < 1e-4, "{case}: logprob {a} vs offline {b}");
        }
    }
}

#[test]
fn generation_survives_a_killed_node() {
    let rt = runtime();
    let model = fixture("deepseek_v3_qnull");
    let (mut nodes, p, _) = start(&model, 3, 2);
    let m = cluster_model(&model, &p, &rt, Duration::from_secs(10));
    let (prompt, want) = reference("deepseek_v3_qnull");
    let mut step = 0;
    let g = generate(&m, &prompt, want.len(), SamplingParams::default(), true, |_, _| {
        step += 1;
        if step == 3 {
            // SIGKILL mid-generation: no drain, the stream just breaks.
            nodes.kill("en-1");
        }
    })
    .unwrap();
    assert_eq!(g.token_ids, want);
}

#[test]
fn no_live_replica_is_a_clean_unavailable_within_the_timeout() {
    let rt = runtime();
    let model = fixture("mixtral");
    let (mut nodes, p, _) = start(&model, 2, 1);
    let timeout = Duration::from_secs(2);
    let m = cluster_model(&model, &p, &rt, timeout);
    nodes.kill("en-0");
    let (prompt, _) = reference("mixtral");
    let t0 = std::time::Instant::now();
    let e = generate(&m, &prompt, 4, SamplingParams::default(), true, |_, _| {}).unwrap_err();
    assert!(matches!(e, expertmesh_model::ModelError::Unavailable(_)), "{e}");
    assert!(e.to_string().contains("no live replica"), "{e}");
    // At most one dispatch timeout (a dead node fails at once), with room
    // for a slow runner.
    assert!(t0.elapsed() < timeout * 3, "took {:?}", t0.elapsed());
}

#[test]
fn malformed_batch_gets_invalid_argument_and_the_node_survives() {
    let rt = runtime();
    let model = fixture("mixtral");
    let (nodes, _, _) = start(&model, 1, 1);
    let addr = nodes.0[0].1.clone();
    rt.block_on(async {
        let mut client = ExpertServiceClient::connect(format!("http://{addr}")).await.unwrap();
        let bad = |rows: PackedRows, experts: Vec<ExpertTokens>| DispatchRequest {
            step: 1,
            layer: 0,
            rows: Some(rows),
            experts,
            trace_id: String::new(),
            nccl: None,
        };
        let good_rows = || PackedRows {
            dtype: Dtype::F32 as i32,
            num_rows: 1,
            hidden_size: 64,
            data: vec![0u8; 256].into(),
            scales: Default::default(),
        };
        let one = |e: u32, r: u32| vec![ExpertTokens { expert: e, rows: vec![r], weights: vec![1.0] }];
        let cases = vec![
            bad(PackedRows { data: vec![0u8; 10].into(), ..good_rows() }, one(0, 0)), // short payload
            bad(PackedRows { hidden_size: 32, ..good_rows() }, one(0, 0)),            // wrong width
            bad(PackedRows { dtype: 9, ..good_rows() }, one(0, 0)),                   // unknown dtype
            bad(good_rows(), one(99, 0)),                                             // unknown expert
            bad(good_rows(), one(0, 5)),                                              // row out of range
            DispatchRequest { layer: 77, ..bad(good_rows(), one(0, 0)) },             // unknown layer
        ];
        for req in cases {
            let mut resp = client.dispatch(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
            let status = resp.message().await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        }
        // The node still serves a well-formed batch.
        let mut resp =
            client.dispatch(tokio_stream::iter(vec![bad(good_rows(), one(0, 0))])).await.unwrap().into_inner();
        let ok = resp.message().await.unwrap().unwrap();
        assert_eq!(ok.combined.unwrap().num_rows, 1);
    });
}

#[test]
fn sigterm_drains_the_batch_in_hand_then_exits_cleanly() {
    let rt = runtime();
    let model = fixture("deepseek_v3_fp8");
    let (mut nodes, p, metrics) = start(&model, 1, 1);
    let metrics = metrics["en-0"].clone();
    let (_, addr, child) = &mut nodes.0[0];
    let (addr, pid) = (addr.clone(), child.id());
    let cfg = expertmesh_model::config::ModelConfig::from_dir(&model).unwrap();
    let layer = *p.layers.keys().next().unwrap();
    let h = cfg.hidden_size;
    // Every row to every expert: ~1.2 GFLOP of compute in ~650 KB, so the
    // batch arrives in about a millisecond (a batch still being received is
    // not in hand, and is rightly not taken) and is computing when SIGTERM lands.
    let rows = 1024usize;
    let data: Vec<f32> = (0..rows * h).map(|i| ((i % 89) as f32 - 44.0) / 50.0).collect();
    let experts = (0..cfg.moe.n_routed_experts as u32)
        .map(|e| ExpertTokens { expert: e, rows: (0..rows as u32).collect(), weights: vec![0.1; rows] })
        .collect();
    let req = DispatchRequest {
        step: 7,
        layer: layer as u32,
        rows: Some(expertmesh_dataplane::codec::encode(data, h, Dtype::F32)),
        experts,
        trace_id: String::new(),
        nccl: None,
    };
    rt.block_on(async {
        let mut client = ExpertServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
            .max_decoding_message_size(expertmesh_proto::MAX_MESSAGE_BYTES);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut resp = client.dispatch(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
        let second = DispatchRequest { step: 8, ..req.clone() };
        tx.send(req).await.unwrap();
        // SIGTERM once the node is computing the batch (it is in hand).
        let t0 = std::time::Instant::now();
        let in_flight = "expertmesh_node_batches_in_flight 1";
        while !http_get(&metrics, "/metrics").1.lines().any(|l| l == in_flight) {
            assert!(t0.elapsed() < Duration::from_secs(30), "the batch never reached the node");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // SAFETY: signalling the node we spawned.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let done = resp.message().await.unwrap().expect("the batch in hand completes");
        assert_eq!(done.step, 7);
        assert_eq!(done.combined.unwrap().num_rows, rows as u32);
        // A new batch on the draining stream is refused: no answer to it.
        if tx.send(second.clone()).await.is_ok() {
            // Refused: the stream ends or fails; an answer would be a bug.
            if let Ok(Some(m)) = resp.message().await {
                panic!("the draining node took batch {}", m.step);
            }
        }
        // And so is a new stream.
        let (tx2, rx2) = tokio::sync::mpsc::channel(1);
        tx2.send(second).await.unwrap();
        let fresh = client.dispatch(tokio_stream::wrappers::ReceiverStream::new(rx2)).await;
        if let Ok(r) = fresh
            && let Ok(Some(m)) = r.into_inner().message().await
        {
            panic!("a new stream to a draining node got batch {} computed", m.step);
        }
    });
    let status = nodes.0[0].2.wait().unwrap();
    assert!(status.success(), "drained node exits 0, got {status:?}");
}

#[test]
fn framed_tcp_links_are_exact_and_garbage_on_one_harms_no_other() {
    use expertmesh_dataplane::frame::MAGIC;
    use expertmesh_dataplane::tcp_transport::TcpTransport;
    use std::io::{Read, Write};
    let model = fixture("deepseek_v3_yarn_bf16");
    let (_nodes, p, _) = start(&model, 2, 2);
    let cfg = ModelConfig::from_dir(&model).unwrap();
    let ws = WeightStore::for_model(&model, &cfg, Precision::F32).unwrap();
    let tcp = TcpTransport::new(p.nodes.clone(), Duration::from_secs(10), Dtype::F32);
    let m =
        Model::load_dense(cfg, &ws, Arc::new(RemoteExecutor::new(Arc::new(p.clone()), Arc::new(tcp))), &mut |_, _| {})
            .unwrap();
    let (prompt, want) = reference("deepseek_v3_yarn_bf16");
    let g = generate(&m, &prompt, want.len(), SamplingParams::default(), true, |_, _| {}).unwrap();
    assert_eq!(g.token_ids, want);
    // A framed link that sends nonsense (an absurd frame length) is answered
    // with an error frame and closed; the node serves on, over both transports.
    let addr = p.nodes.values().next().unwrap().clone();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(MAGIC).unwrap();
    s.write_all(&[0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    assert_eq!(reply.first(), Some(&1), "an error frame, then the link closes: {reply:?}");
    let g = generate(&m, &prompt, want.len(), SamplingParams::default(), true, |_, _| {}).unwrap();
    assert_eq!(g.token_ids, want);
    let rt = runtime();
    rt.block_on(async {
        let mut c = ExpertServiceClient::connect(format!("http://{addr}")).await.unwrap();
        c.info(expertmesh_proto::v1::InfoRequest {}).await.unwrap();
    });
}

/// `--device cuda:0` on a machine without the CUDA driver (every CI
/// machine): a non-zero exit at start, before listening, with a message that
/// names the flag and the missing library; no panic, no hang.
#[test]
fn a_gpu_node_without_a_gpu_exits_naming_what_is_missing() {
    if expertmesh_gpu::libs::Lib::Driver.present() {
        return; // a CUDA machine: tools/gpu_check.sh runs the device there.
    }
    let mut cmd = common::command("expert-node");
    cmd.args(["--model", fixture("deepseek_v3_qnull").to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .args(["--device", "cuda:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let t0 = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(out.status.code(), Some(1), "an error exit, not a signal or panic: {err}");
    assert!(err.contains("--device") && err.contains("libcuda") && err.contains("NVIDIA driver"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30), "it must not hang");
    // A malformed device is a flag error too.
    let out = common::command("expert-node")
        .args(["--model", fixture("deepseek_v3_qnull").to_str().unwrap(), "--device", "gpu0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--device"));
}

/// The NCCL path's refusals on a machine without a GPU: a CPU node answers
/// `NcclInit` with FAILED_PRECONDITION naming `--device`, and a batch
/// marked `nccl` with an error at once (no wait on a communicator that
/// does not exist); the node serves on.
#[test]
fn nccl_on_a_cpu_node_is_refused_at_once_and_the_node_serves_on() {
    use expertmesh_dataplane::nccl_transport::Headers;
    use expertmesh_dataplane::tcp_transport::TcpTransport;
    use expertmesh_dataplane::transport::{NodeBatch, Transport};
    use expertmesh_model::moe::ExpertGroup;
    use expertmesh_proto::v1::{NcclInitRequest, NcclMarker};
    let model = fixture("mixtral");
    let (_nodes, p, _) = start(&model, 1, 1);
    let (node, addr) = p.nodes.iter().next().map(|(n, a)| (n.clone(), a.clone())).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let mut c = ExpertServiceClient::connect(format!("http://{addr}")).await.unwrap();
        let req = NcclInitRequest {
            unique_id: vec![0u8; 128].into(),
            rank: 1,
            world_size: 2,
            router_id: "router-0".into(),
            epoch: 1,
            timeout_seconds: 5.0,
        };
        let e = c.nccl_init(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("--device cuda:N"), "{e:?}");
        let e = c.nccl_init(NcclInitRequest { rank: 0, ..req }).await.unwrap_err();
        assert!(e.message().contains("rank 0 is the router's"), "{e:?}");
    });
    let h = ModelConfig::from_dir(&model).unwrap().hidden_size;
    let tcp = TcpTransport::new(p.nodes.clone(), Duration::from_secs(10), Dtype::F32);
    let b = NodeBatch {
        node: node.clone(),
        rows: Arc::new(vec![0.5; 2 * h]),
        groups: vec![ExpertGroup { expert: 0, rows: vec![0, 1], weights: vec![0.5, 0.5] }],
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let t0 = std::time::Instant::now();
    Headers::send_headers(
        &tcp,
        1,
        0,
        h,
        std::slice::from_ref(&b),
        &NcclMarker { router_id: "r".into(), epoch: 1 },
        &tx,
    );
    let (_, r) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let e = r.unwrap_err().to_string();
    assert!(e.contains("--device cuda:N"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "refused at once");
    let r = tcp.exchange(2, 0, h, &[b]);
    assert_eq!(r[0].as_ref().map(Vec::len).unwrap(), 2 * h, "the node serves on");
}

/// `router --transport nccl` without a GPU exits 1 at start naming the
/// flag and the missing driver.
#[test]
fn an_nccl_router_without_a_gpu_exits_naming_what_is_missing() {
    if expertmesh_gpu::libs::Lib::Driver.present() {
        return; // a CUDA machine: tools/gpu_check.sh runs the device there.
    }
    let model = fixture("mixtral");
    let (_nodes, p, _) = start(&model, 1, 1);
    let dir = common::scratch("nccl-router");
    let placement = dir.0.join("placement.json");
    std::fs::write(&placement, p.to_json()).unwrap();
    let out = common::command("router")
        .args(["--model", model.to_str().unwrap(), "--placement", placement.to_str().unwrap()])
        .args(["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0", "--transport", "nccl"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--nccl-device") && err.contains("libcuda"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `--quantize` counts in a node's capacity: a shard whose bf16 experts
/// exceed `--capacity-bytes` is refused at start naming the flag, and fits
/// once quantized to int8 (about half the bytes); the node then serves.
/// On a GPU, where no integer kernels exist, `--quantize` is refused.
#[test]
fn quantized_experts_fit_a_capacity_the_bf16_ones_exceed() {
    let model = fixture("deepseek_v3_yarn_bf16");
    let cfg = ModelConfig::from_dir(&model).unwrap();
    let ws = WeightStore::for_model(&model, &cfg, Precision::F32).unwrap();
    let bf16 = expertmesh_model::model::load_experts(&cfg, &ws, |_, _| true, &mut |_, _| {}).unwrap();
    let capacity = (bf16.size_bytes() as f64 * 0.6) as u64;
    let node = |extra: &[&str]| {
        let mut c = common::command("expert-node");
        c.args(["--model", model.to_str().unwrap(), "--listen", "127.0.0.1:0", "--experts", "all"])
            .args(["--capacity-bytes", &capacity.to_string()])
            .args(extra);
        c
    };
    let out = node(&[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--capacity-bytes"), "{err}");
    let (mut child, line) = common::spawn(node(&["--quantize", "int8"]));
    assert!(line.contains("grpc=127.0.0.1:"), "the int8 node serves: {line:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    let out = node(&["--quantize", "int4", "--device", "cuda:0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--quantize"), "{err}");
}
