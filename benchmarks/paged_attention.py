"""Decode attention over the paged KV cache in each element type (kernels.c `paged_attention`), in
isolation: one query token per sequence, every sequence at the same context length, blocks of 16.

    .venv/bin/python benchmarks/paged_attention.py [--seqs 48] [--ctx 300] [--heads 12] [--head-dim 64]
                                                   [--softcap 50]

Prints per cache dtype the best of 20 calls and the cache bytes read per second (K and V of every
context token; int8's scales not counted), and the output's max error against the fp32 cache relative
to the output's largest value. GPT-2 small's attention shape by default. --softcap: the same calls
with Gemma 2's soft-capped scores too, timed alternately with the plain ones (its cost in the last column).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encoder import machine, timed  # noqa: E402

from turboserve import native  # noqa: E402
from turboserve.ops import cpu  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=48)
    ap.add_argument("--ctx", type=int, default=300)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--softcap", type=float, default=0.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if native.lib() is None:
        raise SystemExit("the native kernels are not built (no C compiler)")
    n, ctx, nh, d, bs = args.seqs, args.ctx, args.heads, args.head_dim, 16
    nblk = -(-ctx // bs)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(n * nblk * bs, nh, d, generator=g)
    v = torch.randn(n * nblk * bs, nh, d, generator=g)
    q = torch.randn(n, nh * d, generator=g)
    blocks = torch.arange(n * nblk).repeat_interleave(bs)
    offsets = torch.arange(bs).repeat(n * nblk)
    tables = torch.randperm(n * nblk, generator=g).to(torch.int32).view(n, nblk)
    cu, ctx_len = torch.arange(n + 1), torch.full((n,), ctx)
    print(f"# {machine()}, {args.threads} threads; {n} sequences x {ctx} "
          f"tokens, {nh} heads, d {d}")
    capped = f" with softcap {args.softcap:g} |" if args.softcap else ""
    print(f"| cache | time | cache GB/s | max error / max output vs fp32 |{capped}")
    print("|---|---:|---:|---:|" + ("---:|" if capped else ""))
    ref = None
    for kv in ("fp32", "bf16", "int8"):
        cache = cpu.allocate_kv_cache(1, n * nblk, nh, bs, d, kv)[0]
        cpu.write_kv(cache, k, v, blocks, offsets)

        def run(softcap=0.0):
            return cpu.paged_attention(q, cache, tables, cu, ctx_len, nh, 0, d ** -0.5, ctx, softcap)
        out = run()
        ref = out if ref is None else ref
        best, best_capped = float("inf"), float("inf")
        for _ in range(4):                 # alternating, so the VM's drift falls on both
            best = min(best, timed(run, 5))
            if args.softcap:
                best_capped = min(best_capped, timed(lambda: run(args.softcap), 5))
        nbytes = n * ctx * nh * d * 2 * {"fp32": 4, "bf16": 2, "int8": 1}[kv]
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        extra = f" {best_capped * 1e3:.3f} ms ({best_capped / best - 1:+.1%}) |" if args.softcap else ""
        print(f"| {kv} | {best * 1e3:.3f} ms | {nbytes / best / 1e9:.1f} | {err:.1e} |{extra}")


if __name__ == "__main__":
    main()
