//! What `--quantize` costs in accuracy: each quantized variant against the
//! unquantized model (f32 activations), teacher-forced on the same tokens.
//!
//! `quant_accuracy MODEL_DIR [TOKENS] [THREADS]` prints one JSON line per
//! variant (format × targets × group): greedy-token agreement of the
//! next-token distributions, mean and max |Δ log p| of the reference's
//! greedy token, mean and max KL(reference ‖ quantized), and how many tokens
//! a free-running 32-token greedy generation keeps identical.

use expertmesh_model::eval::Agreement;
use expertmesh_model::kernels::quant::QuantFormat;
use expertmesh_model::model::{Logits, Model, SeqChunk};
use expertmesh_model::moe::top_k_indices;
use expertmesh_model::options::{PrecisionChoice, QuantTarget, WeightArgs};

fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(13)) % (vocab as u32 - 2) + 2).collect()
}

fn logits(m: &Model, toks: &[u32]) -> Vec<f32> {
    let mut c = m.new_cache();
    m.forward(&mut [SeqChunk { tokens: toks, cache: &mut c }], Logits::All).expect("forward").remove(0)
}

fn greedy(m: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut c = m.new_cache();
    let mut next = prompt.to_vec();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let l = m.forward(&mut [SeqChunk { tokens: &next, cache: &mut c }], Logits::Last).expect("step").remove(0);
        let t = top_k_indices(&l, 1)[0] as u32;
        out.push(t);
        next = vec![t];
    }
    out
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: quant_accuracy MODEL_DIR [TOKENS] [THREADS]"));
    let n: usize = args.next().map_or(256, |v| v.parse().expect("TOKENS"));
    let threads: usize = args.next().map_or(2, |v| v.parse().expect("THREADS"));
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().expect("thread pool");
    // f32 activations throughout, so that only the quantization differs.
    let reference = Model::load(&dir, PrecisionChoice::F32, &mut |_, _| {}).expect("load");
    let vocab = reference.config().vocab_size;
    let toks = tokens(n, vocab);
    let want = logits(&reference, &toks);
    let want_gen = greedy(&reference, &toks[..8], 32);
    drop(reference);
    let routed = [QuantTarget::Routed];
    let all = [QuantTarget::Routed, QuantTarget::Shared, QuantTarget::Dense];
    for (format, targets, group) in [
        (QuantFormat::Int8, &routed[..], 32),
        (QuantFormat::Int8, &routed[..], 128),
        (QuantFormat::Int8, &all[..], 32),
        (QuantFormat::Int4, &routed[..], 32),
        (QuantFormat::Int4, &routed[..], 128),
        (QuantFormat::Int4, &all[..], 32),
    ] {
        let opts = WeightArgs {
            quantize_group: group,
            precision: PrecisionChoice::F32,
            ..WeightArgs::quantized(format, targets)
        };
        let m = Model::load(&dir, opts, &mut |_, _| {}).expect("load");
        let a = Agreement::of(&want, &logits(&m, &toks), vocab);
        let got = greedy(&m, &toks[..8], 32);
        let same_prefix = got.iter().zip(&want_gen).take_while(|(a, b)| a == b).count();
        let line = serde_json::json!({
            "model": dir.display().to_string(),
            "format": format!("{format:?}").to_lowercase(),
            "targets": targets.iter().map(|t| format!("{t:?}").to_lowercase()).collect::<Vec<_>>(),
            "group": group,
            "top1_agreement": a.top1_rate(),
            "agreement": a,
            "greedy_same_prefix_of_32": same_prefix,
        });
        println!("{line}");
    }
}
