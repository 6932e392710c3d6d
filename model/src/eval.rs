//! How far one model's next-token distributions are from a reference's, on
//! the same tokens: what quantization costs (`examples/quant_accuracy.rs`,
//! the golden tests), measured as llama.cpp's `perplexity --kl-divergence`
//! reports it.

use crate::ops::{argmax, log_sum_exp};

/// Agreement of `positions` next-token distributions with the reference.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Agreement {
    pub positions: usize,
    /// Positions whose most likely token is the reference's.
    pub top1_same: usize,
    /// |Δ log p| of the reference's most likely token, mean and max.
    pub mean_abs_dlogprob: f64,
    pub max_abs_dlogprob: f64,
    /// KL(reference ‖ other) in nats, mean and max over positions.
    pub mean_kl: f64,
    pub max_kl: f64,
}

impl Agreement {
    /// Compares row by row two `[positions, vocab]` logit matrices.
    pub fn of(reference: &[f32], other: &[f32], vocab: usize) -> Agreement {
        debug_assert_eq!(reference.len(), other.len());
        let mut a = Agreement::default();
        for (r, o) in reference.chunks_exact(vocab).zip(other.chunks_exact(vocab)) {
            let (lr, lo) = (log_sum_exp(r), log_sum_exp(o));
            // The greedy sampler's own choice (NaN-safe, first of equals).
            let best = argmax(r);
            a.top1_same += usize::from(argmax(o) == best);
            let d = ((r[best] as f64 - lr) - (o[best] as f64 - lo)).abs();
            a.mean_abs_dlogprob += d;
            a.max_abs_dlogprob = a.max_abs_dlogprob.max(d);
            let kl: f64 = r
                .iter()
                .zip(o)
                .map(|(&x, &y)| {
                    let (pr, qr) = (x as f64 - lr, y as f64 - lo);
                    pr.exp() * (pr - qr)
                })
                .sum();
            a.mean_kl += kl;
            a.max_kl = a.max_kl.max(kl);
            a.positions += 1;
        }
        if a.positions > 0 {
            a.mean_abs_dlogprob /= a.positions as f64;
            a.mean_kl /= a.positions as f64;
        }
        a
    }

    /// The fraction of positions with the same most likely token.
    pub fn top1_rate(&self) -> f64 {
        if self.positions == 0 { 1.0 } else { self.top1_same as f64 / self.positions as f64 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_distributions_agree_and_shifted_ones_do_not() {
        let r = [1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0];
        let a = Agreement::of(&r, &r, 3);
        assert_eq!((a.positions, a.top1_same), (2, 2));
        assert!(a.mean_kl.abs() < 1e-12 && a.max_abs_dlogprob < 1e-12);
        // A constant shift of the logits is the same distribution.
        let shifted: Vec<f32> = r.iter().map(|v| v + 5.0).collect();
        assert!(Agreement::of(&r, &shifted, 3).max_kl < 1e-9);
        let other = [2.0f32, 1.0, 0.5, -1.0, 0.0, 3.0];
        let b = Agreement::of(&r, &other, 3);
        assert_eq!(b.top1_same, 1);
        assert!(b.max_kl > 0.1 && b.max_abs_dlogprob > 0.5, "{b:?}");
        assert!((b.top1_rate() - 0.5).abs() < 1e-12);
    }
}
