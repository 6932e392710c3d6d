//! `expertmesh up --tls`: a throwaway certificate authority for a local
//! secure cluster. Two certificates, both for `localhost` and `127.0.0.1`:
//! - `internal`: server and client authentication, shared by the
//!   processes for mutual TLS with each other and with etcd;
//! - `public`: the router's public listeners.
//!
//! They live in `up`'s run directory and go with it when the cluster stops.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// A PEM certificate and its key on disk.
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct LocalPki {
    pub ca: PathBuf,
    pub internal: Pair,
    pub public: Pair,
}

fn write_private(path: &Path, pem: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(pem.as_bytes())?;
    Ok(())
}

fn leaf(dir: &Path, name: &str, ca: &Issuer<'_, KeyPair>, usages: Vec<ExtendedKeyUsagePurpose>) -> Result<Pair> {
    let mut p = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    p.distinguished_name.push(DnType::CommonName, format!("expertmesh {name}"));
    p.extended_key_usages = usages;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, ca)?;
    let pair = Pair { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}-key.pem")) };
    std::fs::write(&pair.cert, cert.pem()).with_context(|| format!("writing {}", pair.cert.display()))?;
    write_private(&pair.key, &key.serialize_pem())?;
    Ok(pair)
}

/// Makes the CA and both certificates in `dir`.
pub fn make(dir: &Path) -> Result<LocalPki> {
    std::fs::create_dir_all(dir)?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, "expertmesh local CA");
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let ca_cert = p.self_signed(&key)?;
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ca_cert.pem()).with_context(|| format!("writing {}", ca.display()))?;
    let issuer = Issuer::new(p, key);
    use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let internal = leaf(dir, "internal", &issuer, vec![ServerAuth, ClientAuth])?;
    let public = leaf(dir, "public", &issuer, vec![ServerAuth])?;
    Ok(LocalPki { ca, internal, public })
}
