//! Membership: registering under a lease, and following a key prefix.
//!
//! [`Registration`] keeps one key alive under a lease from its own OS thread
//! with its own single-threaded runtime and etcd connection, so neither a
//! busy async runtime nor compute threads can delay a keep-alive past the
//! TTL. If the lease is lost anyway (etcd unreachable for longer than the
//! TTL, or an etcd restart without its data), it grants a new one and puts
//! the record again: the member rejoins.
//!
//! [`watch_prefix`] follows everything under a prefix as a map: list, then
//! watch from the listing's revision + 1, and list again whenever the watch
//! is lost (compaction, stream error, etcd restart).

use crate::store::{ClusterStore, Etcd, EtcdOptions, WatchEvent};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Backoff while etcd is unreachable.
const RETRY: Duration = Duration::from_millis(500);

/// Revokes a lease on leaving, within 2 s. Failing, the record goes when
/// the lease expires instead (at most a TTL later): worth a warning only.
pub(crate) async fn revoke(s: &Etcd, lease: i64) {
    match tokio::time::timeout(Duration::from_secs(2), s.revoke(lease)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(lease, error = %e, "revoking the lease; it expires within its TTL instead"),
        Err(_) => tracing::warn!(lease, "revoking the lease timed out; it expires within its TTL instead"),
    }
}

/// A record kept alive under a lease; revoked (the record vanishes at once)
/// when dropped or stopped.
pub struct Registration {
    record: watch::Sender<Vec<u8>>,
    registered: Arc<AtomicBool>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Registration {
    pub fn start(endpoints: EtcdOptions, key: String, record: Vec<u8>, ttl: Duration) -> std::io::Result<Self> {
        let (tx, rx) = watch::channel(record);
        let stop = CancellationToken::new();
        let registered = Arc::new(AtomicBool::new(false));
        let (s, r) = (stop.clone(), registered.clone());
        let thread = std::thread::Builder::new().name(format!("lease:{key}")).spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(keep_registered(endpoints, key, rx, ttl, s, r)),
                Err(e) => tracing::error!(error = %e, "membership runtime failed to start"),
            }
        })?;
        Ok(Registration { record: tx, registered, stop, thread: Some(thread) })
    }

    /// Replaces the record (put at once, and again on every rejoin).
    pub fn update(&self, record: Vec<u8>) {
        self.record.send_replace(record);
    }

    /// Whether the record is in etcd under a live lease, as last known.
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Relaxed)
    }

    /// Revokes the lease and waits for the membership thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the membership thread panicked");
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn keep_registered(
    endpoints: EtcdOptions,
    key: String,
    mut record: watch::Receiver<Vec<u8>>,
    ttl: Duration,
    stop: CancellationToken,
    registered: Arc<AtomicBool>,
) {
    // The client reconnects by itself after etcd outages.
    let Some(s) = connect_until(&endpoints, &stop).await else { return };
    let mut lease: Option<i64> = None;
    while !stop.is_cancelled() {
        let id = match lease {
            Some(id) => id,
            None => {
                let value = record.borrow_and_update().clone();
                match register(&s, &key, value, ttl).await {
                    Ok(id) => {
                        tracing::info!(%key, lease = id, "registered");
                        registered.store(true, Ordering::Relaxed);
                        lease = Some(id);
                        id
                    }
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "membership: registration failed; retrying");
                        stop_or_sleep(&stop, RETRY).await;
                        continue;
                    }
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => {
                revoke(&s, id).await;
                registered.store(false, Ordering::Relaxed);
                return;
            }
            changed = record.changed() => {
                if changed.is_err() {
                    return;
                }
                let value = record.borrow_and_update().clone();
                if let Err(e) = s.put(&key, value, Some(id)).await {
                    tracing::warn!(%key, error = %e, "membership: record update failed; re-registering");
                    lease = None;
                }
            }
            _ = tokio::time::sleep(ttl / 3) => {
                match tokio::time::timeout(ttl / 3, s.keep_alive(id)).await {
                    Ok(Ok(true)) => registered.store(true, Ordering::Relaxed),
                    Ok(Ok(false)) => {
                        tracing::warn!(%key, lease = id, "membership: lease expired; rejoining");
                        registered.store(false, Ordering::Relaxed);
                        lease = None;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%key, error = %e, "membership: keep-alive failed");
                    }
                    Err(_) => tracing::warn!(%key, "membership: keep-alive timed out"),
                }
            }
        }
    }
}

async fn register(s: &Etcd, key: &str, value: Vec<u8>, ttl: Duration) -> crate::store::Result<i64> {
    let id = s.grant(ttl).await?;
    s.put(key, value, Some(id)).await?;
    Ok(id)
}

/// Connects to etcd, retrying until connected or stopped.
pub(crate) async fn connect_until(endpoints: &EtcdOptions, stop: &CancellationToken) -> Option<Etcd> {
    while !stop.is_cancelled() {
        match Etcd::connect(endpoints).await {
            Ok(s) => return Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "etcd unreachable; retrying");
                stop_or_sleep(stop, RETRY).await;
            }
        }
    }
    None
}

pub(crate) async fn stop_or_sleep(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// Everything under a prefix, key → value, kept current.
pub type Snapshot = BTreeMap<String, Vec<u8>>;

/// Follows `prefix` until `stop`: the receiver always holds the latest
/// snapshot (empty until the first listing succeeds).
pub fn watch_prefix(
    store: Arc<dyn ClusterStore>,
    prefix: String,
    stop: CancellationToken,
) -> watch::Receiver<Snapshot> {
    let (tx, rx) = watch::channel(Snapshot::new());
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let listing = match store.list(&prefix).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(%prefix, error = %e, "listing failed; retrying");
                    stop_or_sleep(&stop, RETRY).await;
                    continue;
                }
            };
            tx.send_replace(listing.entries.into_iter().collect());
            let mut events = match store.watch(&prefix, listing.revision + 1).await {
                Ok(rx) => rx,
                Err(e) => {
                    tracing::debug!(%prefix, error = %e, "watch failed; re-listing");
                    stop_or_sleep(&stop, RETRY).await;
                    continue;
                }
            };
            loop {
                let ev = tokio::select! {
                    _ = stop.cancelled() => return,
                    ev = events.recv() => ev,
                };
                match ev {
                    Some(WatchEvent::Put { key, value, .. }) => {
                        tx.send_modify(|m| {
                            m.insert(key, value);
                        });
                    }
                    Some(WatchEvent::Delete { key, .. }) => {
                        tx.send_modify(|m| {
                            m.remove(&key);
                        });
                    }
                    Some(WatchEvent::Lost(why)) => {
                        tracing::info!(%prefix, %why, "watch lost; re-listing");
                        break;
                    }
                    None => break,
                }
            }
            stop_or_sleep(&stop, Duration::from_millis(100)).await;
        }
    });
    rx
}
