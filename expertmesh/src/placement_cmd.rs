//! `expertmesh placement`: the coordinator's placement algorithm, offline,
//! on a load matrix.

use anyhow::{Context, Result};
use clap::Args;
use expertmesh_planner::{Layers, PlanRequest, plan};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct PlacementCmd {
    /// JSON `[layer][expert]` token counts.
    #[arg(long, env = "EXPERTMESH_LOADS")]
    loads: PathBuf,
    /// Expert nodes.
    #[arg(long, env = "EXPERTMESH_NODES")]
    nodes: usize,
    /// Expert slots per MoE layer on each node.
    #[arg(long, env = "EXPERTMESH_SLOTS_PER_NODE")]
    slots_per_node: usize,
    /// Expert groups of group-limited routing (DeepSeek-V3's `n_group`).
    #[arg(long, env = "EXPERTMESH_GROUPS", default_value_t = 1)]
    groups: usize,
    /// Distinct nodes every expert is on.
    #[arg(long, env = "EXPERTMESH_MIN_REPLICAS", default_value_t = 1)]
    min_replicas: usize,
    /// At most this many extra replicas per layer (default: fill every slot).
    #[arg(long, env = "EXPERTMESH_REDUNDANT_EXPERTS")]
    redundant_experts: Option<usize>,
    /// The placement in force, in this command's output format (only
    /// `layers` is read): the new plan moves as few replicas as it can.
    #[arg(long, env = "EXPERTMESH_PREVIOUS")]
    previous: Option<PathBuf>,
    /// Print the plan as JSON.
    #[arg(long, env = "EXPERTMESH_JSON")]
    json: bool,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {what} {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {what} {}", path.display()))
}

pub fn cmd_placement(a: PlacementCmd) -> Result<()> {
    let loads: Vec<Vec<f64>> = read_json(&a.loads, "--loads")?;
    let previous: Option<Layers> = match &a.previous {
        Some(p) => {
            let v: serde_json::Value = read_json(p, "--previous")?;
            let layers = v.get("layers").cloned().context("--previous has no \"layers\"")?;
            Some(serde_json::from_value(layers).context("--previous: layers must be [[[node index]]]")?)
        }
        None => None,
    };
    let slots = vec![a.slots_per_node; a.nodes];
    let t0 = Instant::now();
    let p = plan(&PlanRequest {
        loads: &loads,
        slots: &slots,
        min_replicas: a.min_replicas,
        redundant: a.redundant_experts,
        groups: a.groups,
        previous: previous.as_deref(),
    })?;
    let compute_ms = t0.elapsed().as_secs_f64() * 1e3;
    if a.json {
        println!(
            "{}",
            json!({"compute_ms": compute_ms, "layers": p.layers, "balancedness": p.balancedness, "moved": p.moved})
        );
        return Ok(());
    }
    println!(
        "{} layers on {} nodes × {} slots: balancedness {:.4}, {} replicas moved, {compute_ms:.1} ms",
        loads.len(),
        a.nodes,
        a.slots_per_node,
        p.balancedness,
        p.moved
    );
    for (l, layer) in p.layers.iter().enumerate() {
        let line: Vec<String> = layer
            .iter()
            .enumerate()
            .map(|(e, n)| format!("{e}:{}", n.iter().map(usize::to_string).collect::<Vec<_>>().join("+")))
            .collect();
        println!("layer {l}: {}", line.join(" "));
    }
    Ok(())
}
