//! config.json parsing: both rope spellings, dense and MoE shapes, errors.

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

/// R1-Distill-Llama-8B's config.json, shrunk: the published spelling
/// (`rope_scaling` with `rope_type`, `rope_theta` at the top level).
const LLAMA: &str = r#"{"model_type":"llama","vocab_size":100,"hidden_size":64,"num_hidden_layers":2,
    "num_attention_heads":4,"num_key_value_heads":2,"intermediate_size":96,"max_position_embeddings":512,
    "rope_theta":500000.0,"rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
    "original_max_position_embeddings":64,"rope_type":"llama3"},"tie_word_embeddings":false,
    "bos_token_id":0,"eos_token_id":[1,2]}"#;

#[test]
fn dense_models_have_no_moe_layers() {
    let c = ModelConfig::from_json_str(LLAMA).unwrap();
    assert_eq!(c.arch, Arch::Llama);
    assert!(!c.arch.is_moe());
    assert_eq!(c.layer_ffn, vec![FfnKind::Dense; 2]);
    assert_eq!(c.moe_layers().count(), 0);
    assert_eq!(c.eos_token_ids, vec![1, 2]);
    let RopeScaling::Llama3 { factor, original_max_position_embeddings, .. } = c.rope.scaling else { panic!() };
    assert_eq!((factor, original_max_position_embeddings), (8.0, 64));
    let AttentionConfig::Gqa(g) = &c.attention else { panic!() };
    assert_eq!((g.num_kv_heads, g.head_dim, g.attention_bias), (2, 16, false));
    // The rope_parameters spelling (transformers ≥ 5) is the same model.
    let new =
        LLAMA.replace(r#""rope_theta":500000.0,"rope_scaling":{"#, r#""rope_parameters":{"rope_theta":500000.0,"#);
    let b = ModelConfig::from_json_str(&new).unwrap();
    assert_eq!((b.rope.scaling, b.rope.theta), (c.rope.scaling, c.rope.theta));

    let q = LLAMA.replace(r#""model_type":"llama""#, r#""model_type":"qwen2","use_sliding_window":false"#);
    let q = ModelConfig::from_json_str(&q).unwrap();
    let AttentionConfig::Gqa(g) = &q.attention else { panic!() };
    assert!(g.attention_bias, "qwen2 always has q/k/v biases");
    assert_eq!(q.moe.n_routed_experts, 0);
}

#[test]
fn dense_config_errors_name_the_field() {
    let e = ModelConfig::from_json_str(&LLAMA.replace(r#""low_freq_factor":1.0,"#, "")).unwrap_err();
    assert!(e.to_string().contains("rope_scaling.low_freq_factor"), "{e}");
    let e = ModelConfig::from_json_str(&LLAMA.replace(r#""high_freq_factor":4.0"#, r#""high_freq_factor":0.5"#))
        .unwrap_err();
    assert!(e.to_string().contains("low_freq_factor < high_freq_factor"), "{e}");
    let e = ModelConfig::from_json_str(
        &LLAMA.replace(r#""model_type":"llama""#, r#""model_type":"qwen2","use_sliding_window":true"#),
    )
    .unwrap_err();
    assert!(e.to_string().contains("use_sliding_window"), "{e}");
    let e = ModelConfig::from_json_str(&LLAMA.replace(r#""intermediate_size":96,"#, "")).unwrap_err();
    assert!(e.to_string().contains("intermediate_size"), "{e}");
}

#[test]
fn errors_name_the_field() {
    let e = ModelConfig::from_json_str(&V3.replace("deepseek_v3", "gpt_neox")).unwrap_err();
    assert!(e.to_string().contains("model_type"), "{e}");
    let e = ModelConfig::from_json_str(&V3.replace(r#""kv_lora_rank":32,"#, "")).unwrap_err();
    assert!(e.to_string().contains("kv_lora_rank"), "{e}");
    let e = ModelConfig::from_json_str(&V3.replace(r#""type":"yarn""#, r#""type":"longrope""#)).unwrap_err();
    assert!(e.to_string().contains("rope_scaling.rope_type"), "{e}");
    let e = ModelConfig::from_json_str(&V3.replace(r#""n_group":4"#, r#""n_group":3"#)).unwrap_err();
    assert!(e.to_string().contains("n_group"), "{e}");
    let e =
        ModelConfig::from_json_str(&V3.replace(r#""n_group":4"#, r#""topk_method":"greedy","n_group":4"#)).unwrap_err();
    assert!(e.to_string().contains("topk_method"), "{e}");
}
