"""SPLADE sparse embeddings: turboserve against sentence-transformers' SparseEncoder and ONNX Runtime.

    .venv/bin/python benchmarks/sparse.py [--workloads short,longtail] [--requests 128] [--interleave 3]
    .venv/bin/python benchmarks/sparse.py --workloads short --head       # where the head's time goes

The model is SPLADE's shape (naver/splade-cocondenser and most SPLADE checkpoints: BertForMaskedLM,
bert-base, 30,522-entry vocabulary) with random weights and its vocabulary bias lowered by 2, so a
vector keeps a few hundred terms as a trained one does (no model hub here). Every system gets the same
token sequences of the public workloads (benchmarks/encoder.py) and computes max over tokens of
log(1 + relu(masked-LM logits)). Throughput counts real tokens per second of wall time, 2 threads.
Quality: min cosine, over all requests, of a system's vector against transformers' fp32 masked-LM
logits of each request alone, and the mean overlap of its terms (entries above 0) with the
reference's (|both| / |either|).
Peers: sentence-transformers SparseEncoder (a fill-mask Transformer + SpladePooling, length-sorted
batches of 32 as its encode makes); ONNX Runtime on the exported masked LM, fp32 and dynamic int8, padded length-sorted
batches of 32 pooled in numpy (the way fastembed serves SPLADE).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encoder import CACHE, batches_of, interleaved, machine, min_cosine, onnx_model, padded, timed  # noqa: E402
from turboserve import Encoder  # noqa: E402
from turboserve.loader import default_model_path  # noqa: E402
from turboserve.workloads import WORKLOAD_MAX_LENGTH, encoder_lengths, token_sequences, word_token_ids  # noqa: E402


def model_dir() -> Path:
    d = CACHE / "splade-base"
    if not (d / "config.json").exists():
        import transformers
        torch.manual_seed(0)
        model = transformers.BertForMaskedLM(transformers.BertConfig())
        with torch.no_grad():
            model.cls.predictions.bias.sub_(2.0)
        model.save_pretrained(d)
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
            shutil.copy(default_model_path() / f, d / f)
    return d


def splade_rows(logits: np.ndarray, lengths) -> np.ndarray:
    """Padded [B, L, V] logits -> [B, V]: max over each row's real tokens of log(1 + relu)."""
    return np.stack([np.log1p(np.maximum(row[:n].max(0), 0.0)) for row, n in zip(logits, lengths)])


def run_turboserve(path, seqs, dtype):
    enc = Encoder.load(path, dtype=dtype, pooling="splade", quality_bound=0.999,
                       max_input_length=max(WORKLOAD_MAX_LENGTH, max(map(len, seqs))))
    out = [None]

    def go():
        out[0] = enc.embed(seqs).numpy()
    return go, out


def run_sentence_transformers(path, seqs, dtype, batch=32):
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sentence_transformer.modules import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling
    st = SparseEncoder(modules=[Transformer(str(path), transformer_task="fill-mask", model_kwargs={"dtype": dtype}),
                                SpladePooling("max")], device="cpu")
    out = [None]

    def go():
        # the token ids given as they are: SparseEncoder.encode would tokenize text, and these
        # sequences are token ids; its forward on length-sorted padded batches is what encode runs
        rows = [None] * len(seqs)
        with torch.inference_mode():
            for idx in batches_of(seqs, batch, sort=True):
                ids, mask = padded(seqs, idx)
                f = st.forward({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)})
                emb = f["sentence_embedding"].float()
                for r, i in enumerate(idx):
                    rows[i] = emb[r].numpy()
        out[0] = np.stack(rows)
    return go, out


def run_onnxruntime(path, seqs, threads, quant, batch=32):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    config = json.loads((path / "config.json").read_text())
    sess = ort.InferenceSession(str(onnx_model(path, config, quant, masked_lm=True)), so,
                                providers=["CPUExecutionProvider"])
    out = [None]

    def go():
        rows = [None] * len(seqs)
        for idx in batches_of(seqs, batch, sort=True):
            ids, mask = padded(seqs, idx)
            logits = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
            for r, v in zip(idx, splade_rows(logits, [len(seqs[i]) for i in idx])):
                rows[r] = v
        out[0] = np.stack(rows)
    return go, out


def reference(path, seqs) -> np.ndarray:
    import transformers
    model = transformers.BertForMaskedLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.inference_mode():
        return np.concatenate([splade_rows(model(input_ids=torch.tensor([s])).logits.numpy(), [len(s)]) for s in seqs])


def term_overlap(a: np.ndarray, b: np.ndarray) -> float:
    both, either = ((a > 0) & (b > 0)).sum(1), ((a > 0) | (b > 0)).sum(1)
    return float((both / np.maximum(either, 1)).mean())


def head_costs(path, seqs) -> None:
    """The head's share of each dtype's time (embed against the forward pass alone), the decoder
    GEMM in each candidate precision at one chunk's rows, and the max over tokens two ways."""
    from turboserve import model as model_mod
    tokens = sum(map(len, seqs))
    for dtype in ("fp32", "bf16", "int8"):
        enc = Encoder.load(path, dtype=dtype, pooling="splade")
        batches = [b for b, _ in enc._batches(enc.tokenize(seqs))]
        t_all = timed(lambda: enc.embed(seqs))
        t_trunk = timed(lambda: [enc.model.forward(b) for b in batches])
        print(f"- {dtype}: {tokens / t_all:,.0f} tokens/s with the head, {tokens / t_trunk:,.0f} forward alone: "
              f"head {1 - t_trunk / t_all:.0%} of the time")
    enc = Encoder.load(path, pooling="splade")
    times = enc.model.mlm_head_timings()
    print(f"- decoder GEMM at {model_mod.SPLADE_CHUNK_TOKENS} rows: "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()), end="")
    vocab = enc.model.vocab_size
    logits = torch.randn(tokens, vocab)
    lengths = [len(s) for s in seqs]
    t_seg = timed(lambda: torch.segment_reduce(logits, "max", lengths=torch.tensor(lengths)))
    t_views = timed(lambda: torch.stack([v.amax(0) for v in logits.split(lengths)]))
    print(f"\n- max over tokens of [{tokens}, {vocab}] logits: segment_reduce {t_seg * 1e3:.0f} ms, "
          f"per-sequence views {t_views * 1e3:.0f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="short,longtail")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=128, help="requests per workload (the first N)")
    ap.add_argument("--systems", default="all", help="comma list of system names to run, or all")
    ap.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                    help="load every system first, then time each once per round in turn (best round reported)")
    ap.add_argument("--head", action="store_true",
                    help="where the head's time goes, on the first workload, instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# machine: {machine()}; threads: {args.threads}")
    path = model_dir()
    vocab = Encoder.load(path).tokenizer._tok.get_vocab()
    for wl in args.workloads.split(","):
        seqs = token_sequences(encoder_lengths(wl)[:args.requests], word_token_ids(vocab), vocab["[CLS]"],
                               vocab["[SEP]"])
        tokens = sum(map(len, seqs))
        if args.head:
            print(f"\n## the head's costs, {wl}: {len(seqs)} requests, {tokens} real tokens")
            head_costs(path, seqs)
            return
        ref = reference(path, seqs)
        systems = {
            "turboserve fp32": lambda: run_turboserve(path, seqs, "fp32"),
            "turboserve bf16": lambda: run_turboserve(path, seqs, "bf16"),
            "turboserve int8": lambda: run_turboserve(path, seqs, "int8"),
            "turboserve auto (0.999)": lambda: run_turboserve(path, seqs, "auto"),
            "sentence-transformers fp32 sorted/32": lambda: run_sentence_transformers(path, seqs, torch.float32),
            "sentence-transformers bf16 sorted/32": lambda: run_sentence_transformers(path, seqs, torch.bfloat16),
            "onnxruntime fp32 (bert-opt) sorted/32": lambda: run_onnxruntime(path, seqs, args.threads, False),
            "onnxruntime int8 dynamic sorted/32": lambda: run_onnxruntime(path, seqs, args.threads, True),
        }
        wanted = set(systems) if args.systems == "all" else {s.strip() for s in args.systems.split(",")}
        print(f"\n## splade-base, {wl}: {len(seqs)} requests, {tokens} real tokens, "
              f"{(ref > 0).sum(1).mean():.0f} terms per vector in the reference")
        print("| system | real tokens/s | min cosine vs fp32 | term overlap |")
        print("|---|---:|---:|---:|")
        loaded = {}
        for name, factory in systems.items():
            if name not in wanted:
                continue
            try:
                loaded[name] = factory()
            except ImportError as exc:
                print(f"| {name} | skipped ({exc.name} not installed) | | |")
                continue
            if not args.interleave:
                go, out = loaded.pop(name)
                t = timed(go, repeat=3)
                print(f"| {name} | {tokens / t:,.0f} | {min_cosine(out[0], ref):.5f} | "
                      f"{term_overlap(out[0], ref):.3f} |", flush=True)
        if args.interleave:
            times = interleaved(loaded, args.interleave)
            for name, (_, out) in loaded.items():
                lo, hi = tokens / max(times[name]), tokens / min(times[name])
                print(f"| {name} | {hi:,.0f} (rounds {lo:,.0f}-{hi:,.0f}) | {min_cosine(out[0], ref):.5f} | "
                      f"{term_overlap(out[0], ref):.3f} |", flush=True)


if __name__ == "__main__":
    main()
