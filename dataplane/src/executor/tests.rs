use super::*;
use crate::transport::InProcess;
use expertmesh_model::ModelError;
use expertmesh_model::moe::{LocalExperts, Mlp, Routing};
use expertmesh_model::tensor::Matrix;
use std::time::Duration;

const H: usize = 4;

fn experts(n: usize) -> LocalExperts {
    let mut l = LocalExperts::new(Vec::new());
    for e in 0..n {
        let s = e as f32 + 1.0;
        let m = |r: usize, c: usize, k: f32| {
            Matrix::from_f32(r, c, (0..r * c).map(|i| ((i as f32 * k).sin()) * 0.5).collect())
        };
        l.insert(0, e, Mlp::new(m(3, H, s), m(3, H, s + 0.5), m(H, 3, s + 0.25), None));
    }
    l
}

fn setup(replicas: usize) -> (Arc<InProcess>, RemoteExecutor, LocalExperts) {
    let nodes: Vec<(NodeId, String)> = (0..3).map(|i| (format!("n{i}"), String::new())).collect();
    let mut layers = BTreeMap::new();
    layers.insert(0, (0..6).map(|e| (0..replicas).map(|r| format!("n{}", (e + r) % 3)).collect()).collect());
    let p = Placement { version: 1, nodes: nodes.into_iter().collect(), layers };
    let t = Arc::new(InProcess::default());
    for i in 0..3 {
        t.add(&format!("n{i}"), Arc::new(experts(6)));
    }
    let ex = RemoteExecutor::new(Arc::new(p), t.clone());
    (t, ex, experts(6))
}

fn batch() -> (Vec<f32>, Routing) {
    let hidden: Vec<f32> = (0..5 * H).map(|i| (i as f32 * 0.37).cos()).collect();
    let routing = Routing {
        top_k: 2,
        ids: vec![0, 3, 1, 2, 5, 4, 0, 1, 2, 3],
        weights: vec![0.6, 0.4, 0.5, 0.5, 0.9, 0.1, 0.3, 0.7, 0.2, 0.8],
    };
    (hidden, routing)
}

/// Same length and values within 1e-6 (an empty result never passes).
fn close(a: &[f32], b: &[f32]) -> bool {
    !b.is_empty() && a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
}

#[test]
fn matches_local_and_survives_a_dead_node() {
    let (t, ex, local) = setup(2);
    let (hidden, routing) = batch();
    let rb = RoutedBatch { layer: 0, hidden: &hidden, hidden_size: H, routing: &routing };
    let want = local.execute(rb).unwrap();
    assert!(close(&ex.execute(rb).unwrap(), &want));
    t.set_down("n1", true);
    assert!(close(&ex.execute(rb).unwrap(), &want), "re-dispatched to the other replicas");
    // n1 is now in backoff: the next call avoids it without a failure.
    assert!(close(&ex.execute(rb).unwrap(), &want));
}

#[test]
fn a_staged_placement_applies_at_the_next_step_and_loads_are_counted() {
    let (t, ex, local) = setup(1);
    let (hidden, routing) = batch();
    let rb = RoutedBatch { layer: 0, hidden: &hidden, hidden_size: H, routing: &routing };
    // Version 2 moves everything onto n2; n0 and n1 go down only after the switch.
    let mut next = (*ex.placement()).clone();
    next.version = 2;
    for reps in next.layers.values_mut().flatten() {
        *reps = vec!["n2".into()];
    }
    ex.stage_placement(Arc::new(next));
    assert_eq!(ex.placement().version, 1, "staged, not applied mid-step");
    assert!(close(&ex.execute(rb).unwrap(), &local.execute(rb).unwrap()));
    ex.begin_step();
    assert_eq!(ex.placement().version, 2);
    t.set_down("n0", true);
    t.set_down("n1", true);
    assert!(close(&ex.execute(rb).unwrap(), &local.execute(rb).unwrap()), "served by n2 alone");
    // Two calls, ten token-expert pairs each.
    let loads = ex.take_loads();
    assert_eq!(loads[&0].iter().sum::<u64>(), 20);
    assert_eq!(loads[&0][0], 4);
    assert!(ex.take_loads().is_empty(), "taking resets the window");
}

#[test]
fn uncovered_experts_are_named() {
    let (t, ex, _) = setup(1);
    let (hidden, routing) = batch();
    t.set_down("n0", true);
    let e = ex.execute(RoutedBatch { layer: 0, hidden: &hidden, hidden_size: H, routing: &routing }).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ModelError::Unavailable(_)), "{msg}");
    // Experts 0 and 3 live only on n0.
    assert!(msg.contains("[0, 3]"), "{msg}");
}

#[test]
fn replicas_share_the_load() {
    let (t, ex, _) = setup(3);
    let (hidden, routing) = batch();
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    struct Spy(Arc<InProcess>, Arc<Mutex<BTreeSet<String>>>);
    impl Transport for Spy {
        fn send(&self, s: u64, l: usize, h: usize, b: &[NodeBatch], first: usize, to: &crate::transport::Replies) {
            self.1.lock().unwrap().extend(b.iter().map(|x| x.node.clone()));
            self.0.send(s, l, h, b, first, to)
        }
    }
    let ex = RemoteExecutor::new(ex.placement(), Arc::new(Spy(t, seen.clone())));
    for _ in 0..20 {
        ex.execute(RoutedBatch { layer: 0, hidden: &hidden, hidden_size: H, routing: &routing }).unwrap();
    }
    assert_eq!(seen.lock().unwrap().len(), 3, "every replica node gets traffic");
}

/// Hedging on, with a small floor so tests run in milliseconds.
fn hedged(replicas: usize, hard: Duration) -> (Arc<InProcess>, RemoteExecutor, LocalExperts) {
    let (t, ex, local) = setup(replicas);
    let p = HedgePolicy { multiple: 3.0, floor: Duration::from_millis(30), hard };
    let ex = RemoteExecutor::new(ex.placement(), t.clone()).with_hedging(p);
    (t, ex, local)
}

/// Enough calls that every node has a learned deadline.
fn warm_up(ex: &RemoteExecutor, rb: RoutedBatch<'_>) {
    for _ in 0..40 {
        ex.execute(rb).unwrap();
    }
}

#[test]
fn a_hung_node_costs_its_deadline_not_the_hard_limit_and_its_late_answer_is_discarded() {
    let (t, ex, local) = hedged(2, Duration::from_secs(10));
    let (hidden, routing) = batch();
    let rb = RoutedBatch { layer: 0, hidden: &hidden, hidden_size: H, routing: &routing };
    let want = local.execute(rb).unwrap();
    warm_up(&ex, rb);
    t.set_delay("n1", Some(Duration::from_millis(800)));
    let t0 = Instant::now();
    let got = ex.execute(rb).unwrap();
    assert!(t0.elapsed() < Duration::from_millis(500), "hedged after the learned deadline: {:?}", t0.elapsed());
    assert!(close(&got, &want), "the hedge's answer, exactly once");
    assert!(ex.is_suspected("n1"));
    // While suspected, n1 gets no real traffic: no more waiting at all.
    let t0 = Instant::now();
    for _ in 0..5 {
        assert!(close(&ex.execute(rb).unwrap(), &want), "late answers never mixed in");
    }
    assert!(t0.elapsed() < Duration::from_millis(400), "{:?}", t0.elapsed());
    // Back to normal: the pending probe answers and n1 serves again.
    t.set_delay("n1", None);
    let t0 = Instant::now();
    while ex.is_suspected("n1") {
        assert!(t0.elapsed() < Duration::from_secs(3), "the probe clears the node once it answers");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(close(&ex.execute(rb).unwrap(), &want));
}

#[test]
fn experts_with_no_other_replica_wait_for_the_hard_limit() {
    let (t, ex, _) = hedged(1, Duration::from_millis(300));
    let (hidden, routing) = batch();
    let rb = RoutedBatch { layer: 0, hidden: &hidden, hidden_size: H, routing: &routing };
    warm_up(&ex, rb);
    t.set_delay("n0", Some(Duration::from_secs(2)));
    let t0 = Instant::now();
    let e = ex.execute(rb).unwrap_err();
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_millis(1500), "{waited:?}");
    assert!(matches!(e, ModelError::Unavailable(_)), "{e}");
    assert!(e.to_string().contains("[0, 3]") && e.to_string().contains("timed out"), "{e}");
}

#[test]
fn a_slow_answer_that_comes_first_wins_over_its_hedge() {
    // n1 is slower than its deadline but faster than the hedge target, so
    // the original answer completes the share first; either way the result
    // is counted once.
    let (t, ex, local) = hedged(2, Duration::from_secs(10));
    let (hidden, routing) = batch();
    let rb = RoutedBatch { layer: 0, hidden: &hidden, hidden_size: H, routing: &routing };
    let want = local.execute(rb).unwrap();
    warm_up(&ex, rb);
    t.set_delay("n1", Some(Duration::from_millis(60)));
    t.set_delay("n0", Some(Duration::from_millis(120)));
    t.set_delay("n2", Some(Duration::from_millis(120)));
    for _ in 0..3 {
        assert!(close(&ex.execute(rb).unwrap(), &want));
    }
}

#[test]
fn answers_for_a_share_already_won_are_discarded_while_other_shares_wait() {
    // Expert 0 lives only on n0, which is slow: its share cannot be hedged
    // and keeps the call open. n1 is slow enough to be hedged to n2, which
    // wins; n1's own answer then arrives while the call still waits for
    // n0, and must be dropped, not added a second time.
    let (t, ex, local) = hedged(2, Duration::from_secs(10));
    let mut p = (*ex.placement()).clone();
    let reps = |a: &str, b: &str| vec![a.to_string(), b.to_string()];
    let layer = vec![
        vec!["n0".to_string()],
        reps("n1", "n2"),
        reps("n1", "n2"),
        reps("n1", "n2"),
        reps("n1", "n2"),
        reps("n1", "n2"),
    ];
    p.layers.insert(0, layer);
    ex.set_placement(Arc::new(p));
    let (hidden, routing) = batch();
    let rb = RoutedBatch { layer: 0, hidden: &hidden, hidden_size: H, routing: &routing };
    let want = local.execute(rb).unwrap();
    warm_up(&ex, rb);
    t.set_delay("n0", Some(Duration::from_millis(250)));
    t.set_delay("n1", Some(Duration::from_millis(80)));
    for _ in 0..4 {
        let t0 = Instant::now();
        while ex.is_suspected("n1") {
            assert!(t0.elapsed() < Duration::from_secs(3), "n1's probe never came back");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(close(&ex.execute(rb).unwrap(), &want));
    }
}
