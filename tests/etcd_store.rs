//! The cluster store and membership against a real etcd started by the test:
//! fenced writes and campaigns, leases, list-then-watch through compaction
//! and an etcd restart, and a registration that rejoins after losing its lease.

use expertmesh_cluster::etcd_server::EtcdServer;
use expertmesh_cluster::membership::{Registration, watch_prefix};
use expertmesh_cluster::store::{ClusterStore, Etcd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

struct Scratch(std::path::PathBuf);
impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("em-etcd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Scratch(p)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Polls `f` until it is true or `limit` passes.
async fn eventually(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[test]
fn kv_campaign_fencing_and_leases() {
    let dir = Scratch::new("kv");
    let etcd = EtcdServer::start(&dir.0).unwrap();
    rt().block_on(async {
        let s = Etcd::connect(&etcd.options()).await.unwrap();
        s.put("/t/a", b"1".to_vec(), None).await.unwrap();
        s.put("/t/b", b"2".to_vec(), None).await.unwrap();
        s.put("/u/c", b"3".to_vec(), None).await.unwrap();
        assert_eq!(s.get("/t/a").await.unwrap(), Some(b"1".to_vec()));
        let l = s.list("/t/").await.unwrap();
        assert_eq!(l.entries, vec![("/t/a".into(), b"1".to_vec()), ("/t/b".into(), b"2".to_vec())]);
        assert!(l.revision > 0);
        s.delete("/t/a").await.unwrap();
        assert_eq!(s.get("/t/a").await.unwrap(), None);

        // A campaign: only the first create wins.
        let lease = s.grant(Duration::from_secs(2)).await.unwrap();
        assert!(s.create("/t/leader", b"c1".to_vec(), lease).await.unwrap());
        let other = s.grant(Duration::from_secs(10)).await.unwrap();
        assert!(!s.create("/t/leader", b"c2".to_vec(), other).await.unwrap());
        // Fenced writes land only for the holder of the leader key.
        assert!(s.put_if("/t/leader", b"c1", "/t/placement", b"v1".to_vec()).await.unwrap());
        assert!(!s.put_if("/t/leader", b"c2", "/t/placement", b"v2".to_vec()).await.unwrap());
        assert_eq!(s.get("/t/placement").await.unwrap(), Some(b"v1".to_vec()));
        // Kept alive, the key stays past its TTL; left alone, it expires.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            assert!(s.keep_alive(lease).await.unwrap());
        }
        assert!(s.get("/t/leader").await.unwrap().is_some());
        assert!(eventually(Duration::from_secs(5), async || s.get("/t/leader").await.unwrap().is_none()).await);
        assert!(!s.keep_alive(lease).await.unwrap(), "an expired lease reports as gone");
        assert!(s.create("/t/leader", b"c2".to_vec(), other).await.unwrap(), "the next campaign wins");
    });
}

#[test]
fn watch_survives_compaction_and_etcd_restart() {
    let dir = Scratch::new("watch");
    let mut etcd = EtcdServer::start(&dir.0).unwrap();
    let rt = rt();
    let stop = CancellationToken::new();
    let s: Arc<dyn ClusterStore> = Arc::new(rt.block_on(Etcd::connect(&etcd.options())).unwrap());
    let mut snap = rt.block_on(async { watch_prefix(s.clone(), "/w/".into(), stop.clone()) });
    let seen = |snap: &mut tokio::sync::watch::Receiver<_>, key: &'static str, want: Option<&'static [u8]>| {
        rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(15),
                snap.wait_for(|m: &expertmesh_cluster::membership::Snapshot| m.get(key).map(Vec::as_slice) == want),
            )
            .await
            .is_ok()
        })
    };
    rt.block_on(s.put("/w/a", b"1".to_vec(), None)).unwrap();
    assert!(seen(&mut snap, "/w/a", Some(b"1")));
    rt.block_on(s.put("/other", b"x".to_vec(), None)).unwrap();
    rt.block_on(s.delete("/w/a")).unwrap();
    assert!(seen(&mut snap, "/w/a", None));

    // Compaction past everything the watch has seen.
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([etcd.url()], None).await.unwrap();
        for i in 0..20 {
            c.put("/w/churn", i.to_string(), None).await.unwrap();
        }
        let rev = c.get("/w/churn", None).await.unwrap().header().unwrap().revision();
        c.compact(rev, None).await.unwrap();
    });
    rt.block_on(s.put("/w/b", b"2".to_vec(), None)).unwrap();
    assert!(seen(&mut snap, "/w/b", Some(b"2")));

    // etcd restarts (same data): the watch re-lists and carries on.
    etcd.kill();
    std::thread::sleep(Duration::from_millis(500));
    etcd.restart().unwrap();
    rt.block_on(async {
        assert!(eventually(Duration::from_secs(15), async || s.put("/w/c", b"3".to_vec(), None).await.is_ok()).await)
    });
    assert!(seen(&mut snap, "/w/c", Some(b"3")));
    assert!(seen(&mut snap, "/w/b", Some(b"2")));
    stop.cancel();
}

#[test]
fn registration_keeps_alive_rejoins_and_leaves() {
    let dir = Scratch::new("reg");
    let etcd = EtcdServer::start(&dir.0).unwrap();
    let rt = rt();
    let s = rt.block_on(Etcd::connect(&etcd.options())).unwrap();
    let ttl = Duration::from_secs(2);
    let reg = Registration::start(etcd.options(), "/r/nodes/n1".into(), b"v1".to_vec(), ttl).unwrap();
    let value = || rt.block_on(s.get("/r/nodes/n1")).unwrap();
    let wait = |want: Option<&[u8]>, limit: u64| {
        let deadline = Instant::now() + Duration::from_secs(limit);
        while Instant::now() < deadline {
            if value().as_deref() == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    };
    assert!(wait(Some(b"v1"), 5));
    // Kept alive well past the TTL (the scenario's length, not a wait).
    std::thread::sleep(ttl * 2);
    assert_eq!(value().as_deref(), Some(&b"v1"[..]));
    reg.update(b"v2".to_vec());
    assert!(wait(Some(b"v2"), 5));

    // The lease is revoked behind its back: the key vanishes, then the
    // registration notices and rejoins with a fresh lease.
    // Watched rather than read afterwards: the rejoin may put the key back
    // before a read could see it gone.
    let (deleted, rejoined) = rt.block_on(async {
        let mut c = etcd_client::Client::connect([etcd.url()], None).await.unwrap();
        let lease = c.get("/r/nodes/n1", None).await.unwrap().kvs()[0].lease();
        let mut events = c.watch("/r/nodes/n1", None).await.unwrap();
        c.lease_revoke(lease).await.unwrap();
        let (mut deleted, mut rejoined) = (false, false);
        let until = tokio::time::Instant::now() + ttl * 3;
        while !(deleted && rejoined) {
            let Ok(Ok(Some(r))) = tokio::time::timeout_at(until, events.message()).await else { break };
            for e in r.events() {
                match e.event_type() {
                    etcd_client::EventType::Delete => deleted = true,
                    etcd_client::EventType::Put => rejoined |= deleted && e.kv().is_some_and(|kv| kv.value() == b"v2"),
                }
            }
        }
        (deleted, rejoined)
    });
    assert!(deleted, "the revoked lease took the key with it");
    assert!(rejoined, "rejoined within the TTL");
    // The flag turns once the put has returned: right after the key shows.
    let t0 = Instant::now();
    while !reg.is_registered() {
        assert!(t0.elapsed() < ttl, "registered key, but the registration does not know it");
        std::thread::sleep(Duration::from_millis(10));
    }

    // Leaving revokes the lease: the record goes at once, well before the TTL.
    let t0 = Instant::now();
    reg.stop();
    assert_eq!(value(), None);
    assert!(t0.elapsed() < ttl, "left after {:?}, no faster than expiry", t0.elapsed());
}

#[test]
fn user_and_password_are_required_once_etcd_auth_is_on() {
    let dir = Scratch::new("auth");
    let etcd = EtcdServer::start(&dir.0).unwrap();
    rt().block_on(async {
        // Turn on etcd auth the way an operator would: a root user, then auth.
        let mut admin = etcd_client::Client::connect([etcd.url()], None).await.unwrap();
        admin.user_add("root", "pw-root-7c1e", None).await.unwrap();
        admin.user_grant_role("root", "root").await.unwrap();
        admin.auth_enable().await.unwrap();

        let mut o = etcd.options();
        let anonymous = Etcd::connect(&o).await.unwrap();
        assert!(anonymous.put("/a/k", b"v".to_vec(), None).await.is_err(), "etcd accepted an anonymous write");
        o.etcd_user = Some("root".into());
        o.etcd_password = Some("wrong".into());
        assert!(Etcd::connect(&o).await.is_err(), "a wrong password connected");
        o.etcd_password = Some("pw-root-7c1e".into());
        let s = Etcd::connect(&o).await.unwrap();
        s.put("/a/k", b"v".to_vec(), None).await.unwrap();
        assert_eq!(s.get("/a/k").await.unwrap(), Some(b"v".to_vec()));
    });
}
