"""Memory planner on/off: time and peak memory on the `longtail` workload (real MiniLM, 2 threads).

    .venv/bin/python benchmarks/planner.py [--dtype fp32] [--batch-tokens 4096]

Each configuration runs in a fresh subprocess so peak RSS (ru_maxrss) is its own; the model's
resident size after loading is subtracted to give the activation peak.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(planner: bool, dtype: str, batch_tokens: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    from turboserve import Encoder
    from turboserve.workloads import WORKLOAD_MAX_LENGTH, encoder_lengths, token_sequences, word_token_ids
    torch.set_num_threads(2)
    enc = Encoder.load(dtype=dtype, use_planner=planner, max_batch_tokens=batch_tokens, threads=2,
                       max_input_length=WORKLOAD_MAX_LENGTH)
    vocab = enc.tokenizer._tok.get_vocab()
    seqs = token_sequences(encoder_lengths("longtail"), word_token_ids(vocab), vocab["[CLS]"], vocab["[SEP]"])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    enc.embed(seqs[:32])
    times = []
    for _ in range(3):
        t = time.perf_counter()
        enc.embed(seqs)
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"tokens": sum(map(len, seqs)), "best_s": min(times), "activation_peak_mib": (peak - base) / 1024,
            "workspace_mib": enc.model.workspace.reserved_bytes / 2**20}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--child", choices=["on", "off"])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "on", args.dtype, args.batch_tokens)))
        return
    print(f"longtail, all-MiniLM-L6-v2 {args.dtype}, batches of <= {args.batch_tokens} tokens, 2 threads")
    print("| planner | real tokens/s | peak RSS growth over the loaded model (MiB) | workspace reserved (MiB) |")
    print("|---|---:|---:|---:|")
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--dtype", args.dtype,
                              "--batch-tokens", str(args.batch_tokens)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {mode} | {r['tokens'] / r['best_s']:,.0f} | {r['activation_peak_mib']:.0f} | {r['workspace_mib']:.0f} |")


if __name__ == "__main__":
    main()
