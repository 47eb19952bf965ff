"""Serving under open-loop load: turboserve (DP and FIFO batching) against peers over HTTP on 127.0.0.1.

    .venv/bin/python benchmarks/serve.py [--rates 50,100,200,400] [--requests 400] [--workloads short,longtail]

Each request is one text (one embedding) from a public length mix (pseudo-text of vocabulary words
whose token count matches the workload's lengths), sent at Poisson arrival times regardless of
answers (open loop), by one asyncio client process. Per system and rate: achieved requests/s and
tokens/s, p50/p99 latency of answered requests, and the share refused with 429/503. The sustainable
rate is the highest offered rate with p99 under --p99-bound and under 1% refused.

Systems: turboserve (fp32 and int8, `--batch-policy dp` and `fifo`); sentence-transformers behind
the same Starlette/uvicorn stack (this file's `st_app`, FIFO batches of up to 32); Infinity
(infinity-emb) if installed in the interpreter given by --infinity-python.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def texts_for(workload: str, n: int) -> list[str]:
    from turboserve.loader import default_model_path
    from turboserve.workloads import encoder_lengths
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
    words = sorted(w for w in tok.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2)
    rng = random.Random(7)
    out = []
    for length in encoder_lengths(workload)[:n]:
        # one token per whole word (they are vocabulary words), plus [CLS] and [SEP]
        out.append(" ".join(rng.choice(words) for _ in range(max(1, length - 2))))
    return out


async def run_load(base: str, path: str, body_of, texts, rate: float, timeout: float = 60.0) -> dict:
    import httpx
    rng = np.random.default_rng(11)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=len(texts)))
    lat, refused, failed = [], 0, 0
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()

        async def one(i):
            nonlocal refused, failed
            delay = start + arrivals[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t = time.perf_counter()
            try:
                r = await client.post(path, json=body_of(texts[i]))
            except Exception:
                failed += 1
                return
            if r.status_code == 200:
                lat.append(time.perf_counter() - t)
            elif r.status_code in (429, 503):
                refused += 1
            else:
                failed += 1
        await asyncio.gather(*(one(i) for i in range(len(texts))))
        wall = time.perf_counter() - start
    done = len(lat)
    return {"rps": done / wall, "p50": float(np.percentile(lat, 50)) if lat else float("nan"),
            "p99": float(np.percentile(lat, 99)) if lat else float("nan"),
            "refused": refused / len(texts), "failed": failed}


def wait_healthy(base: str, proc, path="/health", timeout=300):
    import httpx
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(base + path, timeout=2).status_code == 200:
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not become healthy")


def start(cmd, env=None):
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------------- the sentence-transformers peer
def st_app(threads: int):
    """sentence-transformers behind the same Starlette/uvicorn stack: a worker thread takes up to 32
    queued texts at a time (FIFO) and calls SentenceTransformer.encode."""
    import threading
    import torch
    from sentence_transformers import SentenceTransformer
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
    from turboserve.loader import default_model_path
    torch.set_num_threads(threads)
    model = SentenceTransformer(str(default_model_path()), device="cpu")
    queue: list = []
    cv = threading.Condition()

    def worker():
        while True:
            with cv:
                while not queue:
                    cv.wait()
                batch, queue[:] = queue[:32], queue[32:]
            vecs = model.encode([t for t, _, _ in batch], batch_size=32)
            for (_, loop, fut), v in zip(batch, vecs):
                loop.call_soon_threadsafe(fut.set_result, v.tolist())
    threading.Thread(target=worker, daemon=True).start()

    async def embed(request):
        body = await request.json()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        inputs = body["inputs"] if isinstance(body["inputs"], list) else [body["inputs"]]
        with cv:
            if len(queue) > 512:
                return JSONResponse({"error": "overloaded"}, status_code=429)
            queue.append((inputs[0], loop, fut))
            cv.notify()
        return JSONResponse([await fut])

    async def health(request):
        return Response(status_code=200)
    return Starlette(routes=[Route("/embed", embed, methods=["POST"]), Route("/health", health)])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="25,50,100,200,400")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--workloads", default="short,longtail")
    ap.add_argument("--threads", type=int, default=2, help="model threads of every server")
    ap.add_argument("--p99-bound", type=float, default=0.5)
    ap.add_argument("--systems", default="turboserve-int8-dp,turboserve-int8-fifo,turboserve-fp32-dp,sentence-transformers,infinity")
    ap.add_argument("--infinity-python", default=str(ROOT / ".bench" / "infinity-venv" / "bin" / "python"))
    ap.add_argument("--serve-st", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_st:
        import uvicorn
        uvicorn.run(st_app(args.threads), host="127.0.0.1", port=args.serve_st, log_level="warning")
        return
    from turboserve.loader import default_model_path
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; server model threads: "
          f"{args.threads}; load generator: 1 asyncio process on the same cores; p99 bound {args.p99_bound}s")
    rates = [float(r) for r in args.rates.split(",")]
    sustained = {}
    for wl in args.workloads.split(","):
        texts = texts_for(wl, args.requests)
        print(f"\n## {wl}: {len(texts)} requests of one text each, Poisson arrivals")
        print("| system | offered req/s | achieved req/s | p50 ms | p99 ms | refused | failed |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for system in args.systems.split(","):
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            env = dict(os.environ)
            if system.startswith("turboserve"):
                _, dtype, policy = system.split("-")
                cmd = [sys.executable, "-m", "turboserve", "serve", "--port", str(port), "--dtype", dtype,
                       "--threads", str(args.threads), "--batch-policy", policy]
                path, body = "/embed", (lambda t: {"inputs": t})
            elif system == "sentence-transformers":
                cmd = [sys.executable, __file__, "--serve-st", str(port), "--threads", str(args.threads)]
                path, body = "/embed", (lambda t: {"inputs": t})
            elif system == "infinity":
                if not Path(args.infinity_python).exists():
                    print(f"| infinity | skipped: no interpreter at {args.infinity_python} | | | | | |")
                    continue
                cmd = [args.infinity_python, "-m", "infinity_emb.cli", "v2", "--model-id", str(default_model_path()),
                       "--port", str(port), "--engine", "torch", "--device", "cpu", "--batch-size", "32"]
                env.update(OMP_NUM_THREADS=str(args.threads), INFINITY_ANONYMOUS_USAGE_STATS="0", HF_HUB_OFFLINE="1")
                path, body = "/embeddings", (lambda t: {"input": [t], "model": str(default_model_path())})
            else:
                raise SystemExit(f"unknown system {system}")
            proc = start(cmd, env)
            try:
                wait_healthy(base, proc)
                asyncio.run(run_load(base, path, body, texts[:20], 20.0))     # warm-up
                best = 0.0
                for rate in rates:
                    r = asyncio.run(run_load(base, path, body, texts, rate))
                    print(f"| {system} | {rate:.0f} | {r['rps']:.1f} | {r['p50'] * 1e3:.0f} | {r['p99'] * 1e3:.0f} | "
                          f"{r['refused']:.0%} | {r['failed']} |", flush=True)
                    if r["p99"] <= args.p99_bound and r["refused"] < 0.01 and r["failed"] == 0:
                        best = max(best, r["rps"])
                sustained[(wl, system)] = best
            except Exception as exc:
                print(f"| {system} | failed: {exc} | | | | | |")
            finally:
                stop(proc)
    print(f"\n## sustainable throughput (req/s with p99 <= {args.p99_bound * 1e3:.0f} ms, < 1% refused)")
    print("| workload | " + " | ".join(args.systems.split(",")) + " |")
    print("|---|" + "---:|" * len(args.systems.split(",")))
    for wl in args.workloads.split(","):
        print(f"| {wl} | " + " | ".join(f"{sustained.get((wl, s), float('nan')):.1f}" for s in args.systems.split(",")) + " |")


if __name__ == "__main__":
    main()
