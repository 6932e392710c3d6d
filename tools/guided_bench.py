"""Structured outputs' cost, side by side on one router.

Usage: guided_bench.py HTTP_ADDR [ROUNDS]

Against a running router (start it with the model to measure), alternating
ROUNDS times:
- decode: C concurrent completions (C = 1 and 32) of 128 tokens each,
  unconstrained (ignore_eos) and under a JSON schema whose one long string
  never ends before max_tokens, so both generate the same number of
  tokens; prints output tok/s of each and their ratio;
- compile: the latency of a 1-token request under a schema never seen
  (compiled), the same schema again (cached) and no schema.
Standard library only.
"""

import json
import sys
import threading
import time
import urllib.request

addr = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3


def post(body):
    req = urllib.request.Request(f"http://{addr}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def schema(i=0):
    return {"type": "object", "properties": {f"text{i}": {"type": "string", "minLength": 2000}},
            "required": [f"text{i}"], "additionalProperties": False}


def body(k, guided, max_tokens=128):
    b = {"prompt": f"Request {k}:", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if guided:
        b["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema()}}
    return b


def decode(c, guided):
    out = [0] * c

    def one(k):
        out[k] = post(body(k, guided))["usage"]["completion_tokens"]

    t = time.perf_counter()
    threads = [threading.Thread(target=one, args=(k,)) for k in range(c)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(out) / (time.perf_counter() - t), sum(out)


def latency(b):
    t = time.perf_counter()
    post(b)
    return 1e3 * (time.perf_counter() - t)


post(body(0, True, 4))  # warm up
for r in range(rounds):
    for c in (1, 32):
        (plain, n0), (guided, n1) = decode(c, False), decode(c, True)
        print(f"decode c={c}: plain {plain:.0f} tok/s ({n0} tokens), json_schema {guided:.0f} tok/s ({n1} tokens), "
              f"ratio {guided / plain:.3f}")
    fresh = {"prompt": "x", "max_tokens": 1, "temperature": 0,
             "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema(100 + r)}}}
    cold, warm = latency(fresh), latency(fresh)
    none = latency({"prompt": "x", "max_tokens": 1, "temperature": 0})
    print(f"compile: new schema {cold:.1f} ms, cached {warm:.1f} ms, no schema {none:.1f} ms")
