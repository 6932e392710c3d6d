"""The OpenAI-compatible API through the real `openai` client.

Usage: openai_suite.py BASE_URL API_KEY EXPECTED_JSON

EXPECTED_JSON holds {"prompt_ids": [...], "greedy_ids": [...]}: what offline
`expertmesh generate` produced for that prompt on the same checkpoint. The
router runs with --reasoning-parser deepseek_r1 and --api-key API_KEY. Each
check prints "ok <name>"; any failure raises (non-zero exit).
"""

import asyncio
import json
import re
import sys

import jsonschema
import openai

base, key, expected_path = sys.argv[1], sys.argv[2], sys.argv[3]
expected = json.load(open(expected_path))
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
model = client.models.list().data[0].id
print("ok models", model)


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print("ok", name)


# Greedy completion from token ids reproduces offline generate exactly.
n = len(expected["greedy_ids"])
r = client.completions.create(
    model=model,
    prompt=expected["prompt_ids"],
    max_tokens=n,
    temperature=0,
    extra_body={"return_token_ids": True, "ignore_eos": True},
)
choice = r.choices[0].model_dump()
check("completion token ids", choice["token_ids"] == expected["greedy_ids"], f"{choice['token_ids']} vs {expected['greedy_ids']}")
check("completion prompt ids", choice["prompt_token_ids"] == expected["prompt_ids"])
check("completion usage", r.usage.prompt_tokens == len(expected["prompt_ids"]) and r.usage.completion_tokens == n)
check("completion finish", r.choices[0].finish_reason == "length")
full_text = r.choices[0].text

# Streaming gives the same text, then a usage chunk with no choices.
chunks = list(
    client.completions.create(
        model=model,
        prompt=expected["prompt_ids"],
        max_tokens=n,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
)
streamed = "".join(c.choices[0].text for c in chunks if c.choices)
check("completion stream text", streamed == full_text, f"{streamed!r} vs {full_text!r}")
check("completion stream finish", [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length")
check("completion usage chunk", chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n)

# Legacy logprobs: the chosen token's logprob and N alternatives per token.
r = client.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0, logprobs=3)
lp = r.choices[0].logprobs
# (Alternatives are keyed by text: tokens that decode alike share a key.)
check("completion logprobs", len(lp.token_logprobs) == 4 and all(1 <= len(t) <= 3 for t in lp.top_logprobs), str(lp))
check("greedy is the top choice", all(abs(max(t.values()) - c) < 1e-5 for t, c in zip(lp.top_logprobs, lp.token_logprobs)))

# echo + logprobs scores the prompt (lm-evaluation-harness's request): the
# first prompt token has no logprob, each other one is the greedy answer's
# own logprob where the greedy token was fed back.
g = client.completions.create(model=model, prompt=expected["prompt_ids"], max_tokens=3, temperature=0, logprobs=0, extra_body={"ignore_eos": True})
r0_lps = g.choices[0].logprobs.token_logprobs
scored = client.completions.create(model=model, prompt=expected["prompt_ids"] + expected["greedy_ids"][:3], max_tokens=0, echo=True, logprobs=1)
slp = scored.choices[0].logprobs
P = len(expected["prompt_ids"])
check("echo scores the prompt", slp.token_logprobs[0] is None and len(slp.token_logprobs) == P + 3 and scored.usage.completion_tokens == 0, str(slp.token_logprobs))
check("prompt logprobs are the generated ones", all(abs(a - b) < 1e-4 for a, b in zip(slp.token_logprobs[P:], r0_lps[:3])), f"{slp.token_logprobs[P:]} vs {r0_lps[:3]}")
with_answer = client.completions.create(model=model, prompt="Hello", max_tokens=2, temperature=0, echo=True)
check("echo prefixes the prompt", with_answer.choices[0].text.startswith("Hello") and with_answer.usage.completion_tokens == 2, with_answer.choices[0].text)

# A stop string from the middle of the greedy text: the text ends just
# before it and the reason is "stop".
long = client.completions.create(model=model, prompt="The", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
text = long.choices[0].text
stop = next((text[i : i + 2] for i in range(3, len(text) - 2) if text[i : i + 2].strip() and "\ufffd" not in text[i : i + 2]), None)
check("a stop string is available", stop is not None, repr(text))
r = client.completions.create(model=model, prompt="The", max_tokens=24, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
check("stop string", r.choices[0].text == text[: text.index(stop)] and r.choices[0].finish_reason == "stop", f"{r.choices[0].text!r} stop {stop!r} in {text!r}")
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(model=model, prompt="The", max_tokens=24, temperature=0, stop=stop, stream=True, extra_body={"ignore_eos": True})
    if c.choices
)
check("stop string streaming", streamed == r.choices[0].text, f"{streamed!r}")

# Chat, with the R1 reasoning split: the demo model never closes </think>,
# so everything is reasoning; streaming and not agree.
messages = [{"role": "user", "content": "Hello there"}]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
m = r.choices[0].message.model_dump()
check("chat reasoning", (m.get("reasoning_content") or "") != "" and (m["content"] or "") == "", json.dumps(m))
check("chat logprobs", len(r.choices[0].logprobs.content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content))
chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}))
check("chat first chunk has the role", chunks[0].choices[0].delta.role == "assistant")
reasoning = "".join((c.choices[0].delta.model_dump().get("reasoning_content") or "") for c in chunks if c.choices)
content = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
check("chat stream = non-stream", reasoning == m["reasoning_content"] and content == "", f"{reasoning!r} vs {m['reasoning_content']!r}")
check("chat usage chunk", chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens)

# Errors through the client's exception types.
def raises(name, exc, fn):
    try:
        fn()
    except exc as e:
        check(name, True)
        return e
    raise AssertionError(f"{name}: no {exc.__name__}")


raises("max_tokens 0 is 400", openai.BadRequestError, lambda: client.completions.create(model=model, prompt="x", max_tokens=0))
raises("unknown model is 404", openai.NotFoundError, lambda: client.completions.create(model="nope", prompt="x", max_tokens=2))
raises("prompt beyond the context is 400", openai.BadRequestError, lambda: client.completions.create(model=model, prompt=[5] * 100000, max_tokens=2))
raises("n=2 is 400", openai.BadRequestError, lambda: client.completions.create(model=model, prompt="x", max_tokens=2, n=2))
bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
raises("a wrong key is 401", openai.AuthenticationError, lambda: bad.models.list())


# 64 concurrent streams all complete.
async def many():
    aclient = openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0)

    async def one(i):
        s = await aclient.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"request {i}"}],
            max_tokens=8,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        finish = None
        async for c in s:
            if c.choices and c.choices[0].finish_reason:
                finish = c.choices[0].finish_reason
        return finish

    return await asyncio.gather(*(one(i) for i in range(64)))


finishes = asyncio.run(many())
check("64 concurrent streams", finishes == ["length"] * 64, str(finishes))

# Structured outputs: this model's weights are random, yet every answer
# validates, because the grammar allows nothing else; the bounds keep each
# answer well within max_tokens.
schema = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "admin"],
    "additionalProperties": False,
}
fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
for seed in range(16):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"person {seed}"}], max_tokens=200,
        temperature=1.0, seed=seed, response_format=fmt,
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    check(f"json_schema seed {seed}", r.choices[0].finish_reason == "stop", r.choices[0].finish_reason)
chunks = list(client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "a person"}], max_tokens=200, temperature=1.0, seed=99,
    response_format=fmt, stream=True,
))
jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), schema)
check("json_schema streamed", True)
for seed in range(4):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "anything"}], max_tokens=200, temperature=1.0,
        seed=seed, response_format={"type": "json_object"},
    )
    # Unbounded, so a random model may run out of tokens mid-string: then
    # it is cut, else it parses.
    text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    ok = text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict))
    check(f"json_object seed {seed}", ok, f"{finish}: {text!r}")
choices = ["yes", "no", "it depends"]
seen = set()
for seed in range(8):
    r = client.completions.create(model=model, prompt="Answer:", max_tokens=10, temperature=1.0, seed=seed,
                                  extra_body={"guided_choice": choices})
    seen.add(r.choices[0].text)
check("guided_choice", seen <= set(choices) and len(seen) > 1, str(seen))
for seed in range(4):
    r = client.completions.create(model=model, prompt="Date:", max_tokens=20, temperature=1.0, seed=seed,
                                  extra_body={"guided_regex": r"[0-9]{4}-[01][0-9]-[0-3][0-9]"})
    check(f"guided_regex seed {seed}", re.fullmatch(r"[0-9]{4}-[01][0-9]-[0-3][0-9]", r.choices[0].text), r.choices[0].text)
e = raises("an invalid schema is 400", openai.BadRequestError, lambda: client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "x"}], max_tokens=5,
    response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}}))
check("the 400 names the problem", "nonsense" in str(e), str(e))
raises("a regex that does not parse is 400", openai.BadRequestError, lambda: client.completions.create(
    model=model, prompt="x", max_tokens=5, extra_body={"guided_regex": "[a-"}))

# Tool calling (the router runs --tool-call-parser deepseek_v3; the
# checkpoint's template renders the tools). `required` and a named
# function force a valid call even from random weights.
weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
           "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"],
           "additionalProperties": False}
tools = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast for a city", "parameters": weather}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {},
                                                                         "additionalProperties": False}}},
]
ask = [{"role": "user", "content": "Weather in Oslo?"}]
for seed in range(6):
    r = client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=400, temperature=1.0, seed=seed)
    c = r.choices[0]
    check(f"tool_choice required seed {seed}", c.finish_reason == "tool_calls" and c.message.tool_calls, str(c))
    for call in c.message.tool_calls:
        args = json.loads(call.function.arguments)
        check(f"  call {call.function.name}", call.type == "function" and call.id.startswith("call"))
        if call.function.name == "get_weather":
            jsonschema.validate(args, weather)
        else:
            check("  get_time", call.function.name == "get_time" and args == {}, str(args))
named = {"type": "function", "function": {"name": "get_weather"}}
r = client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice=named, max_tokens=400, seed=1)
calls = r.choices[0].message.tool_calls
check("named tool_choice", [c.function.name for c in calls] == ["get_weather"] and r.choices[0].message.content is None)
jsonschema.validate(json.loads(calls[0].function.arguments), weather)
# Streamed: the call arrives as tool_calls deltas, then finish_reason tool_calls.
chunks = list(client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice=named,
                                             max_tokens=400, seed=1, stream=True))
deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
check("streamed tool call", [d.function.name for d in deltas] == ["get_weather"]
      and deltas[0].function.arguments == calls[0].function.arguments, str(deltas))
check("streamed finish", [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls")
# The call and its result go back in: the template renders both.
follow = ask + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0].id, "type": "function", "function": {"name": "get_weather", "arguments": calls[0].function.arguments}}]},
    {"role": "tool", "tool_call_id": calls[0].id, "content": "{\"forecast\": \"rain\"}"},
]
r = client.chat.completions.create(model=model, messages=follow, tools=tools, max_tokens=8)
check("tool result turn", r.choices[0].finish_reason in ("stop", "length", "tool_calls"))
r = client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice="none", max_tokens=8)
check("tool_choice none", not r.choices[0].message.tool_calls)
raises("an unknown named tool is 400", openai.BadRequestError, lambda: client.chat.completions.create(
    model=model, messages=ask, tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}}, max_tokens=5))
print("ALL OK")
