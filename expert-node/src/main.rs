//! `expert-node`: see the library docs.

use clap::Parser;
use expertmesh_expert_node::{Bound, Config, run};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Some(n) = cfg.threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received; draining");
            signal.cancel();
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<Bound>();
        let node_id = cfg.node_id.clone();
        tokio::spawn(async move {
            // One machine-readable line, so supervisors learn an ephemeral port.
            if let Ok(b) = rx.await {
                let metrics = b.metrics.map(|m| format!(" metrics={m}")).unwrap_or_default();
                println!("expert-node node={node_id} grpc={}{metrics}", b.grpc);
            }
        });
        run(cfg, shutdown, Some(tx)).await
    })?;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return ctrl_c.await.unwrap_or(()),
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
