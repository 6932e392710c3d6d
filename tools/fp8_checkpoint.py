#!/usr/bin/env python3
"""Writes a copy of a bf16/f32 checkpoint in DeepSeek's FP8 layout (e4m3
projection weights with a `weight_scale_inv` per 128x128 block, as
DeepSeek-V3/R1 ship), for measuring FP8 loading on checkpoints larger than
the fixtures. Dev-time only (torch; `tools/make_fixtures.py`'s venv).

    python tools/fp8_checkpoint.py SRC_DIR DST_DIR [TWIN_DIR]

With TWIN_DIR, also writes the same FP8 weights dequantized to float32
(no quantization_config): the reference FP8 loading must match exactly.
"""
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import quantize_fp8  # noqa: E402

src, dst = sys.argv[1:3]
shutil.copytree(src, dst, dirs_exist_ok=True)
deq = quantize_fp8(dst, (128, 128))
cfg_path = os.path.join(dst, "config.json")
cfg = json.load(open(cfg_path))
cfg["quantization_config"] = {
    "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
}
json.dump(cfg, open(cfg_path, "w"), indent=2)
print(f"wrote {dst}")
if len(sys.argv) > 3:
    from safetensors.torch import save_file
    twin = sys.argv[3]
    shutil.copytree(src, twin, dirs_exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in deq.items()}, os.path.join(twin, "model.safetensors"),
              metadata={"format": "pt"})
    print(f"wrote {twin}")
