//! The NCCL transport's orchestration without a GPU: the communicator and
//! the header links are simulated in process (the nodes' computation is
//! real `LocalExperts`), so the router's side (routing, the group's
//! deadline, fallback, rebuilds, joins) runs as it does on GPUs.

use super::*;
use crate::transport::InProcess;
use expertmesh_model::moe::{ExpertGroup, LocalExperts, Mlp};
use expertmesh_model::tensor::Matrix;
use std::sync::atomic::AtomicUsize;

const H: usize = 4;

fn experts() -> Arc<LocalExperts> {
    let mut l = LocalExperts::new(Vec::new());
    for e in 0..4 {
        let s = e as f32 + 1.0;
        let m = |r: usize, c: usize, k: f32| {
            Matrix::from_f32(r, c, (0..r * c).map(|i| (i as f32 * k).sin() * 0.5).collect())
        };
        l.insert(0, e, Mlp::new(m(3, H, s), m(3, H, s + 0.5), m(H, 3, s + 0.25), None));
    }
    Arc::new(l)
}

/// The nodes as the simulated wire sees them: the groups each header
/// carried, and how each node answers its header.
#[derive(Default)]
struct Sim {
    groups: Mutex<HashMap<NodeId, Vec<ExpertGroup>>>,
    refuse: Mutex<Option<NodeId>>,
    /// An exchange hangs until its deadline.
    hang: AtomicBool,
    exchanges: AtomicUsize,
    builds: Mutex<Vec<(u64, Vec<NodeId>)>>,
}

struct SimHeaders(Arc<Sim>);

impl Headers for SimHeaders {
    fn send_headers(&self, _: u64, _: usize, _: usize, batches: &[NodeBatch], m: &NcclMarker, replies: &Replies) {
        assert_eq!(m.router_id, "router-0");
        for (i, b) in batches.iter().enumerate() {
            self.0.groups.lock().unwrap().insert(b.node.clone(), b.groups.clone());
            let refused = self.0.refuse.lock().unwrap().as_ref() == Some(&b.node);
            let r = if refused { Err(DataPlaneError::Invalid("refused".into())) } else { Ok(Vec::new()) };
            reply(replies, i, r);
        }
    }
    fn set_addresses(&self, _: BTreeMap<NodeId, String>) {}
}

/// A communicator whose peers compute what they receive.
struct SimComm {
    sim: Arc<Sim>,
    members: Vec<NodeId>,
    experts: Arc<LocalExperts>,
}

impl Collective for SimComm {
    fn exchange(&mut self, sends: &[Vec<f32>], recv: &[usize], w: usize, deadline: Duration) -> Result<Vec<Vec<f32>>> {
        self.sim.exchanges.fetch_add(1, Ordering::SeqCst);
        if self.sim.hang.load(Ordering::SeqCst) {
            std::thread::sleep(deadline);
            return Err(DataPlaneError::Timeout { node: "nccl".into(), seconds: deadline.as_secs_f64() });
        }
        assert_eq!((sends.len(), recv.len()), (self.members.len() + 1, self.members.len() + 1));
        assert!(sends[0].is_empty() && recv[0] == 0, "the router sends nothing to itself");
        let groups = self.sim.groups.lock().unwrap();
        Ok((0..sends.len())
            .map(|r| match r.checked_sub(1).and_then(|i| groups.get(&self.members[i])) {
                Some(g) if !sends[r].is_empty() => {
                    assert_eq!(sends[r].len(), recv[r] * w);
                    self.experts.compute(0, &sends[r], w, g).unwrap()
                }
                _ => Vec::new(),
            })
            .collect())
    }
}

struct SimBootstrap(Arc<Sim>);

impl Bootstrap for SimBootstrap {
    fn build(&self, epoch: u64, members: &[(NodeId, String)]) -> Result<Box<dyn Collective>> {
        let names: Vec<NodeId> = members.iter().map(|(n, _)| n.clone()).collect();
        self.0.builds.lock().unwrap().push((epoch, names.clone()));
        Ok(Box::new(SimComm { sim: self.0.clone(), members: names, experts: experts() }))
    }
}

/// Counts what goes over the fallback.
struct Counting(InProcess, AtomicUsize);

impl Transport for Counting {
    fn send(&self, s: u64, l: usize, h: usize, b: &[NodeBatch], first: usize, to: &Replies) {
        self.1.fetch_add(b.len(), Ordering::SeqCst);
        self.0.send(s, l, h, b, first, to);
    }
}

fn addrs(n: usize) -> BTreeMap<NodeId, String> {
    (0..n).map(|i| (format!("n{i}"), format!("127.0.0.1:{}", 1000 + i))).collect()
}

fn setup(nodes: usize) -> (NcclTransport, Arc<Sim>, Arc<Counting>) {
    let sim = Arc::new(Sim::default());
    let metrics = Arc::new(DispatchMetrics::register(&prometheus::Registry::new(), true).unwrap());
    let fallback = Arc::new(Counting(InProcess::default(), AtomicUsize::new(0)));
    for n in addrs(4).keys() {
        fallback.0.add(n, experts());
    }
    let t = NcclTransport::new(
        "router-0",
        addrs(nodes),
        Duration::from_millis(300),
        Arc::new(SimHeaders(sim.clone())),
        fallback.clone(),
        Arc::new(SimBootstrap(sim.clone())),
        Some(metrics.clone()),
    )
    .unwrap();
    (t, sim, fallback)
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(5), "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ready(t: &NcclTransport) -> bool {
    matches!(t.shared.lock().machine.route(), Route::Nccl { .. })
}

fn batches(nodes: &[&str]) -> Vec<NodeBatch> {
    nodes
        .iter()
        .enumerate()
        .map(|(k, n)| NodeBatch {
            node: n.to_string(),
            rows: Arc::new((0..3 * H).map(|i| ((i + 7 * k) as f32 * 0.31).cos()).collect()),
            groups: vec![
                ExpertGroup { expert: k as u32, rows: vec![0, 2], weights: vec![0.7, 0.3] },
                ExpertGroup { expert: 3, rows: vec![1], weights: vec![1.0] },
            ],
        })
        .collect()
}

/// What the layer must come to: the fallback's own answer.
fn want(f: &Counting, b: &[NodeBatch]) -> Vec<Vec<f32>> {
    f.0.exchange(1, 0, H, b).into_iter().map(|r| r.unwrap()).collect()
}

fn got(t: &NcclTransport, b: &[NodeBatch]) -> Vec<Vec<f32>> {
    t.exchange(1, 0, H, b).into_iter().map(|r| r.unwrap()).collect()
}

#[test]
fn once_built_a_layer_is_one_group_and_matches_the_fallback() {
    let (t, sim, fallback) = setup(3);
    wait_for("first communicator", || ready(&t));
    assert_eq!(sim.builds.lock().unwrap()[0], (1, vec!["n0".into(), "n1".into(), "n2".into()]));
    let b = batches(&["n2", "n0"]);
    let out = got(&t, &b);
    assert_eq!(out, want(&fallback, &b));
    assert!(out.iter().all(|r| r.len() == 3 * H));
    assert_eq!(sim.exchanges.load(Ordering::SeqCst), 1);
    assert_eq!(fallback.1.load(Ordering::SeqCst), 0, "nothing went over TCP");
    let m = t.metrics.as_ref().unwrap();
    assert_eq!(m.nccl_layers.with_label_values(&["nccl"]).get(), 1);
    assert_eq!(m.nccl_layers.with_label_values(&["tcp"]).get(), 0);
}

#[test]
fn before_the_communicator_is_built_layers_go_over_the_fallback() {
    let (t, sim, fallback) = setup(3);
    // A node outside the communicator cannot be reached over it either.
    let b = batches(&["n0", "n3"]);
    let out = got(&t, &b);
    assert_eq!(out, want(&fallback, &b));
    assert_eq!(sim.exchanges.load(Ordering::SeqCst), 0);
}

#[test]
fn a_hung_group_aborts_falls_back_within_the_deadline_and_rebuilds() {
    let (t, sim, fallback) = setup(2);
    wait_for("first communicator", || ready(&t));
    sim.hang.store(true, Ordering::SeqCst);
    let b = batches(&["n0", "n1"]);
    let t0 = Instant::now();
    let out = got(&t, &b);
    let took = t0.elapsed();
    assert_eq!(out, want(&fallback, &b));
    assert!(took < Duration::from_millis(300 + 500), "bounded by the deadline: {took:?}");
    assert_eq!(fallback.1.load(Ordering::SeqCst), 2, "the layer was re-sent over TCP");
    let m = t.metrics.as_ref().unwrap();
    assert_eq!((m.nccl_aborts.get(), m.nccl_layers.with_label_values(&["tcp"]).get()), (1, 1));
    // Aborted, then rebuilt after the backoff.
    assert!(!ready(&t));
    sim.hang.store(false, Ordering::SeqCst);
    wait_for("rebuilt", || ready(&t));
    assert_eq!(sim.builds.lock().unwrap().last().map(|b| b.0), Some(2));
    let before = sim.exchanges.load(Ordering::SeqCst);
    assert_eq!(got(&t, &b), want(&fallback, &b));
    assert_eq!(sim.exchanges.load(Ordering::SeqCst), before + 1, "back on NCCL");
}

#[test]
fn a_node_refusing_its_header_gets_its_own_error() {
    let (t, sim, _) = setup(2);
    wait_for("first communicator", || ready(&t));
    *sim.refuse.lock().unwrap() = Some("n1".into());
    let r = t.exchange(1, 0, H, &batches(&["n0", "n1"]));
    assert!(r[0].as_ref().is_ok_and(|v| v.len() == 3 * H));
    assert!(matches!(r[1], Err(DataPlaneError::Invalid(_))), "{:?}", r[1]);
    assert!(ready(&t), "a refused batch is no communicator fault");
}

#[test]
fn a_join_builds_the_next_communicator_and_a_death_drops_it() {
    let (t, sim, fallback) = setup(2);
    wait_for("first communicator", || ready(&t));
    t.set_addresses(addrs(3));
    wait_for("a communicator with n2", || sim.builds.lock().unwrap().iter().any(|b| b.1.len() == 3));
    wait_for("swapped in", || t.shared.lock().built.keys().eq([2].iter()));
    let b = batches(&["n2", "n1", "n0"]);
    assert_eq!(got(&t, &b), want(&fallback, &b));
    // n1 dies: the communicator spanning it is dropped, one without it built.
    let mut left = addrs(3);
    left.remove("n1");
    t.set_addresses(left);
    wait_for("rebuilt without n1", || {
        sim.builds.lock().unwrap().last().is_some_and(|b| b.1 == vec!["n0".to_string(), "n2".to_string()]) && ready(&t)
    });
    let b = batches(&["n2", "n0"]);
    assert_eq!(got(&t, &b), want(&fallback, &b));
}
