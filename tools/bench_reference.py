#!/usr/bin/env python3
"""Reference side of the engine benchmark: transformers (and torch for the
expert FFN) on the same checkpoint and thread count as `model/examples/bench.rs`.

    python tools/bench_reference.py MODEL_DIR [THREADS] [DTYPE]

DTYPE is the compute dtype for transformers: bfloat16 (the checkpoint's own,
default) or float32. Prints one JSON line with the same keys as the Rust side.
"""
import json
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

DECODE_STEPS = 32
PROMPT = 16


def prompt(seed, n, vocab):
    return [((i * 2654435761 + seed * 97) % 2**32) % (vocab - 2) + 2 for i in range(n)]


@torch.inference_mode()
def decode(model, batch, vocab):
    ids = torch.tensor([prompt(b, PROMPT, vocab) for b in range(batch)])
    cache = DynamicCache(config=model.config)
    model(ids, past_key_values=cache, use_cache=True)
    tok = torch.tensor([[(b % 50) + 2] for b in range(batch)])
    t0 = time.perf_counter()
    for _ in range(DECODE_STEPS):
        model(tok, past_key_values=cache, use_cache=True)
    return batch * DECODE_STEPS / (time.perf_counter() - t0)


@torch.inference_mode()
def prefill(model, n, vocab):
    ids = torch.tensor([prompt(7, n, vocab)])
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        model(ids, logits_to_keep=1)
        best = min(best, time.perf_counter() - t0)
    return n / best


@torch.inference_mode()
def expert_ffn(cfg, tokens, dtype):
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    g = torch.randn(i, h).to(dtype)
    u = torch.randn(i, h).to(dtype)
    d = torch.randn(h, i).to(dtype)
    x = torch.randn(tokens, h).to(dtype)
    f = lambda: F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
    f()
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return 2 * tokens * h * 3 * i * reps / (time.perf_counter() - t0) / 1e9


def main():
    path = sys.argv[1]
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    dtype = getattr(torch, sys.argv[3]) if len(sys.argv) > 3 else torch.bfloat16
    torch.set_num_threads(threads)
    cfg = AutoConfig.from_pretrained(path)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    load_s = time.perf_counter() - t0
    v = cfg.vocab_size
    out = {
        "engine": f"transformers {__import__('transformers').__version__} ({str(dtype).replace('torch.', '')})",
        "threads": threads,
        "load_s": load_s,
        "decode_b1_tok_s": decode(model, 1, v),
        "decode_b16_tok_s": decode(model, 16, v),
        "prefill_512_tok_s": prefill(model, 512, v),
        "expert_ffn_gflops_t1": expert_ffn(cfg, 1, torch.bfloat16),
        "expert_ffn_gflops_t64": expert_ffn(cfg, 64, torch.bfloat16),
        "expert_ffn_gflops_t256": expert_ffn(cfg, 256, torch.bfloat16),
        "expert_ffn_f32_gflops_t256": expert_ffn(cfg, 256, torch.float32),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
