use super::*;
use expertmesh_cluster::keys::{DrainState, LoadReport, NodeRecord, NodeState};

fn shape() -> ModelShape {
    ModelShape { moe_layers: vec![1, 2], experts: 8, groups: 1 }
}

fn policy(min: usize) -> Policy {
    Policy { min_replicas: min, redundant: Some(2), threshold: 0.8, sustain: Duration::from_secs(10) }
}

fn node(id: &str) -> NodeRecord {
    NodeRecord {
        id: id.into(),
        addr: format!("127.0.0.1:{}", 7000 + id.len()),
        metrics: String::new(),
        device: "cpu".into(),
        capacity_bytes: 0,
        expert_bytes: 100,
        state: NodeState::Ready,
        incarnation: 1,
    }
}

fn view(ids: &[&str]) -> View {
    View { nodes: ids.iter().map(|i| (i.to_string(), node(i))).collect(), ..View::default() }
}

fn covered_on_distinct_nodes(p: &Placement, min: usize) {
    for l in [1, 2] {
        for e in 0..8 {
            let r = p.replicas(l, e);
            assert!(r.len() >= min, "layer {l} expert {e}: {r:?}");
            assert!(r.iter().all(|n| p.nodes.contains_key(n)));
            let distinct: BTreeSet<_> = r.iter().collect();
            assert_eq!(distinct.len(), r.len());
        }
    }
}

#[test]
fn first_plan_waits_for_enough_nodes() {
    let mut st = LeaderState::default();
    let now = Instant::now();
    assert_eq!(decide(&view(&["a"]), &shape(), &policy(2), &mut st, now), None);
    let v = view(&["a", "bb"]);
    assert_eq!(decide(&v, &shape(), &policy(2), &mut st, now), Some(Trigger::Initial));
    let (p, moved) = plan_next(&v, &shape(), &policy(2)).unwrap();
    assert_eq!(p.version, 1);
    covered_on_distinct_nodes(&p, 2);
    assert_eq!(moved, 2 * 8 * 2, "every replica of a first plan is a load");
}

#[test]
fn membership_changes_trigger_and_replans_keep_survivors() {
    let shape = shape();
    let pol = policy(2);
    let mut st = LeaderState::default();
    let now = Instant::now();
    let mut v = view(&["a", "bb", "ccc"]);
    let (p, _) = plan_next(&v, &shape, &pol).unwrap();
    v.placement = Some(p.clone());
    assert_eq!(decide(&v, &shape, &pol, &mut st, now), None, "steady state");

    // A node joins.
    v.nodes.insert("dddd".into(), node("dddd"));
    assert_eq!(decide(&v, &shape, &pol, &mut st, now), Some(Trigger::Join));
    let (joined, _) = plan_next(&v, &shape, &pol).unwrap();
    assert!(!joined.experts_of("dddd").is_empty(), "the new node gets experts");
    assert_eq!(joined.version, 2);
    v.placement = Some(joined.clone());

    // A node dies: its replicas go to survivors; survivors keep theirs.
    v.nodes.remove("bb");
    assert_eq!(decide(&v, &shape, &pol, &mut st, now), Some(Trigger::Leave));
    assert_eq!(v.coverage().uncovered(), Some(0), "min-replicas 2: one death uncovers nothing");
    let (after, moved) = plan_next(&v, &shape, &pol).unwrap();
    covered_on_distinct_nodes(&after, 2);
    assert!(!after.nodes.contains_key("bb"));
    let lost = joined.experts_of("bb").len();
    assert!(moved <= lost + 4, "moved {moved} replicas for {lost} lost");
    for n in ["a", "ccc", "dddd"] {
        let kept = joined.experts_of(n).iter().filter(|x| after.experts_of(n).contains(x)).count();
        assert!(kept * 10 >= joined.experts_of(n).len() * 8, "{n} kept {kept} of {}", joined.experts_of(n).len());
    }

    // A node restarted at another address holds nothing: treated as a leave.
    v.placement = Some(after);
    v.nodes.get_mut("a").unwrap().addr = "127.0.0.1:9".into();
    assert_eq!(decide(&v, &shape, &pol, &mut st, now), Some(Trigger::Leave));
}

#[test]
fn drain_moves_everything_off_the_node() {
    let pol = policy(1);
    let mut v = view(&["a", "bb", "ccc"]);
    v.placement = Some(plan_next(&v, &shape(), &pol).unwrap().0);
    v.drains.insert("bb".into(), DrainState::Requested);
    let mut st = LeaderState::default();
    assert_eq!(decide(&v, &shape(), &pol, &mut st, Instant::now()), Some(Trigger::Drain));
    let (p, _) = plan_next(&v, &shape(), &pol).unwrap();
    assert!(p.experts_of("bb").is_empty() && !p.nodes.contains_key("bb"));
    covered_on_distinct_nodes(&p, 1);
}

#[test]
fn operator_and_sustained_imbalance_trigger_once() {
    let shape = shape();
    let pol = policy(1);
    let mut v = view(&["a", "bb"]);
    v.placement = Some(plan_next(&v, &shape, &pol).unwrap().0);
    let mut st = LeaderState::default();
    let t0 = Instant::now();
    v.rebalance = Some(b"1".to_vec());
    assert_eq!(decide(&v, &shape, &pol, &mut st, t0), Some(Trigger::Operator));
    assert_eq!(decide(&v, &shape, &pol, &mut st, t0), None, "the same request is not repeated");

    // All load on experts that one node holds.
    let p = v.placement.clone().unwrap();
    let hot: Vec<usize> = (0..8).filter(|&e| p.replicas(1, e) == ["a".to_string()]).collect();
    let counts: Vec<f64> = (0..8).map(|e| if hot.contains(&e) { 1000.0 } else { 0.0 }).collect();
    v.loads = vec![LoadReport { moe_layers: vec![1, 2], layers: vec![counts.clone(), counts] }];
    assert!(v.balancedness(&shape, &p).unwrap() < 0.8);
    assert_eq!(decide(&v, &shape, &pol, &mut st, t0), None, "not yet sustained");
    assert_eq!(decide(&v, &shape, &pol, &mut st, t0 + Duration::from_secs(11)), Some(Trigger::Load));
    let (next, _) = plan_next(&v, &shape, &pol).unwrap();
    assert!(v.balancedness(&shape, &next).unwrap() > v.balancedness(&shape, &p).unwrap());
}

#[test]
fn joining_and_draining_nodes_are_not_eligible() {
    let mut v = view(&["a", "bb", "ccc"]);
    v.nodes.get_mut("a").unwrap().state = NodeState::Joining;
    v.nodes.get_mut("bb").unwrap().state = NodeState::Draining;
    assert_eq!(v.eligible().keys().collect::<Vec<_>>(), ["ccc"]);
    assert!(plan_next(&v, &shape(), &policy(2)).is_err(), "two replicas need two nodes");
}

/// A dense model (no MoE layers) is placed at once, with no node at all,
/// and its placement validates against the model.
#[test]
fn a_dense_model_is_placed_without_nodes() {
    let dense = ModelShape { moe_layers: vec![], experts: 0, groups: 1 };
    let pol = policy(2);
    let mut v = view(&[]);
    let mut st = LeaderState::default();
    assert_eq!(decide(&v, &dense, &pol, &mut st, Instant::now()), Some(Trigger::Initial));
    let (p, moved) = plan_next(&v, &dense, &pol).unwrap();
    assert_eq!((p.version, moved, p.layers.len(), p.nodes.len()), (1, 0, 0, 0));
    let cfg = expertmesh_spec::model_config::ModelConfig::from_json_str(
        r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"num_hidden_layers":2,
        "num_attention_heads":2,"intermediate_size":4}"#,
    )
    .unwrap();
    p.validate(&cfg).unwrap();
    v.placement = Some(p);
    assert_eq!(decide(&v, &dense, &pol, &mut st, Instant::now()), None, "nothing more to do");
}
