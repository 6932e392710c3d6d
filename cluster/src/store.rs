//! The cluster store seam: what the control plane needs from etcd, behind a
//! trait, so the services depend on these operations rather than on an etcd
//! client. The services run on [`Etcd`]; the tests run a real etcd.

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// etcd could not be reached or answered with an error.
    #[error("etcd: {0}")]
    Unavailable(String),
    /// A value in the store is not what its key should hold.
    #[error("bad value at {key}: {message}")]
    Corrupt { key: String, message: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    Put {
        key: String,
        value: Vec<u8>,
        revision: i64,
    },
    Delete {
        key: String,
        revision: i64,
    },
    /// The watch ended (compaction past its revision, stream error, etcd
    /// restart): the caller re-lists and watches again.
    Lost(String),
}

/// Keys and values under a prefix, and the store revision they were read at.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub entries: Vec<(String, Vec<u8>)>,
    pub revision: i64,
}

#[async_trait]
pub trait ClusterStore: Send + Sync {
    /// A lease of `ttl`; keys put under it vanish when it is not kept alive.
    async fn grant(&self, ttl: Duration) -> Result<i64>;
    /// Refreshes a lease once; `false` when it no longer exists.
    async fn keep_alive(&self, lease: i64) -> Result<bool>;
    async fn revoke(&self, lease: i64) -> Result<()>;
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> Result<()>;
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    async fn list(&self, prefix: &str) -> Result<Listing>;
    async fn delete(&self, key: &str) -> Result<()>;
    /// Creates `key` under `lease` only if it does not exist; `true` if this
    /// call created it (an election campaign).
    async fn create(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<bool>;
    /// Puts `key = value` only while `guard` holds `expected` (leader fencing:
    /// a deposed leader's write fails instead of landing).
    async fn put_if(&self, guard: &str, expected: &[u8], key: &str, value: Vec<u8>) -> Result<bool>;
    /// Changes under `prefix` after `from_revision`, until the receiver is
    /// dropped or a `Lost` event.
    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<mpsc::Receiver<WatchEvent>>;
}

/// How to reach etcd: `--etcd` endpoints, and optionally TLS (a CA, and a
/// client certificate when etcd checks them) and a user whose password is
/// read from `EXPERTMESH_ETCD_PASSWORD` only (a flag would show it in `ps`).
#[derive(clap::Args, Clone, Default)]
pub struct EtcdOptions {
    /// etcd endpoints (comma-separated); `https://` ones need --etcd-ca.
    #[arg(long = "etcd", env = "EXPERTMESH_ETCD", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// CA (PEM) of etcd's server certificate: turns on TLS to etcd.
    #[arg(long, env = "EXPERTMESH_ETCD_CA")]
    pub etcd_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for an etcd started with --client-cert-auth.
    #[arg(long, env = "EXPERTMESH_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    pub etcd_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --etcd-cert.
    #[arg(long, env = "EXPERTMESH_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<std::path::PathBuf>,
    /// etcd user (etcd auth); the password comes from EXPERTMESH_ETCD_PASSWORD.
    #[arg(long, env = "EXPERTMESH_ETCD_USER")]
    pub etcd_user: Option<String>,
    #[arg(skip = std::env::var("EXPERTMESH_ETCD_PASSWORD").ok())]
    pub etcd_password: Option<String>,
}

// Hand-written so the password never reaches a log line.
impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("etcd_ca", &self.etcd_ca)
            .field("etcd_cert", &self.etcd_cert)
            .field("etcd_user", &self.etcd_user)
            .field("etcd_password", &self.etcd_password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl EtcdOptions {
    pub fn is_empty(&self) -> bool {
        self.endpoints.iter().all(|e| e.trim().is_empty())
    }

    /// Checks the options without connecting: files readable, a password
    /// with a user. Returns the flag at fault.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.etcd_user.is_some() && self.etcd_password.is_none() {
            return Err(("--etcd-user", "needs the password in EXPERTMESH_ETCD_PASSWORD".into()));
        }
        for (flag, path) in
            [("--etcd-ca", &self.etcd_ca), ("--etcd-cert", &self.etcd_cert), ("--etcd-key", &self.etcd_key)]
        {
            if let Some(p) = path {
                std::fs::metadata(p).map_err(|e| (flag, format!("{}: {e}", p.display())))?;
            }
        }
        Ok(())
    }

    fn connect_options(&self) -> Result<ConnectOptions> {
        let mut opts = ConnectOptions::new();
        if let (Some(user), Some(password)) = (&self.etcd_user, &self.etcd_password) {
            opts = opts.with_user(user.clone(), password.clone());
        }
        if let Some(ca) = &self.etcd_ca {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| StoreError::Unavailable(format!("reading {}: {e}", p.display())))
            };
            let mut tls = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            if let (Some(c), Some(k)) = (&self.etcd_cert, &self.etcd_key) {
                tls = tls.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
            }
            opts = opts.with_tls(tls);
        }
        Ok(opts)
    }
}

/// etcd v3 through `etcd-client`. Every request requires a leader (a
/// partitioned member answers with an error instead of stale data).
#[derive(Clone)]
pub struct Etcd {
    client: Client,
}

impl Etcd {
    pub async fn connect(o: &EtcdOptions) -> Result<Self> {
        let opts = o
            .connect_options()?
            .with_require_leader(true)
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            // HTTP/2 pings detect a dead etcd; etcd closes connections that
            // ping more often than every 5 s (`--grpc-keepalive-min-time`),
            // which broke every watch every few seconds at a 2 s interval.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client = Client::connect(&o.endpoints, Some(opts)).await.map_err(unavailable)?;
        Ok(Etcd { client })
    }

    /// [`Self::connect`], retried for up to `limit`: at start-up etcd may
    /// still be starting (as under `expertmesh up` or in a pod).
    pub async fn connect_within(endpoints: &EtcdOptions, limit: Duration) -> Result<Self> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            match Self::connect(endpoints).await {
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                r => return r,
            }
        }
    }
}

fn key_of(kv: &etcd_client::KeyValue) -> String {
    String::from_utf8_lossy(kv.key()).into_owned()
}

#[async_trait]
impl ClusterStore for Etcd {
    async fn grant(&self, ttl: Duration) -> Result<i64> {
        let r = self.client.clone().lease_grant(ttl.as_secs().max(1) as i64, None).await.map_err(unavailable)?;
        Ok(r.id())
    }

    async fn keep_alive(&self, lease: i64) -> Result<bool> {
        // Opening the keep-alive stream sends the first refresh and checks
        // that the lease still exists; one refresh is all this call does.
        match self.client.clone().lease_keep_alive(lease).await {
            Ok(_) => Ok(true),
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn revoke(&self, lease: i64) -> Result<()> {
        self.client.clone().lease_revoke(lease).await.map(|_| ()).map_err(unavailable)
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<i64>) -> Result<()> {
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        self.client.clone().put(key, value, opts).await.map(|_| ()).map_err(unavailable)
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let r = self.client.clone().get(key, None).await.map_err(unavailable)?;
        Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn list(&self, prefix: &str) -> Result<Listing> {
        let r = self.client.clone().get(prefix, Some(GetOptions::new().with_prefix())).await.map_err(unavailable)?;
        Ok(Listing {
            entries: r.kvs().iter().map(|kv| (key_of(kv), kv.value().to_vec())).collect(),
            revision: r.header().map_or(0, |h| h.revision()),
        })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.client.clone().delete(key, None).await.map(|_| ()).map_err(unavailable)
    }

    async fn create(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<bool> {
        let txn = Txn::new().when([Compare::create_revision(key, CompareOp::Equal, 0)]).and_then([TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_lease(lease)),
        )]);
        Ok(self.client.clone().txn(txn).await.map_err(unavailable)?.succeeded())
    }

    async fn put_if(&self, guard: &str, expected: &[u8], key: &str, value: Vec<u8>) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::value(guard, CompareOp::Equal, expected)])
            .and_then([TxnOp::put(key, value, None)]);
        Ok(self.client.clone().txn(txn).await.map_err(unavailable)?.succeeded())
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<mpsc::Receiver<WatchEvent>> {
        let opts = WatchOptions::new().with_prefix().with_start_revision(from_revision);
        let mut stream = self.client.clone().watch(prefix, Some(opts)).await.map_err(unavailable)?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let lost = loop {
                let resp = match stream.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => break "watch stream ended".to_string(),
                    Err(e) => break format!("watch stream: {e}"),
                };
                if resp.canceled() {
                    break format!(
                        "watch canceled (compacted at {}): {}",
                        resp.compact_revision(),
                        resp.cancel_reason()
                    );
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let e = match ev.event_type() {
                        EventType::Put => {
                            WatchEvent::Put { key: key_of(kv), value: kv.value().to_vec(), revision: kv.mod_revision() }
                        }
                        EventType::Delete => WatchEvent::Delete { key: key_of(kv), revision: kv.mod_revision() },
                    };
                    if tx.send(e).await.is_err() {
                        return;
                    }
                }
            };
            if tx.send(WatchEvent::Lost(lost)).await.is_err() {
                tracing::debug!("the watch's follower left before hearing it was lost");
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::EtcdOptions;

    #[test]
    fn options_validate_and_never_print_the_password() {
        let mut o = EtcdOptions { endpoints: vec!["https://e:2379".into()], ..Default::default() };
        o.etcd_user = Some("root".into());
        assert_eq!(o.validate().unwrap_err().0, "--etcd-user");
        o.etcd_password = Some("hunter2-secret".into());
        assert!(o.validate().is_ok());
        assert!(!format!("{o:?}").contains("hunter2"));
        o.etcd_ca = Some("/nonexistent/ca.pem".into());
        assert_eq!(o.validate().unwrap_err().0, "--etcd-ca");
    }
}
