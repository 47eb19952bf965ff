"""Tensor parallelism on this machine: TP=2 (two ranks, 1 thread each, gloo) against TP=1 (one
process, 2 threads), with the share of each step spent in collectives.

    .venv/bin/python benchmarks/tp.py [--cases encoder,decode,prefill] [--requests 128]

Cases (random weights, the shapes of DESIGN.md section 5):
  encoder  prefill-heavy: bert-base shape, the first `--requests` of the `short` workload, batches of
           up to 4096 tokens (length-sorted); time per batch and tokens/s
  decode   decode-heavy: GPT-2 small shape, 16 sequences (32-token prompts) decoding together; time
           per decode step (16 tokens)
  prefill  prefill-heavy: GPT-2 small shape, 4 prompts of 512 tokens as one 2048-token step
The collective share is measured on rank 0 (TPGroup.comm): time inside all_reduce / all_gather and
the step broadcast, waits for the other rank included. Bytes per step are what the all-reduces carry:
2 per layer (+1 for the vocabulary-parallel embedding) of [T, hidden] fp32.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder import machine, model_dir  # noqa: E402  (benchmarks/encoder.py: bert-base directory)
from generate import build  # noqa: E402  (benchmarks/generate.py: GPT-2 small directory)

from turboserve import LLM, Encoder, SamplingParams  # noqa: E402
from turboserve.packing import pack_tokens  # noqa: E402
from turboserve.workloads import encoder_lengths, token_sequences, word_token_ids  # noqa: E402


def comm_split(model, wall: float) -> str:
    """Per-op share of `wall` spent in collectives on rank 0 (single process: none)."""
    tp = getattr(model, "tp", None)
    if tp is None:
        return "-"
    parts = [f"{op} {100 * s / wall:.1f}% ({n} calls)" for op, (s, n) in sorted(tp.comm.items())]
    total = sum(s for s, _ in tp.comm.values())
    return f"{100 * total / wall:.1f}% = " + ", ".join(parts)


def reset(model) -> None:
    if getattr(model, "tp", None) is not None:
        model.tp.reset_counters()


def bench_encoder(tp: int, requests: int) -> dict:
    enc = Encoder.load(model_dir("bert-base"), threads=2, tensor_parallel=tp)
    try:
        vocab = enc.tokenizer._tok.get_vocab()
        lengths = sorted(encoder_lengths("short")[:requests])
        seqs = token_sequences(lengths, word_token_ids(vocab), vocab["[CLS]"], vocab["[SEP]"])
        batches, group, tokens = [], [], 0
        for s in seqs:
            if tokens + len(s) > 4096:
                batches.append(pack_tokens(group))
                group, tokens = [], 0
            group.append(s)
            tokens += len(s)
        batches.append(pack_tokens(group))
        model = enc.model
        model.forward(batches[0])                               # warm-up: workspace, kernels
        best, comm = float("inf"), None
        for _ in range(2):
            reset(model)
            t = time.perf_counter()
            for b in batches:
                model.forward(b)
            wall = time.perf_counter() - t
            if wall < best:
                best, comm = wall, comm_split(model, wall)
        total = sum(lengths)
        return {"wall": best, "per_batch_ms": 1000 * best / len(batches), "tokens_s": total / best,
                "batches": len(batches), "tokens": total, "comm": comm,
                "allreduce_mb": (1 + 2 * model.num_layers) * total * model.hidden * 4 / 2**20}
    finally:
        enc.close()


def _engine(tp: int, budget: int):
    llm = LLM.load(build("gpt2"), threads=2, tensor_parallel=tp, max_batch_tokens=budget, prefix_caching=False)
    return llm, llm.engine


def bench_decode(tp: int, seqs: int = 16, steps: int = 32) -> dict:
    llm, eng = _engine(tp, 2048)
    try:
        rng = np.random.default_rng(3)
        params = SamplingParams(temperature=0.0, max_tokens=steps + 16, ignore_eos=True)
        for i in range(seqs):
            eng.add_request(f"d{i}", [int(t) for t in rng.integers(3, 50000, 32)], params)
        for _ in range(5):                                      # the prefill step, then decode warm-up
            eng.step()
        reset(llm.model)
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
        wall = time.perf_counter() - t
        assert eng.last_step_tokens == seqs
        return {"step_ms": 1000 * wall / steps, "tokens_s": seqs * steps / wall, "comm": comm_split(llm.model, wall),
                "allreduce_kb": (1 + 2 * llm.model.num_layers) * seqs * llm.model.hidden * 4 / 1024}
    finally:
        llm.close()


def bench_prefill(tp: int, prompts: int = 4, length: int = 512, repeat: int = 3) -> dict:
    llm, eng = _engine(tp, prompts * length)
    try:
        rng = np.random.default_rng(4)
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        best, comm = float("inf"), None
        for r in range(repeat + 1):                              # the first round warms up
            for i in range(prompts):
                eng.add_request(f"p{r}-{i}", [int(t) for t in rng.integers(3, 50000, length)], params)
            reset(llm.model)
            t = time.perf_counter()
            eng.step()
            wall = time.perf_counter() - t
            assert eng.last_step_tokens == prompts * length and not eng.has_work()
            if r and wall < best:
                best, comm = wall, comm_split(llm.model, wall)
        tokens = prompts * length
        return {"step_ms": 1000 * best, "tokens_s": tokens / best, "comm": comm,
                "allreduce_mb": (1 + 2 * llm.model.num_layers) * tokens * llm.model.hidden * 4 / 2**20}
    finally:
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="encoder,decode,prefill")
    ap.add_argument("--requests", type=int, default=128, help="requests of the `short` workload (encoder case)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print("TP=1: one process, 2 threads; TP=2: two gloo ranks on this machine, 1 thread each\n")
    for case in args.cases.split(","):
        for tp in (1, 2):
            if case == "encoder":
                r = bench_encoder(tp, args.requests)
                print(f"encoder bert-base short[:{args.requests}] TP={tp}: {r['tokens']} tokens in {r['batches']} "
                      f"batches, {r['per_batch_ms']:.1f} ms/batch, {r['tokens_s']:.0f} tokens/s; "
                      f"all-reduce payload {r['allreduce_mb']:.0f} MiB; collectives {r['comm']}")
            elif case == "decode":
                r = bench_decode(tp)
                print(f"decode gpt2 16 seqs TP={tp}: {r['step_ms']:.1f} ms/step, {r['tokens_s']:.0f} tokens/s; "
                      f"all-reduce payload {r['allreduce_kb']:.0f} KiB/step; collectives {r['comm']}")
            elif case == "prefill":
                r = bench_prefill(tp)
                print(f"prefill gpt2 4x512 TP={tp}: {r['step_ms']:.0f} ms/step, {r['tokens_s']:.0f} tokens/s; "
                      f"all-reduce payload {r['allreduce_mb']:.0f} MiB/step; collectives {r['comm']}")
            else:
                raise SystemExit(f"unknown case {case!r}; known: encoder, decode, prefill")
            sys.stdout.flush()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
