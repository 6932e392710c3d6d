//! A private single-member etcd as a child process: what `expertmesh up`
//! runs when no `--etcd` is given, and what the integration tests run.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const INSTALL_HINT: &str =
    "etcd not found on PATH: install Debian's etcd-server (sudo apt-get install etcd-server), or pass --etcd URL";

#[derive(Debug, thiserror::Error)]
pub enum EtcdServerError {
    #[error("{INSTALL_HINT}")]
    Missing,
    #[error("starting etcd: {0}")]
    Start(#[from] std::io::Error),
    #[error("etcd did not become healthy within {0:?}; its log is {1}")]
    Unhealthy(Duration, PathBuf),
}

/// Server TLS for a private etcd: clients must present a certificate
/// signed by `ca` (`--client-cert-auth`).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct EtcdServer {
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health` and `/metrics`, also when clients use TLS.
    metrics_port: u16,
    tls: Option<EtcdTls>,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdServer {
    /// Starts etcd with its data in `dir` on two free loopback ports and
    /// waits until it reports healthy.
    pub fn start(dir: &Path) -> Result<Self, EtcdServerError> {
        Self::start_with(dir, None)
    }

    /// [`Self::start`], serving clients over TLS when `tls` is given.
    pub fn start_with(dir: &Path, tls: Option<EtcdTls>) -> Result<Self, EtcdServerError> {
        std::fs::create_dir_all(dir)?;
        let mut s = EtcdServer {
            child: None,
            dir: dir.to_path_buf(),
            client_port: free_port()?,
            peer_port: free_port()?,
            metrics_port: free_port()?,
            tls,
        };
        s.spawn()?;
        Ok(s)
    }

    /// The client URL (`http://127.0.0.1:PORT`, or `https://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// How a client reaches this etcd (with its TLS files, when it has TLS:
    /// the server certificate doubles as a client certificate).
    pub fn options(&self) -> crate::store::EtcdOptions {
        crate::store::EtcdOptions {
            endpoints: vec![self.url()],
            etcd_ca: self.tls.as_ref().map(|t| t.ca.clone()),
            etcd_cert: self.tls.as_ref().map(|t| t.cert.clone()),
            etcd_key: self.tls.as_ref().map(|t| t.key.clone()),
            ..Default::default()
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills etcd (SIGKILL) without removing its data.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // An etcd that already exited cannot be killed; reaping tells.
            if let Err(e) = c.kill() {
                tracing::debug!(error = %e, "etcd had already exited");
            }
            if let Err(e) = c.wait() {
                tracing::warn!(error = %e, "reaping etcd");
            }
        }
    }

    /// Starts etcd again on the same ports and data (after [`Self::kill`]).
    pub fn restart(&mut self) -> Result<(), EtcdServerError> {
        self.kill();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<(), EtcdServerError> {
        let (c, p) = (self.url(), format!("http://127.0.0.1:{}", self.peer_port));
        let m = format!("http://127.0.0.1:{}", self.metrics_port);
        let log_path = self.dir.join("etcd.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "expertmesh", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args(["--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
            .args(["--initial-cluster", &format!("expertmesh={p}"), "--log-level", "warn", "--logger", "zap"])
            .args(["--listen-metrics-urls", &m]);
        if let Some(t) = &self.tls {
            cmd.arg("--client-cert-auth")
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key);
        }
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        expertmesh_plumbing::process::tie_to_parent(&mut cmd);
        let child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound { EtcdServerError::Missing } else { EtcdServerError::Start(e) }
        })?;
        self.child = Some(child);
        let limit = Duration::from_secs(20);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.healthy() {
                return Ok(());
            }
            if let Some(c) = &mut self.child
                && matches!(c.try_wait(), Ok(Some(_)))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        Err(EtcdServerError::Unhealthy(limit, log_path))
    }

    /// etcd's own `/health`, on the plain metrics port.
    fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.metrics_port)) else { return false };
        // Any failure here is "not healthy yet": the caller polls again.
        if s.set_read_timeout(Some(Duration::from_secs(1))).is_err()
            || s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err()
        {
            return false;
        }
        let mut body = String::new();
        s.read_to_string(&mut body).is_ok() && body.contains("\"health\":\"true\"")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
