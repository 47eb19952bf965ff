"""Embedding models on the pre-norm layers (prenorm_encoder.py): turboserve against transformers, the
engine that sentence-transformers runs these models on.

    .venv/bin/python benchmarks/embed_decoder.py [--models qwen3-embedding,embeddinggemma] [--workloads short,longtail]
                                                 [--requests 128] [--interleave 3]

Models, random weights in the real ones' shapes, built once into .bench/:
- qwen3-embedding: Qwen3-Embedding-0.6B (28 layers, hidden 1,024, 16 query heads of 128 over 8 KV
  heads, FFN 3,072, vocabulary 151,669), causal, pooled by the last token;
- embeddinggemma: EmbeddingGemma-300m (Gemma 3, bidirectional, 24 layers, hidden 768, 3 query heads
  of 256 over 1 KV head, FFN 1,152, vocabulary 262,144, sliding window 512), mean-pooled.
No Normalize or Dense modules here (cosines, and the heavy part, are the transformer's). Workloads are
the public encoder ones (DESIGN.md section 5), the first --requests of each, as token ids ending in
the model's end-of-text id.

Systems: turboserve fp32 / bf16 / int8 / auto at 0.999 (packed, no padding; auto's plan is made on
the first run, its time printed, and saved beside the model), transformers (sdpa) with padded batches
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
from encoder import CACHE, batches_of, gemm_peaks, interleaved, machine, min_cosine, padded, timed  # noqa: E402
from turboserve import Encoder  # noqa: E402
from turboserve.workloads import encoder_lengths  # noqa: E402

# name -> (transformers config and base model class names, config, pooling)
MODELS = {
    "qwen3-embedding": ("Qwen3Config", "Qwen3Model", dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, vocab_size=151669, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, eos_token_id=151643), "lasttoken"),
    "embeddinggemma": ("Gemma3TextConfig", "Gemma3TextModel", dict(
        hidden_size=768, intermediate_size=1152, num_hidden_layers=24, num_attention_heads=3, num_key_value_heads=1,
        head_dim=256, vocab_size=262144, max_position_embeddings=2048, query_pre_attn_scalar=256, sliding_window=512,
        use_bidirectional_attention=True, rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=1), "mean"),
}


def model_dir(name: str) -> Path:
    d = CACHE / f"{name}-shape"
    config_cls, model_cls, config, pooling = MODELS[name]
    if not (d / "config.json").exists():
        import transformers
        torch.manual_seed(0)
        getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).save_pretrained(d)
        (d / "1_Pooling").mkdir(exist_ok=True)
        (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": config["hidden_size"],
                                                                  "pooling_mode": pooling}))
        (d / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    tokenizer_json(d, config["vocab_size"])         # rewritten: directories built before had no pre-tokenizer
    return d


def tokenizer_json(d: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the model's vocabulary, "t0" ... "tN" split on whitespace (the
    benchmark feeds token ids; the Encoder needs a tokenizer file, and dtype auto's calibration texts
    are words of it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))


def sequences(name: str, workload: str, n: int) -> list[list[int]]:
    rng = np.random.default_rng(99)
    eos = MODELS[name][2]["eos_token_id"]
    return [[int(t) for t in rng.integers(1000, 100000, length - 1)] + [eos] for length in encoder_lengths(workload)[:n]]


def flops(config: dict, length: int) -> float:
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    linear = 2 * length * (h * (q + 2 * kv) + q * h + 3 * h * i)
    # causal: half of QK^T and PV; bidirectional: all of it (turboserve computes every score of a
    # sequence on the sliding layers too)
    attention = (4 if config.get("use_bidirectional_attention") else 2) * length * length * q
    return layers * (linear + attention)


def run_turboserve(path, seqs, dtype):
    t = time.perf_counter()
    enc = Encoder.load(path, dtype=dtype)
    if dtype == "auto":
        m = enc.precision_plan.measured
        print(f"# auto (0.999) loaded in {time.perf_counter() - t:.0f} s (planned in {m['planned_in_s']} s, "
              f"calibration pass {m['calibration_forward_s']} s, search: {m['search']}): "
              f"{enc.precision_plan.summary()}; held-out {m['heldout_min_cosine']}, linear time "
              f"{m['linear_time_fraction_of_fp32']:.0%} of fp32",
              flush=True)
    out = [None]

    def go():
        out[0] = enc.embed(seqs).numpy()
    return go, out


def pooled(h: torch.Tensor, length: int, pooling: str) -> np.ndarray:
    """One sequence's pooled state from its rows of a padded batch (right padding)."""
    return (h[length - 1] if pooling == "lasttoken" else h[:length].mean(0)).float().numpy()


def run_transformers(path, seqs, dtype, sort, pooling, batch=32):
    import transformers
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval().to(dtype)
    out = [None]

    def go():
        rows = [None] * len(seqs)
        with torch.inference_mode():
            for idx in batches_of(seqs, batch, sort):
                ids, mask = padded(seqs, idx)              # right padding, masked
                h = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
                for r, i in enumerate(idx):
                    rows[i] = pooled(h[r], len(seqs[i]), pooling)
        out[0] = np.stack(rows)
    return go, out


def reference(path, seqs, pooling) -> np.ndarray:
    import transformers
    model = transformers.AutoModel.from_pretrained(path).eval()
    with torch.inference_mode():
        return np.stack([pooled(model(torch.tensor([s])).last_hidden_state[0], len(s), pooling) for s in seqs])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3-embedding,embeddinggemma")
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
    for model_name in args.models.split(","):
        path = model_dir(model_name)
        config, pooling = MODELS[model_name][2], MODELS[model_name][3]
        for wl in args.workloads.split(","):
            seqs = sequences(model_name, wl, args.requests)
            tokens = sum(map(len, seqs))
            work = sum(flops(config, len(s)) for s in seqs)
            ref = reference(path, seqs, pooling)
            systems = {
                "turboserve fp32": lambda: run_turboserve(path, seqs, "fp32"),
                "turboserve bf16": lambda: run_turboserve(path, seqs, "bf16"),
                "turboserve int8": lambda: run_turboserve(path, seqs, "int8"),
                "turboserve auto (0.999)": lambda: run_turboserve(path, seqs, "auto"),
                "transformers fp32 padded/32": lambda: run_transformers(path, seqs, torch.float32, False, pooling),
                "transformers fp32 sorted/32": lambda: run_transformers(path, seqs, torch.float32, True, pooling),
                "transformers bf16 sorted/32": lambda: run_transformers(path, seqs, torch.bfloat16, True, pooling),
            }
            wanted = set(systems) if args.systems == "all" else {s.strip() for s in args.systems.split(",")}
            print(f"\n## {model_name} shape, {wl}: {len(seqs)} requests, {tokens} real tokens")
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
            times = interleaved(loaded, args.interleave)
            for name, (_, out) in loaded.items():
                report(name, min(times[name]), out, f"{tokens / max(times[name]):,.0f}-{tokens / min(times[name]):,.0f}")


if __name__ == "__main__":
    main()
