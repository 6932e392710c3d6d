#!/usr/bin/env python3
"""Builds the golden fixtures: small random checkpoints made by Hugging Face
transformers, with reference logits and greedy continuations.

Dev-only (needs torch + transformers; CI does not run it):

    python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors
    .venv/bin/python tools/make_fixtures.py tests/fixtures

Each case directory holds a checkpoint (config.json, model.safetensors,
generation_config.json) and reference.json:
  prompt_ids, prompt_logits ([P][V], every prompt position),
  greedy_ids (N tokens, EOS ignored), greedy_logits ([N][V], the logits that
  chose each greedy token), transformers_version.

The reference always computes in float32: bf16 checkpoints are upcast
exactly, FP8 checkpoints are dequantized with their block scales, so a
correct engine matches to ~1e-4 whatever the storage dtype.
"""
import json
import math
import os
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file

VOCAB = 256
N_GREEDY = 8


def perturb(model, seed):
    """Non-trivial norm weights and correction biases, so a misplaced norm or
    an ignored bias changes the logits."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith(".bias"):
                # transformers zero-initialises biases: an ignored one would not show.
                p.copy_((torch.rand(p.shape, generator=g) - 0.5) * 0.4)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_((torch.rand(b.shape, generator=g) - 0.5) * 0.2)


def reference(model, prompt):
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        prompt_logits = model(ids).logits[0].float()
        greedy, greedy_logits = [], []
        seq = list(prompt)
        for _ in range(N_GREEDY):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            tok = int(torch.argmax(logits))
            greedy.append(tok)
            greedy_logits.append(logits.tolist())
            seq.append(tok)
    return {
        "prompt_ids": prompt,
        "prompt_logits": prompt_logits.tolist(),
        "greedy_ids": greedy,
        "greedy_logits": greedy_logits,
        "transformers_version": transformers.__version__,
    }


def quantize_fp8(path, block):
    """Rewrites model.safetensors with DeepSeek's FP8 layout: e4m3 weights plus
    `weight_scale_inv` per block for every projection except embeddings, LM
    head and gates. Returns the dequantized state dict (the reference)."""
    sd = load_file(os.path.join(path, "model.safetensors"))
    out, deq = {}, {}
    fmax = torch.finfo(torch.float8_e4m3fn).max
    for k, w in sd.items():
        quant = (w.dim() == 2 and k.endswith("proj.weight")) and "embed" not in k
        if not quant:
            out[k] = w
            deq[k] = w
            continue
        r, c = w.shape
        br, bc = block
        sr, sc = math.ceil(r / br), math.ceil(c / bc)
        scale = torch.zeros(sr, sc)
        q = torch.zeros(r, c, dtype=torch.float8_e4m3fn)
        for i in range(sr):
            for j in range(sc):
                blk = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float()
                s = blk.abs().max().clamp(min=1e-12) / fmax
                scale[i, j] = s
                q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (blk / s).to(torch.float8_e4m3fn)
        out[k] = q
        out[k + "_scale_inv"] = scale
        deq[k] = q.float() * scale.repeat_interleave(br, 0)[:r].repeat_interleave(bc, 1)[:, :c]
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return deq


def build(case, root):
    name, cls_cfg, cls_model, kw, opts = case
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(opts["seed"])
    cfg = cls_cfg(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, **{"tie_word_embeddings": False, **kw})
    cfg._attn_implementation = "eager"
    model = cls_model(cfg)
    perturb(model, opts["seed"])
    dtype = opts.get("dtype", torch.float32)
    model.to(dtype).save_pretrained(path)
    if opts.get("legacy_rope"):
        # Published DeepSeek checkpoints spell rope settings the old way.
        c = json.load(open(os.path.join(path, "config.json")))
        rp = c.pop("rope_parameters")
        c["rope_theta"] = rp.pop("rope_theta")
        # DeepSeek's files say "type"; Llama 3's say "rope_type".
        if opts["legacy_rope"] != "rope_type":
            rp["type"] = rp.pop("rope_type")
        c["rope_scaling"] = rp
        json.dump(c, open(os.path.join(path, "config.json"), "w"), indent=2)
    ref_path = path
    if "fp8_block" in opts:
        deq = quantize_fp8(path, opts["fp8_block"])
        # The reference loads the dequantized weights through from_pretrained,
        # which maps per-expert keys onto transformers' fused expert tensors
        # (load_state_dict would silently skip them).
        ref_path = path + ".deq"
        os.makedirs(ref_path, exist_ok=True)
        save_file(deq, os.path.join(ref_path, "model.safetensors"), metadata={"format": "pt"})
        for f in ("config.json", "generation_config.json"):
            with open(os.path.join(path, f)) as src, open(os.path.join(ref_path, f), "w") as dst:
                dst.write(src.read())
        c = json.load(open(os.path.join(path, "config.json")))
        c["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(opts["fp8_block"]),
        }
        json.dump(c, open(os.path.join(path, "config.json"), "w"), indent=2)
    ref_model = cls_model.from_pretrained(ref_path, dtype=torch.float32, attn_implementation="eager")
    if ref_path != path:
        import shutil
        shutil.rmtree(ref_path)
    g = torch.Generator().manual_seed(opts["seed"] + 2)
    prompt = [int(t) for t in torch.randint(2, VOCAB, (opts.get("prompt_len", 7),), generator=g)]
    ref = reference(ref_model, prompt)
    ref["case"] = name
    ref["storage_dtype"] = opts.get("storage", str(dtype).replace("torch.", ""))
    with open(os.path.join(path, "reference.json"), "w") as f:
        json.dump(ref, f)
    print(name, "greedy", ref["greedy_ids"])


def cases():
    from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
                              LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)
    ds = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8,
              qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1, initializer_range=0.1,
              max_position_embeddings=64)
    v3 = dict(ds, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
              routed_scaling_factor=2.5, norm_topk_prob=True)
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8,
            "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}
    return [
        ("deepseek_v3_yarn_bf16", DeepseekV3Config, DeepseekV3ForCausalLM,
         dict(v3, q_lora_rank=24, rope_parameters=yarn, rope_interleave=True),
         dict(seed=1, dtype=torch.bfloat16, legacy_rope=True)),
        ("deepseek_v3_qnull", DeepseekV3Config, DeepseekV3ForCausalLM,
         dict(v3, q_lora_rank=None, rope_interleave=False, rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
         dict(seed=2)),
        ("deepseek_v3_fp8", DeepseekV3Config, DeepseekV3ForCausalLM,
         dict(v3, hidden_size=160, intermediate_size=192, moe_intermediate_size=80, q_lora_rank=48),
         dict(seed=3, fp8_block=(128, 128), storage="float8_e4m3fn")),
        ("deepseek_v2_lite", DeepseekV2Config, DeepseekV2ForCausalLM,
         dict(ds, q_lora_rank=None, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=3,
              topk_method="greedy", routed_scaling_factor=1.0),
         dict(seed=4)),
        ("deepseek_v2_group", DeepseekV2Config, DeepseekV2ForCausalLM,
         dict(ds, q_lora_rank=24, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=3,
              topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5),
         dict(seed=5)),
        ("qwen3_moe", Qwen3MoeConfig, Qwen3MoeForCausalLM,
         dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
              norm_topk_prob=True, mlp_only_layers=[1], initializer_range=0.1, max_position_embeddings=64),
         dict(seed=6)),
        ("mixtral", MixtralConfig, MixtralForCausalLM,
         dict(hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, initializer_range=0.1,
              max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
         dict(seed=7)),
        # R1-Distill-Qwen-1.5B's shape in small: q/k/v biases, GQA, tied embeddings.
        ("qwen2_tied_bf16", Qwen2Config, Qwen2ForCausalLM,
         dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False, initializer_range=0.1,
              max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
         dict(seed=8, dtype=torch.bfloat16)),
        # R1-Distill-Llama's: Llama 3 RoPE scaling in the published spelling
        # (original context 32 so every band of the scaling is exercised),
        # GQA, an untied head. The prompt runs past the original context.
        ("llama3", LlamaConfig, LlamaForCausalLM,
         dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, initializer_range=0.1, max_position_embeddings=128,
              rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 32}),
         dict(seed=9, legacy_rope="rope_type", prompt_len=40)),
    ]


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
    only = set(sys.argv[2:])
    for c in cases():
        if not only or c[0] in only:
            build(c, root)
