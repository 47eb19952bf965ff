"""Serving under open-loop load: turboserve (DP and FIFO batching) against peers over HTTP on 127.0.0.1.

    .venv/bin/python benchmarks/serve.py [--rates 50,100,200,400] [--requests 400] [--workloads short,longtail]

Each request is one text (one embedding) from a public length mix (pseudo-text of vocabulary words
whose token count matches the workload's lengths), sent at Poisson arrival times regardless of
answers (open loop), by one asyncio client process. Per system and rate: achieved requests/s and
tokens/s, p50/p99 latency of answered requests, and the share refused with 429/503. The sustainable
rate is the highest offered rate with p99 under --p99-bound and under 1% refused.

"model busy" (turboserve): the share of the run's wall time the model thread spent in forward passes,
from its /metrics counter; a `-nopipe` suffix (e.g. turboserve-int8-fifo-nopipe) runs the server with
--no-pipeline, packing and answering on the model's thread.

Systems: turboserve (fp32 and int8, `--batch-policy dp` and `fifo`); sentence-transformers behind
the same Starlette/uvicorn stack (this file's `st_app`, FIFO batches of up to 32); Infinity
(infinity-emb, its torch and optimum engines) if installed in the interpreter given by --infinity-python:

    python3 -m venv .bench/infinity-venv && .bench/infinity-venv/bin/pip install torch==2.13.0 "infinity-emb[server,torch,optimum]"
"""
from __future__ import annotations

import argparse
import asyncio
import json
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


def texts_for(workload: str, n: int) -> tuple[list[str], list[int]]:
    """n texts of the workload's token lengths (with [CLS] and [SEP]), and those lengths."""
    from tokenizers import Tokenizer

    from turboserve.loader import default_model_path
    from turboserve.workloads import encoder_lengths
    tok = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
    words = sorted(w for w in tok.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2)
    rng = random.Random(7)
    lengths = [max(3, length) for length in encoder_lengths(workload)[:n]]
    # one token per whole word (they are vocabulary words), plus [CLS] and [SEP]
    return [" ".join(rng.choice(words) for _ in range(length - 2)) for length in lengths], lengths


class Http11Pool:
    """A lean keep-alive HTTP/1.1 client on asyncio streams. httpx spent ~20 ms of CPU per request with
    hundreds of connections open, on the same 2 cores as the server, so it measured itself; this costs
    well under 1 ms. One connection per in-flight request, reused when idle."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.idle: list = []

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        while self.idle:
            reader, writer = self.idle.pop()
            try:
                return await self._post(reader, writer, path, body)
            except (OSError, asyncio.IncompleteReadError):
                continue        # the server closed this idle keep-alive connection: use another
        return await self._post(*await asyncio.open_connection(self.host, self.port), path, body)

    async def _post(self, reader, writer, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)}
            if headers.get(b"transfer-encoding") == b"chunked":
                data = b""
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    data += (await reader.readexactly(size + 2))[:size]
                    if size == 0:
                        break
            else:
                data = await reader.readexactly(int(headers.get(b"content-length", b"0")))
        except BaseException:
            writer.close()
            raise
        if headers.get(b"connection") == b"close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return status, data

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def run_load(base: str, path: str, body_of, texts, lengths, rate: float) -> dict:
    """Open loop: request i is sent at its Poisson arrival time whatever the answers so far; its latency
    runs from that scheduled time (so client-side delay counts against the system, never hides it)."""
    host, port = base.rsplit("//", 1)[1].split(":")
    pool = Http11Pool(host, int(port))
    bodies = [json.dumps(body_of(t)).encode() for t in texts]
    rng = np.random.default_rng(11)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=len(texts)))
    lat, refused, failed, tokens = [], 0, 0, 0
    start = time.perf_counter()

    async def one(i):
        nonlocal refused, failed, tokens
        due = start + arrivals[i]
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            status, _ = await asyncio.wait_for(pool.post(path, bodies[i]), 120)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            failed += 1
            return
        if status == 200:
            lat.append(time.perf_counter() - due)
            tokens += lengths[i]
        elif status in (429, 503):
            refused += 1
        else:
            failed += 1
    await asyncio.gather(*(one(i) for i in range(len(texts))))
    wall = time.perf_counter() - start
    pool.close()
    return {"rps": len(lat) / wall, "tps": tokens / wall, "wall": wall,
            "p50": float(np.percentile(lat, 50)) if lat else float("nan"),
            "p99": float(np.percentile(lat, 99)) if lat else float("nan"),
            "refused": refused / len(texts), "failed": failed}


def model_busy(base: str) -> float | None:
    """turboserve's model_busy_seconds counter (None for servers without it): its growth over a run
    divided by the run's wall time is the share of time the model thread was running forwards."""
    import urllib.request
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("turboserve_model_busy_seconds_total "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


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


def start(cmd, env=None, cwd=None):
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def min_cosine(base: str, path: str, body_of, texts, reference) -> float:
    """The served vectors of `texts`, one request each, against `reference` (turboserve fp32 in-process)."""
    import httpx
    got = []
    for t in texts:
        js = httpx.post(base + path, json=body_of(t), timeout=60).json()
        got.append(js["data"][0]["embedding"] if isinstance(js, dict) else js[0])
    a = np.asarray(got, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def infinity_model_dir() -> Path:
    """The bundled model for Infinity, in a directory of links of its own (Infinity writes a cache
    directory into its working directory). Its optimum (ONNX Runtime) engine only loads a model
    directory that already holds an .onnx file (it will not export offline), and its own graph
    optimization fails with optimum 2.x: give it the ORT BERT-optimized graph benchmarks/encoder.py
    builds, as model.onnx. Infinity 0.0.78 also passes optimum an absolute file name, which optimum 2.x
    rejects, so the server runs inside this directory with --model-id "."."""
    import json

    from encoder import onnx_model

    from turboserve.loader import default_model_path
    src = default_model_path()
    onnx_file = onnx_model(src, json.loads((src / "config.json").read_text()), quant=False)
    d = ROOT / ".bench" / "infinity-minilm"
    d.mkdir(parents=True, exist_ok=True)
    for name, f in [*((f.name, f) for f in src.iterdir() if not f.name.startswith(".")), ("model.onnx", onnx_file)]:
        if not (d / name).exists():
            (d / name).symlink_to(f.resolve())
    return d


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
    ap.add_argument("--rates", default="50,100,150,200,300,400,600", help="offered req/s for turboserve")
    ap.add_argument("--peer-rates", default="10,20,30,40,50,75,100", help="offered req/s for the peers")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--workloads", default="short,longtail")
    ap.add_argument("--threads", type=int, default=2, help="model threads of every server")
    ap.add_argument("--p99-bound", type=float, default=0.5)
    ap.add_argument("--systems", default="turboserve-int8-dp,turboserve-int8-fifo,turboserve-fp32-dp,sentence-transformers,"
                    "infinity-torch,infinity-optimum")
    ap.add_argument("--infinity-python", default=str(ROOT / ".bench" / "infinity-venv" / "bin" / "python"))
    ap.add_argument("--serve-st", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_st:
        import uvicorn
        uvicorn.run(st_app(args.threads), host="127.0.0.1", port=args.serve_st, log_level="warning")
        return
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; server model threads: "
          f"{args.threads}; load generator: 1 asyncio process on the same cores; p99 bound {args.p99_bound}s")
    from turboserve import Encoder
    from turboserve.workloads import WORKLOAD_MAX_LENGTH
    systems = args.systems.split(",")
    sustained = {}
    for wl in args.workloads.split(","):
        texts, lengths = texts_for(wl, args.requests)
        probe = texts[:48]
        reference = Encoder.load(threads=args.threads, max_input_length=WORKLOAD_MAX_LENGTH).embed(probe).numpy()
        print(f"\n## {wl}: {len(texts)} requests of one text each ({sum(lengths) / len(lengths):.1f} tokens on average), "
              "Poisson arrivals; min cos: served vectors of 48 texts against turboserve fp32 in-process")
        print("| system | offered req/s | achieved req/s | tokens/s | p50 ms | p99 ms | refused | failed | min cos | model busy |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for system in systems:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            env, cwd = dict(os.environ), None
            if system.startswith("turboserve"):
                _, dtype, policy, *rest = system.split("-")
                cmd = [sys.executable, "-m", "turboserve", "serve", "--port", str(port), "--dtype", dtype,
                       "--threads", str(args.threads), "--batch-policy", policy,
                       "--max-input-length", str(WORKLOAD_MAX_LENGTH)]
                cmd += ["--no-pipeline"] if "nopipe" in rest else []
                path, body = "/embed", (lambda t: {"inputs": t})
            elif system == "sentence-transformers":
                cmd = [sys.executable, __file__, "--serve-st", str(port), "--threads", str(args.threads)]
                path, body = "/embed", (lambda t: {"inputs": t})
            elif system.startswith("infinity"):
                if not Path(args.infinity_python).exists():
                    print(f"| {system} | skipped: no interpreter at {args.infinity_python} | | | | | | | |")
                    continue
                engine = system.split("-")[1]
                cwd = infinity_model_dir()
                cmd = [args.infinity_python, "-m", "infinity_emb.cli", "v2", "--model-id", ".", "--served-model-name",
                       "minilm", "--port", str(port), "--engine", engine, "--device", "cpu", "--batch-size", "32",
                       "--pooling-method", "mean"]     # its "auto" picks CLS pooling for the ONNX model: wrong
                env.update(OMP_NUM_THREADS=str(args.threads), INFINITY_ANONYMOUS_USAGE_STATS="0", HF_HUB_OFFLINE="1")
                path, body = "/embeddings", (lambda t: {"input": [t], "model": "minilm"})
            else:
                raise SystemExit(f"unknown system {system}")
            proc = start(cmd, env, cwd)
            try:
                wait_healthy(base, proc)
                asyncio.run(run_load(base, path, body, texts[:20], lengths, 20.0))     # warm-up
                quality = min_cosine(base, path, body, probe, reference)
                best = (0.0, 0.0)
                for rate in (float(r) for r in (args.rates if system.startswith("turboserve") else args.peer_rates).split(",")):
                    busy0 = model_busy(base)
                    r = asyncio.run(run_load(base, path, body, texts, lengths, rate))
                    busy1 = model_busy(base)
                    busy = f"{(busy1 - busy0) / r['wall']:.0%}" if busy0 is not None and busy1 is not None else ""
                    print(f"| {system} | {rate:.0f} | {r['rps']:.1f} | {r['tps']:.0f} | {r['p50'] * 1e3:.0f} | {r['p99'] * 1e3:.0f} | "
                          f"{r['refused']:.0%} | {r['failed']} | {quality:.5f} | {busy} |", flush=True)
                    if r["p99"] <= args.p99_bound and r["refused"] < 0.01 and r["failed"] == 0:
                        best = max(best, (r["rps"], r["tps"]))
                sustained[(wl, system)] = best
            except Exception as exc:
                print(f"| {system} | failed: {exc} | | | | | | | |")
            finally:
                stop(proc)
    print(f"\n## sustainable throughput: the best offered rate answered with p99 <= {args.p99_bound * 1e3:.0f} ms, "
          "< 1% refused, none failed (req/s, tokens/s)")
    print("| workload | " + " | ".join(systems) + " |")
    print("|---|" + "---:|" * len(systems))
    for wl in args.workloads.split(","):
        cells = (sustained.get((wl, s)) for s in systems)
        print(f"| {wl} | " + " | ".join(f"{c[0]:.1f} ({c[1]:.0f})" if c else "n/a" for c in cells) + " |")
    for wl in args.workloads.split(","):
        peer = max((sustained.get((wl, s), (0.0, 0.0))[0] for s in systems if s.startswith("infinity")), default=0.0)
        for s in systems:
            if s.startswith("turboserve") and peer and (wl, s) in sustained:
                print(f"{wl}: {s} / best Infinity = {sustained[(wl, s)][0] / peer:.2f}x")


if __name__ == "__main__":
    main()
