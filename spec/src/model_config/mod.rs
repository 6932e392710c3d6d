//! Hugging Face `config.json` parsing for the supported architectures (the
//! MoE ones and the dense Qwen2/Llama that DeepSeek's R1 distills use),
//! normalised into one [`ModelConfig`]; a dense model has no MoE layers.
//!
//! Field names and defaults follow transformers ≥ 5 (the correctness
//! reference) and the published checkpoints: rope settings are read from
//! `rope_parameters` or the older `rope_scaling` + top-level `rope_theta`.

use crate::error::{Result, SpecError};
use fields::Fields;
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    DeepseekV3,
    DeepseekV2,
    Qwen3Moe,
    Mixtral,
    /// Dense (R1-Distill-Qwen): q/k/v biases, GQA, often tied embeddings.
    Qwen2,
    /// Dense (R1-Distill-Llama): GQA, Llama 3 RoPE scaling.
    Llama,
}

impl Arch {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "deepseek_v3" => Arch::DeepseekV3,
            "deepseek_v2" => Arch::DeepseekV2,
            "qwen3_moe" => Arch::Qwen3Moe,
            "mixtral" => Arch::Mixtral,
            "qwen2" => Arch::Qwen2,
            "llama" => Arch::Llama,
            other => {
                return Err(SpecError::Unsupported {
                    field: "model_type".into(),
                    value: format!("{other:?} (supported: deepseek_v3, deepseek_v2, qwen3_moe, mixtral, qwen2, llama)"),
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
            Arch::Qwen2 => "qwen2",
            Arch::Llama => "llama",
        }
    }

    /// Whether the architecture has routed experts at all.
    pub fn is_moe(self) -> bool {
        !matches!(self, Arch::Qwen2 | Arch::Llama)
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

/// Grouped-query attention (Qwen3-MoE, Mixtral, Qwen2, Llama).
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
    /// Llama 3.1's frequency-dependent interpolation: wavelengths longer
    /// than `original / low_freq_factor` are divided by `factor`, shorter
    /// than `original / high_freq_factor` kept, the band between blended.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
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

impl MoeConfig {
    /// A dense model's: no routed experts (and no MoE layers use it).
    pub fn none() -> Self {
        MoeConfig {
            n_routed_experts: 0,
            experts_per_tok: 0,
            moe_intermediate_size: 0,
            n_shared_experts: 0,
            scoring: ScoringFunc::Softmax,
            topk_method: TopkMethod::Greedy,
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: false,
            routed_scaling_factor: 1.0,
        }
    }
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
    /// DeepSeek-V3's multi-token-prediction modules
    /// (`num_nextn_predict_layers`), stored as layers `num_layers..`; 0
    /// when [`from_dir`](Self::from_dir) finds the checkpoint without them.
    pub mtp_layers: usize,
}

mod fields;
mod moe;
mod rope;
mod tensors;

use moe::{parse_moe, parse_quantization};
use rope::parse_rope;
#[cfg(test)]
mod tests;

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
        // Configs saved by transformers declare the module but drop its weights.
        if cfg.mtp_layers > 0 && !tensors::has_tensor(dir, &format!("model.layers.{}.eh_proj.weight", cfg.num_layers))?
        {
            cfg.mtp_layers = 0;
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
            Arch::Qwen3Moe | Arch::Mixtral | Arch::Qwen2 | Arch::Llama => {
                let head_dim = f.usize_or("head_dim", hidden_size / num_heads)?;
                let sliding = match arch {
                    Arch::Qwen3Moe if !f.bool_or("use_sliding_window", false)? => None,
                    // Qwen2 windows only the layers from `max_window_layers`
                    // on; no R1 distill enables it, so it is refused rather
                    // than approximated.
                    Arch::Qwen2 if f.bool_or("use_sliding_window", false)? => {
                        return Err(SpecError::Unsupported {
                            field: "use_sliding_window".into(),
                            value: "true for qwen2 (per-layer sliding windows are not implemented)".into(),
                        });
                    }
                    Arch::Qwen2 | Arch::Llama => None,
                    _ => f.opt_usize("sliding_window")?,
                };
                let gqa = GqaConfig {
                    num_heads,
                    num_kv_heads: f.usize_or("num_key_value_heads", num_heads)?,
                    head_dim,
                    qk_norm: arch == Arch::Qwen3Moe,
                    // Qwen2's q/k/v projections always carry biases.
                    attention_bias: arch == Arch::Qwen2 || f.bool_or("attention_bias", false)?,
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
            mtp_layers: if arch == Arch::DeepseekV3 { f.usize_or("num_nextn_predict_layers", 0)? } else { 0 },
        })
    }

    /// Indices of the layers whose FFN is a routed MoE, the MTP module's
    /// layer (`num_layers`, MoE as the layers before it) among them: its
    /// experts are placed and dispatched like the others.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        let mtp = (self.mtp_layers > 0 && self.layer_ffn.last() == Some(&FfnKind::Moe)).then_some(self.num_layers);
        self.layer_ffn.iter().enumerate().filter(|(_, k)| **k == FfnKind::Moe).map(|(i, _)| i).chain(mtp)
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
