"""KServe v2 / Triton gRPC through the real `tritonclient[grpc]` client.

Usage: triton_suite.py HOST:PORT API_KEY MODEL

Each check prints "ok <name>"; any failure raises (non-zero exit).
"""

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
auth = {"authorization": f"Bearer {key}"}
client = grpcclient.InferenceServerClient(url)


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    print("ok", name)


check("live", client.is_server_live(headers=auth))
check("ready", client.is_server_ready(headers=auth))
check("model ready", client.is_model_ready(model, headers=auth))
md = client.get_server_metadata(headers=auth)
check("server metadata", md.name == "expertmesh", str(md))
mm = client.get_model_metadata(model, headers=auth)
check("model metadata", [i.name for i in mm.inputs][:1] == ["text_input"] and "text_output" in [o.name for o in mm.outputs], str(mm))


def inputs(prompt, params, stream=None):
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    sp = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    sp.set_data_from_numpy(np.array([json.dumps(params).encode()], dtype=object))
    out = [text, sp]
    if stream is not None:
        s = grpcclient.InferInput("stream", [1], "BOOL")
        s.set_data_from_numpy(np.array([stream], dtype=bool))
        out.append(s)
    return out


params = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
r = client.infer(model, inputs("Hello", params), headers=auth)
text = r.as_numpy("text_output")[0].decode()
check("infer text", len(text) > 0, repr(text))
check("infer counts", int(r.as_numpy("num_output_tokens")[0]) == 8 and int(r.as_numpy("num_input_tokens")[0]) > 0)
check("infer finish", r.as_numpy("finish_reason")[0].decode() == "length")

# Request parameters work as well as sampling_parameters.
r2 = client.infer(model, inputs("Hello", {}), parameters={"temperature": 0.0, "max_tokens": 3, "ignore_eos": True}, headers=auth)
check("infer parameters", int(r2.as_numpy("num_output_tokens")[0]) == 3)

# Decoupled streaming: one response per token, then an empty final one.
results = queue.Queue()
client.start_stream(callback=lambda result, error: results.put((result, error)), headers=auth)
client.async_stream_infer(model, inputs("Hello", params, stream=True), request_id="s1", enable_empty_final_response=True)
pieces, finals = [], 0
while True:
    result, error = results.get(timeout=30)
    check_err = error is None
    if not check_err:
        raise AssertionError(f"stream error: {error}")
    resp = result.get_response()
    final = resp.parameters["triton_final_response"].bool_param
    out = result.as_numpy("text_output")
    if out is not None:
        pieces.append(out[0].decode())
    if final:
        finals += 1
        check("empty final response", out is None and len(resp.outputs) == 0, str(resp))
        break
client.stop_stream()
check("stream text = infer text", "".join(pieces) == text, f"{''.join(pieces)!r} vs {text!r}")
check("one response per token", len(pieces) >= 8, str(len(pieces)))


def raises(name, code, fn):
    try:
        fn()
    except InferenceServerException as e:
        check(name, e.status() == code, f"{e.status()} {e.message()}")
        return
    raise AssertionError(f"{name}: no error")


raises("unknown model", "StatusCode.NOT_FOUND", lambda: client.infer("nope", inputs("x", params), headers=auth))
raises("no key", "StatusCode.UNAUTHENTICATED", lambda: client.is_server_live())
raises("missing text_input", "StatusCode.INVALID_ARGUMENT", lambda: client.infer(model, inputs("x", params)[1:], headers=auth))
raises("bad sampling JSON", "StatusCode.INVALID_ARGUMENT", lambda: client.infer(model, inputs("x", {"max_tokens": "many"}), headers=auth))
raises("unimplemented", "StatusCode.UNIMPLEMENTED", lambda: client.get_model_repository_index(headers=auth))
print("ALL OK")
