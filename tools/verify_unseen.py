#!/usr/bin/env python3
"""Dev-only acceptance check: fresh random checkpoints made by transformers
(new seeds, options the committed fixtures do not cover) must give the same
greedy tokens and logprobs from `expertmesh generate --json` as transformers.

    .venv/bin/python tools/verify_unseen.py [path/to/expertmesh] [N_TOKENS]

Prints one line per case and exits non-zero on any mismatch. Reference is
float32 (bf16 checkpoints upcast), as in tools/make_fixtures.py.
"""
import json
import subprocess
import sys
import tempfile

import torch
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
                          LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/expertmesh"
N = int(sys.argv[2]) if len(sys.argv) > 2 else 12
TOL = 2e-4

base_ds = dict(vocab_size=300, hidden_size=96, intermediate_size=160, moe_intermediate_size=48, num_hidden_layers=4,
               num_attention_heads=6, num_key_value_heads=6, kv_lora_rank=48, qk_rope_head_dim=16,
               qk_nope_head_dim=32, v_head_dim=24, initializer_range=0.08, max_position_embeddings=128)
CASES = [
    ("v3 tied, attention_bias, yarn no mscale, bf16", DeepseekV3Config, DeepseekV3ForCausalLM,
     dict(base_ds, n_routed_experts=32, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
          first_k_dense_replace=2, q_lora_rank=40, attention_bias=True, tie_word_embeddings=True,
          rope_parameters={"rope_type": "yarn", "rope_theta": 20000.0, "factor": 2.0,
                           "original_max_position_embeddings": 32}, norm_topk_prob=False, routed_scaling_factor=1.7),
     torch.bfloat16, 11),
    ("v3 sharded, q_lora null, non-interleaved", DeepseekV3Config, DeepseekV3ForCausalLM,
     dict(base_ds, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
          first_k_dense_replace=0, q_lora_rank=None, rope_interleave=False), torch.float32, 12),
    ("v2 mlp_bias, group-limited", DeepseekV2Config, DeepseekV2ForCausalLM,
     dict(base_ds, n_routed_experts=24, n_shared_experts=2, num_experts_per_tok=4, n_group=4, topk_group=2,
          topk_method="group_limited_greedy", first_k_dense_replace=1, q_lora_rank=None, mlp_bias=True,
          routed_scaling_factor=2.0), torch.float32, 13),
    ("qwen3 attention_bias, sparse step 2, no norm_topk", Qwen3MoeConfig, Qwen3MoeForCausalLM,
     dict(vocab_size=300, hidden_size=96, intermediate_size=128, moe_intermediate_size=40, num_hidden_layers=4,
          num_attention_heads=6, num_key_value_heads=3, head_dim=24, num_experts=12, num_experts_per_tok=3,
          norm_topk_prob=False, decoder_sparse_step=2, attention_bias=True, initializer_range=0.08,
          max_position_embeddings=128), torch.bfloat16, 14),
    ("mixtral sliding window 8", MixtralConfig, MixtralForCausalLM,
     dict(vocab_size=300, hidden_size=96, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
          num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, sliding_window=8,
          initializer_range=0.08, max_position_embeddings=128), torch.float32, 15),
    ("qwen2 dense untied, sharded, bf16", Qwen2Config, Qwen2ForCausalLM,
     dict(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
          num_key_value_heads=2, tie_word_embeddings=False, initializer_range=0.08, max_position_embeddings=128,
          rope_parameters={"rope_type": "default", "rope_theta": 1e6}), torch.bfloat16, 16),
    ("llama dense llama3 rope, attention_bias, mlp_bias", LlamaConfig, LlamaForCausalLM,
     dict(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
          num_key_value_heads=3, head_dim=16, attention_bias=True, mlp_bias=True, initializer_range=0.08,
          max_position_embeddings=128, tie_word_embeddings=True,
          rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 4.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 2.0, "original_max_position_embeddings": 16}), torch.float32, 17),
]


def greedy(model, prompt):
    seq, toks, lps = list(prompt), [], []
    with torch.no_grad():
        for _ in range(N):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            t = int(torch.argmax(logits))
            toks.append(t)
            lps.append(float(torch.log_softmax(logits.double(), -1)[t]))
            seq.append(t)
    return toks, lps


def main():
    bad = 0
    for name, ccls, mcls, kw, dtype, seed in CASES:
        torch.manual_seed(seed)
        cfg = ccls(bos_token_id=0, eos_token_id=1, **kw)
        model = mcls(cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.copy_(0.6 + torch.rand(p.shape))
                elif n.endswith("bias") and "correction" not in n:
                    p.copy_(torch.randn(p.shape) * 0.05)
            for n, b in model.named_buffers():
                if n.endswith("e_score_correction_bias"):
                    b.copy_((torch.rand(b.shape) - 0.5) * 0.1)
        with tempfile.TemporaryDirectory() as d:
            shard = "sharded" in name
            model.to(dtype).save_pretrained(d, max_shard_size="200KB" if shard else "5GB")
            ref = mcls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
            prompt = [int(x) for x in torch.randint(2, kw["vocab_size"], (20,))]
            toks, lps = greedy(ref, prompt)
            out = subprocess.run([BIN, "generate", "--model", d, "--prompt-ids", ",".join(map(str, prompt)),
                                  "--max-tokens", str(N), "--ignore-eos", "--json",
                                  "--precision", "f32"], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"FAIL {name}: {out.stderr.strip()}")
                bad += 1
                continue
            got = json.loads(out.stdout)
            dlp = max(abs(a - b) for a, b in zip(got["logprobs"], lps))
            ok = got["token_ids"] == toks and dlp < TOL
            bad += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name}: tokens {'equal' if got['token_ids'] == toks else 'DIFFER'}, "
                  f"max |Δlogprob| {dlp:.1e}{' (sharded)' if shard else ''}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
