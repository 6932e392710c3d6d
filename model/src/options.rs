//! How weights are loaded and multiplied: the flags every command that runs
//! the model shares (`generate`, `bench --model`, the router, expert nodes),
//! declared once here and flattened into each command.

use crate::kernels::quant::{GROUPS, QuantFormat};
use crate::tensor::Precision;

/// Which weights `--quantize` turns into integer codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantTarget {
    /// The routed experts (almost all of an MoE model's bytes).
    Routed,
    /// The shared experts.
    Shared,
    /// Everything else that is multiplied whole: attention projections,
    /// dense MLP layers (MLA's absorbed `kv_b` halves among them), the
    /// embeddings and the LM head. The gates stay as they are.
    Dense,
}

/// Activations for products with bf16 weights, as asked for by
/// `--precision`; [`resolve`](Self::resolve) turns it into the mode the
/// kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PrecisionChoice {
    /// Follow the checkpoint, as vLLM's `dtype=auto` does: bf16 activations
    /// against bf16 weights where the CPU's bf16 dot products beat f32
    /// FMAs, f32 elsewhere. f32, F16 and FP8 weights take f32 activations
    /// in every mode, so an f32 checkpoint stays exact.
    #[default]
    Auto,
    /// f32 activations: exact against transformers in float32.
    F32,
    /// bf16 activations: what torch does in bfloat16.
    Bf16,
}

impl PrecisionChoice {
    /// The mode for bf16 weights on this CPU.
    pub fn resolve(self) -> Precision {
        match self {
            PrecisionChoice::Auto if crate::kernels::bf16_dot_is_fast() => Precision::Bf16,
            PrecisionChoice::Auto | PrecisionChoice::F32 => Precision::F32,
            PrecisionChoice::Bf16 => Precision::Bf16,
        }
    }
}

impl From<Precision> for PrecisionChoice {
    fn from(p: Precision) -> Self {
        match p {
            Precision::F32 => PrecisionChoice::F32,
            Precision::Bf16 => PrecisionChoice::Bf16,
        }
    }
}

/// Weight loading options.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct WeightArgs {
    /// Activations in products with bf16 weights: `auto` (the default:
    /// bf16 where the CPU's bf16 dot products are faster, which is AMD Zen
    /// 4 and later; f32 elsewhere), `f32` (exact against transformers in
    /// float32) or `bf16` (what torch does in bfloat16; AVX512-BF16 where
    /// the CPU has it). f32, F16 and FP8 weights and the gates always run
    /// in f32; quantized weights always take int8 activations.
    #[arg(long, value_enum, env = "EXPERTMESH_PRECISION", default_value = "auto")]
    pub precision: PrecisionChoice,
    /// Quantize weights at load (from bf16, f32, f16 or FP8 checkpoints):
    /// `int8` (1.06 bytes per weight) or `int4` (0.56), symmetric codes
    /// with one f16 scale per `--quantize-group` columns; activations are
    /// quantized to int8 per token with the same groups. See
    /// `--quantize-targets` for which weights.
    #[arg(long, value_enum, env = "EXPERTMESH_QUANTIZE")]
    pub quantize: Option<QuantFormat>,
    /// Columns per quantization group: 32 (llama.cpp's Q8_0/Q4_0), 64, 128
    /// or 256 (fewer scales, less accuracy).
    #[arg(long, env = "EXPERTMESH_QUANTIZE_GROUP", default_value_t = 32, value_parser = parse_group)]
    pub quantize_group: usize,
    /// Weights `--quantize` applies to, comma-separated: `routed`,
    /// `shared`, `dense`.
    #[arg(long, value_enum, value_delimiter = ',', env = "EXPERTMESH_QUANTIZE_TARGETS", default_value = "routed")]
    pub quantize_targets: Vec<QuantTarget>,
    /// Round f32 and F16 weight matrices to bf16 as they are loaded: half
    /// an f32 checkpoint's memory and the bf16 kernels (gates stay f32;
    /// bf16, FP8 and quantized weights are unaffected).
    #[arg(long, env = "EXPERTMESH_LOAD_BF16")]
    pub load_bf16: bool,
}

fn parse_group(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(g) if GROUPS.contains(&g) => Ok(g),
        _ => Err(format!("must be one of {GROUPS:?}")),
    }
}

impl Default for WeightArgs {
    fn default() -> Self {
        WeightArgs::from(PrecisionChoice::Auto)
    }
}

impl From<Precision> for WeightArgs {
    fn from(precision: Precision) -> Self {
        WeightArgs::from(PrecisionChoice::from(precision))
    }
}

impl From<PrecisionChoice> for WeightArgs {
    fn from(precision: PrecisionChoice) -> Self {
        WeightArgs {
            precision,
            quantize: None,
            quantize_group: 32,
            quantize_targets: vec![QuantTarget::Routed],
            load_bf16: false,
        }
    }
}

impl WeightArgs {
    /// `(format, group)` for weights of kind `target`, if they are quantized.
    pub fn quant_for(&self, target: QuantTarget) -> Option<(QuantFormat, usize)> {
        let f = self.quantize?;
        self.quantize_targets.contains(&target).then_some((f, self.quantize_group))
    }

    /// Quantized in `format` with the default group, for `targets`.
    pub fn quantized(format: QuantFormat, targets: &[QuantTarget]) -> Self {
        WeightArgs { quantize: Some(format), quantize_targets: targets.to_vec(), ..WeightArgs::default() }
    }
}

/// The drafter of speculative decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Speculative {
    /// DeepSeek-V3's multi-token-prediction module drafts, the model verifies.
    Mtp,
}

/// Speculative decoding (offline `generate` and the router).
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct SpeculativeArgs {
    /// Speculative decoding with the checkpoint's MTP module (DeepSeek-V3's
    /// `num_nextn_predict_layers`): each step verifies one drafted token as
    /// an extra position, so output is unchanged and accepted drafts save
    /// a step each.
    #[arg(long, value_enum, env = "EXPERTMESH_SPECULATIVE")]
    pub speculative: Option<Speculative>,
    /// Draft tokens per step (only 1 is implemented: DeepSeek ships one
    /// MTP module).
    #[arg(long, default_value_t = 1, requires = "speculative", env = "EXPERTMESH_NUM_SPECULATIVE_TOKENS")]
    pub num_speculative_tokens: usize,
}

impl SpeculativeArgs {
    /// Whether MTP speculation is asked for, checked against the model;
    /// `Err((flag, why))` names the flag at fault.
    pub fn mtp(&self, model: &crate::model::Model) -> Result<bool, (&'static str, String)> {
        if self.speculative.is_none() {
            return Ok(false);
        }
        if self.num_speculative_tokens != 1 {
            let n = self.num_speculative_tokens;
            return Err(("--num-speculative-tokens", format!("only 1 draft token per step is implemented, got {n}")));
        }
        if !model.has_mtp() {
            return Err(("--speculative", "the checkpoint has no MTP module (num_nextn_predict_layers)".into()));
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        w: WeightArgs,
    }

    #[test]
    fn flags_parse_and_bad_groups_name_the_flag() {
        let c = Cli::try_parse_from(["x", "--quantize", "int4", "--quantize-targets", "routed,dense"]).unwrap();
        assert_eq!(c.w.quant_for(QuantTarget::Dense), Some((QuantFormat::Int4, 32)));
        assert_eq!(c.w.quant_for(QuantTarget::Shared), None);
        let c = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(c.w, WeightArgs::default());
        assert_eq!(c.w.precision, PrecisionChoice::Auto);
        let c = Cli::try_parse_from(["x", "--precision", "f32"]).unwrap();
        assert_eq!(c.w.precision.resolve(), Precision::F32);
        assert_eq!(c.w.quant_for(QuantTarget::Routed), None);
        let err = Cli::try_parse_from(["x", "--quantize", "int8", "--quantize-group", "48"]).err().unwrap();
        assert!(err.to_string().contains("--quantize-group"), "{err}");
    }
}
