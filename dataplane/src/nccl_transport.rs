//! `router --transport nccl`: token rows moved GPU to GPU.
//!
//! Per MoE layer each node gets its batch's header over the framed-TCP link
//! (experts, rows, weights, the row count, and an `nccl{router_id, epoch}`
//! marker, but no rows); then the router posts **one group** with, per
//! node, the send of its rows and the receive of its combined rows. The
//! node posts the receive, computes, posts the send and answers the header.
//! Posting both directions in the router's group keeps a node's send from
//! waiting on a receive the router has not posted yet.
//!
//! Nothing waits unbounded: the group has the dispatch timeout as its
//! deadline; past it, or on an NCCL error, the communicator is aborted
//! ([`FaultMachine::exchange_failed`]) and the same layer goes over the
//! fallback transport (framed TCP, whose failover and hedging pick other
//! replicas), while a communicator without the dead node is built in the
//! background. A second `send` while a group is in flight (a hedge) goes
//! over the fallback too: one group per layer makes the slowest node bound
//! the layer, so per-node hedging only works there.
//!
//! The communicator is behind [`Collective`] and its bootstrap behind
//! [`Bootstrap`]: [`NcclBootstrap`] is the real one (a CUDA device, the
//! `NcclInit` call to every node while the router joins as rank 0).

use crate::error::{DataPlaneError, Result};
use crate::metrics::DispatchMetrics;
use crate::placement::NodeId;
use crate::transport::{NodeBatch, Replies, Transport, reply};
use expertmesh_gpu::nccl::comm::{Communicator, NcclLink, new_id};
use expertmesh_gpu::nccl::fault::{Action, FaultMachine, Route, SystemClock, Timings};
use expertmesh_proto::v1::NcclMarker;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak, mpsc};
use std::time::{Duration, Instant};

/// A layer's headers: sent over their own links, answered on `replies`
/// tagged by batch index, once the node's half of the exchange is done.
pub trait Headers: Send + Sync {
    fn send_headers(
        &self,
        step: u64,
        layer: usize,
        hidden: usize,
        batches: &[NodeBatch],
        marker: &NcclMarker,
        replies: &Replies,
    );
    fn set_addresses(&self, addrs: BTreeMap<NodeId, String>);
}

/// A built communicator, seen from the router (rank 0).
pub trait Collective: Send {
    /// Sends `sends[r]` (rows of `width`) to rank `r` and receives
    /// `recv_rows[r]` rows from it, in one group, within `deadline`.
    fn exchange(
        &mut self,
        sends: &[Vec<f32>],
        recv_rows: &[usize],
        width: usize,
        deadline: Duration,
    ) -> Result<Vec<Vec<f32>>>;
}

impl Collective for NcclLink {
    fn exchange(
        &mut self,
        sends: &[Vec<f32>],
        recv_rows: &[usize],
        width: usize,
        deadline: Duration,
    ) -> Result<Vec<Vec<f32>>> {
        NcclLink::exchange(self, sends, recv_rows, width, deadline).map_err(nccl_error)
    }
}

fn nccl_error(e: expertmesh_gpu::GpuError) -> DataPlaneError {
    DataPlaneError::Transport { node: "nccl".into(), message: e.to_string() }
}

/// Makes the communicator of `epoch` over `members` (rank `i + 1` for
/// `members[i]`, the router rank 0), within its own deadline.
pub trait Bootstrap: Send + Sync {
    fn build(&self, epoch: u64, members: &[(NodeId, String)]) -> Result<Box<dyn Collective>>;
}

/// The real bootstrap: a CUDA device to stage rows through, and the
/// `NcclInit` call to each node, made while this router joins as rank 0
/// (every rank must be inside `ncclCommInitRankConfig` together).
pub struct NcclBootstrap {
    router_id: String,
    rt: tokio::runtime::Handle,
    device: expertmesh_gpu::Device,
    timeout: Duration,
}

impl NcclBootstrap {
    /// Opens `cuda:ordinal` and checks that NCCL loads: a router without
    /// either gets the error at start.
    pub fn open(router_id: &str, rt: tokio::runtime::Handle, ordinal: usize, timeout: Duration) -> Result<Self> {
        let device = expertmesh_gpu::Device::open(ordinal).map_err(nccl_error)?;
        expertmesh_gpu::libs::require(&[expertmesh_gpu::libs::Lib::Nccl]).map_err(nccl_error)?;
        Ok(NcclBootstrap { router_id: router_id.to_string(), rt, device, timeout })
    }

    pub fn device(&self) -> &str {
        &self.device.name
    }
}

impl Bootstrap for NcclBootstrap {
    fn build(&self, epoch: u64, members: &[(NodeId, String)]) -> Result<Box<dyn Collective>> {
        use expertmesh_proto::v1::NcclInitRequest;
        use expertmesh_proto::v1::expert_service_client::ExpertServiceClient;
        let id = new_id().map_err(nccl_error)?;
        let world = members.len() + 1;
        let calls: Vec<_> = members
            .iter()
            .enumerate()
            .map(|(i, (node, addr))| {
                let req = NcclInitRequest {
                    unique_id: expertmesh_gpu::nccl::id_bytes(&id).into(),
                    rank: (i + 1) as u32,
                    world_size: world as u32,
                    router_id: self.router_id.clone(),
                    epoch,
                    timeout_seconds: self.timeout.as_secs_f64(),
                };
                let (node, url, limit) =
                    (node.clone(), format!("http://{addr}"), self.timeout + Duration::from_secs(2));
                self.rt.spawn(async move {
                    let call = async {
                        let mut c = ExpertServiceClient::connect(url).await.map_err(|e| e.to_string())?;
                        c.nccl_init(req).await.map(drop).map_err(|s| s.message().to_string())
                    };
                    let r =
                        tokio::time::timeout(limit, call).await.unwrap_or_else(|_| Err("init call timed out".into()));
                    r.map_err(|message| DataPlaneError::Transport { node, message })
                })
            })
            .collect();
        // Each communicator on a stream of its own, so the next one never
        // queues behind kernels of one stuck on a dead peer.
        let stream = self.device.ctx.new_stream().map_err(|e| nccl_error(e.into()))?;
        let joined = Communicator::init(stream, 0, world, &id, self.timeout).map_err(nccl_error);
        let mut failed = None;
        for c in calls {
            let r = self.rt.block_on(c).map_err(|e| DataPlaneError::Compute(e.to_string())).and_then(|r| r);
            if let Err(e) = r {
                failed.get_or_insert(e);
            }
        }
        // A node that failed makes the communicator unusable: dropping it aborts it.
        let comm = joined?;
        match failed {
            Some(e) => Err(e),
            None => Ok(Box::new(NcclLink::new(comm))),
        }
    }
}

/// A communicator in service: its ranks and the link.
#[derive(Clone)]
struct Built {
    ranks: HashMap<NodeId, usize>,
    link: Arc<Mutex<Box<dyn Collective>>>,
}

/// The fault machine, the built communicators and the member addresses.
struct State {
    machine: FaultMachine<SystemClock>,
    built: BTreeMap<u64, Built>,
    addrs: BTreeMap<NodeId, String>,
}

struct Shared {
    state: Mutex<State>,
    bootstrap: Arc<dyn Bootstrap>,
    /// A layer's group is in flight.
    busy: AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Carries out the machine's actions: aborts drop a communicator
    /// (dropping a real one aborts it); builds run on their own thread.
    fn perform(self: &Arc<Self>, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Abort { epoch, reason } => {
                    if self.lock().built.remove(&epoch).is_some() {
                        tracing::warn!(epoch, reason, "NCCL communicator dropped");
                    }
                }
                Action::Build { epoch, members } => self.spawn_build(epoch, members),
            }
        }
    }

    fn spawn_build(self: &Arc<Self>, epoch: u64, members: Vec<String>) {
        let shared = Arc::downgrade(self);
        let addrs: Vec<(NodeId, String)> = {
            let st = self.lock();
            members.iter().filter_map(|m| st.addrs.get(m).map(|a| (m.clone(), a.clone()))).collect()
        };
        let spawned = std::thread::Builder::new().name(format!("nccl-build-{epoch}")).spawn(move || {
            let Some(bootstrap) = shared.upgrade().map(|s| s.bootstrap.clone()) else { return };
            let t0 = Instant::now();
            let r = bootstrap.build(epoch, &addrs);
            let Some(shared) = shared.upgrade() else { return };
            let actions = {
                let mut st = shared.lock();
                match r {
                    Ok(link) => {
                        tracing::info!(
                            epoch,
                            members = addrs.len(),
                            seconds = t0.elapsed().as_secs_f64(),
                            "NCCL communicator built"
                        );
                        let ranks = addrs.iter().enumerate().map(|(i, (n, _))| (n.clone(), i + 1)).collect();
                        st.built.insert(epoch, Built { ranks, link: Arc::new(Mutex::new(link)) });
                        st.machine.built(epoch)
                    }
                    Err(e) => {
                        tracing::warn!(epoch, error = %e, "NCCL communicator build failed; dispatch stays on TCP");
                        st.machine.build_failed(epoch)
                    }
                }
            };
            shared.perform(actions);
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "NCCL build thread");
            let actions = self.lock().machine.build_failed(epoch);
            self.perform(actions);
        }
    }
}

/// One layer for the exchange thread.
struct Layer {
    step: u64,
    layer: usize,
    hidden: usize,
    batches: Vec<NodeBatch>,
    first_tag: usize,
    replies: Replies,
    epoch: u64,
    comm: Built,
}

pub struct NcclTransport {
    metrics: Option<Arc<DispatchMetrics>>,
    shared: Arc<Shared>,
    headers: Arc<dyn Headers>,
    fallback: Arc<dyn Transport>,
    layers: mpsc::SyncSender<Layer>,
}

impl NcclTransport {
    /// Starts building the first communicator over `addrs`; until it is
    /// built, and whenever it is not usable, layers go over `fallback`.
    pub fn new(
        router_id: &str,
        addrs: BTreeMap<NodeId, String>,
        timeout: Duration,
        headers: Arc<dyn Headers>,
        fallback: Arc<dyn Transport>,
        bootstrap: Arc<dyn Bootstrap>,
        metrics: Option<Arc<DispatchMetrics>>,
    ) -> Result<Self> {
        let timings = Timings { build: timeout + Duration::from_secs(5), ..Timings::default() };
        let (machine, first) = FaultMachine::new(SystemClock, timings, addrs.keys().cloned());
        let state = State { machine, built: BTreeMap::new(), addrs };
        let shared = Arc::new(Shared { state: Mutex::new(state), bootstrap, busy: AtomicBool::new(false) });
        let (tx, rx) = mpsc::sync_channel::<Layer>(1);
        let worker = Exchanger {
            metrics: metrics.clone(),
            router_id: router_id.to_string(),
            timeout,
            headers: headers.clone(),
            fallback: fallback.clone(),
        };
        let s = Arc::downgrade(&shared);
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map(drop)
                .map_err(|e| DataPlaneError::Compute(format!("{name} thread: {e}")))
        };
        spawn("nccl-exchange", Box::new(move || worker.run(&s, rx)))?;
        let s = Arc::downgrade(&shared);
        spawn("nccl-faults", Box::new(move || poll_faults(&s)))?;
        shared.perform(vec![first]);
        Ok(NcclTransport { metrics, shared, headers, fallback, layers: tx })
    }

    /// The layer's communicator, if NCCL can carry it now: every node in
    /// it, each once.
    fn route(&self, batches: &[NodeBatch]) -> Option<(u64, Built)> {
        let st = self.shared.lock();
        let Route::Nccl { epoch } = st.machine.route() else { return None };
        let b = st.built.get(&epoch)?;
        let mut seen = std::collections::HashSet::new();
        batches.iter().all(|x| b.ranks.contains_key(&x.node) && seen.insert(&x.node)).then(|| (epoch, b.clone()))
    }
}

/// Advances the machine's clock: due rebuilds, build deadlines.
fn poll_faults(shared: &Weak<Shared>) {
    while let Some(s) = shared.upgrade() {
        let actions = s.lock().machine.poll();
        s.perform(actions);
        drop(s);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The thread that runs one layer's group at a time.
struct Exchanger {
    metrics: Option<Arc<DispatchMetrics>>,
    router_id: String,
    timeout: Duration,
    headers: Arc<dyn Headers>,
    fallback: Arc<dyn Transport>,
}

impl Exchanger {
    fn run(&self, shared: &Weak<Shared>, layers: mpsc::Receiver<Layer>) {
        for l in layers {
            let failed = self.exchange(&l);
            if failed.is_ok() {
                count(&self.metrics, "nccl");
            }
            let Some(s) = shared.upgrade() else { return };
            if let Err(e) = failed {
                tracing::warn!(step = l.step, layer = l.layer, epoch = l.epoch, error = %e, "NCCL exchange failed; the layer goes over TCP");
                if let Some(m) = &self.metrics {
                    m.nccl_aborts.inc();
                }
                count(&self.metrics, "tcp");
                let actions = s.lock().machine.exchange_failed(l.epoch, &e.to_string(), &[]);
                s.perform(actions);
                self.fallback.send(l.step, l.layer, l.hidden, &l.batches, l.first_tag, &l.replies);
            }
            s.busy.store(false, Ordering::Release);
        }
    }

    /// Headers out, the group, then each batch's answer. An error means
    /// the communicator failed (nothing was answered yet); a node's refusal
    /// of its batch is that batch's answer.
    fn exchange(&self, l: &Layer) -> Result<()> {
        let marker = NcclMarker { router_id: self.router_id.clone(), epoch: l.epoch };
        let (tx, rx) = mpsc::channel();
        self.headers.send_headers(l.step, l.layer, l.hidden, &l.batches, &marker, &tx);
        drop(tx);
        // The router (rank 0) and every member.
        let world = l.comm.ranks.len() + 1;
        let (mut sends, mut recv_rows) = (vec![Vec::new(); world], vec![0; world]);
        for b in &l.batches {
            let r = l.comm.ranks[&b.node];
            sends[r] = b.rows.to_vec();
            recv_rows[r] = b.rows.len() / l.hidden.max(1);
        }
        let deadline = Instant::now() + self.timeout;
        let mut got = l.comm.link.lock().unwrap_or_else(|e| e.into_inner()).exchange(
            &sends,
            &recv_rows,
            l.hidden,
            self.timeout,
        )?;
        let mut answered = vec![false; l.batches.len()];
        while answered.iter().any(|a| !a) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok((i, header)) = rx.recv_timeout(left) else { break };
            let Some(b) = l.batches.get(i) else { continue };
            answered[i] = true;
            reply(
                &l.replies,
                l.first_tag + i,
                header.map(|_| got.get_mut(l.comm.ranks[&b.node]).map(std::mem::take).unwrap_or_default()),
            );
        }
        for (i, b) in l.batches.iter().enumerate().filter(|(i, _)| !answered[*i]) {
            let e = DataPlaneError::Timeout { node: b.node.clone(), seconds: self.timeout.as_secs_f64() };
            reply(&l.replies, l.first_tag + i, Err(e));
        }
        Ok(())
    }
}

/// One layer under `--transport nccl`, by the way it went.
fn count(metrics: &Option<Arc<DispatchMetrics>>, route: &str) {
    if let Some(m) = metrics {
        m.nccl_layers.with_label_values(&[route]).inc();
    }
}

impl NcclTransport {
    fn over_tcp(
        &self,
        step: u64,
        layer: usize,
        hidden: usize,
        batches: &[NodeBatch],
        first_tag: usize,
        replies: &Replies,
    ) {
        count(&self.metrics, "tcp");
        self.fallback.send(step, layer, hidden, batches, first_tag, replies);
    }
}

impl Transport for NcclTransport {
    fn send(&self, step: u64, layer: usize, hidden: usize, batches: &[NodeBatch], first_tag: usize, replies: &Replies) {
        let Some((epoch, comm)) = self.route(batches) else {
            return self.over_tcp(step, layer, hidden, batches, first_tag, replies);
        };
        if self.shared.busy.swap(true, Ordering::AcqRel) {
            // A hedge while the layer's group is in flight.
            return self.over_tcp(step, layer, hidden, batches, first_tag, replies);
        }
        let l =
            Layer { step, layer, hidden, batches: batches.to_vec(), first_tag, replies: replies.clone(), epoch, comm };
        if let Err(e) = self.layers.try_send(l) {
            self.shared.busy.store(false, Ordering::Release);
            let l = match e {
                mpsc::TrySendError::Full(l) | mpsc::TrySendError::Disconnected(l) => l,
            };
            self.over_tcp(step, layer, hidden, &l.batches, first_tag, replies);
        }
    }

    /// A node that left (or moved) leaves the communicator; one that
    /// joined gets a new communicator, built beside the one in service.
    fn set_addresses(&self, addrs: BTreeMap<NodeId, String>) {
        let actions = {
            let mut st = self.shared.lock();
            let old = std::mem::replace(&mut st.addrs, addrs.clone());
            let mut actions = Vec::new();
            for (n, a) in &old {
                if addrs.get(n) != Some(a) {
                    actions.extend(st.machine.peer_died(n));
                }
            }
            for (n, a) in &addrs {
                if old.get(n) != Some(a) {
                    actions.extend(st.machine.peer_joined(n));
                }
            }
            actions
        };
        self.shared.perform(actions);
        self.fallback.set_addresses(addrs.clone());
        self.headers.set_addresses(addrs);
    }
}

#[cfg(test)]
mod tests;
