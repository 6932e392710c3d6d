//! The cluster flags, declared once: every service and CLI command that
//! reaches etcd flattens these.

use crate::keys::Keys;
use crate::store::EtcdOptions;
use std::time::Duration;

/// Which cluster, in which etcd.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClusterArgs {
    /// etcd (`--etcd` endpoints, comma-separated, and its TLS and user).
    #[command(flatten)]
    pub etcd: EtcdOptions,
    /// Cluster name: keys live under `/expertmesh/<cluster>/`.
    #[arg(long, env = "EXPERTMESH_CLUSTER", default_value = "default")]
    pub cluster: String,
}

/// What a member (router, expert node, coordinator) needs to join.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MemberArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Membership lease TTL in seconds: a member that stops renewing its
    /// lease (a dead node, router or leader) is gone within it.
    #[arg(long, env = "EXPERTMESH_LEASE_TTL", default_value_t = 10)]
    pub lease_ttl: u64,
}

impl ClusterArgs {
    /// The etcd options are consistent and the cluster name can be a key
    /// prefix; returns the flag at fault.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        self.etcd.validate()?;
        if self.cluster.is_empty() || self.cluster.contains('/') {
            return Err(("--cluster", "must be a non-empty name without '/'".into()));
        }
        Ok(())
    }

    pub fn keys(&self) -> Keys {
        Keys::new(&self.cluster)
    }
}

impl MemberArgs {
    /// Whether etcd endpoints were given (the process joins a cluster).
    pub fn joins(&self) -> bool {
        !self.cluster.etcd.is_empty()
    }

    /// [`ClusterArgs::validate`] and the lease TTL, for a member that joins;
    /// without endpoints only the etcd options are checked.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.joins() {
            return self.cluster.etcd.validate();
        }
        self.cluster.validate()?;
        if self.lease_ttl == 0 {
            return Err(("--lease-ttl", "must be at least 1 second".into()));
        }
        Ok(())
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl)
    }

    pub fn etcd(&self) -> &EtcdOptions {
        &self.cluster.etcd
    }

    pub fn keys(&self) -> Keys {
        self.cluster.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_that_join_need_a_ttl_and_a_prefix_safe_name() {
        let mut m = MemberArgs { lease_ttl: 0, ..Default::default() };
        assert!(m.validate().is_ok(), "a process that does not join has nothing to check");
        m.cluster.etcd.endpoints = vec!["http://127.0.0.1:2379".into()];
        m.cluster.cluster = "prod".into();
        assert_eq!(m.validate().unwrap_err().0, "--lease-ttl");
        m.lease_ttl = 5;
        assert!(m.validate().is_ok());
        m.cluster.cluster = "a/b".into();
        assert_eq!(m.validate().unwrap_err().0, "--cluster");
    }
}
