#!/usr/bin/env python3
"""torch's bf16 matmul at an expert's shapes, the reference for
`expertmesh-gpu-check speed` (tools/gpu_check.sh runs both on one GPU).

For each token count T: x[T, h] @ W1ᵀ (W1: [2·inter, h]), SwiGLU, then
@ W2ᵀ (W2: [h, inter]), all bf16 with f32 accumulation (torch's default),
timed with CUDA events. Prints one JSON line per T.
"""
import json
import sys

import torch


def main():
    tokens = [int(t) for t in sys.argv[1].split(",")]
    h, inter, iters = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    dev = torch.device("cuda:0")
    g = torch.Generator(device=dev).manual_seed(0)
    w1 = (torch.rand(2 * inter, h, device=dev, generator=g) - 0.5).to(torch.bfloat16)
    w2 = (torch.rand(h, inter, device=dev, generator=g) - 0.5).to(torch.bfloat16)
    for t in tokens:
        x = (torch.rand(t, h, device=dev, generator=g) - 0.5).to(torch.bfloat16)

        def step():
            gu = x @ w1.T
            a = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
            return a @ w2.T

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
        s = start.elapsed_time(end) / 1e3 / iters
        flops = 2.0 * t * 3.0 * h * inter
        print(json.dumps({"check": "torch_speed", "tokens": t, "device_s": s, "gflops": flops / s / 1e9,
                          "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}))


if __name__ == "__main__":
    main()
