"""Decoder embedding models (prenorm_encoder.py): turboserve against transformers, the engine that
sentence-transformers runs these models on.

    .venv/bin/python benchmarks/embed_decoder.py [--workloads short,longtail] [--requests 128] [--interleave 3]

Model: the Qwen3-Embedding-0.6B shape (28 layers, hidden 1,024, 16 query heads of 128 over 8 KV
heads, FFN 3,072, vocabulary 151,669) with random weights, built once into .bench/. Its pooling is
the last token's state (no Normalize here: cosines are unchanged by it). Workloads are the public
encoder ones (DESIGN.md section 5), the first --requests of each, as token ids ending in the
model's end-of-text id, as Qwen3-Embedding's tokenizer makes them.

Systems: turboserve fp32 / bf16 / int8 (packed, no padding), transformers (sdpa) with padded batches
of 32 in arrival order and sorted by length (what sentence-transformers' encode does: it sorts),
fp32 and bf16. Quality: minimum cosine over all requests against transformers fp32 with each request
alone. Throughput: real tokens per second, 2 threads; the FLOP rate (linears and attention of real
tokens) as a fraction of the fp32 GEMM peak measured at the start.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encoder import CACHE, batches_of, gemm_peaks, machine, min_cosine, padded, timed  # noqa: E402
from turboserve import Encoder  # noqa: E402
from turboserve.workloads import encoder_lengths  # noqa: E402

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151669, max_position_embeddings=32768,
                 rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=151643)


def model_dir() -> Path:
    d = CACHE / "qwen3-embedding-0.6b-shape"
    if not (d / "config.json").exists():
        import transformers
        torch.manual_seed(0)
        transformers.Qwen3Model(transformers.Qwen3Config(**QWEN3_06B)).save_pretrained(d)
        (d / "1_Pooling").mkdir(exist_ok=True)
        (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 1024,
                                                                  "pooling_mode": "lasttoken"}))
        (d / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        tokenizer_json(d)
    return d


def tokenizer_json(d: Path) -> None:
    """A word-level tokenizer over the model's vocabulary (the benchmark feeds token ids; the Encoder
    still needs a tokenizer file to load)."""
    from tokenizers import Tokenizer, models
    vocab = {f"t{i}": i for i in range(QWEN3_06B["vocab_size"])}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(d / "tokenizer.json"))


def sequences(workload: str, n: int) -> list[list[int]]:
    rng = np.random.default_rng(99)
    eos = QWEN3_06B["eos_token_id"]
    return [[int(t) for t in rng.integers(1000, 100000, length - 1)] + [eos] for length in encoder_lengths(workload)[:n]]


def flops(config: dict, length: int) -> float:
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    linear = 2 * length * (h * (q + 2 * kv) + q * h + 3 * h * i)
    attention = 2 * length * length * q          # causal: half of QK^T and PV
    return layers * (linear + attention)


def run_turboserve(path, seqs, dtype):
    enc = Encoder.load(path, dtype=dtype)
    out = [None]

    def go():
        out[0] = enc.embed(seqs).numpy()
    return go, out


def run_transformers(path, seqs, dtype, sort, batch=32):
    import transformers
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval().to(dtype)
    out = [None]

    def go():
        rows = [None] * len(seqs)
        with torch.inference_mode():
            for idx in batches_of(seqs, batch, sort):
                ids, mask = padded(seqs, idx)              # right padding: a causal model's real tokens ignore it
                h = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
                for r, i in enumerate(idx):
                    rows[i] = h[r, len(seqs[i]) - 1].float().numpy()
        out[0] = np.stack(rows)
    return go, out


def reference(path, seqs) -> np.ndarray:
    import transformers
    model = transformers.AutoModel.from_pretrained(path).eval()
    with torch.inference_mode():
        return np.stack([model(torch.tensor([s])).last_hidden_state[0, -1].numpy() for s in seqs])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="short,longtail")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--systems", default="all")
    ap.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                    help="load every system, then time each once per round in turn (best round, with the range)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# machine: {machine()}; threads: {args.threads}")
    peak = gemm_peaks()["fp32"]
    print(f"# fp32 GEMM peak at start: {peak / 1e9:.0f} GFLOP/s")
    path = model_dir()
    config = json.loads((path / "config.json").read_text())
    for wl in args.workloads.split(","):
        seqs = sequences(wl, args.requests)
        tokens = sum(map(len, seqs))
        work = sum(flops(config, len(s)) for s in seqs)
        ref = reference(path, seqs)
        systems = {
            "turboserve fp32": lambda: run_turboserve(path, seqs, "fp32"),
            "turboserve bf16": lambda: run_turboserve(path, seqs, "bf16"),
            "turboserve int8": lambda: run_turboserve(path, seqs, "int8"),
            "transformers fp32 padded/32": lambda: run_transformers(path, seqs, torch.float32, False),
            "transformers fp32 sorted/32": lambda: run_transformers(path, seqs, torch.float32, True),
            "transformers bf16 sorted/32": lambda: run_transformers(path, seqs, torch.bfloat16, True),
        }
        wanted = set(systems) if args.systems == "all" else {s.strip() for s in args.systems.split(",")}
        print(f"\n## Qwen3-Embedding-0.6B shape, {wl}: {len(seqs)} requests, {tokens} real tokens")
        print("| system | real tokens/s | min cosine vs fp32 | fraction of fp32 GEMM peak |")
        print("|---|---:|---:|---:|")

        def report(name, t, out, spread=None):
            rounds = f" (rounds {spread})" if spread else ""
            print(f"| {name} | {tokens / t:,.0f}{rounds} | {min_cosine(out[0], ref):.5f} | {work / t / peak:.0%} |",
                  flush=True)
        loaded = {}
        for name, factory in systems.items():
            if name not in wanted:
                continue
            go, out = factory()
            if args.interleave:
                loaded[name] = (go, out)
            else:
                report(name, timed(go, repeat=3), out)
        for go, _ in loaded.values():
            go()
        times = {k: [] for k in loaded}
        for _ in range(args.interleave):
            for name, (go, _) in loaded.items():
                t = time.perf_counter()
                go()
                times[name].append(time.perf_counter() - t)
        for name, (_, out) in loaded.items():
            report(name, min(times[name]), out, f"{tokens / max(times[name]):,.0f}-{tokens / min(times[name]):,.0f}")


if __name__ == "__main__":
    main()
