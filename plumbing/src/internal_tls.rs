//! TLS for the cluster's own gRPC: mutual TLS between routers, expert nodes
//! and coordinators (`--internal-ca/--internal-cert/--internal-key`), and
//! the server side of the router's public listeners (`--tls-cert/--tls-key`).
//!
//! Internal TLS is all or nothing: with a CA, every server asks for a client
//! certificate signed by it and refuses peers without one, and every client
//! presents its own certificate and checks the server's against the CA (by
//! the host in the address, so certificates name IPs or DNS names nodes
//! advertise).

use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{flag} {path}: {source}")]
    Read { flag: &'static str, path: String, source: std::io::Error },
    #[error("{flag}: {message}")]
    Invalid { flag: &'static str, message: String },
}

/// `--internal-*`: mutual TLS inside the cluster.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct InternalTlsArgs {
    /// CA (PEM) that signs every internal certificate; turns on mutual TLS
    /// between routers, expert nodes and coordinators.
    #[arg(long, env = "EXPERTMESH_INTERNAL_CA", requires_all = ["internal_cert", "internal_key"])]
    pub internal_ca: Option<PathBuf>,
    /// This process's certificate chain (PEM), signed by --internal-ca.
    #[arg(long, env = "EXPERTMESH_INTERNAL_CERT", requires = "internal_ca")]
    pub internal_cert: Option<PathBuf>,
    /// The private key (PEM) of --internal-cert.
    #[arg(long, env = "EXPERTMESH_INTERNAL_KEY", requires = "internal_ca")]
    pub internal_key: Option<PathBuf>,
}

/// Reads a PEM file that must hold `marker` (`CERTIFICATE`, `PRIVATE KEY`).
fn read_pem(flag: &'static str, path: &Path, marker: &str) -> Result<Vec<u8>, TlsError> {
    let pem =
        std::fs::read(path).map_err(|source| TlsError::Read { flag, path: path.display().to_string(), source })?;
    let begin = format!("-----BEGIN {marker}-----");
    let has = pem.windows(begin.len()).any(|w| w == begin.as_bytes())
        // PKCS#1/SEC1 keys: "BEGIN RSA PRIVATE KEY", "BEGIN EC PRIVATE KEY".
        || (marker == "PRIVATE KEY" && pem.windows(marker.len()).any(|w| w == marker.as_bytes()));
    if !has {
        return Err(TlsError::Invalid { flag, message: format!("{}: no PEM {marker} in the file", path.display()) });
    }
    Ok(pem)
}

/// Reads a certificate/key pair, checking that both are PEM.
pub fn identity(cert: (&'static str, &Path), key: (&'static str, &Path)) -> Result<Identity, TlsError> {
    Ok(Identity::from_pem(read_pem(cert.0, cert.1, "CERTIFICATE")?, read_pem(key.0, key.1, "PRIVATE KEY")?))
}

/// Loaded internal TLS material; `None` (plaintext) when no CA is given.
#[derive(Clone, Debug)]
pub struct InternalTls {
    ca: Certificate,
    identity: Identity,
}

impl InternalTls {
    pub fn load(a: &InternalTlsArgs) -> Result<Option<Self>, TlsError> {
        let (Some(ca), Some(cert), Some(key)) = (&a.internal_ca, &a.internal_cert, &a.internal_key) else {
            if a.internal_ca.is_some() || a.internal_cert.is_some() || a.internal_key.is_some() {
                return Err(TlsError::Invalid {
                    flag: "--internal-ca",
                    message: "needs --internal-cert and --internal-key together".into(),
                });
            }
            return Ok(None);
        };
        let ca_pem = read_pem("--internal-ca", ca, "CERTIFICATE")?;
        let identity = identity(("--internal-cert", cert), ("--internal-key", key))?;
        Ok(Some(InternalTls { ca: Certificate::from_pem(ca_pem), identity }))
    }

    /// Server side: present our certificate, require the peer's.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .timeout(Duration::from_secs(10))
    }

    fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(self.ca.clone()).identity(self.identity.clone())
    }
}

/// An endpoint for an internal peer at `addr` (`HOST:PORT`): `https` with
/// our client certificate under internal TLS, plain `http` otherwise.
pub fn endpoint(tls: Option<&InternalTls>, addr: &str) -> Result<Endpoint, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let ep = Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| format!("bad address {addr:?}: {e}"))?;
    match tls {
        Some(t) => ep.tls_config(t.client()).map_err(|e| format!("TLS for {addr}: {e}")),
        None => Ok(ep),
    }
}

/// A tonic server builder, with internal mutual TLS when configured.
pub fn server_builder(tls: Option<&InternalTls>) -> Result<tonic::transport::Server, TlsError> {
    let b = tonic::transport::Server::builder();
    match tls {
        Some(t) => {
            b.tls_config(t.server()).map_err(|e| TlsError::Invalid { flag: "--internal-cert", message: e.to_string() })
        }
        None => Ok(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(ca: &Path, cert: &Path, key: &Path) -> InternalTlsArgs {
        InternalTlsArgs {
            internal_ca: Some(ca.to_path_buf()),
            internal_cert: Some(cert.to_path_buf()),
            internal_key: Some(key.to_path_buf()),
        }
    }

    #[test]
    fn bad_material_names_the_flag() {
        let dir = std::env::temp_dir().join(format!("em-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (pem, junk) = (dir.join("cert.pem"), dir.join("junk.pem"));
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        std::fs::write(&junk, "not pem").unwrap();
        let missing = dir.join("missing.pem");
        let e = InternalTls::load(&args(&missing, &pem, &pem)).unwrap_err().to_string();
        assert!(e.starts_with("--internal-ca") && e.contains("missing.pem"), "{e}");
        let e = InternalTls::load(&args(&junk, &pem, &pem)).unwrap_err().to_string();
        assert!(e.starts_with("--internal-ca") && e.contains("no PEM CERTIFICATE"), "{e}");
        let e = InternalTls::load(&args(&pem, &pem, &junk)).unwrap_err().to_string();
        assert!(e.starts_with("--internal-key"), "{e}");
        let partial = InternalTlsArgs { internal_ca: Some(pem.clone()), ..Default::default() };
        assert!(InternalTls::load(&partial).unwrap_err().to_string().starts_with("--internal-ca"));
        assert!(InternalTls::load(&InternalTlsArgs::default()).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn plaintext_endpoints_use_http_and_bad_addresses_are_errors() {
        assert_eq!(endpoint(None, "127.0.0.1:1").unwrap().uri().scheme_str(), Some("http"));
        assert!(endpoint(None, "not an address").is_err());
    }
}
