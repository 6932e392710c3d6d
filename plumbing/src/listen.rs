//! Listeners: accepted sockets with Nagle's algorithm off, and a record of
//! whether every server a process runs is still serving.

use std::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// Accepted connections with Nagle's algorithm off. tonic's `tcp_nodelay`
/// covers only listeners it binds itself; with a caller's listener, small
/// responses would otherwise wait ~40 ms for delayed ACKs.
pub fn nodelay_incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        let s = s?;
        s.set_nodelay(true)?;
        Ok(s)
    })
}

/// gRPC server reflection for `descriptors` (encoded file descriptor
/// sets), served as both `grpc.reflection.v1` and `v1alpha`: older clients
/// (Python's grpcio-reflection, older grpcurl, some IDEs) only ask v1alpha.
pub fn reflection(descriptors: &[&'static [u8]]) -> Result<tonic::service::Routes, String> {
    let configure = || {
        descriptors
            .iter()
            .fold(tonic_reflection::server::Builder::configure(), |b, d| b.register_encoded_file_descriptor_set(d))
    };
    let v1 = configure().build_v1().map_err(|e| format!("reflection: {e}"))?;
    let v1alpha = configure().build_v1alpha().map_err(|e| format!("reflection: {e}"))?;
    Ok(tonic::service::Routes::new(v1).add_service(v1alpha))
}

/// The servers of one process. A server that fails (or stops before the
/// process is shutting down) is logged with its name and marks the process
/// unready; readiness endpoints consult [`Listeners::healthy`], and
/// [`Listeners::failed`] lets a service react (turn its gRPC health to
/// `NOT_SERVING`).
#[derive(Debug, Default)]
pub struct Listeners {
    failure: Mutex<Option<String>>,
    failed: CancellationToken,
}

impl Listeners {
    /// Whether every server is still serving.
    pub fn healthy(&self) -> bool {
        !self.failed.is_cancelled()
    }

    /// The first failure, as "name: error".
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Resolves once any server has failed.
    pub async fn failed(&self) {
        self.failed.cancelled().await
    }

    /// Records that server `name` stopped serving.
    pub fn fail(&self, name: &str, error: impl std::fmt::Display) {
        tracing::error!(listener = name, %error, "listener failed; this process is no longer ready");
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert_with(|| format!("{name}: {error}"));
        self.failed.cancel();
    }

    /// Runs server `name` to completion. An error, or an end before `stop`
    /// is cancelled, is a failure (see [`Listeners::fail`]).
    pub async fn run<E: std::fmt::Display>(
        &self,
        name: &str,
        server: impl std::future::Future<Output = Result<(), E>>,
        stop: &CancellationToken,
    ) {
        match server.await {
            Err(e) => self.fail(name, e),
            Ok(()) if !stop.is_cancelled() => self.fail(name, "stopped serving"),
            Ok(()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_or_vanished_server_marks_the_process_unready() {
        let (l, stop) = (Listeners::default(), CancellationToken::new());
        l.run("ok", async { Ok::<(), String>(()) }, &CancellationToken::new()).await;
        assert!(!l.healthy(), "a server that ends while the process runs has failed");
        let l = Listeners::default();
        stop.cancel();
        l.run("drained", async { Ok::<(), String>(()) }, &stop).await;
        assert!(l.healthy(), "ending on shutdown is not a failure");
        l.run("metrics", async { Err::<(), _>("address in use") }, &stop).await;
        l.run("grpc", async { Err::<(), _>("later") }, &stop).await;
        assert!(!l.healthy());
        assert_eq!(l.failure().as_deref(), Some("metrics: address in use"), "the first failure is kept");
        tokio::time::timeout(std::time::Duration::from_secs(1), l.failed()).await.unwrap();
    }
}
