"""The generation server: the official openai client (completions and chat, streaming and not),
answers equal to the offline API, errors with the right codes, disconnects freeing KV blocks."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import random_sequences
from tests.serving import running
from turboserve.gen_server import make_gen_app
from turboserve.llm import LLM
from turboserve.sampling import SamplingParams
from turboserve.server import ServerConfig


@pytest.fixture(scope="module")
def gen_server(decoder_dirs):
    app = make_gen_app(ServerConfig(model=str(decoder_dirs["llama"]), max_queued_requests=8, request_timeout=30))
    with running(app) as base:
        deadline = time.time() + 60
        while httpx.get(base + "/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.1)
        yield base, app.state.turboserve


@pytest.fixture(scope="module")
def offline(decoder_dirs):
    return LLM.load(decoder_dirs["llama"])


def test_openai_completions_match_offline(gen_server, offline):
    from openai import OpenAI
    base, _ = gen_server
    client = OpenAI(base_url=base + "/v1", api_key="none")
    prompt = random_sequences([9], seed=1)[0]
    ref = offline.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10))[0].outputs[0]
    out = client.completions.create(model="x", prompt=prompt, max_tokens=10, temperature=0)
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == 9 and out.usage.completion_tokens == len(ref.token_ids)
    pieces, reasons, usage = [], [], None
    for chunk in client.completions.create(model="x", prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == ref.text and reasons[-1] == ref.finish_reason
    assert usage.completion_tokens == len(ref.token_ids)


def test_openai_chat_streaming_and_not(gen_server, offline):
    from openai import OpenAI
    base, _ = gen_server
    client = OpenAI(base_url=base + "/v1", api_key="none")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    ids = offline.tokenizer.apply_chat_template(messages)
    ref = offline.generate([ids], SamplingParams(temperature=0.0, max_tokens=8))[0].outputs[0]
    out = client.chat.completions.create(model="x", messages=messages, max_tokens=8, temperature=0)
    assert out.choices[0].message.content == ref.text and out.choices[0].message.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="x", messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert text == ref.text
    # logprobs and n
    out = client.chat.completions.create(model="x", messages=messages, max_tokens=4, temperature=1.0, seed=3, n=2,
                                         logprobs=True, top_logprobs=2)
    assert len(out.choices) == 2
    assert len(out.choices[0].logprobs.content[0].top_logprobs) == 2


def test_sse_wire_format_ends_with_done(gen_server):
    base, _ = gen_server
    with httpx.stream("POST", base + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3, "stream": True,
                                                              "temperature": 0}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunk = json.loads(lines[0][6:])
    assert chunk["object"] == "text_completion" and "choices" in chunk


@pytest.mark.parametrize("body,status,needle", [
    ({"prompt": [5] * 250, "max_tokens": 20}, 400, "context length of 256"),
    ({"prompt": "", "max_tokens": 2}, 400, "prompt"),
    ({"prompt": [1, 2], "temperature": -3}, 400, "temperature"),
    ({"prompt": [1, 2], "max_tokens": "lots"}, 400, "max_tokens"),
    ({"messages": "hi"}, 400, "messages"),
    ({"prompt": [1, 2], "n": 2.5}, 400, "n"),
])
def test_errors_in_openai_shape_and_server_keeps_serving(gen_server, body, status, needle):
    base, _ = gen_server
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(base + route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"
    ok = httpx.post(base + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_malformed_json_and_oversized_body(gen_server):
    base, _ = gen_server
    r = httpx.post(base + "/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(base + "/v1/completions", content=b"x" * (3 * 1024 * 1024))
    assert r.status_code == 413


def test_disconnect_frees_kv_blocks(gen_server):
    base, state = gen_server
    engine = state.llm.engine
    with httpx.stream("POST", base + "/v1/completions", json={"prompt": [5] * 40, "max_tokens": 200, "stream": True,
                                                              "ignore_eos": True, "temperature": 0}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and engine.running:
                break
    deadline = time.time() + 10
    while engine.running or engine.waiting:
        assert time.time() < deadline, "the aborted request still holds the engine"
        time.sleep(0.05)
    engine.blocks.check()
    metrics = httpx.get(base + "/metrics").text
    assert "turboserve_kv_cache_usage" in metrics and "turboserve_time_to_first_token_seconds" in metrics
