//! `router`: see the library docs.

use clap::Parser;
use expertmesh_plumbing::process;
use expertmesh_router::{Bound, Config, run};

fn main() -> anyhow::Result<()> {
    process::tune_allocator().map_err(anyhow::Error::msg)?;
    let cfg = Config::parse();
    process::init_tracing(&cfg.log);
    process::set_compute_threads(cfg.threads).map_err(anyhow::Error::msg)?;
    process::runtime()?.block_on(async {
        let shutdown = process::shutdown_on_signal();
        let (tx, rx) = tokio::sync::oneshot::channel::<Bound>();
        tokio::spawn(async move {
            // One machine-readable line, so supervisors learn ephemeral ports.
            if let Ok(b) = rx.await {
                println!("router listening grpc={} http={}", b.grpc, b.http);
            }
        });
        run(cfg, shutdown, Some(tx)).await
    })?;
    Ok(())
}
