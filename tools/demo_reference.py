#!/usr/bin/env python3
"""Writes the trained demo model's golden fixture from transformers
(float32, the bf16 weights upcast exactly; transformers ignores the MTP
module's tensors as the model does outside speculative decoding):

    target/llama-venv/bin/python tools/demo_reference.py model/demo tests/fixtures/demo_trained

reference.json: a chat prompt's ids and logits at every position, 16 greedy
tokens and the logits that chose them (the format of tools/make_fixtures.py).
perplexity.json: perplexity over text.txt (the first held-out paragraphs)
with sliding windows as transformers' perplexity guide computes them, each
window starting with BOS.
"""
import json
import math
import os
import sys

import torch
import transformers

N_GREEDY = 16
CONTEXT, STRIDE = 128, 64
TEXT_CHARS = 6000


@torch.no_grad()
def main(model_dir, out):
    os.makedirs(out, exist_ok=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    msgs = [{"role": "user", "content": "What is a buffer?"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ref = {"prompt_ids": ids, "prompt_logits": model(torch.tensor([ids])).logits[0].tolist(),
           "greedy_ids": [], "greedy_logits": [], "transformers_version": transformers.__version__}
    seq = list(ids)
    for _ in range(N_GREEDY):
        logits = model(torch.tensor([seq])).logits[0, -1]
        t = int(torch.argmax(logits))
        ref["greedy_ids"].append(t)
        ref["greedy_logits"].append(logits.tolist())
        seq.append(t)
    print("greedy:", repr(tok.decode(ref["greedy_ids"])))
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f)

    held = open(os.path.join(model_dir, "heldout.txt")).read()
    text = held[: held.rfind("\n\n", 0, TEXT_CHARS)]
    with open(os.path.join(out, "text.txt"), "w") as f:
        f.write(text)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = model.config.bos_token_id
    nll, n, prev_end = 0.0, 0, 0
    span = CONTEXT - 1
    for begin in range(0, len(ids), STRIDE):
        end = min(begin + span, len(ids))
        trg = end - prev_end
        x = torch.tensor([[bos] + ids[begin:end]])
        logp = torch.log_softmax(model(x).logits[0, :-1].double(), dim=-1)
        y = torch.tensor(ids[begin:end])
        nll -= float(logp[-trg:].gather(1, y[-trg:, None]).sum())
        n += trg
        prev_end = end
        if end == len(ids):
            break
    ppl = {"context": CONTEXT, "stride": STRIDE, "ids": ids, "tokens": n, "perplexity": math.exp(nll / n)}
    print(f"perplexity {ppl['perplexity']:.5f} over {n} tokens")
    with open(os.path.join(out, "perplexity.json"), "w") as f:
        json.dump(ppl, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
