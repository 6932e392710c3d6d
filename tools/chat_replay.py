#!/usr/bin/env python3
"""Replays a multi-turn chat against a router, as chat clients do: every
turn resends the whole conversation (system prompt, earlier turns and the
model's replies) plus a new user message, over OpenAI `/v1/completions`
with token-id prompts and streaming. Prints one JSON line: per turn the
time to first token and the prompt tokens the router computed (from its
`expertmesh_prompt_tokens_total`), and their totals.

    tools/chat_replay.py HTTP_ADDR [TURNS] [SYSTEM_TOKENS] [USER_TOKENS] [REPLY_TOKENS]

Stdlib only. The token ids are arbitrary (2..255, valid in any byte-level
vocabulary) and deterministic, so two routers see the same conversation.
"""
import json
import sys
import time
import urllib.request

addr = sys.argv[1]
turns, system, user, reply = (int(x) for x in (sys.argv[2:] + ["10", "400", "48", "32"][len(sys.argv) - 2:])[:4])


def ids(seed, n):
    return [((seed * 7919 + k) * 2654435761) % 254 + 2 for k in range(n)]


def computed():
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("expertmesh_prompt_tokens_total "):
                return float(line.split()[1])
    raise SystemExit("no expertmesh_prompt_tokens_total")


def turn(prompt):
    body = json.dumps({"prompt": prompt, "max_tokens": reply, "temperature": 0, "ignore_eos": True,
                       "stream": True, "return_token_ids": True}).encode()
    req = urllib.request.Request(f"http://{addr}/v1/completions", body, {"Content-Type": "application/json"})
    t0, ttft, out = time.perf_counter(), None, []
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            toks = json.loads(line[6:])["choices"][0].get("token_ids") or []
            if toks and ttft is None:
                ttft = time.perf_counter() - t0
            out.extend(toks)
    return ttft, out


conv = ids(1, system)
rows = []
for k in range(turns):
    conv = conv + ids(100 + k, user)
    before = computed()
    ttft, out = turn(conv)
    rows.append({"turn": k + 1, "prompt_tokens": len(conv), "computed": computed() - before, "ttft_s": ttft})
    conv = conv + out
print(json.dumps({"turns": rows, "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
                  "computed_tokens": sum(r["computed"] for r in rows),
                  "ttft_sum_s": sum(r["ttft_s"] for r in rows)}))
