//! `expert-node`: see the library docs.

use clap::Parser;
use expertmesh_expert_node::{Bound, Config, run};
use expertmesh_plumbing::process;

fn main() -> anyhow::Result<()> {
    process::tune_allocator().map_err(anyhow::Error::msg)?;
    let cfg = Config::parse();
    process::init_tracing(&cfg.log);
    process::set_compute_threads(cfg.threads).map_err(anyhow::Error::msg)?;
    process::runtime()?.block_on(async {
        let shutdown = process::shutdown_on_signal();
        let (tx, rx) = tokio::sync::oneshot::channel::<Bound>();
        let node_id = cfg.node_id.clone();
        tokio::spawn(async move {
            // One machine-readable line, so supervisors learn ephemeral ports.
            if let Ok(b) = rx.await {
                let metrics = b.metrics.map(|m| format!(" metrics={m}")).unwrap_or_default();
                println!("expert-node node={node_id} grpc={}{metrics}", b.grpc);
            }
        });
        run(cfg, shutdown, Some(tx)).await
    })?;
    Ok(())
}
