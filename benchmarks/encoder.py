"""Encoder throughput and quality: turboserve against transformers, ONNX Runtime and CTranslate2.

    .venv/bin/python benchmarks/encoder.py [--models minilm,bert-base,mpnet-base,modernbert-base] [--workloads short,longtail]
                                           [--interleave 3]
    .venv/bin/python benchmarks/encoder.py --models modernbert-base --workloads longdoc --bert-requests 4 \
        --peer-batch 1 --systems "turboserve fp32,turboserve int8,transformers fp32 sorted/32"

Workloads and models are the public ones of shared/DESIGN.md section 5 (token sequences of the
workload's lengths drawn from whole words of the vocabulary; `longdoc`, 1k-8k-token documents clipped
to the model's positions, is ours, for the long-context encoders). Every system gets the same sequences;
throughput counts real (non-padding) tokens per second of wall time, 2 threads unless --threads.
With --interleave N every system is loaded first and then timed once per round in turn, N rounds, best
round reported with the range: on a VM whose speed drifts by 20-40% over minutes, systems timed one
after another can differ by more than they do. CTranslate2 brings its own libgomp: once it has run,
its thread pool sits beside torch's for the rest of the process, and two OpenMP pools on 2 cores make
libgomp sleep between parallel regions (docs/generation.md, Threads). turboserve bf16 on MiniLM
`short` measured 26,217 tokens/s interleaved with a loaded CTranslate2 and 34,356 with ONNX Runtime
(AMX VM): time the ctranslate2 systems in their own invocation for figures of the others. Quality is the minimum cosine, over all requests,
between a system's pooled embedding and the fp32 reference (transformers, each request alone). Peers need the `peers` extra (onnxruntime,
ctranslate2); systems whose package is missing are reported as skipped.
The GEMM peaks are measured at start on this machine, and each system's FLOP rate (linear layers plus
attention, real tokens only) is printed as a fraction of the peak of its arithmetic ("mixed" for
turboserve auto, whose linears are partly int8 and partly fp32).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from turboserve import Encoder, native  # noqa: E402
from turboserve.ops.cpu import pack_vnni  # noqa: E402
from turboserve.loader import default_model_path  # noqa: E402
from turboserve.workloads import WORKLOAD_MAX_LENGTH, encoder_lengths, token_sequences, word_token_ids  # noqa: E402

CACHE = Path(os.environ.get("TURBOSERVE_BENCH_CACHE", Path(__file__).resolve().parents[1] / ".bench"))


# ------------------------------------------------------------------ machine and peaks
def machine() -> str:
    name = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.python_version()}"


def timed(fn, repeat=3, slow=10.0):
    """Best of `repeat` timed runs after a warm-up; a system whose warm-up took over `slow` seconds
    gets one timed run (its timing noise is small next to its run time)."""
    t = time.perf_counter()
    fn()
    if time.perf_counter() - t > slow:
        repeat = 1
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_peaks() -> dict:
    """Best rate of each arithmetic over a few encoder-like GEMM shapes (4096 rows, the runtime's
    batch), best of 8 runs each after a warm-up: the ceiling a forward pass could reach."""
    peaks = {"fp32": 0.0, "bf16": 0.0, "int8": 0.0}
    for m, k, n in ((4096, 384, 1536), (4096, 768, 3072), (2048, 2048, 2048)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        ab, bb = a.bfloat16(), b.bfloat16()
        ai, bi = torch.randint(-127, 127, (m, k), dtype=torch.int8), torch.randint(-127, 127, (n, k), dtype=torch.int8).t()
        flops = 2 * m * k * n
        # int8: the GEMM turboserve's int8 linears run here: torch._int_mm (oneDNN, VNNI), or the native
        # kernel on CPUs where that has no fast path (AVX2 without VNNI: 4 GOP/s there)
        if native.int8_gemm_everywhere():
            packed, colsum = pack_vnni(bi.contiguous())
            acc = torch.empty(m, n, dtype=torch.int32)
            int8_mm = lambda: native.int8_gemm_packed(ai, packed, colsum, n, acc)  # noqa: E731
        else:
            int8_mm = lambda: torch._int_mm(ai, bi)  # noqa: E731
        for arith, fn in (("fp32", lambda: torch.mm(a, b)), ("bf16", lambda: torch.mm(ab, bb)), ("int8", int8_mm)):
            # slow=1: a CPU without native bf16 (AVX2 only) runs bf16 at ~1 GFLOP/s; time it once
            peaks[arith] = max(peaks[arith], flops / timed(fn, repeat=8, slow=1.0))
    return peaks


# ------------------------------------------------------------------ models
def model_dir(name: str, vocab_from: Path | None = None) -> Path:
    """The model's directory (bert-base, mpnet-base, modernbert-base: built once, random weights, MiniLM's
    tokenizer files, taken from `vocab_from` where the bundled package is not installed, as on the GPU
    machine)."""
    if name == "minilm":
        return default_model_path()
    if name in ("bert-base", "mpnet-base", "modernbert-base"):
        d = CACHE / name
        if not (d / "config.json").exists():
            import shutil
            import transformers
            torch.manual_seed(0)
            if name == "bert-base":
                transformers.BertModel(transformers.BertConfig()).save_pretrained(d)   # bert-base-uncased shape
            elif name == "mpnet-base":      # all-mpnet-base-v2's shape: 12 layers of 768, relative position bias
                transformers.MPNetModel(transformers.MPNetConfig(max_position_embeddings=514)).save_pretrained(d)
            else:       # ModernBERT-base: 22 layers of 768, GeGLU 1152, RoPE, a window of 128 on 2 layers in 3
                transformers.ModernBertModel(transformers.ModernBertConfig()).save_pretrained(d)
            for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
                shutil.copy((vocab_from or default_model_path()) / f, d / f)
        # transformers 5 no longer writes this key; CTranslate2's converter still reads it
        cfg = json.loads((d / "config.json").read_text())
        if "position_embedding_type" not in cfg:
            cfg["position_embedding_type"] = "absolute"
            (d / "config.json").write_text(json.dumps(cfg, indent=2))
        return d
    raise ValueError(name)


def flops_per_request(config: dict, length: int) -> float:
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    gated = config.get("model_type") == "modernbert"          # GeGLU: an up projection twice as wide
    linear = 2 * length * (4 * h * h + (3 if gated else 2) * h * i)
    full = 4 * length * length * h
    if not gated:
        return layers * (linear + full)
    # ModernBERT: the useful scores of a sliding layer are the keys |j - i| <= local_attention / 2
    half, every = config.get("local_attention", 128) // 2, config.get("global_attn_every_n_layers", 3)
    pos = np.arange(length)
    keys = int((np.minimum(pos + half, length - 1) - np.maximum(pos - half, 0) + 1).sum())
    types = config.get("layer_types") or ["full_attention" if n % every == 0 else "sliding" for n in range(layers)]
    sliding = sum(t != "full_attention" for t in types)
    return layers * linear + (layers - sliding) * full + sliding * 4 * keys * h


# ------------------------------------------------------------------ systems
def pool_padded(hidden: np.ndarray, lengths, mode: str) -> np.ndarray:
    out = []
    for row, n in zip(hidden, lengths):
        out.append(row[0] if mode == "cls" else row[:n].mean(0))
    return np.stack(out)


def batches_of(seqs, size, sort):
    idx = sorted(range(len(seqs)), key=lambda i: len(seqs[i])) if sort else list(range(len(seqs)))
    return [idx[i:i + size] for i in range(0, len(idx), size)]


def padded(seqs, idx, pad_id=0):
    width = max(len(seqs[i]) for i in idx)
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    for r, i in enumerate(idx):
        ids[r, :len(seqs[i])] = seqs[i]
        mask[r, :len(seqs[i])] = 1
    return ids, mask


def run_transformers(path, seqs, mode, dtype, sort, batch=32):
    import transformers
    try:
        model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa")
    except ValueError:          # no SDPA version (MPNet, whose attention adds a position bias): its own
        model = transformers.AutoModel.from_pretrained(path)
    model = model.eval().to(dtype)
    out = [None] * len(seqs)

    def go():
        with torch.inference_mode():
            for idx in batches_of(seqs, batch, sort):
                ids, mask = padded(seqs, idx)
                h = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
                pooled = pool_padded(h.float().numpy(), [len(seqs[i]) for i in idx], mode)
                for r, i in enumerate(idx):
                    out[i] = pooled[r]
    return go, out


def run_turboserve(path, seqs, mode, dtype):
    """dtype "auto": the layer-wise precision plan for min cosine 0.999 (made on first use with the
    built-in calibration set, then read from the plan file beside the model)."""
    enc = Encoder.load(path, dtype=dtype, normalize=False, quality_bound=0.999,
                       max_input_length=max(WORKLOAD_MAX_LENGTH, max(map(len, seqs))))
    out = [None]

    def go():
        out[0] = enc.embed(seqs).numpy()
    return go, out


class _Output(torch.nn.Module):
    """(input_ids, attention_mask) -> one output of the model (last_hidden_state, or a masked LM's
    logits): a fixed positional signature for the ONNX exporter (transformers 5 models take the
    second positional argument as something else)."""

    def __init__(self, model, output: str):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids, attention_mask):
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True), self.output)


def onnx_model(path: Path, config: dict, quant: bool, masked_lm: bool = False) -> Path:
    """The model exported to ONNX and optimized by ONNX Runtime's BERT optimizer (dynamic int8 too with
    quant), cached: its last_hidden_state, or with masked_lm its ...ForMaskedLM logits."""
    import transformers
    from onnxruntime.transformers import optimizer
    d = CACHE / "onnx" / path.name
    d.mkdir(parents=True, exist_ok=True)
    raw, opt, q = d / "model.onnx", d / "model_opt.onnx", d / "model_opt_int8.onnx"
    output = "logits" if masked_lm else "last_hidden_state"
    if not opt.exists():
        auto = transformers.AutoModelForMaskedLM if masked_lm else transformers.AutoModel
        model = _Output(auto.from_pretrained(path, attn_implementation="eager").eval(), output)
        ids = torch.randint(1000, 2000, (2, 16))
        torch.onnx.export(model, (ids, torch.ones_like(ids)), str(raw), input_names=["input_ids", "attention_mask"],
                          output_names=[output], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "b", 1: "s"} for n in ("input_ids", "attention_mask", output)})
        optimizer.optimize_model(str(raw), model_type="bert", num_heads=config["num_attention_heads"],
                                 hidden_size=config["hidden_size"]).save_model_to_file(str(opt))
    if quant and not q.exists():
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantize_dynamic(str(opt), str(q), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return q if quant else opt


def run_onnxruntime(path, seqs, mode, config, threads, quant, batch=32):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(onnx_model(path, config, quant)), so, providers=["CPUExecutionProvider"])
    out = [None] * len(seqs)

    def go():
        for idx in batches_of(seqs, batch, sort=True):
            ids, mask = padded(seqs, idx)
            h = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
            pooled = pool_padded(h, [len(seqs[i]) for i in idx], mode)
            for r, i in enumerate(idx):
                out[i] = pooled[r]
    return go, out


def run_ctranslate2(path, seqs, mode, threads, compute_type, batch=32):
    import ctranslate2
    d = CACHE / "ct2" / path.name
    if not (d / "model.bin").exists():
        ctranslate2.converters.TransformersConverter(str(path)).convert(str(d), force=True)
    enc = ctranslate2.Encoder(str(d), device="cpu", compute_type=compute_type, intra_threads=threads)
    out = [None] * len(seqs)

    def go():
        for idx in batches_of(seqs, batch, sort=True):
            res = enc.forward_batch([seqs[i] for i in idx])
            h = np.array(res.last_hidden_state)
            pooled = pool_padded(h, [len(seqs[i]) for i in idx], mode)
            for r, i in enumerate(idx):
                out[i] = pooled[r]
    return go, out


def interleaved(loaded: dict, rounds: int) -> dict[str, list[float]]:
    """Every system ({name: (go, ...)}) warmed, then timed once per round in turn, `rounds` rounds:
    a drift of the VM's speed then reaches all systems alike instead of whichever happened to run
    during it. {name: seconds of each round}."""
    for go, *_ in loaded.values():
        go()
    times = {k: [] for k in loaded}
    for _ in range(rounds):
        for name, (go, *_) in loaded.items():
            t = time.perf_counter()
            go()
            times[name].append(time.perf_counter() - t)
    return times


# ------------------------------------------------------------------ main
def reference(path, seqs, mode):
    import transformers
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.inference_mode():
        rows = []
        for s in seqs:
            h = model(input_ids=torch.tensor([s])).last_hidden_state[0]
            rows.append(pool_padded(h.numpy()[None], [len(s)], mode)[0])
    return np.stack(rows)


def min_cosine(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,bert-base")
    ap.add_argument("--workloads", default="short,longtail")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=512, help="requests per workload (the first N)")
    ap.add_argument("--bert-requests", type=int, default=128,
                    help="requests per workload for the base-size models (bert-base, mpnet-base, modernbert-base)")
    ap.add_argument("--systems", default="all", help="comma list of system names to run, or all")
    ap.add_argument("--peer-batch", type=int, default=32,
                    help="the peers' batch size (the systems' names keep /32): 1 for longdoc, where a padded "
                         "batch's materialized attention outgrows 24 GiB, and one document per batch is the "
                         "peers' best case, no padding at all")
    ap.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                    help="load every system first, then time each once per round in turn (best round reported, "
                         "with the range over rounds): for a VM whose speed drifts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# machine: {machine()}; threads: {args.threads}")
    peaks = gemm_peaks()
    print("# measured GEMM peaks at start (best of 4096x384x1536, 4096x768x3072, 2048^3): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    rows = []
    for name in args.models.split(","):
        path = model_dir(name)
        config = json.loads((path / "config.json").read_text())
        mode = "mean"
        enc = Encoder.load(path)
        vocab = enc.tokenizer._tok.get_vocab()
        words = word_token_ids(vocab)
        for wl in args.workloads.split(","):
            n = args.requests if name == "minilm" else args.bert_requests
            lengths = [min(x, enc.model.max_tokens) for x in encoder_lengths(wl)[:n]]     # RoBERTa: 512 of 514
            seqs = token_sequences(lengths, words, vocab["[CLS]"], vocab["[SEP]"])
            tokens = sum(map(len, seqs))
            flops = sum(flops_per_request(config, len(s)) for s in seqs)
            ref = reference(path, seqs, mode)
            systems = {
                "turboserve fp32": (lambda: run_turboserve(path, seqs, mode, "fp32"), "fp32"),
                "turboserve bf16": (lambda: run_turboserve(path, seqs, mode, "bf16"), "bf16"),
                "turboserve int8": (lambda: run_turboserve(path, seqs, mode, "int8"), "int8"),
                "turboserve auto (0.999)": (lambda: run_turboserve(path, seqs, mode, "auto"), None),
                "transformers fp32 padded/32": (lambda: run_transformers(path, seqs, mode, torch.float32, False, args.peer_batch), "fp32"),
                "transformers bf16 padded/32": (lambda: run_transformers(path, seqs, mode, torch.bfloat16, False, args.peer_batch), "bf16"),
                "transformers fp32 sorted/32": (lambda: run_transformers(path, seqs, mode, torch.float32, True, args.peer_batch), "fp32"),
                "onnxruntime fp32 (bert-opt)": (lambda: run_onnxruntime(path, seqs, mode, config, args.threads, False, args.peer_batch), "fp32"),
                "onnxruntime int8 dynamic": (lambda: run_onnxruntime(path, seqs, mode, config, args.threads, True, args.peer_batch), "int8"),
                "ctranslate2 fp32": (lambda: run_ctranslate2(path, seqs, mode, args.threads, "float32", args.peer_batch), "fp32"),
                "ctranslate2 int8": (lambda: run_ctranslate2(path, seqs, mode, args.threads, "int8", args.peer_batch), "int8"),
            }
            wanted = set(systems) if args.systems == "all" else {s.strip() for s in args.systems.split(",")}

            def report(sys_name, t, out, arith, spread=None):
                emb = out[0] if sys_name.startswith("turboserve") else np.stack(out)
                results[sys_name] = (tokens / t, min_cosine(emb, ref), flops / t / peaks[arith] if arith else None)
                tps, cos, frac = results[sys_name]
                ours = results.get("turboserve int8", (None,))[0]
                ratio = f"{ours / tps:.2f}x" if ours else ""
                frac = f"{frac:.0%}" if frac is not None else "mixed"
                rounds = f" (rounds {spread})" if spread else ""
                print(f"| {sys_name} | {tps:,.0f}{rounds} | {ratio} | {cos:.5f} | {frac} |", flush=True)
            print(f"\n## {name}, {wl}: {len(seqs)} requests, {tokens} real tokens")
            print("| system | real tokens/s | vs turboserve int8 | min cosine vs fp32 | fraction of GEMM peak |")
            print("|---|---:|---:|---:|---:|")
            results = {}
            loaded = {}
            for sys_name, (factory, arith) in systems.items():
                if sys_name not in wanted:
                    continue
                try:
                    loaded[sys_name] = (*factory(), arith)
                except ImportError as exc:
                    print(f"| {sys_name} | skipped ({exc.name} not installed) | | | |")
                    continue
                except Exception as exc:   # a peer that cannot load this model is reported, not fatal
                    print(f"| {sys_name} | failed: {str(exc).splitlines()[0][:80]} | | | |")
                    continue
                if not args.interleave:     # timed at once, then released
                    go, out, _ = loaded.pop(sys_name)
                    report(sys_name, timed(go, repeat=3), out, arith)
            if args.interleave:
                times = interleaved(loaded, args.interleave)
                for sys_name, (_, out, arith) in loaded.items():
                    spread = f"{tokens / max(times[sys_name]):,.0f}-{tokens / min(times[sys_name]):,.0f}"
                    report(sys_name, min(times[sys_name]), out, arith, spread)
            rows.append((name, wl, results))
    end_peaks = gemm_peaks()
    print("\n# measured GEMM peaks at the end: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in end_peaks.items())
          + " (this VM's speed drifts; fractions above use the start figures)")
    print("\n## summary: turboserve against the best peer at each quality class")
    print("| model, workload | best peer >= 0.999 | turboserve best >= 0.999 | best peer int8 >= 0.99 | turboserve int8 |")
    print("|---|---|---|---|---|")
    for name, wl, res in rows:
        def best(pred):
            c = [(v[0], k) for k, v in res.items() if pred(k, v)]
            return max(c) if c else (0.0, "none")
        peer_fp = best(lambda k, v: not k.startswith("turboserve") and v[1] >= 0.999)
        ours_fp = best(lambda k, v: k.startswith("turboserve") and v[1] >= 0.999)
        peer_q = best(lambda k, v: not k.startswith("turboserve") and "int8" in k and v[1] >= 0.99)
        ours_q = res.get("turboserve int8", (0.0, 0.0, 0.0))
        print(f"| {name}, {wl} | {peer_fp[1]} {peer_fp[0]:,.0f} | {ours_fp[1]} {ours_fp[0]:,.0f} | "
              f"{peer_q[1]} {peer_q[0]:,.0f} | {ours_q[0]:,.0f} (min cos {ours_q[1]:.4f}) |")


if __name__ == "__main__":
    main()
