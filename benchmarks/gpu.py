"""The CUDA backend on a real GPU: each Triton kernel against PyTorch, and end to end against transformers.

    .venv/bin/python benchmarks/gpu.py [--skip-e2e] [--models bert-base] [--gen-models llama]

Measured first on the GPU itself: the bf16 GEMM peak (an 8192^3 matmul) and the copy bandwidth (a
1 GiB device-to-device copy, bytes read + written). Every kernel line then prints its time, the
PyTorch baseline's, and its achieved GB/s or TFLOP/s as a fraction of those peaks:

  varlen attention    bf16, the encoder `short` and `longtail` length mixes, d = 64 and 128, against
                      SDPA on the same sequences padded to a batch (with the key-padding mask) and,
                      where torch has it, torch.nn.attention.varlen.varlen_attn
  paged attention     bf16 decode (one token per sequence) over 1024- and 8192-token contexts in 16-token
                      pages, GQA 32/8, d = 128, against SDPA over the same keys gathered contiguous
                      (enable_gqa); each also with flash-decoding's key splits off (one split)
  row/elementwise     bias+residual+LayerNorm, RMSNorm, bias+GELU, SiLU-and-mul, RoPE against eager torch
  int8 weight-only    the Triton W8 GEMM against bf16 cuBLAS for M = 1 ... 512 rows; prints the row count
                      where cuBLAS starts to win (the value for cuda.Int8WeightOnlyLinear.triton_max_rows)

End to end (unless --skip-e2e): encoder throughput (real tokens/s) of turboserve on device="cuda"
against transformers (SDPA, length-sorted padded batches of 32) on the same GPU, and generation
throughput against transformers' generate; a system that cannot run yet on CUDA is reported with the
reason (docs/gpu.md lists what the model code still lacks). Without CUDA the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


# ---------------------------------------------------------------------- timing and peaks
def cuda_time(fn, *args, **kwargs) -> float:
    """Median seconds of fn(*args, **kwargs) over 20 calls on the GPU (CUDA events around each call),
    after 3 warm-up calls (Triton compiles on the first)."""
    for _ in range(3):
        fn(*args, **kwargs)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args, **kwargs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_peaks() -> dict:
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    flops = 2 * n ** 3 / cuda_time(torch.mm, a, b)
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / cuda_time(dst.copy_, src)
    return {"flops": flops, "bytes": bandwidth}


class Report:
    def __init__(self, peaks: dict):
        self.peaks = peaks

    def line(self, name: str, ours: float, base: float | None, base_name: str, *, flops: float = 0.0,
             nbytes: float = 0.0) -> None:
        rate = (f"{flops / ours / 1e12:7.1f} TFLOP/s ({flops / ours / self.peaks['flops']:5.1%} of peak)" if flops
                else f"{nbytes / ours / 1e9:7.0f} GB/s ({nbytes / ours / self.peaks['bytes']:5.1%} of peak)")
        vs = f"{base_name} {base * 1e6:9.1f} us  x{base / ours:5.2f}" if base else ""
        print(f"  {name:<44} {ours * 1e6:9.1f} us  {rate}   {vs}")


# ---------------------------------------------------------------------- kernels
def bench_varlen(report: Report, tk) -> None:
    from turboserve.workloads import encoder_lengths
    print("varlen attention (bf16, 64 sequences per batch)")
    for workload in ("short", "longtail"):
        lengths = encoder_lengths(workload, 64)
        for heads, d in ((12, 64), (16, 128)):
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
            T, H = int(cu[-1]), heads * d
            qkv = torch.randn(T, 3 * H, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
            order = torch.tensor(sorted(range(len(lengths)), key=lambda i: -lengths[i]), device="cuda")
            ours = cuda_time(tk.varlen_attention, qkv, cu, order, heads, max(lengths), out)
            # SDPA baseline: the same sequences padded to [B, heads, Lmax, d] with a key-padding mask
            L = max(lengths)
            padded = torch.zeros(3, len(lengths), heads, L, d, device="cuda", dtype=torch.bfloat16)
            mask = torch.zeros(len(lengths), 1, 1, L, dtype=torch.bool, device="cuda")
            for i, n in enumerate(lengths):
                padded[:, i, :, :n] = qkv[int(cu[i]):int(cu[i]) + n].view(n, 3, heads, d).permute(1, 2, 0, 3)
                mask[i, ..., :n] = True
            base = cuda_time(F.scaled_dot_product_attention, padded[0], padded[1], padded[2], attn_mask=mask)
            flops = 4 * sum(n * n for n in lengths) * H
            report.line(f"{workload} d={d}", ours, base, "SDPA padded", flops=flops)
            varlen_attn = getattr(getattr(torch.nn.attention, "varlen", None), "varlen_attn", None)
            if varlen_attn is not None:
                q, k, v = (qkv[:, i * H:(i + 1) * H].reshape(T, heads, d) for i in range(3))
                cu32 = cu.int()
                try:
                    t = cuda_time(varlen_attn, q, k, v, cu32, cu32, L, L)
                    report.line(f"{workload} d={d}", ours, t, "torch varlen_attn", flops=flops)
                except (RuntimeError, TypeError) as exc:
                    print(f"    torch varlen_attn unavailable here: {exc}")


def bench_paged(report: Report, tk) -> None:
    print("paged decode attention (bf16, GQA 32/8, d=128, 16-token pages; 'one split' = flash-decoding off)")
    nh, kvh, d, page = 32, 8, 128, 16
    for ctx in (1024, 8192):
        for seqs in (1, 8, 64):
            blocks_per = ctx // page
            k_cache = torch.randn(seqs * blocks_per + 1, kvh, page, d, device="cuda", dtype=torch.bfloat16)
            v_cache = torch.randn_like(k_cache)
            tables = torch.randperm(seqs * blocks_per, device="cuda").int().view(seqs, blocks_per)
            cu_q = torch.arange(seqs + 1, device="cuda")
            ctx_len = torch.full((seqs,), ctx, device="cuda")
            q = torch.randn(seqs, nh * d, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(seqs, nh * d, device="cuda", dtype=torch.float32)
            args = (q, k_cache, v_cache, tables, cu_q, ctx_len, nh, 0, d ** -0.5, out)
            ours = cuda_time(tk.paged_attention, *args)
            k = k_cache[tables.long()].permute(0, 2, 1, 3, 4).reshape(seqs, kvh, ctx, d)   # gathered outside the timing
            v = v_cache[tables.long()].permute(0, 2, 1, 3, 4).reshape(seqs, kvh, ctx, d)
            base = cuda_time(F.scaled_dot_product_attention, q.view(seqs, nh, 1, d), k, v, enable_gqa=True)
            nbytes = 2 * k.numel() * 2
            report.line(f"{seqs} sequences x {ctx} keys", ours, base, "SDPA contiguous", nbytes=nbytes)
            whole = cuda_time(tk.paged_attention, *args, split_size=ctx)
            report.line(f"{seqs} sequences x {ctx} keys, one split", whole, base, "SDPA contiguous", nbytes=nbytes)
            del k, v, k_cache, v_cache


def bench_rows(report: Report, tk) -> None:
    print("row and elementwise fusions (bf16, 8192 rows)")
    M, N, inter = 8192, 4096, 11008
    bf = {"device": "cuda", "dtype": torch.bfloat16}
    x, res, bias, w, b = (torch.randn(M, N, **bf), torch.randn(M, N, **bf), torch.randn(N, **bf),
                          torch.randn(N, **bf), torch.randn(N, **bf))
    out = torch.empty_like(x)
    row_bytes = 3 * x.numel() * 2
    report.line("bias+residual+LayerNorm", cuda_time(tk.row_norm, x, w, b, 1e-5, "layer", out, bias=bias, residual=res),
                cuda_time(lambda: F.layer_norm(x + bias + res, (N,), w, b, 1e-5)), "eager", nbytes=row_bytes)

    def rms_eager():
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w).to(x.dtype)
    report.line("RMSNorm", cuda_time(tk.row_norm, x, w, None, 1e-5, "rms", out), cuda_time(rms_eager), "eager",
                nbytes=2 * x.numel() * 2)
    h = torch.randn(M, inter, **bf)
    hb = torch.randn(inter, **bf)
    report.line("bias+GELU", cuda_time(tk.bias_act, h, h, bias=hb, act="gelu"),
                cuda_time(lambda: F.gelu(h + hb)), "eager", nbytes=2 * h.numel() * 2)
    gu = torch.randn(M, 2 * inter, **bf)
    report.line("SiLU-and-mul", cuda_time(tk.silu_and_mul, gu),
                cuda_time(lambda: F.silu(gu[:, :inter]) * gu[:, inter:]), "eager", nbytes=1.5 * gu.numel() * 2)
    heads, d = 32, 128
    qx = torch.randn(M, heads * d, device="cuda")
    angles = torch.rand(M, d // 2, device="cuda")
    cos, sin = angles.cos(), angles.sin()

    def rope_eager():
        xh = qx.view(M, heads, d)
        x1, x2 = xh[..., :d // 2], xh[..., d // 2:]
        return torch.cat([x1 * cos[:, None] - x2 * sin[:, None], x2 * cos[:, None] + x1 * sin[:, None]], -1)
    report.line("RoPE in place (fp32, 32 heads x 128)", cuda_time(tk.rope_, qx, cos, sin, heads),
                cuda_time(rope_eager), "eager", nbytes=2 * qx.numel() * 4)


def bench_w8(report: Report, cuda_ops) -> None:
    print("int8 weight-only GEMM against bf16 cuBLAS (4096 x 4096 and 4096 -> 11008)")
    for K, N in ((4096, 4096), (4096, 11008)):
        w = torch.randn(N, K)
        lin8 = cuda_ops.Int8WeightOnlyLinear(w, None, torch.bfloat16)
        w16 = w.to("cuda", torch.bfloat16)
        crossover = None
        for M in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            ours = cuda_time(cuda_ops.tk.w8_matmul, x, lin8.weight_q, lin8.weight_scale, None, out)
            base = cuda_time(torch.mm, x, w16.t())
            report.line(f"K={K} N={N} M={M}", ours, base, "bf16 cuBLAS", nbytes=K * N)
            if crossover is None and base < ours:
                crossover = M
        print(f"    cuBLAS bf16 first wins at M = {crossover} rows (None: never up to 512)")


# ---------------------------------------------------------------------- end to end
def _hf_encode(model, seqs) -> None:
    from encoder import batches_of, padded
    with torch.inference_mode():
        for idx in batches_of(seqs, 32, True):
            ids, mask = padded(seqs, idx)
            model(input_ids=torch.from_numpy(ids).cuda(), attention_mask=torch.from_numpy(mask).cuda())
    torch.cuda.synchronize()


def e2e_encoder(models: list[str]) -> None:
    import transformers
    from encoder import model_dir

    from turboserve import Encoder
    from turboserve.workloads import encoder_lengths, token_sequences, word_token_ids
    print("encoder end to end (bf16, real tokens/s)")
    for name in models:
        path = model_dir(name)
        vocab = Encoder.load(path).tokenizer._tok.get_vocab()       # as benchmarks/encoder.py draws words
        words = word_token_ids(vocab)
        hf = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").to("cuda", torch.bfloat16)
        for workload in ("short", "longtail"):
            seqs = token_sequences(encoder_lengths(workload), words, vocab["[CLS]"], vocab["[SEP]"])
            tokens = sum(len(s) for s in seqs)
            try:
                enc = Encoder.load(path, dtype="bf16", device="cuda")
                enc.embed(seqs[:8])
                t = time.perf_counter()
                enc.embed(seqs)
                torch.cuda.synchronize()
                print(f"  {name} {workload}: turboserve {tokens / (time.perf_counter() - t):10.0f} tok/s")
            except Exception as exc:        # noqa: BLE001 - report any failure as "not runnable yet"
                print(f"  {name} {workload}: turboserve on cuda not runnable yet: {type(exc).__name__}: {exc}")
            _hf_encode(hf, seqs)
            t = time.perf_counter()
            _hf_encode(hf, seqs)
            print(f"  {name} {workload}: transformers {tokens / (time.perf_counter() - t):10.0f} tok/s")


def e2e_generation(models: list[str]) -> None:
    import transformers
    from generate import build

    from turboserve.llm import LLM
    from turboserve.sampling import SamplingParams
    from turboserve.workloads import decoder_offline
    print("generation end to end (bf16, decoder offline workload, output tokens/s)")
    for name in models:
        path = build(name)
        config = transformers.AutoConfig.from_pretrained(path)
        prompts, outs = decoder_offline(config.vocab_size)
        try:
            llm = LLM.load(path, dtype="bf16", device="cuda")
            params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in outs]
            t = time.perf_counter()
            llm.generate(prompts, params)
            print(f"  {name}: turboserve {sum(outs) / (time.perf_counter() - t):8.0f} tok/s")
        except Exception as exc:            # noqa: BLE001
            print(f"  {name}: turboserve on cuda not runnable yet: {type(exc).__name__}: {exc}")
        model = transformers.AutoModelForCausalLM.from_pretrained(path).to("cuda", torch.bfloat16).eval()
        model.generation_config.eos_token_id = None
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(prompts), 16):
                group = prompts[i:i + 16]
                width = max(len(p) for p in group)
                ids = torch.tensor([[0] * (width - len(p)) + p for p in group], device="cuda")
                mask = (torch.arange(width, device="cuda")[None] >= torch.tensor(
                    [width - len(p) for p in group], device="cuda")[:, None]).long()
                new = max(outs[i:i + 16])
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        hf_tokens = sum(max(outs[i:i + 16]) * len(prompts[i:i + 16]) for i in range(0, len(prompts), 16))
        print(f"  {name}: transformers static/16 {hf_tokens / (time.perf_counter() - t):8.0f} tok/s "
              f"(counting padded outputs)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--models", default="bert-base")
    ap.add_argument("--gen-models", default="llama")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here (torch.cuda.is_available() is False); nothing to time. "
              "The kernels' correctness runs on the CPU in tests/test_triton_kernels.py.")
        return 0
    import triton

    from turboserve.ops import cuda as cuda_ops
    tk = cuda_ops.tk
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
          f"torch {torch.__version__}, triton {triton.__version__}")
    peaks = measure_peaks()
    print(f"measured peaks: bf16 GEMM {peaks['flops'] / 1e12:.0f} TFLOP/s (8192^3), "
          f"copy {peaks['bytes'] / 1e9:.0f} GB/s (1 GiB, read + write)")
    report = Report(peaks)
    bench_varlen(report, tk)
    bench_paged(report, tk)
    bench_rows(report, tk)
    bench_w8(report, cuda_ops)
    if not args.skip_e2e:
        e2e_encoder([m for m in args.models.split(",") if m])
        e2e_generation([m for m in args.gen_models.split(",") if m])
    return 0


if __name__ == "__main__":
    sys.exit(main())
