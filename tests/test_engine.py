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

from turboserve import Encoder
from turboserve.engine import EncoderEngine, Overloaded


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
        with pytest.raises(Overloaded, match="at most 50"):
            engine.submit(small.tokenize([[5] * 60]), "embed", timeout=10)
        engine.submit(small.tokenize(["two"]), "embed", timeout=10)
        with pytest.raises(Overloaded, match="queue full"):
            engine.submit(small.tokenize(["three"]), "embed", timeout=10)
    asyncio.run(go())
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
