"""The serving engine: cancelled work never reaches the model; SIGTERM finishes in-flight requests."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from turboserve import Encoder
from turboserve.engine import EncoderEngine, Overloaded, TooLarge


@pytest.fixture(scope="module")
def small(model_dirs):
    return Encoder.load(model_dirs["bert"])


def test_cancelled_request_is_dropped_before_the_model(small):
    engine = EncoderEngine(small, lazy_timeout=0.3, policy="fifo")

    async def go():
        a = engine.submit(small.tokenize(["dropped"] * 5), "embed", timeout=10)
        b = engine.submit(small.tokenize(["kept", "kept too"]), "embed", timeout=10)
        engine.cancel(a)
        results, timings = await asyncio.wait_for(b, 10)
        await asyncio.sleep(0.2)
        return a, results
    a, results = asyncio.run(go())
    assert len(results) == 2 and not a.done()
    assert engine.items_run == 2
    assert engine.queue_depth == (0, 0)
    engine.stop()


def test_queue_bounds_in_requests_and_tokens(small):
    engine = EncoderEngine(small, lazy_timeout=0.5, max_queued_requests=2, max_queued_tokens=50, policy="fifo")

    async def go():
        engine.submit(small.tokenize(["one"]), "embed", timeout=10)
        with pytest.raises(TooLarge, match="at most 50"):
            engine.submit(small.tokenize([[5] * 60]), "embed", timeout=10)
        engine.submit(small.tokenize(["two"]), "embed", timeout=10)
        with pytest.raises(Overloaded, match="queue full"):
            engine.submit(small.tokenize(["three"]), "embed", timeout=10)
    asyncio.run(go())
    engine.stop()


def test_a_cancelled_request_spanning_batches_is_accounted_once(small):
    """Its tokens leave the queue bound once, not once per batch its inputs landed in (the queue's
    token count went negative, and the bound stopped holding)."""
    engine = EncoderEngine(small, lazy_timeout=0.3, max_batch_tokens=20, policy="fifo")

    async def go():
        for cancel in (True, False):
            job = engine.submit(small.tokenize([[5] * 10] * 4), "embed", timeout=10 if cancel else -1)
            if cancel:
                engine.cancel(job)
            await asyncio.sleep(0.6)
            assert engine.queue_depth == (0, 0)
        with pytest.raises(ValueError, match="kind"):
            engine.submit(small.tokenize(["x"]), "bogus", timeout=10)
    asyncio.run(go())
    engine.stop()


def test_a_dying_scheduler_fails_the_requests_it_had_taken(small):
    engine = EncoderEngine(small, policy="fifo")

    def broken(items):
        raise RuntimeError("scheduler bug")
    engine.plan = broken

    async def go():
        job = engine.submit(small.tokenize(["x", "y"]), "embed", timeout=30)
        with pytest.raises(Exception, match="engine has failed"):
            await asyncio.wait_for(job, 5)          # not left pending until its deadline
    asyncio.run(go())
    assert engine.queue_depth == (0, 0) and not engine.alive()
    engine.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_in_flight_requests_and_exits_0(model_dirs, tmp_path):
    port = _free_port()
    env = dict(os.environ, TURBOSERVE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "turboserve", "serve", "--model", str(model_dirs["bert"]),
                             "--port", str(port), "--max-batch-tokens", "512", "--batch-policy", "fifo"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, "server did not become healthy"
            time.sleep(0.2)
        result = {}

        def request():
            result["r"] = httpx.post(base + "/embed", json={"inputs": [[7] * 120] * 600}, timeout=60)
        t = threading.Thread(target=request)
        t.start()
        time.sleep(0.3)                      # the request is in flight
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert result["r"].status_code == 200 and len(result["r"].json()) == 600
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read()
    assert "ready: model" in out and "dtype fp32" in out


def _serve_all(engine, requests, kind="embed"):
    async def go():
        futures = [engine.submit(r, kind, timeout=30) for r in requests]
        return await asyncio.gather(*futures, return_exceptions=True)
    return asyncio.run(go())


def test_pipeline_answers_equal_the_inline_engine_and_the_api(small):
    """Mixed lengths, several inputs per request, more work than one batch: the pipelined engine's
    answers are bit-identical to the one-thread engine's, in the same order, and equal the API's."""
    g = torch.Generator().manual_seed(4)
    texts = [[int(t) for t in torch.randint(1000, 20000, (int(n),), generator=g)]
             for n in torch.randint(1, 120, (60,), generator=g)]
    requests = [small.tokenize(texts[i:i + k]) for i, k in zip(range(0, 60, 6), [1, 2, 3, 4, 5, 6, 5, 4, 3, 2])]
    answers = {}
    for pipeline in (True, False):
        engine = EncoderEngine(small, max_batch_tokens=600, pipeline=pipeline)
        answers[pipeline] = _serve_all(engine, requests)
        assert engine.alive() and engine.batches_run > 1
        engine.stop()
    for (a, _), (b, _) in zip(answers[True], answers[False]):
        assert len(a) == len(b)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    flat = torch.stack([v for res, _ in answers[True] for v in res])
    expected = small.embed([t for i, k in zip(range(0, 60, 6), [1, 2, 3, 4, 5, 6, 5, 4, 3, 2])
                            for t in texts[i:i + k]], normalize=False)
    assert torch.allclose(flat, expected, atol=1e-5)


@pytest.mark.parametrize("stage", ["pack", "model", "answer"])
def test_an_error_in_one_stage_fails_only_its_own_requests(small, monkeypatch, stage):
    """A batch holding token 7777 fails in `stage`; the budget keeps each request in its own batch,
    so the others are answered and the engine stays alive."""
    import turboserve.engine as engine_mod
    bad = 7777

    def poisoned(ids):
        return any(bad in seq for seq in ids)
    if stage == "pack":
        real = engine_mod.pack_tokens
        monkeypatch.setattr(engine_mod, "pack_tokens", lambda ids, *a: (_ for _ in ()).throw(ValueError("bad pack"))
                            if poisoned(ids) else real(ids, *a))
    engine = EncoderEngine(small, max_batch_tokens=50)
    if stage == "model":
        real_forward = small.model.forward
        monkeypatch.setattr(small.model, "forward", lambda b: (_ for _ in ()).throw(ValueError("bad forward"))
                            if bad in b.input_ids.tolist() else real_forward(b))
    if stage == "answer":
        real_answer = engine._answer_batch

        def answer(done):
            if any(bad in w.job.items[w.index].ids for w in done.batch):
                raise ValueError("bad answer")
            real_answer(done)
        engine._answer.fn = answer
    requests = [small.tokenize([[5] * 40]), small.tokenize([[5] * 20 + [bad] * 20]), small.tokenize([[6] * 40])]
    results = _serve_all(engine, requests)
    assert isinstance(results[1], ValueError)
    assert not isinstance(results[0], BaseException) and not isinstance(results[2], BaseException)
    assert torch.equal(results[0][0][0], small.embed([[5] * 40], normalize=False)[0])
    assert engine.alive()
    engine.stop()


def test_cost_table_cache_is_keyed_by_what_the_times_depend_on(small, monkeypatch):
    import types
    from turboserve.engine import cost_cache_path
    base = cost_cache_path(small, 4096)
    assert cost_cache_path(small, 2048) != base
    monkeypatch.setattr(small.model, "tp", types.SimpleNamespace(world=2))     # one shard of two ranks
    assert cost_cache_path(small, 4096) != base
    monkeypatch.setattr(small.model, "tp", None)
    monkeypatch.setattr(small.pooling, "mode", "cls")
    assert cost_cache_path(small, 4096) != base
    monkeypatch.setattr(small.pooling, "mode", "mean")
    monkeypatch.setattr(small.model, "device", torch.device("cuda"))
    assert cost_cache_path(small, 4096) != base
