//! RoPE settings: `rope_parameters` (transformers ≥ 5) or the older
//! `rope_scaling` + top-level `rope_theta`, for default, YaRN and Llama 3
//! scaling.

use super::fields::Fields;
use super::{RopeConfig, RopeScaling};
use crate::error::{Result, SpecError};
use serde_json::{Map, Value};

pub(super) fn parse_rope(f: &Fields<'_>, dim: usize, interleaved: bool, max_pos: usize) -> Result<RopeConfig> {
    // transformers ≥ 5 writes `rope_parameters` (theta inside); published
    // checkpoints write `rope_scaling` with `rope_theta` at the top level.
    let (params, field) = match (f.opt("rope_parameters"), f.opt("rope_scaling")) {
        (Some(p), _) => (Some(p), "rope_parameters"),
        (None, Some(p)) => (Some(p), "rope_scaling"),
        (None, None) => (None, "rope_parameters"),
    };
    let empty = Map::new();
    let p = match params {
        Some(Value::Object(m)) => m,
        Some(v) => {
            return Err(SpecError::Config(format!("field `{field}` must be an object, got {v}")));
        }
        None => &empty,
    };
    let pf = Fields(p);
    let theta = match pf.opt_f64("rope_theta")? {
        Some(t) => t,
        None => f.f64_or("rope_theta", 10000.0)?,
    };
    let kind = match pf.opt_str("rope_type")? {
        Some(t) => t,
        None => pf.opt_str("type")?.unwrap_or("default"),
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "yarn" => {
            let original = match pf.opt_usize("original_max_position_embeddings")? {
                Some(o) => o,
                None => f.usize_or("original_max_position_embeddings", max_pos)?,
            };
            let factor = match pf.opt_f64("factor")? {
                Some(x) => x,
                None => max_pos as f64 / original as f64,
            };
            let mscale = pf.opt_f64("mscale")?.filter(|m| *m != 0.0);
            let mscale_all_dim = pf.opt_f64("mscale_all_dim")?.filter(|m| *m != 0.0);
            let attention_factor = match (pf.opt_f64("attention_factor")?, mscale, mscale_all_dim) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(ma)) => yarn_mscale(factor, m) / yarn_mscale(factor, ma),
                _ => yarn_mscale(factor, 1.0),
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: pf.opt_f64("beta_fast")?.filter(|b| *b != 0.0).unwrap_or(32.0),
                beta_slow: pf.opt_f64("beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0),
                attention_factor,
                softmax_mscale: mscale_all_dim.map_or(1.0, |m| yarn_mscale(factor, m)),
                truncate: pf.bool_or("truncate", true)?,
            }
        }
        "llama3" => {
            let need = |k: &str| {
                pf.opt_f64(k)?.ok_or_else(|| SpecError::Config(format!("missing field `{field}.{k}` (llama3 RoPE)")))
            };
            let (factor, low_freq_factor, high_freq_factor) =
                (need("factor")?, need("low_freq_factor")?, need("high_freq_factor")?);
            let original = pf.opt_usize("original_max_position_embeddings")?.ok_or_else(|| {
                SpecError::Config(format!("missing field `{field}.original_max_position_embeddings` (llama3 RoPE)"))
            })?;
            if !(factor > 0.0 && low_freq_factor > 0.0 && high_freq_factor > low_freq_factor) || original == 0 {
                return Err(SpecError::Config(format!(
                    "`{field}`: llama3 RoPE needs factor > 0, 0 < low_freq_factor < high_freq_factor and \
                     original_max_position_embeddings > 0"
                )));
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original,
            }
        }
        other => {
            return Err(SpecError::Unsupported {
                field: format!("{field}.rope_type"),
                value: format!("{other:?} (supported: default, yarn, llama3)"),
            });
        }
    };
    Ok(RopeConfig { theta, dim, interleaved, scaling })
}

fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * mscale * scale.ln() + 1.0 }
}
