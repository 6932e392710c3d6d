//! The routed-expert settings per architecture (and which layers are MoE),
//! and DeepSeek's FP8 `quantization_config`.

use super::fields::Fields;
use super::{Arch, FfnKind, MoeConfig, ScoringFunc, TopkMethod};
use crate::error::{Result, SpecError};
use serde_json::Value;

pub(super) fn parse_moe(arch: Arch, f: &Fields<'_>, num_layers: usize) -> Result<(MoeConfig, Vec<FfnKind>)> {
    let moe = match arch {
        Arch::DeepseekV3 | Arch::DeepseekV2 => {
            let v3 = arch == Arch::DeepseekV3;
            let method = match f.opt_str("topk_method")?.unwrap_or(if v3 { "noaux_tc" } else { "greedy" }) {
                "noaux_tc" => TopkMethod::NoauxTc,
                "greedy" => TopkMethod::Greedy,
                "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
                other => {
                    return Err(SpecError::Unsupported {
                        field: "topk_method".into(),
                        value: format!("{other:?} (supported: noaux_tc, greedy, group_limited_greedy)"),
                    });
                }
            };
            let scoring = match f.opt_str("scoring_func")?.unwrap_or(if v3 { "sigmoid" } else { "softmax" }) {
                "sigmoid" => ScoringFunc::Sigmoid,
                "softmax" => ScoringFunc::Softmax,
                other => {
                    return Err(SpecError::Unsupported {
                        field: "scoring_func".into(),
                        value: format!("{other:?} (supported: sigmoid, softmax)"),
                    });
                }
            };
            // transformers implements exactly one gate per architecture:
            // V3 is sigmoid + noaux_tc, V2 is softmax + greedy/group-limited.
            if v3 && (method != TopkMethod::NoauxTc || scoring != ScoringFunc::Sigmoid) {
                return Err(SpecError::Unsupported {
                    field: "topk_method/scoring_func".into(),
                    value: format!("{method:?}/{scoring:?} for deepseek_v3 (it routes with noaux_tc + sigmoid)"),
                });
            }
            if !v3 && (method == TopkMethod::NoauxTc || scoring != ScoringFunc::Softmax) {
                return Err(SpecError::Unsupported {
                    field: "topk_method/scoring_func".into(),
                    value: format!(
                        "{method:?}/{scoring:?} for deepseek_v2 (it routes with softmax + greedy or group_limited_greedy)"
                    ),
                });
            }
            MoeConfig {
                n_routed_experts: f.usize_alias(&["n_routed_experts", "num_local_experts", "num_experts"])?,
                experts_per_tok: f.usize("num_experts_per_tok")?,
                moe_intermediate_size: f.usize("moe_intermediate_size")?,
                n_shared_experts: f.usize_or("n_shared_experts", 0)?,
                scoring,
                topk_method: method,
                n_group: f.usize_or("n_group", 1)?,
                topk_group: f.usize_or("topk_group", 1)?,
                // transformers' V2 gate never renormalises the top-k weights.
                norm_topk_prob: v3 && f.bool_or("norm_topk_prob", true)?,
                routed_scaling_factor: f.f64_or("routed_scaling_factor", if v3 { 2.5 } else { 1.0 })? as f32,
            }
        }
        Arch::Qwen3Moe => MoeConfig {
            n_routed_experts: f.usize_alias(&["num_experts", "num_local_experts"])?,
            experts_per_tok: f.usize("num_experts_per_tok")?,
            moe_intermediate_size: f.usize("moe_intermediate_size")?,
            n_shared_experts: 0,
            scoring: ScoringFunc::Softmax,
            topk_method: TopkMethod::Greedy,
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: f.bool_or("norm_topk_prob", false)?,
            routed_scaling_factor: 1.0,
        },
        Arch::Mixtral => MoeConfig {
            n_routed_experts: f.usize("num_local_experts")?,
            experts_per_tok: f.usize("num_experts_per_tok")?,
            moe_intermediate_size: f.usize("intermediate_size")?,
            n_shared_experts: 0,
            scoring: ScoringFunc::Softmax,
            topk_method: TopkMethod::Greedy,
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor: 1.0,
        },
        Arch::Qwen2 | Arch::Llama => return Ok((MoeConfig::none(), vec![FfnKind::Dense; num_layers])),
    };
    if moe.n_routed_experts == 0 || moe.experts_per_tok == 0 || moe.experts_per_tok > moe.n_routed_experts {
        return Err(SpecError::Config(format!(
            "num_experts_per_tok ({}) must be in 1..={} (the number of routed experts)",
            moe.experts_per_tok, moe.n_routed_experts
        )));
    }
    let grouped = matches!(moe.topk_method, TopkMethod::NoauxTc | TopkMethod::GroupLimitedGreedy);
    if grouped {
        if moe.n_group == 0 || moe.n_routed_experts % moe.n_group != 0 {
            return Err(SpecError::Config(format!(
                "n_group ({}) must divide n_routed_experts ({})",
                moe.n_group, moe.n_routed_experts
            )));
        }
        if moe.topk_group == 0 || moe.topk_group > moe.n_group {
            return Err(SpecError::Config(format!(
                "topk_group ({}) must be in 1..=n_group ({})",
                moe.topk_group, moe.n_group
            )));
        }
        let per_group = moe.n_routed_experts / moe.n_group;
        if moe.topk_method == TopkMethod::NoauxTc && per_group < 2 {
            return Err(SpecError::Config(
                "noaux_tc needs at least 2 experts per group (n_routed_experts / n_group)".into(),
            ));
        }
        if moe.experts_per_tok > moe.topk_group * per_group {
            return Err(SpecError::Config(format!(
                "num_experts_per_tok ({}) exceeds the experts in topk_group groups ({})",
                moe.experts_per_tok,
                moe.topk_group * per_group
            )));
        }
    }
    let layer_ffn = (0..num_layers)
        .map(|i| -> Result<FfnKind> {
            let is_moe = match arch {
                // transformers ≥ 5 makes every layer from first_k_dense_replace on
                // a MoE layer (moe_layer_freq is 1 in every published checkpoint).
                Arch::DeepseekV3 | Arch::DeepseekV2 => i >= f.usize_or("first_k_dense_replace", 0)?,
                Arch::Qwen3Moe => {
                    let step = f.usize_or("decoder_sparse_step", 1)?.max(1);
                    let mlp_only = match f.opt("mlp_only_layers") {
                        Some(Value::Array(a)) => a.iter().any(|v| v.as_u64() == Some(i as u64)),
                        _ => false,
                    };
                    !mlp_only && (i + 1) % step == 0
                }
                Arch::Mixtral => true,
                Arch::Qwen2 | Arch::Llama => false,
            };
            Ok(if is_moe { FfnKind::Moe } else { FfnKind::Dense })
        })
        .collect::<Result<Vec<_>>>()?;
    if matches!(arch, Arch::DeepseekV3 | Arch::DeepseekV2) && f.usize_or("moe_layer_freq", 1)? != 1 {
        return Err(SpecError::Unsupported {
            field: "moe_layer_freq".into(),
            value: format!("{} (transformers supports only 1)", f.usize_or("moe_layer_freq", 1)?),
        });
    }
    Ok((moe, layer_ffn))
}

pub(super) fn parse_quantization(f: &Fields<'_>) -> Result<Option<(usize, usize)>> {
    let Some(q) = f.opt("quantization_config") else {
        return Ok(None);
    };
    let q = q.as_object().ok_or_else(|| SpecError::Config("field `quantization_config` must be an object".into()))?;
    let qf = Fields(q);
    match qf.opt_str("quant_method")? {
        Some("fp8") => {}
        other => {
            return Err(SpecError::Unsupported {
                field: "quantization_config.quant_method".into(),
                value: format!("{other:?} (supported: fp8)"),
            });
        }
    }
    match qf.opt_str("fmt")? {
        None | Some("e4m3") => {}
        Some(other) => {
            return Err(SpecError::Unsupported {
                field: "quantization_config.fmt".into(),
                value: format!("{other:?} (supported: e4m3)"),
            });
        }
    }
    let block = match qf.opt("weight_block_size") {
        Some(Value::Array(a)) if a.len() == 2 => match (a[0].as_u64(), a[1].as_u64()) {
            (Some(r), Some(c)) if r > 0 && c > 0 => (r as usize, c as usize),
            _ => {
                return Err(SpecError::Config(
                    "quantization_config.weight_block_size must be two positive integers".into(),
                ));
            }
        },
        _ => {
            return Err(SpecError::Config(
                "missing field `quantization_config.weight_block_size` ([rows, cols])".into(),
            ));
        }
    };
    Ok(Some(block))
}
