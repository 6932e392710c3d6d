//! What one structured-output mask costs on a checkpoint's vocabulary: the
//! router's own `Guidance` compiles `tools/guided_bench.py`'s schema (one
//! string of at least 2,000 characters) and `{"type": "json_object"}`, and
//! each matcher then walks TOKENS steps, timing `compute_mask` at each and
//! advancing over a token drawn uniformly (seeded) from those allowed, as a
//! random-weight model's masked sampling would.
//!
//! `cargo run --release -p expertmesh-router --example mask_cost -- MODEL_DIR [TOKENS]`
//! prints per guide the vocabulary, the median, p90 and mean microseconds.

use anyhow::{Context, Result, bail};
use expertmesh_model::config::ModelConfig;
use expertmesh_model::tokenizer::TextTokenizer;
use expertmesh_router::generation::guide::{Guidance, Guide};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Instant;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().context("usage: mask_cost MODEL_DIR [TOKENS]")?);
    let tokens: usize = args.next().map_or(Ok(256), |s| s.parse()).context("TOKENS")?;
    let cfg = ModelConfig::from_dir(&dir)?;
    let tok = Arc::new(TextTokenizer::from_dir(&dir)?);
    let g = Guidance::new(&dir, tok, cfg.vocab_size, &cfg.eos_token_ids).map_err(anyhow::Error::msg)?;
    let schema = serde_json::json!({"type": "object", "properties": {"text": {"type": "string", "minLength": 2000}},
                                    "required": ["text"], "additionalProperties": false});
    for (name, guide) in [("json_schema", Guide::JsonSchema(schema)), ("json_object", Guide::JsonObject)] {
        let mut m = g.matcher(&guide)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let mut times = Vec::with_capacity(tokens);
        while times.len() < tokens && !m.is_stopped() {
            let t = Instant::now();
            let mask = m.compute_mask()?;
            times.push(t.elapsed().as_secs_f64() * 1e6);
            let allowed: Vec<u32> = (0..cfg.vocab_size as u32).filter(|&i| mask.is_allowed(i)).collect();
            if allowed.is_empty() {
                bail!("{name}: the grammar allows no token after {} steps", times.len());
            }
            m.consume_token(allowed[rng.random_range(0..allowed.len())])?;
        }
        times.sort_by(f64::total_cmp);
        let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        println!(
            "{name}: vocab {}, {} masks: median {:.1} us, p90 {:.1} us, mean {:.1} us",
            cfg.vocab_size,
            times.len(),
            at(0.5),
            at(0.9),
            mean
        );
    }
    Ok(())
}
