//! Random checkpoints in Hugging Face layout, for demos, tests and
//! benchmarks without downloads: `config.json`, `model.safetensors`,
//! `generation_config.json`, a byte-level BPE `tokenizer.json` trained on a
//! built-in corpus, and a `tokenizer_config.json` with a chat template.

use crate::config::Arch;
use crate::error::{ModelError, Result};
use crate::tensor::f32_to_bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{Value, json};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenDtype {
    F32,
    Bf16,
}

/// Sizes of a generated model. Fields that an architecture does not use
/// (e.g. `kv_lora_rank` for Mixtral) are ignored.
#[derive(Debug, Clone)]
pub struct GenSpec {
    pub arch: Arch,
    pub seed: u64,
    pub dtype: GenDtype,
    /// Upper bound: the trained tokenizer's size is used if smaller.
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub n_experts: usize,
    pub experts_per_tok: usize,
    pub n_shared_experts: usize,
    pub first_k_dense: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub max_position_embeddings: usize,
    /// A DeepSeek-V3 MTP module after the last layer (random, like the rest).
    pub mtp: bool,
    /// Text to train the tokenizer on instead of the built-in corpus (which
    /// holds a few thousand tokens' worth): a vocabulary as large as a
    /// production model's (DeepSeek-V3's 129,280) needs a large text.
    pub tokenizer_corpus: Option<std::path::PathBuf>,
}

impl GenSpec {
    /// A small model that loads and generates in well under a second.
    pub fn demo(arch: Arch) -> Self {
        GenSpec {
            arch,
            seed: 0,
            dtype: GenDtype::Bf16,
            vocab_size: 2048,
            hidden_size: 256,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 64,
            intermediate_size: 512,
            moe_intermediate_size: 128,
            n_experts: 16,
            experts_per_tok: 4,
            n_shared_experts: 1,
            first_k_dense: 1,
            n_group: 4,
            topk_group: 2,
            q_lora_rank: Some(128),
            kv_lora_rank: 64,
            qk_nope_head_dim: 32,
            qk_rope_head_dim: 16,
            v_head_dim: 32,
            max_position_embeddings: 4096,
            mtp: false,
            tokenizer_corpus: None,
        }
    }
}

const BOS: &str = "<｜begin▁of▁sentence｜>";
const EOS: &str = "<｜end▁of▁sentence｜>";
const SPECIALS: [&str; 6] = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"];
/// A DeepSeek-R1-style template: the assistant turn opens with `<think>`.
/// With `tools`, a preamble lists them and says how to call one in
/// DeepSeek-V3's markup; assistant calls and `tool` results are rendered in
/// that markup too.
const CHAT_TEMPLATE: &str = concat!(
    "{{ bos_token }}",
    "{% if tools %}## Tools\nCall a function by answering <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function",
    "<｜tool▁sep｜>NAME\n```json\nARGUMENTS\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>\n",
    "{% for t in tools %}### {{ t['function']['name'] }}\n{{ t['function']['description'] }}\n",
    "Parameters: {{ t['function']['parameters'] | tojson }}\n{% endfor %}{% endif %}",
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}",
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}",
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}",
    "{% if m['tool_calls'] %}<｜tool▁calls▁begin｜>{% for c in m['tool_calls'] %}<｜tool▁call▁begin｜>",
    "{{ c['type'] }}<｜tool▁sep｜>{{ c['function']['name'] }}\n```json\n{{ c['function']['arguments'] }}\n```",
    "<｜tool▁call▁end｜>{% endfor %}<｜tool▁calls▁end｜>{% endif %}<｜end▁of▁sentence｜>",
    "{% elif m['role'] == 'tool' %}<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{{ m['content'] }}",
    "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>{% endif %}{% endfor %}",
    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}",
);
const CORPUS: &str = include_str!("genmodel_corpus.txt");

/// Writes a complete random checkpoint into `out`.
pub fn generate_checkpoint(spec: &GenSpec, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let vocab = write_tokenizer(out, spec.vocab_size, spec.tokenizer_corpus.as_deref())?;
    let config = config_json(spec, vocab);
    write_json(&out.join("config.json"), &config)?;
    write_json(
        &out.join("generation_config.json"),
        &json!({"bos_token_id": 0, "eos_token_id": 1, "do_sample": false}),
    )?;
    write_json(
        &out.join("tokenizer_config.json"),
        &json!({"bos_token": BOS, "eos_token": EOS, "add_bos_token": false, "chat_template": CHAT_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": spec.max_position_embeddings}),
    )?;
    write_weights(spec, vocab, out)
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| expertmesh_spec::SpecError::Config(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}

fn write_tokenizer(out: &Path, max_vocab: usize, corpus: Option<&Path>) -> Result<usize> {
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, NormalizerWrapper, PostProcessorWrapper, TokenizerBuilder};
    let err = |e: tokenizers::Error| ModelError::Tokenizer(e.to_string());
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(max_vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(SPECIALS.iter().map(|s| AddedToken::from(*s, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, PostProcessorWrapper, ByteLevel>::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(err)?;
    let text = match corpus {
        Some(p) => std::fs::read_to_string(p).map_err(|e| ModelError::io(p, e))?,
        None => CORPUS.to_string(),
    };
    tok.train(&mut trainer, text.lines().map(str::to_string)).map_err(err)?;
    let path = out.join("tokenizer.json");
    tok.save(&path, false).map_err(err)?;
    Ok(tok.get_vocab_size(true))
}

fn config_json(s: &GenSpec, vocab: usize) -> Value {
    let mut c = json!({
        "vocab_size": vocab, "hidden_size": s.hidden_size, "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads, "intermediate_size": s.intermediate_size,
        "max_position_embeddings": s.max_position_embeddings, "rms_norm_eps": 1e-6, "bos_token_id": 0,
        "eos_token_id": 1, "tie_word_embeddings": false, "hidden_act": "silu", "initializer_range": 0.02,
        "torch_dtype": match s.dtype { GenDtype::F32 => "float32", GenDtype::Bf16 => "bfloat16" },
        "model_type": s.arch.name(),
    });
    let extra = match s.arch {
        Arch::DeepseekV3 | Arch::DeepseekV2 => {
            let v3 = s.arch == Arch::DeepseekV3;
            json!({
                "architectures": [if v3 { "DeepseekV3ForCausalLM" } else { "DeepseekV2ForCausalLM" }],
                "num_key_value_heads": s.num_heads, "q_lora_rank": s.q_lora_rank, "kv_lora_rank": s.kv_lora_rank,
                "qk_nope_head_dim": s.qk_nope_head_dim, "qk_rope_head_dim": s.qk_rope_head_dim,
                "v_head_dim": s.v_head_dim, "n_routed_experts": s.n_experts, "n_shared_experts": s.n_shared_experts,
                "num_experts_per_tok": s.experts_per_tok, "moe_intermediate_size": s.moe_intermediate_size,
                "first_k_dense_replace": s.first_k_dense, "moe_layer_freq": 1, "n_group": s.n_group,
                "topk_group": s.topk_group,
                "topk_method": if v3 { "noaux_tc" } else { "group_limited_greedy" },
                "scoring_func": if v3 { "sigmoid" } else { "softmax" },
                "norm_topk_prob": v3, "routed_scaling_factor": if v3 { 2.5 } else { 1.0 },
                "rope_theta": 10000.0, "rope_interleave": true,
                "num_nextn_predict_layers": usize::from(v3 && s.mtp),
            })
        }
        Arch::Qwen3Moe => json!({
            "architectures": ["Qwen3MoeForCausalLM"], "num_key_value_heads": s.num_kv_heads, "head_dim": s.head_dim,
            "num_experts": s.n_experts, "num_experts_per_tok": s.experts_per_tok,
            "moe_intermediate_size": s.moe_intermediate_size, "norm_topk_prob": true, "decoder_sparse_step": 1,
            "mlp_only_layers": (0..s.first_k_dense).collect::<Vec<_>>(), "rope_theta": 1000000.0,
        }),
        Arch::Mixtral => json!({
            "architectures": ["MixtralForCausalLM"], "num_key_value_heads": s.num_kv_heads, "head_dim": s.head_dim,
            "num_local_experts": s.n_experts, "num_experts_per_tok": s.experts_per_tok,
            "intermediate_size": s.moe_intermediate_size, "rope_theta": 1000000.0,
        }),
        // Qwen2's head width is always hidden / heads (it has no head_dim field).
        Arch::Qwen2 => json!({
            "architectures": ["Qwen2ForCausalLM"], "num_key_value_heads": s.num_kv_heads,
            "tie_word_embeddings": true, "use_sliding_window": false, "rope_theta": 10000.0,
        }),
        // R1-Distill-Llama's RoPE, with the original context a quarter of the
        // generated one so the scaling matters.
        Arch::Llama => json!({
            "architectures": ["LlamaForCausalLM"], "num_key_value_heads": s.num_kv_heads, "head_dim": s.head_dim,
            "rope_theta": 500000.0, "attention_bias": false, "mlp_bias": false,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": (s.max_position_embeddings / 4).max(1)},
        }),
    };
    if let (Value::Object(a), Value::Object(b)) = (&mut c, extra) {
        a.extend(b);
    }
    c
}

/// Tensor names and shapes of the checkpoint, in a stable order.
fn tensor_shapes(s: &GenSpec, vocab: usize) -> Vec<(String, Vec<usize>)> {
    let h = s.hidden_size;
    let mut t: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![vocab, h])];
    let ds = matches!(s.arch, Arch::DeepseekV3 | Arch::DeepseekV2);
    let mtp = s.mtp && s.arch == Arch::DeepseekV3;
    for l in 0..s.num_layers + usize::from(mtp) {
        let p = format!("model.layers.{l}.");
        if l == s.num_layers {
            // DeepSeek's MTP module: its own norms and projection; its copies
            // of the embeddings and head are added at the end.
            for n in ["enorm", "hnorm", "shared_head.norm"] {
                t.push((format!("{p}{n}.weight"), vec![h]));
            }
            t.push((format!("{p}eh_proj.weight"), vec![h, 2 * h]));
        }
        let a = format!("{p}self_attn.");
        t.push((format!("{p}input_layernorm.weight"), vec![h]));
        t.push((format!("{p}post_attention_layernorm.weight"), vec![h]));
        if ds {
            let qd = s.qk_nope_head_dim + s.qk_rope_head_dim;
            match s.q_lora_rank {
                None => t.push((format!("{a}q_proj.weight"), vec![s.num_heads * qd, h])),
                Some(r) => {
                    t.push((format!("{a}q_a_proj.weight"), vec![r, h]));
                    t.push((format!("{a}q_a_layernorm.weight"), vec![r]));
                    t.push((format!("{a}q_b_proj.weight"), vec![s.num_heads * qd, r]));
                }
            }
            t.push((format!("{a}kv_a_proj_with_mqa.weight"), vec![s.kv_lora_rank + s.qk_rope_head_dim, h]));
            t.push((format!("{a}kv_a_layernorm.weight"), vec![s.kv_lora_rank]));
            t.push((
                format!("{a}kv_b_proj.weight"),
                vec![s.num_heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank],
            ));
            t.push((format!("{a}o_proj.weight"), vec![h, s.num_heads * s.v_head_dim]));
        } else {
            let head_dim = if s.arch == Arch::Qwen2 { h / s.num_heads } else { s.head_dim };
            let (qd, kvd) = (s.num_heads * head_dim, s.num_kv_heads * head_dim);
            for (n, d) in [("q", qd), ("k", kvd), ("v", kvd)] {
                t.push((format!("{a}{n}_proj.weight"), vec![d, h]));
                if s.arch == Arch::Qwen2 {
                    t.push((format!("{a}{n}_proj.bias"), vec![d]));
                }
            }
            t.push((format!("{a}o_proj.weight"), vec![h, qd]));
            if s.arch == Arch::Qwen3Moe {
                t.push((format!("{a}q_norm.weight"), vec![s.head_dim]));
                t.push((format!("{a}k_norm.weight"), vec![s.head_dim]));
            }
        }
        let mlp = |t: &mut Vec<(String, Vec<usize>)>, pre: &str, names: [&str; 3], inter: usize| {
            t.push((format!("{pre}{}.weight", names[0]), vec![inter, h]));
            t.push((format!("{pre}{}.weight", names[1]), vec![inter, h]));
            t.push((format!("{pre}{}.weight", names[2]), vec![h, inter]));
        };
        let dense = !s.arch.is_moe() || (l < s.first_k_dense && s.arch != Arch::Mixtral);
        let swiglu = ["gate_proj", "up_proj", "down_proj"];
        if dense {
            mlp(&mut t, &format!("{p}mlp."), swiglu, s.intermediate_size);
            continue;
        }
        let m = if s.arch == Arch::Mixtral { "block_sparse_moe" } else { "mlp" };
        t.push((format!("{p}{m}.gate.weight"), vec![s.n_experts, h]));
        if s.arch == Arch::DeepseekV3 {
            t.push((format!("{p}mlp.gate.e_score_correction_bias"), vec![s.n_experts]));
        }
        for e in 0..s.n_experts {
            if s.arch == Arch::Mixtral {
                mlp(&mut t, &format!("{p}block_sparse_moe.experts.{e}."), ["w1", "w3", "w2"], s.moe_intermediate_size);
            } else {
                mlp(&mut t, &format!("{p}mlp.experts.{e}."), swiglu, s.moe_intermediate_size);
            }
        }
        if ds && s.n_shared_experts > 0 {
            mlp(&mut t, &format!("{p}mlp.shared_experts."), swiglu, s.moe_intermediate_size * s.n_shared_experts);
        }
    }
    t.push(("model.norm.weight".into(), vec![h]));
    if s.arch != Arch::Qwen2 {
        t.push(("lm_head.weight".into(), vec![vocab, h]));
    }
    if mtp {
        let p = format!("model.layers.{}.", s.num_layers);
        t.push((format!("{p}embed_tokens.weight"), vec![vocab, h]));
        t.push((format!("{p}shared_head.head.weight"), vec![vocab, h]));
    }
    t
}

/// The tensor an MTP copy repeats (DeepSeek stores the embeddings and the
/// head again in the module).
fn copy_of(name: &str) -> Option<&'static str> {
    if name.ends_with(".embed_tokens.weight") && name != "model.embed_tokens.weight" {
        Some("model.embed_tokens.weight")
    } else if name.ends_with("shared_head.head.weight") {
        Some("lm_head.weight")
    } else {
        None
    }
}

fn write_weights(s: &GenSpec, vocab: usize, out: &Path) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    // Uniform with the std of HF's normal(0, 0.02) init, scaled up for small
    // widths so a demo model's logits are not flat.
    let std = 0.02f32.max(0.5 / (s.hidden_size as f32).sqrt());
    let bound = std * 3f32.sqrt();
    let mut buffers: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = Vec::new();
    for (name, shape) in tensor_shapes(s, vocab) {
        if let Some(src) = copy_of(&name).and_then(|c| buffers.iter().find(|b| b.0 == c)) {
            let (dtype, bytes) = (src.2, src.3.clone());
            buffers.push((name, shape, dtype, bytes));
            continue;
        }
        let n: usize = shape.iter().product();
        let is_norm = name.ends_with("norm.weight");
        let is_bias = name.ends_with("bias");
        let vals = (0..n).map(|_| {
            if is_norm {
                1.0 + rng.random_range(-0.1..0.1f32)
            } else if is_bias {
                rng.random_range(-0.01..0.01f32)
            } else {
                rng.random_range(-bound..bound)
            }
        });
        // Gates and correction biases stay f32, as transformers keeps them.
        let keep_f32 = s.dtype == GenDtype::F32 || name.ends_with("correction_bias") || name.ends_with("gate.weight");
        let (dtype, bytes): (Dtype, Vec<u8>) = if keep_f32 {
            (Dtype::F32, vals.flat_map(f32::to_le_bytes).collect())
        } else {
            (Dtype::BF16, vals.flat_map(|v| f32_to_bf16(v).to_le_bytes()).collect())
        };
        buffers.push((name, shape, dtype, bytes));
    }
    let views = buffers
        .iter()
        .map(|(n, shape, d, b)| {
            TensorView::new(*d, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| ModelError::Weights(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let path = out.join("model.safetensors");
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &path)
        .map_err(|e| ModelError::Weights(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{SamplingParams, generate};
    use crate::model::Model;
    use crate::tokenizer::{ChatMessage, TextTokenizer};

    #[test]
    fn every_arch_generates_loads_and_runs() {
        for arch in [Arch::DeepseekV3, Arch::DeepseekV2, Arch::Qwen3Moe, Arch::Mixtral, Arch::Qwen2, Arch::Llama] {
            let dir = std::env::temp_dir().join(format!("em-gen-{}-{}", arch.name(), std::process::id()));
            let mut spec = GenSpec::demo(arch);
            spec.hidden_size = 64;
            spec.num_layers = 2;
            generate_checkpoint(&spec, &dir).unwrap();
            let m = Model::load(&dir, crate::tensor::Precision::F32, &mut |_, _| {}).unwrap();
            let tok = TextTokenizer::from_dir(&dir).unwrap();
            assert_eq!(tok.vocab_size(), m.config().vocab_size);
            let text = tok.apply_chat_template(&[ChatMessage::new("user", "Hello there")], true).unwrap();
            assert!(text.starts_with(BOS) && text.ends_with("<think>\n"), "{text}");
            let ids = tok.encode(&text).unwrap();
            assert_eq!(ids[0], 0, "BOS is a single special token");
            assert_eq!(tok.decode(&tok.encode("hello world").unwrap(), true).unwrap(), "hello world");
            let g = generate(&m, &ids, 5, SamplingParams::default(), true, |_, _| {}).unwrap();
            assert_eq!(g.token_ids.len(), 5);
            // Streaming pieces add up to the full decode, multi-byte characters included.
            let text = "héllo wörld, 漢字 and emoji 🙂 done";
            let ids = tok.encode(text).unwrap();
            let mut d = crate::tokenizer::IncrementalDecoder::default();
            let streamed: String = ids.iter().filter_map(|&i| d.push(&tok, i)).collect();
            assert_eq!(streamed, tok.decode(&ids, true).unwrap());
            std::fs::remove_dir_all(&dir).ok();
        }
    }

    /// A corpus of its own trains the tokenizer: its one word becomes a
    /// single token; a missing file is an error that names it.
    #[test]
    fn a_corpus_file_trains_the_tokenizer() {
        let dir = std::env::temp_dir().join(format!("em-gen-corpus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let corpus = dir.join("corpus.txt");
        std::fs::write(&corpus, "quokkazyzzyva\n".repeat(50)).unwrap();
        let mut spec = GenSpec::demo(Arch::Llama);
        (spec.hidden_size, spec.num_layers, spec.tokenizer_corpus) = (64, 1, Some(corpus.clone()));
        let out = dir.join("model");
        generate_checkpoint(&spec, &out).unwrap();
        let tok = TextTokenizer::from_dir(&out).unwrap();
        assert_eq!(tok.encode("quokkazyzzyva").unwrap().len(), 1);
        spec.tokenizer_corpus = Some(dir.join("absent.txt"));
        let e = generate_checkpoint(&spec, &out).unwrap_err();
        assert!(e.to_string().contains("absent.txt"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
