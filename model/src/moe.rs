//! MoE routing (the gate, exactly as transformers computes it) and the
//! [`ExpertExecutor`] seam that computes the routed experts.

use crate::config::{MoeConfig, ScoringFunc, TopkMethod};
use crate::error::{ModelError, Result};
use crate::kernels::quant::QuantFormat;
use crate::kernels::{axpy, matmul};
use crate::ops::{softmax, swiglu};
use crate::tensor::{MatView, Matrix, Storage};
use rayon::prelude::*;

/// Top-k routing of a batch: `ids[t * k + j]` is token t's j-th expert.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

/// One MoE layer's routed work for a whole forward step.
#[derive(Debug, Clone, Copy)]
pub struct RoutedBatch<'a> {
    /// Decoder layer index.
    pub layer: usize,
    /// `[tokens, hidden]` rows, post-attention-normed.
    pub hidden: &'a [f32],
    pub hidden_size: usize,
    pub routing: &'a Routing,
}

/// Computes `Σ_j weight[t, j] · expert[ids[t, j]](hidden[t])` for every token.
///
/// The model calls it once per MoE layer per forward step with every token of
/// the batch, never per token or per expert, so a remote implementation sends
/// one message per node per layer.
pub trait ExpertExecutor: Send + Sync {
    /// Returns the combined routed output, `[tokens, hidden]`.
    fn execute(&self, batch: RoutedBatch<'_>) -> Result<Vec<f32>>;

    /// Called between forward steps, never during one: where a distributed
    /// executor switches to a new expert placement, so that no step sees
    /// half of one plan and half of another.
    fn begin_step(&self) {}
}

/// A SwiGLU feed-forward block with `gate` and `up` fused into one matrix
/// (`[2 * inter, hidden]`), so both projections stream the input once.
pub struct Mlp {
    pub gate_up: Matrix,
    pub down: Matrix,
    pub bias: Option<MlpBias>,
}

pub struct MlpBias {
    pub gate_up: Vec<f32>,
    pub down: Vec<f32>,
}

impl Mlp {
    pub fn new(gate: Matrix, up: Matrix, down: Matrix, bias: Option<MlpBias>) -> Self {
        Mlp::with_quant(gate, up, down, bias, None)
    }

    /// As [`new`](Mlp::new), the weights quantized as `quant` = (format,
    /// group) says (`None`: packed bf16, or f32 as loaded).
    pub fn with_quant(
        gate: Matrix,
        up: Matrix,
        down: Matrix,
        bias: Option<MlpBias>,
        quant: Option<(QuantFormat, usize)>,
    ) -> Self {
        Mlp { gate_up: vstack(gate, up).prepared(quant), down: down.prepared(quant), bias }
    }

    pub fn inter(&self) -> usize {
        self.down.cols()
    }

    /// `[tokens, hidden]` → `[tokens, hidden]`.
    pub fn forward(&self, x: &[f32], tokens: usize) -> Vec<f32> {
        let h = self.gate_up.cols();
        let mut gu = matmul(x, tokens, self.gate_up.view(), self.gate_up.rows(), h);
        if let Some(b) = &self.bias {
            add_bias(&mut gu, &b.gate_up);
        }
        let mut act = Vec::new();
        swiglu(&gu, self.inter(), &mut act);
        let mut out = matmul(&act, tokens, self.down.view(), h, self.inter());
        if let Some(b) = &self.bias {
            add_bias(&mut out, &b.down);
        }
        out
    }
}

pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// Stacks two matrices of equal width; widens to f32 if their dtypes differ
/// (or FP8 blocks do not line up).
fn vstack(a: Matrix, b: Matrix) -> Matrix {
    let (rows, cols) = (a.rows() + b.rows(), a.cols());
    debug_assert_eq!(a.cols(), b.cols());
    let same = match (a.view(), b.view()) {
        (MatView::Bf16(x), MatView::Bf16(y)) => Some(Storage::Bf16([x, y].concat())),
        (MatView::Fp8(x), MatView::Fp8(y)) => crate::kernels::fp8::Fp8Matrix::vstack(x, y).map(Storage::Fp8),
        _ => None,
    };
    let data = same.unwrap_or_else(|| Storage::F32([a.to_f32(), b.to_f32()].concat()));
    let mut m = Matrix::new(rows, cols, data);
    m.set_precision(a.precision());
    m
}

/// The router ("gate") of one MoE layer.
pub struct Gate {
    pub weight: Matrix,
    /// DeepSeek-V3's `e_score_correction_bias`: used for selection only.
    pub correction_bias: Option<Vec<f32>>,
}

impl Gate {
    /// Routes `tokens` rows of `x` (f32, as transformers' gate computes).
    pub fn route(&self, cfg: &MoeConfig, x: &[f32], tokens: usize) -> Routing {
        let e = cfg.n_routed_experts;
        let logits = matmul(x, tokens, self.weight.view(), e, self.weight.cols());
        let k = cfg.experts_per_tok;
        let mut ids = Vec::with_capacity(tokens * k);
        let mut weights = Vec::with_capacity(tokens * k);
        let mut scores = vec![0f32; e];
        let mut choice = vec![0f32; e];
        for row in logits.chunks_exact(e) {
            scores.copy_from_slice(row);
            match cfg.scoring {
                ScoringFunc::Sigmoid => scores.iter_mut().for_each(|s| *s = 1.0 / (1.0 + (-*s).exp())),
                ScoringFunc::Softmax => softmax(&mut scores),
            }
            choice.copy_from_slice(&scores);
            if let Some(bias) = &self.correction_bias {
                choice.iter_mut().zip(bias).for_each(|(c, b)| *c += b);
            }
            match cfg.topk_method {
                TopkMethod::Greedy => {}
                TopkMethod::NoauxTc => mask_groups(&mut choice, cfg, top2_sum, f32::NEG_INFINITY),
                TopkMethod::GroupLimitedGreedy => {
                    mask_groups(&mut choice, cfg, |g| g.iter().copied().fold(f32::NEG_INFINITY, f32::max), 0.0)
                }
            }
            let top = top_k_indices(&choice, k);
            // NoauxTc weighs by the unbiased scores; the V2 group-limited gate
            // takes the masked scores, which equal the raw ones when chosen.
            let mut w: Vec<f32> = match cfg.topk_method {
                TopkMethod::NoauxTc => top.iter().map(|&i| scores[i]).collect(),
                _ => top.iter().map(|&i| choice[i]).collect(),
            };
            if cfg.norm_topk_prob {
                let denom = w.iter().sum::<f32>() + if cfg.topk_method == TopkMethod::NoauxTc { 1e-20 } else { 0.0 };
                w.iter_mut().for_each(|v| *v /= denom);
            }
            w.iter_mut().for_each(|v| *v *= cfg.routed_scaling_factor);
            ids.extend(top.iter().map(|&i| i as u32));
            weights.extend(w);
        }
        Routing { top_k: k, ids, weights }
    }
}

fn top2_sum(g: &[f32]) -> f32 {
    let top = top_k_indices(g, 2);
    g[top[0]] + g[top[1]]
}

/// Keeps the `topk_group` best groups by `group_score`, filling the rest with `fill`.
fn mask_groups(choice: &mut [f32], cfg: &MoeConfig, group_score: impl Fn(&[f32]) -> f32, fill: f32) {
    let per = cfg.n_routed_experts / cfg.n_group;
    let gs: Vec<f32> = choice.chunks_exact(per).map(&group_score).collect();
    let keep = top_k_indices(&gs, cfg.topk_group);
    for (g, chunk) in choice.chunks_exact_mut(per).enumerate() {
        if !keep.contains(&g) {
            chunk.fill(fill);
        }
    }
}

/// Indices of the `k` largest values, largest first; ties go to the lower
/// index. NaN sorts last.
pub fn top_k_indices(v: &[f32], k: usize) -> Vec<usize> {
    let key = |i: usize| {
        if v[i].is_nan() { f32::NEG_INFINITY } else { v[i] }
    };
    // A total order (ties by index), so selecting then sorting the first k
    // gives exactly a full sort's prefix, without sorting a whole vocabulary
    // for every sampled token.
    let order = |a: &usize, b: &usize| key(*b).total_cmp(&key(*a)).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..v.len()).collect();
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, order);
        idx.truncate(k);
    }
    idx.sort_by(order);
    idx
}

/// Routed experts computed in this process: owns the weights of the
/// `(layer, expert)` pairs it was loaded with.
pub struct LocalExperts {
    /// `experts[layer][expert]`, `None` where not loaded here.
    experts: Vec<Vec<Option<Mlp>>>,
}

impl LocalExperts {
    pub fn new(experts: Vec<Vec<Option<Mlp>>>) -> Self {
        LocalExperts { experts }
    }

    fn get(&self, layer: usize, expert: usize) -> Option<&Mlp> {
        self.experts.get(layer)?.get(expert)?.as_ref()
    }

    /// Inserts or replaces one expert's weights.
    pub fn insert(&mut self, layer: usize, expert: usize, mlp: Mlp) {
        if self.experts.len() <= layer {
            self.experts.resize_with(layer + 1, Vec::new);
        }
        let l = &mut self.experts[layer];
        if l.len() <= expert {
            l.resize_with(expert + 1, || None);
        }
        l[expert] = Some(mlp);
    }
}

/// One expert's share of a batch: row indices into the batch and the gate
/// weights, aligned.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertGroup {
    pub expert: u32,
    pub rows: Vec<usize>,
    pub weights: Vec<f32>,
}

/// Groups a routing by expert, in expert order. The one dispatch-planning
/// primitive: the in-process executor and the remote planner both use it.
pub fn group_by_expert(routing: &Routing) -> Vec<ExpertGroup> {
    let mut order: Vec<usize> = (0..routing.ids.len()).collect();
    order.sort_by_key(|&i| (routing.ids[i], i));
    let mut groups: Vec<ExpertGroup> = Vec::new();
    for i in order {
        let e = routing.ids[i];
        if groups.last().is_none_or(|g| g.expert != e) {
            groups.push(ExpertGroup { expert: e, rows: Vec::new(), weights: Vec::new() });
        }
        if let Some(g) = groups.last_mut() {
            g.rows.push(i / routing.top_k);
            g.weights.push(routing.weights[i]);
        }
    }
    groups
}

impl LocalExperts {
    /// Whether `(layer, expert)` is loaded here.
    pub fn has(&self, layer: usize, expert: usize) -> bool {
        self.get(layer, expert).is_some()
    }

    /// Drops one expert's weights; returns whether it was loaded.
    pub fn remove(&mut self, layer: usize, expert: usize) -> bool {
        self.experts.get_mut(layer).and_then(|l| l.get_mut(expert)).and_then(Option::take).is_some()
    }

    /// Loaded `(layer, expert)` pairs, in order.
    pub fn loaded(&self) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        for (l, layer) in self.experts.iter().enumerate() {
            v.extend(layer.iter().enumerate().filter(|(_, m)| m.is_some()).map(|(e, _)| (l, e)));
        }
        v
    }

    /// Bytes of loaded expert weights.
    pub fn size_bytes(&self) -> usize {
        self.experts.iter().flatten().flatten().map(|m| m.gate_up.size_bytes() + m.down.size_bytes()).sum()
    }

    /// `Σ weight · expert(row)` per row of `hidden` (`[rows, h]`) over the
    /// given groups. Experts run in parallel, each as one matrix product over
    /// all of its rows; the weighted sums are then added in group order, so
    /// the result does not depend on scheduling.
    pub fn compute(&self, layer: usize, hidden: &[f32], h: usize, groups: &[ExpertGroup]) -> Result<Vec<f32>> {
        self.compute_timed(layer, hidden, h, groups).map(|(out, _)| out)
    }

    /// [`compute`](Self::compute), also returning each group's compute time
    /// in seconds (for per-expert utilisation metrics).
    pub fn compute_timed(
        &self,
        layer: usize,
        hidden: &[f32],
        h: usize,
        groups: &[ExpertGroup],
    ) -> Result<(Vec<f32>, Vec<f64>)> {
        let n = hidden.len() / h.max(1);
        let mut work = Vec::with_capacity(groups.len());
        for g in groups {
            let mlp = self.get(layer, g.expert as usize).ok_or_else(|| {
                ModelError::Executor(format!("expert {} of layer {layer} is not loaded here", g.expert))
            })?;
            if mlp.gate_up.cols() != h {
                return Err(ModelError::Executor(format!(
                    "hidden size {h} does not match expert width {}",
                    mlp.gate_up.cols()
                )));
            }
            if g.rows.len() != g.weights.len() || g.rows.iter().any(|&r| r >= n) {
                return Err(ModelError::Executor(format!(
                    "expert {}: rows out of range or unaligned weights",
                    g.expert
                )));
            }
            work.push((mlp, g));
        }
        let outputs: Vec<(Vec<f32>, f64)> = work
            .par_iter()
            .map(|(mlp, g)| {
                let t0 = std::time::Instant::now();
                let mut rows = Vec::with_capacity(g.rows.len() * h);
                for &t in &g.rows {
                    rows.extend_from_slice(&hidden[t * h..(t + 1) * h]);
                }
                (mlp.forward(&rows, g.rows.len()), t0.elapsed().as_secs_f64())
            })
            .collect();
        let mut out = vec![0f32; hidden.len()];
        for ((_, g), (y, _)) in work.iter().zip(&outputs) {
            for ((&t, w), yr) in g.rows.iter().zip(&g.weights).zip(y.chunks_exact(h)) {
                axpy(*w, yr, &mut out[t * h..(t + 1) * h]);
            }
        }
        Ok((out, outputs.into_iter().map(|(_, s)| s).collect()))
    }
}

impl ExpertExecutor for LocalExperts {
    fn execute(&self, batch: RoutedBatch<'_>) -> Result<Vec<f32>> {
        self.compute(batch.layer, batch.hidden, batch.hidden_size, &group_by_expert(batch.routing))
    }
}

/// Where an expert node's routed experts live and run: the compute-backend
/// seam. [`LocalExperts`] is the CPU backend; `expertmesh-gpu` holds the
/// CUDA one. The node's validation, wire protocol, drain and metrics are the
/// same whichever backend computes.
pub trait ExpertBank: Send + Sync {
    /// The device, as `Info.device` and the node record name it.
    fn device(&self) -> String;
    /// Whether `(layer, expert)` is loaded here.
    fn has(&self, layer: usize, expert: usize) -> bool;
    /// Loads or replaces one expert's weights (an upload, on a device: it
    /// fails when the device is out of memory).
    fn insert(&mut self, layer: usize, expert: usize, mlp: Mlp) -> Result<()>;
    /// Drops one expert's weights, freeing its memory; whether it was loaded.
    fn remove(&mut self, layer: usize, expert: usize) -> bool;
    /// Loaded `(layer, expert)` pairs, in order.
    fn loaded(&self) -> Vec<(usize, usize)>;
    /// Bytes the loaded weights occupy in the backend's memory.
    fn size_bytes(&self) -> usize;
    /// Bytes `mlp` would occupy here once inserted (capacity checks run
    /// before the upload).
    fn bytes_for(&self, mlp: &Mlp) -> usize;
    /// `Σ weight · expert(row)` per row of `hidden` (`[rows, h]`) over the
    /// groups, with each group's compute seconds.
    fn compute_timed(
        &self,
        layer: usize,
        hidden: &[f32],
        h: usize,
        groups: &[ExpertGroup],
    ) -> Result<(Vec<f32>, Vec<f64>)>;
}

impl ExpertBank for LocalExperts {
    fn device(&self) -> String {
        "cpu".into()
    }
    fn has(&self, layer: usize, expert: usize) -> bool {
        LocalExperts::has(self, layer, expert)
    }
    fn insert(&mut self, layer: usize, expert: usize, mlp: Mlp) -> Result<()> {
        LocalExperts::insert(self, layer, expert, mlp);
        Ok(())
    }
    fn remove(&mut self, layer: usize, expert: usize) -> bool {
        LocalExperts::remove(self, layer, expert)
    }
    fn loaded(&self) -> Vec<(usize, usize)> {
        LocalExperts::loaded(self)
    }
    fn size_bytes(&self) -> usize {
        LocalExperts::size_bytes(self)
    }
    fn bytes_for(&self, mlp: &Mlp) -> usize {
        mlp.gate_up.size_bytes() + mlp.down.size_bytes()
    }
    fn compute_timed(
        &self,
        layer: usize,
        hidden: &[f32],
        h: usize,
        groups: &[ExpertGroup],
    ) -> Result<(Vec<f32>, Vec<f64>)> {
        LocalExperts::compute_timed(self, layer, hidden, h, groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Selecting then sorting gives a full sort's first k, NaN last and
        /// ties to the lower index, for every k.
        #[test]
        fn top_k_is_a_full_sorts_prefix(v in prop::collection::vec(prop_oneof![Just(f32::NAN), Just(1.0f32), -4.0f32..4.0], 0..40), k in 0usize..45) {
            let key = |i: usize| if v[i].is_nan() { f32::NEG_INFINITY } else { v[i] };
            let mut all: Vec<usize> = (0..v.len()).collect();
            all.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
            all.truncate(k);
            prop_assert_eq!(top_k_indices(&v, k), all);
        }
    }

    fn cfg(method: TopkMethod, scoring: ScoringFunc, n: usize, groups: usize, tg: usize, k: usize) -> MoeConfig {
        MoeConfig {
            n_routed_experts: n,
            experts_per_tok: k,
            moe_intermediate_size: 1,
            n_shared_experts: 0,
            scoring,
            topk_method: method,
            n_group: groups,
            topk_group: tg,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
        }
    }

    #[test]
    fn noaux_tc_selects_within_best_groups_and_weighs_unbiased() {
        // 4 experts in 2 groups; identity gate so logits = x.
        let gate = Gate {
            weight: Matrix::from_f32(4, 4, (0..16).map(|i| if i % 5 == 0 { 1.0 } else { 0.0 }).collect()),
            correction_bias: Some(vec![0.0, 0.0, 10.0, 10.0]),
        };
        let c = cfg(TopkMethod::NoauxTc, ScoringFunc::Sigmoid, 4, 2, 1, 2);
        let r = gate.route(&c, &[3.0, 2.0, -1.0, -2.0], 1);
        // The bias makes group 1 win although its raw scores are lower.
        assert_eq!(r.ids, vec![2, 3]);
        let s = |x: f32| 1.0 / (1.0 + (-x).exp());
        let (a, b) = (s(-1.0), s(-2.0));
        assert!((r.weights[0] - a / (a + b) * 2.5).abs() < 1e-6);
    }

    proptest! {
        #[test]
        fn routing_invariants(x in proptest::collection::vec(-3f32..3.0, 16), groups in prop::sample::select(vec![1usize, 2, 4]), k in 1usize..4) {
            let gate = Gate { weight: Matrix::from_f32(8, 2, (0..16).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect()), correction_bias: None };
            for method in [TopkMethod::Greedy, TopkMethod::GroupLimitedGreedy, TopkMethod::NoauxTc] {
                let tg = groups.div_ceil(2);
                if method == TopkMethod::NoauxTc && 8 / groups < 2 { continue; }
                if k > tg * (8 / groups) { continue; }
                let scoring = if method == TopkMethod::NoauxTc { ScoringFunc::Sigmoid } else { ScoringFunc::Softmax };
                let c = cfg(method, scoring, 8, groups, tg, k);
                let r = gate.route(&c, &x, 8);
                prop_assert_eq!(r.ids.len(), 8 * k);
                for t in 0..8 {
                    let ids = &r.ids[t * k..(t + 1) * k];
                    let mut d = ids.to_vec(); d.sort(); d.dedup();
                    prop_assert_eq!(d.len(), k, "distinct experts");
                    let gs: std::collections::HashSet<u32> = ids.iter().map(|i| i / (8 / groups) as u32).collect();
                    if method != TopkMethod::Greedy { prop_assert!(gs.len() <= tg); }
                    if c.norm_topk_prob { let s: f32 = r.weights[t * k..(t + 1) * k].iter().sum(); prop_assert!((s - 2.5).abs() < 1e-4); }
                }
            }
        }
    }

    #[test]
    fn local_executor_matches_per_token_reference() {
        let h = 3;
        let mk = |s: f32| {
            Mlp::new(
                Matrix::from_f32(2, h, (0..6).map(|i| s * i as f32 / 10.0).collect()),
                Matrix::from_f32(2, h, (0..6).map(|i| s - i as f32 / 7.0).collect()),
                Matrix::from_f32(h, 2, (0..6).map(|i| (i as f32 - s) / 5.0).collect()),
                None,
            )
        };
        let ex = LocalExperts::new(vec![vec![Some(mk(1.0)), Some(mk(-0.5)), Some(mk(2.0))]]);
        let hidden = vec![0.1, -0.2, 0.3, 0.5, 0.4, -0.1];
        let routing = Routing { top_k: 2, ids: vec![0, 2, 2, 1], weights: vec![0.3, 0.7, 0.6, 0.4] };
        let got = ex.execute(RoutedBatch { layer: 0, hidden: &hidden, hidden_size: h, routing: &routing }).unwrap();
        for t in 0..2 {
            let mut want = vec![0f32; h];
            for j in 0..2 {
                let m = ex.get(0, routing.ids[t * 2 + j] as usize).unwrap();
                let y = m.forward(&hidden[t * h..(t + 1) * h], 1);
                for c in 0..h {
                    want[c] += routing.weights[t * 2 + j] * y[c];
                }
            }
            for c in 0..h {
                assert!((got[t * h + c] - want[c]).abs() < 1e-6);
            }
        }
        let bad = Routing { top_k: 1, ids: vec![5, 0], weights: vec![1.0, 1.0] };
        assert!(ex.execute(RoutedBatch { layer: 0, hidden: &hidden, hidden_size: h, routing: &bad }).is_err());
    }
}
