use super::*;
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `[layer][expert]` Zipf(s) loads, a random expert order per layer.
fn zipf(layers: usize, experts: usize, s: f64, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..layers)
        .map(|_| {
            let mut order: Vec<usize> = (0..experts).collect();
            order.shuffle(&mut rng);
            let mut l = vec![0.0; experts];
            for (rank, e) in order.into_iter().enumerate() {
                l[e] = (1e6 / ((rank + 1) as f64).powf(s)).round();
            }
            l
        })
        .collect()
}

fn drift(loads: &[Vec<f64>], by: f64, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    loads.iter().map(|l| l.iter().map(|v| v * (1.0 + rng.random_range(-by..=by))).collect()).collect()
}

fn request<'a>(loads: &'a [Vec<f64>], slots: &'a [usize], min: usize) -> PlanRequest<'a> {
    PlanRequest { loads, slots, min_replicas: min, redundant: None, groups: 1, previous: None }
}

fn check_valid(req: &PlanRequest<'_>, p: &Plan) {
    let nodes = req.slots.len();
    let total: usize = req.slots.iter().sum();
    for (l, layer) in p.layers.iter().enumerate() {
        assert_eq!(layer.len(), req.loads[l].len());
        let mut used = vec![0usize; nodes];
        for (e, holders) in layer.iter().enumerate() {
            assert!(holders.len() >= req.min_replicas, "layer {l} expert {e}: {holders:?}");
            let mut h = holders.clone();
            h.sort();
            h.dedup();
            assert_eq!(h.len(), holders.len(), "layer {l} expert {e}: replicas on one node {holders:?}");
            for &n in holders {
                assert!(n < nodes);
                used[n] += 1;
            }
        }
        for (n, (&u, &s)) in used.iter().zip(req.slots).enumerate() {
            assert!(u <= s, "layer {l} node {n}: {u} replicas in {s} slots");
        }
        let experts = req.loads[l].len();
        let usable: usize = req.slots.iter().map(|&s| s.min(experts)).sum();
        let want =
            (experts * req.min_replicas).saturating_add(req.redundant.unwrap_or(usize::MAX)).min(total).min(usable);
        let used = used.iter().sum::<usize>();
        // With uneven slots a replica count may fit the slots but not the
        // one-per-node rule; such spare replicas are dropped. Even slots: none.
        if req.slots.iter().all(|&s| s == req.slots[0]) {
            assert_eq!(used, want, "layer {l}: every budgeted slot used");
        } else {
            assert!(used <= want && used >= experts * req.min_replicas, "layer {l}: {used} replicas of {want}");
        }
    }
}

/// Max node load against its lower bound (mean load, heaviest replica).
fn max_over_bound(load: &[f64], layer: &[Vec<usize>], nodes: usize) -> f64 {
    let mut per = vec![0f64; nodes];
    let mut heaviest = 0f64;
    for (l, h) in load.iter().zip(layer) {
        heaviest = heaviest.max(l / h.len() as f64);
        for &n in h {
            per[n] += l / h.len() as f64;
        }
    }
    let bound = (load.iter().sum::<f64>() / nodes as f64).max(heaviest);
    per.iter().copied().fold(0.0, f64::max) / bound
}

#[test]
fn deepseek_scale_zipf_is_balanced_and_valid() {
    let slots = vec![8; 36];
    for s in [0.8, 1.2] {
        let loads = zipf(58, 256, s, 7);
        let req = request(&loads, &slots, 1);
        let p = plan(&req).unwrap();
        check_valid(&req, &p);
        assert!(p.balancedness > 0.9, "zipf {s}: balancedness {}", p.balancedness);
        for (load, layer) in loads.iter().zip(&p.layers) {
            assert!(max_over_bound(load, layer, 36) < 1.1);
        }
    }
}

#[test]
fn drift_moves_few_replicas() {
    let slots = vec![8; 36];
    let loads = zipf(58, 256, 1.0, 3);
    let first = plan(&request(&loads, &slots, 1)).unwrap();
    let drifted = drift(&loads, 0.25, 4);
    let scratch = plan(&request(&drifted, &slots, 1)).unwrap();
    let sticky = plan(&PlanRequest { previous: Some(&first.layers), ..request(&drifted, &slots, 1) }).unwrap();
    check_valid(&request(&drifted, &slots, 1), &sticky);
    let scratch_moved = moves(&first.layers, &scratch.layers);
    assert!(
        sticky.moved * 4 <= scratch_moved,
        "sticky re-plan moved {} replicas; from scratch {scratch_moved}",
        sticky.moved
    );
    assert!(sticky.balancedness >= scratch.balancedness / (1.0 + TOLERANCE) - 1e-9);
}

#[test]
fn unchanged_loads_move_nothing() {
    let slots = vec![7; 6];
    let loads = zipf(3, 16, 1.0, 9);
    let first = plan(&request(&loads, &slots, 2)).unwrap();
    let again = plan(&PlanRequest { previous: Some(&first.layers), ..request(&loads, &slots, 2) }).unwrap();
    assert_eq!(again.moved, 0);
    assert_eq!(again.layers, first.layers);
}

#[test]
fn lost_node_only_replaces_what_it_held() {
    let slots = vec![6; 5];
    let loads = zipf(2, 10, 1.0, 5);
    let first = plan(&request(&loads, &slots, 2)).unwrap();
    // Node 4 dies: the survivors are nodes 0..4, and its replicas must move.
    let survivors = vec![6; 4];
    let next = plan(&PlanRequest { previous: Some(&first.layers), ..request(&loads, &survivors, 2) }).unwrap();
    check_valid(&request(&loads, &survivors, 2), &next);
    let lost: usize = first.layers.iter().flatten().filter(|h| h.contains(&4)).count();
    assert!(next.moved <= lost * 2, "moved {} for {lost} lost replicas", next.moved);
}

#[test]
fn groups_stay_on_few_nodes_when_balance_allows() {
    let slots = vec![8; 8];
    let loads = vec![vec![1.0; 64]];
    let nodes_per_group = |groups: usize| {
        let p = plan(&PlanRequest { groups, ..request(&loads, &slots, 1) }).unwrap();
        (0..8)
            .map(|g| {
                let mut n: Vec<usize> = p.layers[0][g * 8..(g + 1) * 8].iter().flatten().copied().collect();
                n.sort();
                n.dedup();
                n.len()
            })
            .sum::<usize>() as f64
            / 8.0
    };
    let (grouped, ungrouped) = (nodes_per_group(8), nodes_per_group(1));
    assert!(grouped < ungrouped / 2.0, "grouped {grouped} nodes per group; ungrouped {ungrouped}");
}

#[test]
fn refuses_what_cannot_fit() {
    let loads = vec![vec![1.0; 10]];
    let err = plan(&request(&loads, &[4, 4], 1)).unwrap_err();
    assert!(matches!(err, PlanError::Capacity(ref m) if m.contains("10 experts")), "{err}");
    let err = plan(&request(&loads, &[10, 10], 3)).unwrap_err();
    assert!(matches!(err, PlanError::Capacity(ref m) if m.contains("3 distinct nodes")), "{err}");
    let bad = vec![vec![1.0, f64::NAN]];
    assert!(matches!(plan(&request(&bad, &[2, 2], 1)), Err(PlanError::Input(_))));
    let err = plan(&PlanRequest { groups: 3, ..request(&loads, &[10, 10], 1) }).unwrap_err();
    assert!(matches!(err, PlanError::Input(_)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn every_plan_is_valid(
        nodes in 1usize..9,
        slots_each in 1usize..7,
        experts in 1usize..24,
        min in 1usize..4,
        redundant in proptest::option::of(0usize..10),
        seed in any::<u64>(),
        with_prev in any::<bool>(),
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let slots: Vec<usize> = (0..nodes).map(|_| rng.random_range(slots_each..=slots_each + 2)).collect();
        let loads: Vec<Vec<f64>> = (0..2).map(|_| (0..experts).map(|_| rng.random_range(0.0..100.0f64).floor()).collect()).collect();
        let req = PlanRequest { redundant, ..request(&loads, &slots, min) };
        match plan(&req) {
            Ok(p) => {
                check_valid(&req, &p);
                if with_prev {
                    let d = drift(&loads, 0.5, seed);
                    let again = PlanRequest { previous: Some(&p.layers), ..PlanRequest { loads: &d, ..req.clone() } };
                    let q = plan(&again).unwrap();
                    check_valid(&again, &q);
                }
            }
            Err(PlanError::Capacity(_)) => {
                prop_assert!(min > nodes || experts * min > slots.iter().map(|&s| s.min(experts)).sum::<usize>());
            }
            Err(e) => prop_assert!(false, "{e}"),
        }
    }
}
