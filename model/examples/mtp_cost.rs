//! What one MTP speculation cycle costs against a plain decode step, per
//! sequence, at batch B: a 1-position step, a 2-position step (the last
//! token and its draft, with hidden rows), and the MTP pass that drafts.
//! With acceptance a, speculation pays when (1 + a) plain steps take longer
//! than one 2-position step plus one MTP pass.
//!
//! `cargo run --release -p expertmesh-model --example mtp_cost -- MODEL_DIR [BATCH] [ITERS]`
//! prints one JSON line of milliseconds per step.

use expertmesh_model::model::{Logits, Model, SeqChunk};
use expertmesh_model::mtp::MtpChunk;
use expertmesh_model::tensor::Precision;
use std::time::Instant;

/// Positions cached before every timed step (a short chat's context).
const CONTEXT: usize = 256;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("MODEL_DIR"));
    let batch: usize = args.next().map_or(1, |s| s.parse().expect("BATCH"));
    let iters: usize = args.next().map_or(200, |s| s.parse().expect("ITERS"));
    let m = Model::load(&dir, Precision::F32, &mut |_, _| {}).expect("model");
    assert!(m.has_mtp(), "{} has no MTP module", dir.display());
    let h = m.config().hidden_size;
    let vocab = m.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..CONTEXT as u32).map(|i| 2 + i * 7 % (vocab - 2)).collect();
    let mut caches: Vec<_> = (0..batch).map(|_| m.new_cache()).collect();
    let mut mcaches: Vec<_> = (0..batch).map(|_| m.new_mtp_cache().expect("mtp cache")).collect();
    let mut chunks: Vec<SeqChunk<'_>> = caches.iter_mut().map(|c| SeqChunk { tokens: &prompt, cache: c }).collect();
    m.forward(&mut chunks, Logits::Last).expect("prefill");
    let (one, two) = ([5u32], [5u32, 9]);
    let rows = vec![0.1f32; CONTEXT * h];
    let mut mchunks: Vec<MtpChunk<'_>> =
        mcaches.iter_mut().map(|c| MtpChunk { cache: c, hidden: &rows, next: &prompt }).collect();
    m.mtp_forward(&mut mchunks).expect("MTP prefill");
    // Every timed step is undone, so each runs at the same context.
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        1e3 * t.elapsed().as_secs_f64() / iters as f64
    };
    let plain = time(&mut || {
        let mut c: Vec<SeqChunk<'_>> = caches.iter_mut().map(|c| SeqChunk { tokens: &one, cache: c }).collect();
        m.forward(&mut c, Logits::Last).expect("step");
        caches.iter_mut().for_each(|c| c.truncate(CONTEXT));
    });
    let verify = time(&mut || {
        let mut c: Vec<SeqChunk<'_>> = caches.iter_mut().map(|c| SeqChunk { tokens: &two, cache: c }).collect();
        m.forward_hidden(&mut c, Logits::Tail(2), false).expect("verify");
        caches.iter_mut().for_each(|c| c.truncate(CONTEXT));
    });
    let draft = time(&mut || {
        let mut c: Vec<MtpChunk<'_>> =
            mcaches.iter_mut().map(|c| MtpChunk { cache: c, hidden: &rows[..h], next: &one }).collect();
        m.mtp_forward(&mut c).expect("mtp");
        mcaches.iter_mut().for_each(|c| c.truncate(CONTEXT));
    });
    println!(
        "{}",
        serde_json::json!({"batch": batch, "plain_ms": plain, "verify_ms": verify, "mtp_ms": draft,
                           "cycle_over_plain": (verify + draft) / plain})
    );
}
