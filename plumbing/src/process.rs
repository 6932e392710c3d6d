//! Process plumbing for service binaries.

use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (fields flattened), for log pipelines.
    Json,
}

/// `--log-format`, shared by every service.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LogArgs {
    /// Log line format on stderr; `RUST_LOG` filters (default `info`).
    #[arg(long, value_enum, env = "EXPERTMESH_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

/// Sets glibc's allocator up for inference; call first in `main`, before
/// any thread starts. Measured on the 0.53 B bench checkpoint
/// (docs/benchmarks.md):
/// - one arena (`M_ARENA_MAX`): every pool thread would otherwise keep its
///   own arena of freed activation buffers resident, ~15 MB more at int4;
/// - `M_MMAP_THRESHOLD` 64 MiB and `M_TRIM_THRESHOLD` 256 MiB: batch and
///   activation buffers of a few megabytes are reused from the heap instead
///   of each being a fresh `mmap` that faults and zeroes its pages (~17% of
///   the data plane's time once), which is what mimalloc was brought in
///   for; mimalloc instead kept 30% more memory resident at the same speed
///   (0.46 GB against 0.34 at int4).
///
/// A parameter set through glibc's own variable (`MALLOC_ARENA_MAX`,
/// `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`) is left as given,
/// e.g. more arenas on a many-core host.
pub fn tune_allocator() -> Result<(), String> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (what, env, param, value) in [
        ("M_ARENA_MAX", "MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 1),
        ("M_MMAP_THRESHOLD", "MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 64 << 20),
        ("M_TRIM_THRESHOLD", "MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, 256 << 20),
    ] {
        if std::env::var_os(env).is_some() {
            continue;
        }
        // SAFETY: mallopt only sets allocator parameters.
        if unsafe { libc::mallopt(param, value) } != 1 {
            return Err(format!("mallopt({what}, {value}) failed"));
        }
    }
    Ok(())
}

/// Structured logs on stderr, filtered by `RUST_LOG` (default `info`);
/// stdout stays free for the one machine-readable start line.
pub fn init_tracing(a: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match a.log_format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(true).with_span_list(false).init(),
    }
}

/// Sizes the global compute pool (`--threads`); `None` keeps one per core.
pub fn set_compute_threads(threads: Option<usize>) -> Result<(), String> {
    match threads {
        None => Ok(()),
        Some(0) => Err("--threads must be at least 1".into()),
        Some(n) => rayon::ThreadPoolBuilder::new().num_threads(n).build_global().map_err(|e| format!("--threads: {e}")),
    }
}

/// The async runtime for I/O. Two workers: heavy compute runs on the
/// compute pool, never here.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
}

/// A token cancelled on SIGINT or SIGTERM; call inside the runtime.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received; draining");
        t.cancel();
    });
    token
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

/// Makes a child started from `cmd` die with this process, even on
/// `kill -9` of this process (Linux `PR_SET_PDEATHSIG`).
pub fn tie_to_parent(cmd: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}
