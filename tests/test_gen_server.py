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
    # logit_bias (token ids as the JSON object's string keys) and min_tokens, as offline
    params = SamplingParams(temperature=0.0, max_tokens=4, logit_bias={77: 30}, min_tokens=2,
                            stop_token_ids=[ref.token_ids[0]])
    want = offline.generate([prompt], params)[0].outputs[0]
    got = client.completions.create(model="x", prompt=prompt, max_tokens=4, temperature=0, logit_bias={"77": 30},
                                    extra_body={"min_tokens": 2, "stop_token_ids": [ref.token_ids[0]]})
    assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.token_ids)


def test_echo_with_logprobs_scores_the_prompt(gen_server, offline):
    """Completions' echo (what evaluation harnesses send: echo, logprobs, a token-id prompt): the text
    and the logprobs start with the prompt's, the first prompt token without a logprob and the others
    as offline's prompt_logprobs; a second identical request, whose prompt blocks sit in the prefix
    cache, still scores every prompt token; streamed, the same text and logprobs."""
    base, _ = gen_server
    prompt = random_sequences([37], seed=4)[0]
    ref = offline.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, logprobs=1, prompt_logprobs=1))[0]
    for _ in range(2):
        r = httpx.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0,
                                                        "logprobs": 1, "echo": True})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        assert choice["text"] == offline.tokenizer.decode(prompt, False) + ref.outputs[0].text
        assert len(lp["tokens"]) == len(prompt) + 2
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = [d.logprob for d in ref.prompt_logprobs[1:]] + [d.logprob for d in ref.outputs[0].logprobs]
        assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)
    plain = httpx.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0,
                                                        "echo": True}).json()["choices"][0]
    assert plain["text"] == choice["text"] and plain["logprobs"] is None
    from openai import OpenAI                       # streamed: the prompt comes with the first chunk
    client = OpenAI(base_url=base + "/v1", api_key="none")
    chunks = [c.choices[0] for c in client.completions.create(model="x", prompt=prompt, max_tokens=2, temperature=0,
                                                               logprobs=1, echo=True, stream=True)]
    assert "".join(c.text for c in chunks) == choice["text"]
    assert [x for c in chunks for x in c.logprobs.token_logprobs] == lp["token_logprobs"]


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
    ({"prompt": [1, 2], "seed": "abc"}, 400, "seed"),       # each of these once killed the engine
    ({"prompt": [1, 2], "seed": 2**70}, 400, "seed"),
    ({"prompt": [1, 2], "seed": 1.5}, 400, "seed"),
    ({"prompt": [1, 2], "stop_token_ids": 5}, 400, "stop_token_ids"),
    ({"prompt": [1, 2], "stream_options": "x", "stream": True}, 400, "stream_options"),
    ({"prompt": [1, 2], "stream": "false"}, 400, "stream"),
    ({"prompt": [1, 2], "n": 9}, 400, "bound of 8"),           # more than may ever wait: not a 429
    ({"prompt": [[1, 2], "hi", 3]}, 400, "prompt"),
    ({"prompt": [1, 2], "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"prompt": [1, 2], "logit_bias": {"five": 1}}, 400, "logit_bias"),
    ({"prompt": [1, 2], "logit_bias": {"99999999": 1}}, 400, "logit_bias"),    # past the vocabulary
    ({"prompt": [1, 2], "logit_bias": [5]}, 400, "logit_bias"),
    ({"prompt": [1, 2], "min_tokens": 1.5}, 400, "min_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "text"),     # was a 500
    ({"messages": [{"role": "user", "content": "hi"}], "echo": True}, 400, "echo"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
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


def test_several_prompts_are_choice_groups_in_order(gen_server, offline):
    """A completions prompt list: choice k * n + i is prompt k's continuation i, streaming or not."""
    base, _ = gen_server
    prompts = random_sequences([5, 9], seed=8)
    refs = [r.outputs[0].text for r in offline.generate(prompts, SamplingParams(temperature=0.0, max_tokens=5))]
    body = {"prompt": prompts, "max_tokens": 5, "temperature": 0}
    out = httpx.post(base + "/v1/completions", json=body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1] and [c["text"] for c in out["choices"]] == refs
    assert out["usage"]["prompt_tokens"] == 14
    texts = ["", ""]
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                c = json.loads(line[6:])["choices"][0]
                texts[c["index"]] += c["text"]
    assert texts == refs


def test_streamed_logprobs_are_each_tokens_once(gen_server):
    """One logprob per generated token, in order, streamed or not, also while a long stop string
    holds text back (the held-back tokens' logprobs arrive with the next chunk)."""
    base, _ = gen_server
    body = {"prompt": [5, 6, 7], "max_tokens": 12, "temperature": 0, "logprobs": 1, "ignore_eos": True,
            "stop": ["a stop string this model will not produce"]}
    whole = httpx.post(base + "/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert len(whole["tokens"]) == 12 and whole["text_offset"][0] == 0
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                lp = json.loads(line[6:])["choices"][0]["logprobs"]
                for k in streamed:
                    streamed[k] += lp[k]
    assert streamed["tokens"] == whole["tokens"] and streamed["text_offset"] == whole["text_offset"]
    assert streamed["token_logprobs"] == pytest.approx(whole["token_logprobs"], abs=1e-5)
    # chat: logprobs true with top_logprobs null is logprobs of the chosen tokens only
    chat = httpx.post(base + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                     {"role": "user", "content": "again"}],
        "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": None}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"] and content[0]["top_logprobs"] == []


def test_request_timeout_bounds_the_wait_for_the_first_token_only():
    import asyncio
    from turboserve.gen_server import _Job
    from turboserve.server import ApiError
    aborted = []
    llm = type("L", (), {"abort": lambda self, rid: aborted.append(rid)})()

    async def scenario(started):
        job = _Job(llm, ["r"], asyncio.Queue(), SamplingParams(), 1, 3, time.perf_counter() - 1, started)
        asyncio.get_running_loop().call_later(0.05, job.queue.put_nowait, "event")
        return await job.next()
    assert asyncio.run(scenario(True)) == "event"            # generating: the deadline is over
    with pytest.raises(ApiError) as err:
        asyncio.run(scenario(False))                          # still queued past the deadline: 504
    assert err.value.status == 504 and aborted == ["r"]


def test_non_streaming_client_that_leaves_frees_its_kv_blocks(gen_server):
    """The client goes away while its request is generating (not before it arrived): the request
    is aborted and its blocks freed, where it used to run to its last token."""
    import asyncio
    base, state = gen_server
    engine = state.llm.engine
    before = engine.stats.generated_tokens

    async def leave_mid_generation():
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            request = asyncio.ensure_future(client.post("/v1/completions", json={
                "prompt": [5] * 40, "max_tokens": 200, "ignore_eos": True, "temperature": 0}))
            while not engine.running:
                assert not request.done(), "finished before it was seen generating"
                await asyncio.sleep(0.002)
            request.cancel()                       # closes the connection: the client has left
            with pytest.raises(asyncio.CancelledError):
                await request
    asyncio.run(leave_mid_generation())
    deadline = time.time() + 10
    while engine.running or engine.waiting:
        assert time.time() < deadline, "the abandoned request still holds the engine"
        time.sleep(0.05)
    engine.blocks.check()
    assert engine.stats.generated_tokens - before < 190, "it ran to (nearly) its last token"


def test_a_closed_event_loop_aborts_its_request_not_the_engine(decoder_dirs):
    import asyncio
    from turboserve.llm import AsyncLLM
    llm = AsyncLLM(LLM.load(decoder_dirs["llama"]).engine)

    async def leave_early():
        queue = llm.submit("r", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
        await queue.get()
    try:
        asyncio.run(leave_early())
        deadline = time.time() + 10
        while llm.engine.running or llm.engine.waiting:
            assert time.time() < deadline
            time.sleep(0.05)
        assert llm.alive()

        async def again():
            queue = llm.submit("s", [5, 6], SamplingParams(temperature=0.0, max_tokens=2))
            while not (await queue.get()).finished:
                pass
        asyncio.run(again())
    finally:
        llm.stop()


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


def test_a_stream_that_times_out_before_its_first_token_is_a_504(decoder_dirs):
    """Failing before the first token is a real HTTP status for a stream too (it was a 200 carrying
    one error event)."""
    app = make_gen_app(ServerConfig(model=str(decoder_dirs["llama"]), request_timeout=0.001))
    with running(app) as base:
        deadline = time.time() + 60
        while httpx.get(base + "/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.1)
        r = httpx.post(base + "/v1/completions", json={"prompt": [5] * 200, "max_tokens": 8, "n": 4,
                                                       "stream": True})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        engine = app.state.turboserve.llm.engine
        deadline = time.time() + 10
        while engine.running or engine.waiting:
            assert time.time() < deadline
            time.sleep(0.05)


def test_flags_the_model_kind_does_not_read_are_named():
    """serve() warns about flags set for the other kind of server (a decoder server ignored
    --batch-policy, --lazy-timeout-ms and the rest silently; an encoder one --kv-dtype)."""
    from turboserve.server import ServerConfig, unused_flags
    cfg = ServerConfig(policy="dp", lazy_timeout=0.01, pipeline=False, kv_dtype="int8")
    assert unused_flags(cfg, generation=True) == ["--batch-policy", "--lazy-timeout-ms", "--no-pipeline"]
    assert unused_flags(cfg, generation=False) == ["--kv-dtype"]
    assert unused_flags(ServerConfig(), generation=True) == [] == unused_flags(ServerConfig(), generation=False)
