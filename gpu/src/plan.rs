//! The host-side layout of one dispatch batch on the GPU, kept apart from
//! the device calls so that it is unit-tested on machines without one.
//!
//! A batch of `n` token rows arrives with its expert groups. On the device:
//! 1. the rows each expert needs are gathered (and rounded to bf16) into one
//!    buffer, expert after expert: [`BatchPlan::gather`], with each expert's
//!    first row at [`BatchPlan::starts`];
//! 2. each expert is one GEMM over its contiguous rows ([`Problem`]); all of
//!    a batch's GEMMs go in one grouped call ([`GroupedArrays`]);
//! 3. every token's outputs are summed, weighted, in expert order, from the
//!    per-token lists [`BatchPlan::offsets`] / [`BatchPlan::pos`] /
//!    [`BatchPlan::weights`] (a CSR matrix: no atomics, so results are
//!    deterministic and summed in the CPU executor's order).

use crate::error::{GpuError, Result};
use expertmesh_model::moe::ExpertGroup;

/// Where one batch's rows go.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPlan {
    /// Batch row of each gathered row.
    pub gather: Vec<i32>,
    /// `starts[g]..starts[g + 1]`: group `g`'s gathered rows.
    pub starts: Vec<usize>,
    /// `offsets[t]..offsets[t + 1]`: token `t`'s entries in `pos`/`weights`.
    pub offsets: Vec<i32>,
    /// Gathered row of each entry.
    pub pos: Vec<i32>,
    pub weights: Vec<f32>,
}

impl BatchPlan {
    /// Lays out `groups` over a batch of `tokens` rows; refuses rows out of
    /// range, unaligned weights and sizes past the kernels' `int` indices.
    pub fn new(groups: &[ExpertGroup], tokens: usize) -> Result<BatchPlan> {
        let total: usize = groups.iter().map(|g| g.rows.len()).sum();
        if total >= i32::MAX as usize || tokens >= i32::MAX as usize {
            return Err(GpuError::Invalid(format!(
                "{total} routed rows over {tokens} tokens exceed the kernels' range"
            )));
        }
        let mut gather = Vec::with_capacity(total);
        let mut starts = Vec::with_capacity(groups.len() + 1);
        let mut per_token = vec![0i32; tokens + 1];
        for g in groups {
            if g.rows.len() != g.weights.len() {
                return Err(GpuError::Invalid(format!("expert {}: rows and weights differ in length", g.expert)));
            }
            starts.push(gather.len());
            for &r in &g.rows {
                if r >= tokens {
                    return Err(GpuError::Invalid(format!("expert {}: row {r} out of {tokens}", g.expert)));
                }
                gather.push(r as i32);
                per_token[r + 1] += 1;
            }
        }
        starts.push(gather.len());
        for t in 0..tokens {
            per_token[t + 1] += per_token[t];
        }
        let offsets = per_token;
        let mut fill: Vec<i32> = offsets[..tokens].to_vec();
        let (mut pos, mut weights) = (vec![0i32; total], vec![0f32; total]);
        // Groups in order, so each token's entries are in expert order.
        for (g, group) in groups.iter().enumerate() {
            for (i, (&r, &w)) in group.rows.iter().zip(&group.weights).enumerate() {
                let slot = fill[r] as usize;
                pos[slot] = (starts[g] + i) as i32;
                weights[slot] = w;
                fill[r] += 1;
            }
        }
        Ok(BatchPlan { gather, starts, offsets, pos, weights })
    }

    /// Gathered rows in all.
    pub fn rows(&self) -> usize {
        self.gather.len()
    }

    /// Rows of group `g`.
    pub fn group_rows(&self, g: usize) -> usize {
        self.starts[g + 1] - self.starts[g]
    }

    /// The index arrays as one upload: `gather ++ offsets ++ pos`, with the
    /// offset of each part.
    pub fn packed_indices(&self) -> (Vec<i32>, [usize; 3]) {
        let mut v = Vec::with_capacity(self.gather.len() * 2 + self.offsets.len());
        v.extend_from_slice(&self.gather);
        let o = v.len();
        v.extend_from_slice(&self.offsets);
        let p = v.len();
        v.extend_from_slice(&self.pos);
        (v, [0, o, p])
    }
}

/// One expert's GEMM: `output[tokens, out] = input[tokens, inp] · W[out, inp]ᵀ`,
/// all row-major, addresses in device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Problem {
    pub out_features: usize,
    pub in_features: usize,
    pub tokens: usize,
    pub weight: u64,
    pub input: u64,
    pub output: u64,
}

impl Problem {
    /// The column-major cuBLAS call computing the row-major product:
    /// `Cᵀ[out, tokens] = op_T(W)[out, inp] · Xᵀ[inp, tokens]`, so
    /// `(m, n, k) = (out, tokens, inp)`, `lda = ldb = inp`, `ldc = out`.
    pub fn cublas_dims(&self) -> (i32, i32, i32, i32, i32, i32) {
        let (o, t, i) = (self.out_features as i32, self.tokens as i32, self.in_features as i32);
        (o, t, i, i, i, o)
    }

    /// Floating-point operations of the product.
    pub fn flops(&self) -> f64 {
        2.0 * self.out_features as f64 * self.in_features as f64 * self.tokens as f64
    }
}

/// The problems of one grouped call, for `cublasGemmGroupedBatchedEx`: one
/// group per problem (sizes differ per expert), the host arrays it reads and
/// the pointer arrays it wants in device memory.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GroupedArrays {
    pub m: Vec<i32>,
    pub n: Vec<i32>,
    pub k: Vec<i32>,
    pub lda: Vec<i32>,
    pub ldb: Vec<i32>,
    pub ldc: Vec<i32>,
    pub group_size: Vec<i32>,
    pub alpha: Vec<f32>,
    pub beta: Vec<f32>,
    /// `A ++ B ++ C` pointer arrays (weights, inputs, outputs), uploaded at once.
    pub pointers: Vec<u64>,
}

impl GroupedArrays {
    /// Problems with no tokens are left out (cuBLAS is given only real work).
    pub fn new(problems: &[Problem]) -> GroupedArrays {
        let live: Vec<&Problem> = problems.iter().filter(|p| p.tokens > 0).collect();
        let mut g = GroupedArrays::default();
        for p in &live {
            let (m, n, k, lda, ldb, ldc) = p.cublas_dims();
            g.m.push(m);
            g.n.push(n);
            g.k.push(k);
            g.lda.push(lda);
            g.ldb.push(ldb);
            g.ldc.push(ldc);
            g.group_size.push(1);
            g.alpha.push(1.0);
            g.beta.push(0.0);
        }
        g.pointers.extend(live.iter().map(|p| p.weight));
        g.pointers.extend(live.iter().map(|p| p.input));
        g.pointers.extend(live.iter().map(|p| p.output));
        g
    }

    pub fn groups(&self) -> usize {
        self.m.len()
    }
}

/// The problems of one projection over a batch: expert `g`'s rows of `input`
/// (row width `in_features`, element size `in_bytes`) times its weight,
/// into the same rows of `output` (element size `out_bytes`).
pub struct Projection<'a> {
    pub plan: &'a BatchPlan,
    pub weights: &'a [u64],
    pub in_features: usize,
    pub out_features: usize,
    pub input: u64,
    pub in_bytes: usize,
    pub output: u64,
    pub out_bytes: usize,
}

impl Projection<'_> {
    pub fn problems(&self) -> Vec<Problem> {
        self.weights
            .iter()
            .enumerate()
            .map(|(g, &w)| {
                let s = self.plan.starts[g] as u64;
                Problem {
                    out_features: self.out_features,
                    in_features: self.in_features,
                    tokens: self.plan.group_rows(g),
                    weight: w,
                    input: self.input + s * (self.in_features * self.in_bytes) as u64,
                    output: self.output + s * (self.out_features * self.out_bytes) as u64,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn group(expert: u32, rows: &[usize], weights: &[f32]) -> ExpertGroup {
        ExpertGroup { expert, rows: rows.to_vec(), weights: weights.to_vec() }
    }

    #[test]
    fn lays_out_gather_starts_and_combine_lists() {
        let groups = [group(3, &[0, 2], &[0.5, 0.25]), group(7, &[2, 1], &[0.75, 1.0])];
        let p = BatchPlan::new(&groups, 3).unwrap();
        assert_eq!(p.gather, vec![0, 2, 2, 1]);
        assert_eq!(p.starts, vec![0, 2, 4]);
        // Token 0: group 0's row 0; token 1: group 1's second row; token 2:
        // group 0's second row, then group 1's first (expert order).
        assert_eq!(p.offsets, vec![0, 1, 2, 4]);
        assert_eq!(p.pos, vec![0, 3, 1, 2]);
        assert_eq!(p.weights, vec![0.5, 1.0, 0.25, 0.75]);
        let (packed, at) = p.packed_indices();
        assert_eq!(at, [0, 4, 8]);
        assert_eq!(&packed[at[2]..], &p.pos[..]);
        assert!(BatchPlan::new(&[group(0, &[3], &[1.0])], 3).is_err());
        assert!(BatchPlan::new(&[group(0, &[0, 1], &[1.0])], 3).is_err());
    }

    #[test]
    fn projection_pointers_step_by_rows_and_skip_empty_experts() {
        let groups = [group(0, &[0, 1, 2], &[1.0; 3]), group(1, &[], &[]), group(2, &[1], &[1.0])];
        let plan = BatchPlan::new(&groups, 3).unwrap();
        let proj = Projection {
            plan: &plan,
            weights: &[1000, 2000, 3000],
            in_features: 8,
            out_features: 32,
            input: 1 << 20,
            in_bytes: 2,
            output: 1 << 30,
            out_bytes: 4,
        };
        let ps = proj.problems();
        assert_eq!(ps[2].input, (1 << 20) + 3 * 8 * 2);
        assert_eq!(ps[2].output, (1 << 30) + 3 * 32 * 4);
        assert_eq!(ps[1].tokens, 0);
        let g = GroupedArrays::new(&ps);
        assert_eq!(g.groups(), 2);
        assert_eq!((g.m.clone(), g.n.clone(), g.k.clone()), (vec![32, 32], vec![3, 1], vec![8, 8]));
        assert_eq!((g.lda[0], g.ldb[0], g.ldc[0]), (8, 8, 32));
        assert_eq!(g.pointers, vec![1000, 3000, 1 << 20, (1 << 20) + 48, 1 << 30, (1 << 30) + 384]);
        assert_eq!(ps[0].flops(), 2.0 * 32.0 * 8.0 * 3.0);
    }

    proptest! {
        /// Summing through the plan's lists gives, per token, exactly the
        /// weights routed to it, in expert order, each gathered row once.
        #[test]
        fn combine_lists_reproduce_the_routing(tokens in 1usize..12, picks in proptest::collection::vec((0u32..6, 0usize..12, 0f32..1.0), 0..40)) {
            let mut groups: Vec<ExpertGroup> = Vec::new();
            for e in 0..6u32 {
                let mine: Vec<_> = picks.iter().filter(|p| p.0 == e && p.1 < tokens).collect();
                groups.push(group(e, &mine.iter().map(|p| p.1).collect::<Vec<_>>(), &mine.iter().map(|p| p.2).collect::<Vec<_>>()));
            }
            let plan = BatchPlan::new(&groups, tokens).unwrap();
            let mut seen = vec![false; plan.rows()];
            for t in 0..tokens {
                let (a, b) = (plan.offsets[t] as usize, plan.offsets[t + 1] as usize);
                let mut want = Vec::new();
                for (g, grp) in groups.iter().enumerate() {
                    for (i, (&r, &w)) in grp.rows.iter().zip(&grp.weights).enumerate() {
                        if r == t { want.push(((plan.starts[g] + i) as i32, w)); }
                    }
                }
                let got: Vec<(i32, f32)> = (a..b).map(|j| (plan.pos[j], plan.weights[j])).collect();
                prop_assert_eq!(&got, &want);
                for (p, _) in got { prop_assert!(!seen[p as usize]); seen[p as usize] = true; prop_assert_eq!(plan.gather[p as usize] as usize, t); }
            }
            prop_assert!(seen.iter().all(|&s| s));
        }
    }
}
