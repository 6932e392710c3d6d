//! `coordinator`: see the library docs.

use clap::Parser;
use expertmesh_coordinator::{Bound, Config, run};
use expertmesh_plumbing::process;

fn main() -> anyhow::Result<()> {
    process::tune_allocator().map_err(anyhow::Error::msg)?;
    let cfg = Config::parse();
    process::init_tracing(&cfg.log);
    process::runtime()?.block_on(async {
        let shutdown = process::shutdown_on_signal();
        let (tx, rx) = tokio::sync::oneshot::channel::<Bound>();
        let id = cfg.id.clone();
        tokio::spawn(async move {
            // One machine-readable line, so supervisors learn ephemeral ports.
            if let Ok(b) = rx.await {
                let grpc = b.grpc.map(|a| format!(" grpc={a}")).unwrap_or_default();
                let metrics = b.metrics.map(|a| format!(" metrics={a}")).unwrap_or_default();
                println!("coordinator id={id}{grpc}{metrics}");
            }
        });
        run(cfg, shutdown, Some(tx)).await
    })?;
    Ok(())
}
