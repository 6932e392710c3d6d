//! Hugging Face `config.json` parsing for the supported MoE architectures,
//! normalised into one [`ModelConfig`].
//!
//! Field names and defaults follow transformers ≥ 5 (the correctness
//! reference) and the published checkpoints: rope settings are read from
//! `rope_parameters` or the older `rope_scaling` + top-level `rope_theta`.

use crate::error::{Result, SpecError};
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    DeepseekV3,
    DeepseekV2,
    Qwen3Moe,
    Mixtral,
}

impl Arch {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "deepseek_v3" => Arch::DeepseekV3,
            "deepseek_v2" => Arch::DeepseekV2,
            "qwen3_moe" => Arch::Qwen3Moe,
            "mixtral" => Arch::Mixtral,
            other => {
                return Err(SpecError::Unsupported {
                    field: "model_type".into(),
                    value: format!("{other:?} (supported: deepseek_v3, deepseek_v2, qwen3_moe, mixtral)"),
                });
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::DeepseekV3 => "deepseek_v3",
            Arch::DeepseekV2 => "deepseek_v2",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::Mixtral => "mixtral",
        }
    }
}

/// Multi-head latent attention (DeepSeek-V2/V3).
#[derive(Debug, Clone)]
pub struct MlaConfig {
    pub num_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub attention_bias: bool,
}

/// Grouped-query attention (Qwen3-MoE, Mixtral).
#[derive(Debug, Clone)]
pub struct GqaConfig {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Qwen3: RMSNorm over each head of q and k before RoPE.
    pub qk_norm: bool,
    pub attention_bias: bool,
    pub sliding_window: Option<usize>,
}

#[derive(Debug, Clone)]
pub enum AttentionConfig {
    Mla(MlaConfig),
    Gqa(GqaConfig),
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        /// Scale applied to cos/sin (transformers' `attention_factor`).
        attention_factor: f64,
        /// Extra factor on the softmax scale (`mscale_all_dim`, MLA only).
        softmax_mscale: f64,
        truncate: bool,
    },
}

#[derive(Debug, Clone)]
pub struct RopeConfig {
    pub theta: f64,
    /// Rotary dimensions per head.
    pub dim: usize,
    /// Pairs are adjacent `(x0, x1), (x2, x3)…` (DeepSeek) instead of
    /// `(x_i, x_{i+d/2})` (Llama style).
    pub interleaved: bool,
    pub scaling: RopeScaling,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    Sigmoid,
    Softmax,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// DeepSeek-V3: bias-corrected, group-limited selection.
    NoauxTc,
    Greedy,
    GroupLimitedGreedy,
}

#[derive(Debug, Clone)]
pub struct MoeConfig {
    pub n_routed_experts: usize,
    pub experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub n_shared_experts: usize,
    pub scoring: ScoringFunc,
    pub topk_method: TopkMethod,
    pub n_group: usize,
    pub topk_group: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnKind {
    Dense,
    Moe,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub tie_word_embeddings: bool,
    pub mlp_bias: bool,
    pub attention: AttentionConfig,
    pub rope: RopeConfig,
    pub moe: MoeConfig,
    pub layer_ffn: Vec<FfnKind>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// FP8 block size when the checkpoint is DeepSeek's native FP8 layout.
    pub fp8_block: Option<(usize, usize)>,
}

/// Typed access to a JSON object that names the missing or mistyped field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn opt(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    fn usize(&self, k: &str) -> Result<usize> {
        self.opt_usize(k)?.ok_or_else(|| SpecError::Config(format!("missing field `{k}`")))
    }
    fn opt_usize(&self, k: &str) -> Result<Option<usize>> {
        match self.opt(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| SpecError::Config(format!("field `{k}` must be a non-negative integer, got {v}"))),
        }
    }
    /// The first of several spellings that is present (transformers'
    /// `attribute_map` aliases, e.g. `num_experts` / `num_local_experts`).
    fn usize_alias(&self, keys: &[&str]) -> Result<usize> {
        for k in keys {
            if let Some(v) = self.opt_usize(k)? {
                return Ok(v);
            }
        }
        Err(SpecError::Config(format!("missing field `{}`", keys.join("` or `"))))
    }
    fn usize_or(&self, k: &str, d: usize) -> Result<usize> {
        Ok(self.opt_usize(k)?.unwrap_or(d))
    }
    fn opt_f64(&self, k: &str) -> Result<Option<f64>> {
        match self.opt(k) {
            None => Ok(None),
            Some(v) => {
                v.as_f64().map(Some).ok_or_else(|| SpecError::Config(format!("field `{k}` must be a number, got {v}")))
            }
        }
    }
    fn f64_or(&self, k: &str, d: f64) -> Result<f64> {
        Ok(self.opt_f64(k)?.unwrap_or(d))
    }
    fn bool_or(&self, k: &str, d: bool) -> Result<bool> {
        match self.opt(k) {
            None => Ok(d),
            Some(v) => v.as_bool().ok_or_else(|| SpecError::Config(format!("field `{k}` must be a boolean, got {v}"))),
        }
    }
    fn opt_str(&self, k: &str) -> Result<Option<&str>> {
        match self.opt(k) {
            None => Ok(None),
            Some(v) => {
                v.as_str().map(Some).ok_or_else(|| SpecError::Config(format!("field `{k}` must be a string, got {v}")))
            }
        }
    }
    fn token_ids(&self, k: &str) -> Result<Vec<u32>> {
        match self.opt(k) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|x| x as u32)
                        .ok_or_else(|| SpecError::Config(format!("field `{k}` must hold token ids, got {v}")))
                })
                .collect(),
            Some(v) => v
                .as_u64()
                .map(|x| vec![x as u32])
                .ok_or_else(|| SpecError::Config(format!("field `{k}` must be a token id, got {v}"))),
        }
    }
}

impl ModelConfig {
    /// Reads `config.json` (and `generation_config.json` for EOS ids, when present).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| SpecError::io(&path, e))?;
        let mut cfg = Self::from_json_str(&text)?;
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let text = std::fs::read_to_string(&gen_path).map_err(|e| SpecError::io(&gen_path, e))?;
            let v: Value =
                serde_json::from_str(&text).map_err(|e| SpecError::Config(format!("generation_config.json: {e}")))?;
            if let Some(obj) = v.as_object() {
                let eos = Fields(obj).token_ids("eos_token_id")?;
                if !eos.is_empty() {
                    cfg.eos_token_ids = eos;
                }
            }
        }
        Ok(cfg)
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| SpecError::Config(format!("config.json: {e}")))?;
        let obj = v.as_object().ok_or_else(|| SpecError::Config("config.json must be a JSON object".into()))?;
        let f = Fields(obj);
        let arch = Arch::parse(
            f.opt_str("model_type")?.ok_or_else(|| SpecError::Config("missing field `model_type`".into()))?,
        )?;
        let hidden_size = f.usize("hidden_size")?;
        let num_layers = f.usize("num_hidden_layers")?;
        let num_heads = f.usize("num_attention_heads")?;
        if num_heads == 0 || hidden_size == 0 || num_layers == 0 {
            return Err(SpecError::Config(
                "hidden_size, num_hidden_layers and num_attention_heads must be positive".into(),
            ));
        }
        let max_position_embeddings = f.usize_or("max_position_embeddings", 4096)?;

        let (attention, rope_dim, interleaved) = match arch {
            Arch::DeepseekV3 | Arch::DeepseekV2 => {
                let mla = MlaConfig {
                    num_heads,
                    q_lora_rank: f.opt_usize("q_lora_rank")?,
                    kv_lora_rank: f.usize("kv_lora_rank")?,
                    qk_nope_head_dim: f.usize("qk_nope_head_dim")?,
                    qk_rope_head_dim: f.usize("qk_rope_head_dim")?,
                    v_head_dim: f.usize("v_head_dim")?,
                    attention_bias: f.bool_or("attention_bias", false)?,
                };
                // V2's complex-number RoPE rotates adjacent pairs; V3 does
                // so when `rope_interleave` is true (its default).
                let inter = arch == Arch::DeepseekV2 || f.bool_or("rope_interleave", true)?;
                let d = mla.qk_rope_head_dim;
                (AttentionConfig::Mla(mla), d, inter)
            }
            Arch::Qwen3Moe | Arch::Mixtral => {
                let head_dim = f.usize_or("head_dim", hidden_size / num_heads)?;
                let sliding = if arch == Arch::Qwen3Moe && !f.bool_or("use_sliding_window", false)? {
                    None
                } else {
                    f.opt_usize("sliding_window")?
                };
                let gqa = GqaConfig {
                    num_heads,
                    num_kv_heads: f.usize_or("num_key_value_heads", num_heads)?,
                    head_dim,
                    qk_norm: arch == Arch::Qwen3Moe,
                    attention_bias: f.bool_or("attention_bias", false)?,
                    sliding_window: sliding,
                };
                if gqa.num_kv_heads == 0 || !gqa.num_heads.is_multiple_of(gqa.num_kv_heads) {
                    return Err(SpecError::Config(format!(
                        "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                        gqa.num_heads, gqa.num_kv_heads
                    )));
                }
                (AttentionConfig::Gqa(gqa), head_dim, false)
            }
        };
        if rope_dim % 2 != 0 {
            return Err(SpecError::Config(format!("rotary dimension {rope_dim} must be even")));
        }
        let rope = parse_rope(&f, rope_dim, interleaved, max_position_embeddings)?;

        let intermediate_size = f.usize_or("intermediate_size", 0)?;
        let (moe, layer_ffn) = parse_moe(arch, &f, num_layers)?;
        if layer_ffn.contains(&FfnKind::Dense) && intermediate_size == 0 {
            return Err(SpecError::Config("missing field `intermediate_size` (dense layers need it)".into()));
        }

        let fp8_block = parse_quantization(&f)?;
        let bos_token_id = f.token_ids("bos_token_id")?.first().copied();
        Ok(ModelConfig {
            arch,
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            num_layers,
            intermediate_size,
            max_position_embeddings,
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)? as f32,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            mlp_bias: f.bool_or("mlp_bias", false)?,
            attention,
            rope,
            moe,
            layer_ffn,
            bos_token_id,
            eos_token_ids: f.token_ids("eos_token_id")?,
            fp8_block,
        })
    }

    /// Indices of the layers whose FFN is a routed MoE.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layer_ffn.iter().enumerate().filter(|(_, k)| **k == FfnKind::Moe).map(|(i, _)| i)
    }

    /// Softmax scale of the attention scores.
    pub fn attention_scale(&self) -> f32 {
        let (head_dim, mla) = match &self.attention {
            AttentionConfig::Mla(m) => (m.qk_nope_head_dim + m.qk_rope_head_dim, true),
            AttentionConfig::Gqa(g) => (g.head_dim, false),
        };
        let mut s = (head_dim as f64).powf(-0.5);
        if let (true, RopeScaling::Yarn { softmax_mscale, .. }) = (mla, &self.rope.scaling) {
            s *= softmax_mscale * softmax_mscale;
        }
        s as f32
    }
}

fn parse_rope(f: &Fields<'_>, dim: usize, interleaved: bool, max_pos: usize) -> Result<RopeConfig> {
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
        other => {
            return Err(SpecError::Unsupported {
                field: format!("{field}.rope_type"),
                value: format!("{other:?} (supported: default, yarn)"),
            });
        }
    };
    Ok(RopeConfig { theta, dim, interleaved, scaling })
}

fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * mscale * scale.ln() + 1.0 }
}

fn parse_moe(arch: Arch, f: &Fields<'_>, num_layers: usize) -> Result<(MoeConfig, Vec<FfnKind>)> {
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

fn parse_quantization(f: &Fields<'_>) -> Result<Option<(usize, usize)>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    const V3: &str = r#"{"model_type":"deepseek_v3","vocab_size":100,"hidden_size":64,"num_hidden_layers":3,
        "num_attention_heads":4,"intermediate_size":96,"moe_intermediate_size":32,"q_lora_rank":null,
        "kv_lora_rank":32,"qk_nope_head_dim":16,"qk_rope_head_dim":8,"v_head_dim":16,"n_routed_experts":8,
        "n_shared_experts":1,"num_experts_per_tok":2,"n_group":4,"topk_group":2,"first_k_dense_replace":1,
        "rope_theta":10000,"rope_scaling":{"type":"yarn","factor":4.0,"original_max_position_embeddings":64,
        "mscale":1.0,"mscale_all_dim":0.8,"beta_fast":32,"beta_slow":1},"max_position_embeddings":256}"#;

    #[test]
    fn parses_v3_with_legacy_rope_scaling() {
        let c = ModelConfig::from_json_str(V3).unwrap();
        assert_eq!(c.arch, Arch::DeepseekV3);
        assert_eq!(c.layer_ffn, vec![FfnKind::Dense, FfnKind::Moe, FfnKind::Moe]);
        assert!(c.rope.interleaved);
        let RopeScaling::Yarn { attention_factor, softmax_mscale, .. } = c.rope.scaling else { panic!() };
        let m = |s: f64| 0.1 * s * 4f64.ln() + 1.0;
        assert!((attention_factor - m(1.0) / m(0.8)).abs() < 1e-12);
        assert!((softmax_mscale - m(0.8)).abs() < 1e-12);
        assert!((c.attention_scale() as f64 - 24f64.powf(-0.5) * m(0.8) * m(0.8)).abs() < 1e-6);
    }

    #[test]
    fn rope_parameters_spelling_is_equivalent() {
        let new = V3.replace(
            r#""rope_theta":10000,"rope_scaling":{"type":"yarn""#,
            r#""rope_parameters":{"rope_theta":10000,"rope_type":"yarn""#,
        );
        let a = ModelConfig::from_json_str(V3).unwrap();
        let b = ModelConfig::from_json_str(&new).unwrap();
        assert_eq!(a.rope.scaling, b.rope.scaling);
        assert_eq!(a.rope.theta, b.rope.theta);
    }

    #[test]
    fn errors_name_the_field() {
        let e = ModelConfig::from_json_str(&V3.replace("deepseek_v3", "llama")).unwrap_err();
        assert!(e.to_string().contains("model_type"), "{e}");
        let e = ModelConfig::from_json_str(&V3.replace(r#""kv_lora_rank":32,"#, "")).unwrap_err();
        assert!(e.to_string().contains("kv_lora_rank"), "{e}");
        let e = ModelConfig::from_json_str(&V3.replace(r#""type":"yarn""#, r#""type":"longrope""#)).unwrap_err();
        assert!(e.to_string().contains("rope_scaling.rope_type"), "{e}");
        let e = ModelConfig::from_json_str(&V3.replace(r#""n_group":4"#, r#""n_group":3"#)).unwrap_err();
        assert!(e.to_string().contains("n_group"), "{e}");
        let e = ModelConfig::from_json_str(&V3.replace(r#""n_group":4"#, r#""topk_method":"greedy","n_group":4"#))
            .unwrap_err();
        assert!(e.to_string().contains("topk_method"), "{e}");
    }
}
