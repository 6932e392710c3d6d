//! Placement benchmark at DeepSeek-V3 scale (`docs/benchmarks.md`).
//!
//! `cargo run --release -p expertmesh-planner --example placement_bench`
//!
//! 58 MoE layers × 256 experts on 36 nodes × 8 slots, Zipf-skewed loads
//! (exponents 0.8 and 1.2, a random expert order per layer). Against the
//! baseline, DeepSeek's EPLB greedy (global policy), written here from its
//! description: replicate the expert with the most load per replica until
//! every slot is used, then pack replicas heaviest first onto the lightest
//! node that still has a free slot. Reports compute time, balancedness, the
//! replicas a re-plan moves after ±25% load drift, and, with DeepSeek-V3's 8
//! expert groups, how many nodes a group spans.

use expertmesh_planner::{Layers, PlanRequest, balancedness, moves, plan};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

const LAYERS: usize = 58;
const EXPERTS: usize = 256;
const NODES: usize = 36;
const SLOTS: usize = 8;
const GROUPS: usize = 8;

fn zipf(s: f64, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..LAYERS)
        .map(|_| {
            let mut order: Vec<usize> = (0..EXPERTS).collect();
            order.shuffle(&mut rng);
            let mut l = vec![0.0; EXPERTS];
            for (rank, e) in order.into_iter().enumerate() {
                l[e] = (1e6 / ((rank + 1) as f64).powf(s)).round();
            }
            l
        })
        .collect()
}

fn drift(loads: &[Vec<f64>], seed: u64) -> Vec<Vec<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    loads.iter().map(|l| l.iter().map(|v| v * (1.0 + rng.random_range(-0.25..=0.25))).collect()).collect()
}

/// EPLB's global policy for one layer: `[expert] -> nodes` (a node may hold
/// two replicas of one expert; EPLB does not forbid it).
fn eplb_layer(load: &[f64]) -> Vec<Vec<usize>> {
    let phys = NODES * SLOTS;
    let mut count = vec![1usize; load.len()];
    for _ in load.len()..phys {
        let e = (0..load.len())
            .max_by(|&a, &b| (load[a] / count[a] as f64).total_cmp(&(load[b] / count[b] as f64)))
            .unwrap_or(0);
        count[e] += 1;
    }
    let mut items: Vec<(usize, f64)> =
        count.iter().enumerate().flat_map(|(e, &c)| std::iter::repeat_n((e, load[e] / c as f64), c)).collect();
    items.sort_by(|a, b| b.1.total_cmp(&a.1));
    let (mut weight, mut used) = (vec![0f64; NODES], vec![0usize; NODES]);
    let mut out = vec![Vec::new(); load.len()];
    for (e, w) in items {
        let n = (0..NODES).filter(|&n| used[n] < SLOTS).min_by(|&a, &b| weight[a].total_cmp(&weight[b])).unwrap_or(0);
        weight[n] += w;
        used[n] += 1;
        out[e].push(n);
    }
    out
}

fn eplb(loads: &[Vec<f64>]) -> Layers {
    loads.iter().map(|l| eplb_layer(l)).collect()
}

fn mean_balancedness(loads: &[Vec<f64>], layers: &Layers) -> f64 {
    loads.iter().zip(layers).map(|(l, p)| balancedness(l, p, NODES)).sum::<f64>() / loads.len() as f64
}

/// Median wall time of `reps` runs, in ms.
fn time_ms<T>(reps: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut times = Vec::with_capacity(reps);
    let mut last = None;
    for _ in 0..reps {
        let t0 = Instant::now();
        last = Some(f());
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    (times[reps / 2], last.expect("reps > 0"))
}

fn nodes_per_group(layers: &Layers) -> f64 {
    let size = EXPERTS / GROUPS;
    let mut total = 0usize;
    for layer in layers {
        for g in 0..GROUPS {
            let mut n: Vec<usize> = layer[g * size..(g + 1) * size].iter().flatten().copied().collect();
            n.sort_unstable();
            n.dedup();
            total += n.len();
        }
    }
    total as f64 / (layers.len() * GROUPS) as f64
}

fn main() {
    let slots = vec![SLOTS; NODES];
    println!("| Zipf s | planner | compute ms | balancedness | moved after ±25% drift | nodes per group (of 36) |");
    println!("|---|---|---|---|---|---|");
    for s in [0.8, 1.2] {
        let loads = zipf(s, 1);
        let drifted = drift(&loads, 2);
        let req = |loads, groups, previous| PlanRequest {
            loads,
            slots: &slots,
            min_replicas: 1,
            redundant: None,
            groups,
            previous,
        };
        let (t_eplb, base) = time_ms(5, || eplb(&loads));
        let (_, base_next) = time_ms(1, || eplb(&drifted));
        println!(
            "| {s} | EPLB greedy (Rust port of its description) | {t_eplb:.1} | {:.4} (after drift: {:.4}) | {} (from scratch) | {:.1} |",
            mean_balancedness(&loads, &base),
            mean_balancedness(&drifted, &base_next),
            moves(&base, &base_next),
            nodes_per_group(&base)
        );
        let (t_ours, ours) = time_ms(5, || plan(&req(&loads, 1, None)).expect("plan"));
        let scratch = plan(&req(&drifted, 1, None)).expect("plan");
        let (t_sticky, sticky) = time_ms(5, || plan(&req(&drifted, 1, Some(&ours.layers))).expect("plan"));
        println!(
            "| {s} | ExpertMesh | {t_ours:.1} (re-plan {t_sticky:.1}) | {:.4} (after drift: {:.4}; from scratch {:.4}) | {} ({} from scratch: {:.1}%) | {:.1} |",
            ours.balancedness,
            sticky.balancedness,
            scratch.balancedness,
            sticky.moved,
            moves(&ours.layers, &scratch.layers),
            100.0 * sticky.moved as f64 / moves(&ours.layers, &scratch.layers).max(1) as f64,
            nodes_per_group(&ours.layers)
        );
        let (t_group, grouped) = time_ms(5, || plan(&req(&loads, GROUPS, None)).expect("plan"));
        println!(
            "| {s} | ExpertMesh, group-aware ({GROUPS} groups) | {t_group:.1} | {:.4} | – | {:.1} |",
            grouped.balancedness,
            nodes_per_group(&grouped.layers)
        );
    }
}
