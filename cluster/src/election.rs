//! Leader election through etcd: the leader key is created (only if absent)
//! under the candidate's lease and kept alive from a dedicated OS thread and
//! runtime, like [`crate::membership::Registration`]. Losing the lease
//! (etcd unreachable past the TTL) steps down; a stopped leader revokes its
//! lease, so a successor takes over at once instead of after the TTL.
//!
//! Leader-only writes go through [`crate::store::ClusterStore::put_if`]
//! guarded on the leader key holding this candidate's id: a deposed leader
//! that has not noticed yet cannot overwrite its successor's decisions.

use crate::membership::{connect_until, stop_or_sleep};
use crate::store::{ClusterStore, EtcdOptions};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub struct Election {
    leader: watch::Receiver<bool>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Election {
    /// Campaigns for `key` with value `id` until stopped.
    pub fn start(endpoints: EtcdOptions, key: String, id: String, ttl: Duration) -> std::io::Result<Self> {
        let (tx, rx) = watch::channel(false);
        let stop = CancellationToken::new();
        let s = stop.clone();
        let thread = std::thread::Builder::new().name("election".into()).spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(campaign(endpoints, key, id, ttl, tx, s)),
                Err(e) => tracing::error!(error = %e, "election runtime failed to start"),
            }
        })?;
        Ok(Election { leader: rx, stop, thread: Some(thread) })
    }

    /// Follows leadership: `true` while this candidate leads.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.leader.clone()
    }

    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the election thread panicked");
        }
    }
}

async fn campaign(
    endpoints: EtcdOptions,
    key: String,
    id: String,
    ttl: Duration,
    leader: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let pause = |d: Duration| stop_or_sleep(&stop, d);
    let Some(s) = connect_until(&endpoints, &stop).await else { return };
    while !stop.is_cancelled() {
        let lease = match s.grant(ttl).await {
            Ok(l) => l,
            Err(_) => {
                pause(Duration::from_millis(500)).await;
                continue;
            }
        };
        // Wait for the key to be free, refreshing our lease meanwhile.
        let won = loop {
            if stop.is_cancelled() {
                crate::membership::revoke(&s, lease).await;
                return;
            }
            match s.create(&key, id.clone().into_bytes(), lease).await {
                Ok(true) => break true,
                Ok(false) => {}
                Err(_) => break false,
            }
            if !matches!(s.keep_alive(lease).await, Ok(true)) {
                break false;
            }
            pause(ttl / 10).await;
        };
        if !won {
            pause(Duration::from_millis(500)).await;
            continue;
        }
        tracing::info!(%id, lease, "elected leader");
        leader.send_replace(true);
        let mut last_ok = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    leader.send_replace(false);
                    crate::membership::revoke(&s, lease).await;
                    return;
                }
                _ = tokio::time::sleep(ttl / 3) => {}
            }
            match tokio::time::timeout(ttl / 3, s.keep_alive(lease)).await {
                Ok(Ok(true)) => last_ok = Instant::now(),
                Ok(Ok(false)) => break,
                _ if last_ok.elapsed() >= ttl => break,
                _ => {}
            }
        }
        tracing::warn!(%id, "lost leadership (lease expired)");
        leader.send_replace(false);
    }
}
