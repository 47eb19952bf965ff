"""CPU ops for the packed-token encoder and the paged-KV decoder.

Everything runs on [T, H] tensors of real tokens. GEMMs go through oneDNN/MKL via `torch.addmm` with
a pre-transposed, contiguous weight (measured on this Ice Lake machine: 210-280 GFLOP/s at 2 threads,
the same as oneDNN's prepacked `_linear_pointwise`, which has no `out=` and so cannot write into the
memory planner's workspace). On CPUs with AVX2 and no AVX-512 fp32 linears and LM heads take the
native fp32 GEMMs instead (DenseLinear, lm_head: on a 2-core AMD EPYC MKL ran 4-64 rows at 8-82
GFLOP/s against an FMA peak of 182). int8 linears are W8A8: per-output-channel weight scales, per-token
activation scales, `torch._int_mm` (VNNI; exact int32 accumulation). Rows are quantized
independently, so a text's result never depends on its batch neighbours.

Everything between two GEMMs is one `epilogue` pass per row (native/kernels.c `row_epilogue`):
dequantize + bias, activation, + residual, LayerNorm, and quantization for the next int8 GEMM. So
between fc1 and fc2 of an int8 model the [T, intermediate] activation exists only in int8. A bf16
model's rows take the same kernel (widened on load, rounded on store). Without the native library
(no C compiler), the PyTorch version below runs instead.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import native
from ..timing import best_seconds

log = logging.getLogger("turboserve")


@dataclass
class Quantized:
    """An activation in int8, ready for the int8 GEMM whose smoothing it was quantized with."""
    q: torch.Tensor            # int8 [T, C]
    scale: torch.Tensor        # fp32 [T, 1]
    inv_smooth: torch.Tensor   # the consumer's 1/s (identity check: `is`)


@dataclass
class IntAccumulator:
    """An int8 GEMM's raw output and what turns it into real numbers."""
    acc: torch.Tensor          # int32 [T, N]
    row_scale: torch.Tensor    # [T, 1]
    col_scale: torch.Tensor    # [N]
    bias: torch.Tensor         # [N]


def _native_ok(*tensors) -> bool:
    return native.lib() is not None and all(
        t.dtype in (torch.float32, torch.int32, torch.int8) and t.is_contiguous() for t in tensors if t is not None)


def _native_bf16_ok(*tensors) -> bool:
    """A bf16 model's rows (the first tensor given) for a native kernel: every float tensor bf16."""
    return tensors[0] is not None and native.lib() is not None and all(
        t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors if t is not None)


def epilogue(src, *, out: torch.Tensor | None = None, act: str | None = None, residual=None, ln=None,
             rms: bool = False, quant_for=None) -> tuple[torch.Tensor | None, Quantized | None]:
    """out = LN(act(src) + residual), and its int8 form for `quant_for` (an Int8Linear) if given.

    src: a float tensor (a GEMM output with bias) or an IntAccumulator. act "silu_mul" / "gelu_mul":
    src is gate | up and the result act(gate) * up, half as wide. ln: (gamma, beta, eps); with rms, RMSNorm
    (beta None). `out` may alias src or residual. Returns (out, Quantized or None)."""
    inv_smooth = None if quant_for is None else quant_for.inv_smooth
    rows, cols = (src.acc if isinstance(src, IntAccumulator) else src).shape
    out_cols = cols // 2 if act in native.GATED else cols
    q = torch.empty(rows, out_cols, dtype=torch.int8) if inv_smooth is not None else None
    qscale = torch.empty(rows, 1, dtype=torch.float32) if inv_smooth is not None else None
    if isinstance(src, IntAccumulator):
        tensors = (src.acc, src.row_scale, src.col_scale, src.bias)
    else:
        tensors = (src,)
    gamma, beta = (ln[0], ln[1]) if ln is not None else (None, None)
    if act in native.ACTIVATIONS and (_native_ok(*tensors, residual, gamma, beta, out) or _native_bf16_ok(
            out, *tensors, residual, gamma, beta)):
        if isinstance(src, IntAccumulator):
            native.row_epilogue(src.acc, row_scale=src.row_scale, col_scale=src.col_scale, bias=src.bias,
                                activation=act, residual=residual, ln=ln, rms=rms, out=out, inv_smooth=inv_smooth,
                                q=q, qscale=qscale)
        else:
            native.row_epilogue(src, activation=act, residual=residual, ln=ln, rms=rms, out=out,
                                inv_smooth=inv_smooth, q=q, qscale=qscale)
    else:
        out, q, qscale = _epilogue_torch(src, out, act, residual, ln, inv_smooth, rms)
    return out, (Quantized(q, qscale, inv_smooth) if inv_smooth is not None else None)


def _epilogue_torch(src, out, act, residual, ln, inv_smooth, rms=False):
    if isinstance(src, IntAccumulator):
        v = torch.addcmul(src.bias, src.acc.float() * src.row_scale, src.col_scale)
    else:
        v = src.float()
    if act in native.GATED:
        v = _act_and_mul_torch(v, native.GATED[act])
    elif act is not None:
        v = activation_(v.clone() if v is src else v, act)
    if residual is not None:
        v = v + residual.float()
    if ln is not None and rms:
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + ln[2]) * ln[0].float()
    elif ln is not None:
        v = F.layer_norm(v, (v.shape[-1],), ln[0].float(), None if ln[1] is None else ln[1].float(), ln[2])
    if out is not None:
        out.copy_(v)
    if inv_smooth is None:
        return out, None, None
    xs = v * inv_smooth
    scale = xs.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    return out, torch.round(xs / scale).clamp(-127, 127).to(torch.int8), scale


def activation_(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "gelu":
        return torch._C._nn.gelu_(x)
    if kind == "gelu_tanh":
        return torch._C._nn.gelu_(x, approximate="tanh")
    if kind == "relu":
        return torch.relu_(x)
    if kind == "silu":
        return F.silu(x, inplace=True)
    raise ValueError(f"unknown activation {kind!r}")


class DenseLinear:
    """y = x @ W^T + b in fp32 or bf16, then the epilogue in place.

    fp32 on a CPU where native.f32_gemm_native() (AVX2 without AVX-512): the weight is held only in the
    native GEMM's panel layout (pack_panels, the same bytes as the [K, N] copy it replaces) and every
    row count takes that kernel, with a lone activation applied to each 6 x 64 block of output once
    it is stored. `weight_t` stays readable and assignable (tensor-parallel sharding slices it)
    through the property below."""
    takes_int8 = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.dtype = dtype
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self.weight_t = weight.detach().to(dtype).t().contiguous()    # [K, N]

    @property
    def weight_t(self) -> torch.Tensor:
        return self._weight_t if self.packed is None else unpack_panels(self.packed, self.out_features)

    @weight_t.setter
    def weight_t(self, w: torch.Tensor) -> None:
        self.in_features, self.out_features = w.shape
        if self.dtype == torch.float32 and native.f32_gemm_native():
            self.packed, self._weight_t = pack_panels(w), None
        else:
            self.packed, self._weight_t = None, w

    @property
    def nbytes(self) -> int:
        w = self._weight_t if self.packed is None else self.packed
        return w.numel() * w.element_size()

    def __call__(self, x: torch.Tensor, xq: Quantized | None = None, *, out: torch.Tensor | None, **epi):
        rest = {k: v for k, v in epi.items() if v is not None}
        if self.packed is not None and x.dtype == torch.float32:
            fused = rest.get("act") if list(rest) == ["act"] else None
            if out is None:
                out = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
            x = x if x.stride(1) == 1 else x.contiguous()          # the kernel reads whole rows
            native.f32_gemm_packed(x, self.packed, self.bias, self.out_features, out, fused)
            if fused is not None or not rest:
                return out, None
            return self._epilogue(out, epi)
        weight_t = self.weight_t
        if x.dtype != self.dtype:
            # a bf16 linear inside an fp32 model (a layer-wise precision plan): cast in, GEMM, cast out
            y = torch.mm(x.to(self.dtype), weight_t) if self.bias is None else \
                torch.addmm(self.bias, x.to(self.dtype), weight_t)
            out = y.to(x.dtype) if out is None else out.copy_(y)
        elif self.bias is None:
            out = torch.mm(x, weight_t, out=out) if out is not None else torch.mm(x, weight_t)
        else:
            out = torch.addmm(self.bias, x, weight_t, out=out) if out is not None else \
                torch.addmm(self.bias, x, weight_t)
        if not rest:
            return out, None
        if list(rest) == ["act"]:
            # activation alone: torch's in-place GELU (Sleef erf) is faster than the epilogue's
            # (2.3 ms against 5.0 ms at [4096, 1536]); the epilogue pays off when it fuses more
            return activation_(out, rest["act"]), None
        return self._epilogue(out, epi)

    @staticmethod
    def _epilogue(out: torch.Tensor, epi: dict):
        """The epilogue over the GEMM's output, in place; a gated activation's result is half as wide:
        a fresh tensor, or for an int8 consumer only its quantized form (a layer-wise plan's bf16 or
        fp32 gate|up feeding an int8 down)."""
        if epi.get("act") in native.GATED:
            half = None if epi.get("quant_for") is not None else torch.empty(
                out.shape[0], out.shape[1] // 2, dtype=out.dtype, device=out.device)
            return epilogue(out, out=half, **epi)
        return epilogue(out, out=out, **epi)


def pack_panels(weight_t: torch.Tensor) -> torch.Tensor:
    """fp32 [K, N] -> [ceil(N / 16), K, 16]: 16 columns side by side at each k, zeros past N
    (native.f32_gemm_packed's weight operand)."""
    k, n = weight_t.shape
    panels = -(-n // 16)
    padded = torch.zeros(k, panels * 16, dtype=torch.float32)
    padded[:, :n] = weight_t
    return padded.view(k, panels, 16).transpose(0, 1).contiguous()


def unpack_panels(packed: torch.Tensor, n: int) -> torch.Tensor:
    """pack_panels' inverse: [K, n]."""
    panels, k, _ = packed.shape
    return packed.transpose(0, 1).reshape(k, panels * 16)[:, :n].contiguous()


def pack_vnni(weight_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [K, N] -> ([Np / 64, ceil(K/4), 64, 4]: blocks of 64 columns, each one contiguous run over
    K with the four consecutive k of a column side by side, zeros past K and N; Np = N rounded up to
    64) and int32 [Np] 128 * column sums: native.int8_gemm_packed's operands."""
    k, n = weight_q.shape
    kp, np_ = -(-k // 4) * 4, -(-n // 64) * 64
    w = torch.zeros(kp, np_, dtype=torch.int8)
    w[:k, :n] = weight_q
    return (w.view(kp // 4, 4, np_ // 64, 64).permute(2, 0, 3, 1).contiguous(),
            128 * w.sum(0, dtype=torch.int32))


class Int8Linear:
    """W8A8 linear: per-channel int8 weights, per-token dynamic int8 activations.

    `smooth` (SmoothQuant) moves activation outliers into the weights: the input's columns are divided by
    s and the weight's multiplied. It cannot be folded into the producing LayerNorm here, because in a
    post-LN encoder that LayerNorm's output is also the residual; the division rides along in the
    producer's epilogue when it quantizes for this layer.
    """
    takes_int8 = True

    # decoder linears: the native VNNI kernel on weights packed for it (kernels.c int8_gemm_packed) up to
    # `native_limit` rows, oneDNN's _int_mm above. tune_int8_rows measures the limit per weight shape on
    # the machine; until then (and where it is not called) PACKED_ROWS, or no limit for weights of
    # WIDE_COLS columns or more (the LM head). Those defaults come from CPUs without AMX
    # (benchmarks/decode_gemm.py: 2-4x oneDNN at 1-4 rows, even at 64-128, oneDNN 5-30% faster at
    # 512-2048 on GPT-2's layer shapes; on the 768 x 50257 LM head native 1.2-1.8x ahead at every row
    # count); with AMX oneDNN overtakes from 32-64 rows
    PACKED_ROWS = 128
    WIDE_COLS = 8192

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, smooth: torch.Tensor | None = None,
                 small_rows: bool = False):
        w = weight.detach().float()
        if smooth is None:
            smooth = torch.ones(w.shape[1])
        w = w * smooth[None, :]
        self.inv_smooth = (1.0 / smooth).float().contiguous()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0           # [N]
        self.weight_q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).t().contiguous()
        self.weight_scale = scale.contiguous()
        self.bias = (torch.zeros(w.shape[0]) if bias is None else bias.detach().float()).contiguous()
        self.in_features, self.out_features = self.weight_q.shape
        self.dtype = torch.float32
        # small_rows (decoder linears), or a CPU where the native kernel serves every row count (AVX2
        # without VNNI: torch._int_mm has no fast path there): a second copy of the weights in the packed
        # kernel's layout
        everywhere = native.int8_gemm_everywhere()
        self.packed, self.colsum = pack_vnni(self.weight_q) if small_rows or everywhere else (None, None)
        self.native_limit = math.inf if everywhere or small_rows and self.out_features >= self.WIDE_COLS else \
            self.PACKED_ROWS if small_rows else 0

    def resliced(self) -> None:
        """Re-derive the packed copy after weight_q was cut (a tensor-parallel shard)."""
        if self.packed is not None:
            self.packed, self.colsum = pack_vnni(self.weight_q)

    @property
    def nbytes(self) -> int:
        packed = 0 if self.packed is None else self.packed.numel() + 4 * self.colsum.numel()
        return self.weight_q.numel() + packed + 4 * (self.weight_scale.numel() + self.bias.numel() + self.inv_smooth.numel())

    def _int_mm(self, q: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
        if self.packed is not None and native.lib() is not None and q.shape[0] <= self.native_limit:
            out = acc if acc is not None else torch.empty(q.shape[0], self.out_features, dtype=torch.int32)
            return native.int8_gemm_packed(q, self.packed, self.colsum, self.out_features, out)
        return torch._int_mm(q, self.weight_q, out=acc) if acc is not None else torch._int_mm(q, self.weight_q)

    def __call__(self, x: torch.Tensor | None, xq: Quantized | None = None, *, out: torch.Tensor | None,
                 acc: torch.Tensor | None = None, **epi):
        if xq is None or xq.inv_smooth is not self.inv_smooth:
            _, xq = epilogue(x, quant_for=self)
        acc = self._int_mm(xq.q, acc)
        return epilogue(IntAccumulator(acc, xq.scale, self.weight_scale, self.bias), out=out, **epi)


INT8_PROBE_ROWS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
INT8_PROBE_SECONDS = 0.02      # a probe this slow is the last: the LM head's wide GEMMs stop at 128-256 rows
INT8_ROWS_VERSION = "1"


@functools.lru_cache(maxsize=None)
def _int8_rows_key(threads: int) -> str:
    ident = [INT8_ROWS_VERSION, native.cpu_identity(), str(threads), torch.__version__, native.SOURCE.read_text()]
    return hashlib.sha256("\n".join(ident).encode()).hexdigest()[:16]


def _int8_rows_path() -> Path:
    """The measured limits' file: one per CPU, thread count, torch version and kernel source (its key
    made once per thread count: a precision plan's search asks at every linear swap)."""
    return native.cache_dir() / "int8-rows" / f"{_int8_rows_key(torch.get_num_threads())}.json"


def measure_native_limit(linear: Int8Linear, margin: float = 1.05) -> float:
    """The largest of INT8_PROBE_ROWS up to which oneDNN's _int_mm is not faster than the native kernel
    by more than `margin` at any probe on this weight (math.inf: at none of them; 0: already at one
    row). Probing stops at the first probe oneDNN wins, or with math.inf after a probe that took
    INT8_PROBE_SECONDS. The margin keeps near-ties (o 768 x 768 at 32-64 rows on a Zen 4: 3-6% apart,
    either way from run to run) from cutting the native range short."""
    k, n = linear.in_features, linear.out_features
    g = torch.Generator().manual_seed(0)
    limit = 0
    for m in INT8_PROBE_ROWS:
        q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        acc = torch.empty(m, n, dtype=torch.int32)
        ours = best_seconds(lambda: native.int8_gemm_packed(q, linear.packed, linear.colsum, n, acc))
        theirs = best_seconds(lambda: torch._int_mm(q, linear.weight_q, out=acc))
        if ours > theirs * margin:
            return limit
        if theirs > INT8_PROBE_SECONDS:
            break
        limit = m
    return math.inf


def tune_int8_rows(linears, use_cache: bool = True) -> dict[str, float]:
    """Set each decoder int8 linear's native_limit to what this machine measures for its weight shape
    (measure_native_limit), cached on disk per CPU, thread count, torch and kernel source: the
    crossover depends on the CPU (without AMX the native kernel keeps up with oneDNN to 512 rows on
    GPT-2's shapes; with AMX oneDNN overtakes from 32-64). Returns {"KxN": limit} of the shapes given."""
    todo = [lin for lin in linears if isinstance(lin, Int8Linear) and lin.packed is not None]
    if native.lib() is None or native.int8_gemm_everywhere() or not todo:
        return {}
    path = _int8_rows_path()
    table = {}
    if use_cache and path.exists():
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
    shapes = {}
    for lin in todo:
        shapes.setdefault(f"{lin.in_features}x{lin.out_features}", lin)
    missing = [key for key in shapes if key not in table]
    if missing:
        start = time.perf_counter()
        for key in missing:
            limit = measure_native_limit(shapes[key])
            table[key] = "inf" if limit == math.inf else limit
        log.info("int8 kernel choice measured for %d weight shape(s) in %.1f s (native kernel up to: %s)",
                 len(missing), time.perf_counter() - start, ", ".join(f"{k} {table[k]} rows" for k in missing))
        _write_atomic(path, json.dumps(table, sort_keys=True))
    for lin in todo:
        lin.native_limit = float(table[f"{lin.in_features}x{lin.out_features}"])
    return {key: float(table[key]) for key in shapes}


def _write_atomic(path: Path, text: str) -> None:
    """Best effort: a cache that cannot be written is measured again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: str,
                smooth: torch.Tensor | None = None):
    if dtype == "int8":
        return Int8Linear(weight, bias, smooth)
    return DenseLinear(weight, bias, torch.bfloat16 if dtype == "bf16" else torch.float32)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               out: torch.Tensor) -> torch.Tensor:
    """out = LayerNorm(x), written into `out` (a workspace view)."""
    torch.ops.aten.native_layer_norm.out(x, [x.shape[-1]], weight, bias, eps, out0=out,
                                         out1=torch.empty(0, dtype=x.dtype), out2=torch.empty(0, dtype=x.dtype))
    return out


def varlen_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, num_heads: int, out: torch.Tensor,
                     order: torch.Tensor, max_len: int, position_bias: torch.Tensor | None = None,
                     window: int = 0) -> torch.Tensor:
    """Bidirectional attention of each packed sequence over exactly its own tokens.

    qkv: [T, 3 * H] (Q, K, V blocks of H columns); out: [T, H]; cu_seqlens: int64 [B + 1];
    order: sequence indices longest first (the native kernel's work order); position_bias: None, or
    fp32 [num_heads, 2 * max_len - 1] added to the scaled scores, key j of query i taking
    [h, max_len - 1 + j - i] (MPNet's relative positions); window > 0: query i sees keys
    |j - i| < window only (a sliding layer of ModernBERT or EmbeddingGemma; the native kernel reads
    only those keys). Native kernel: 1.7x SDPA on a 64-sequence `short` batch (11.5 ms against 19.5 ms).
    bf16 qkv / out take it too (fp32 arithmetic on widened rows): on a Zen 4 CPU without AMX 5.0 ms
    against bf16 SDPA's 15.6 for MiniLM's 64-sequence `short` batch (13.2 against 24.5 on `longtail`).
    """
    if _native_ok(qkv, out) and qkv.dtype == torch.float32 or _native_bf16_ok(qkv, out):
        return native.varlen_attention(qkv, cu_seqlens, order, num_heads, max_len, out, position_bias, window)
    if window:
        position_bias = window_bias(window, max_len, num_heads, qkv.device, position_bias)
    return sdpa_varlen(qkv, cu_seqlens.tolist(), num_heads, out, position_bias)


def window_bias(window: int, max_len: int, num_heads: int, device, position_bias: torch.Tensor | None = None):
    """A window as an additive [num_heads, 2 max_len - 1] table (0 for |j - i| < window, else -1e30:
    finite, for kernels' fast math), added to `position_bias` if given: for kernels without a window
    of their own."""
    offsets = torch.arange(-(max_len - 1), max_len, device=device).abs()
    table = torch.where(offsets < window, 0.0, -1e30).expand(num_heads, -1)
    return table.contiguous() if position_bias is None else position_bias + table


def sdpa_varlen(qkv: torch.Tensor, cu_seqlens: list[int], num_heads: int, out: torch.Tensor,
                position_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The PyTorch version: adjacent sequences of equal length (batches arrive length-sorted) share one
    SDPA call as a [B, heads, L, d] batch, with no padding and no mask (with a position bias: its
    [heads, L, L] slice as the additive mask). q, k and v are made contiguous first: with strided
    inputs SDPA leaves its flash kernel for the math path, 3-5x slower at L >= 128."""
    hidden = qkv.shape[1] // 3
    head_dim = hidden // num_heads
    scale = 1.0 / math.sqrt(head_dim)
    view = qkv.view(-1, 3, num_heads, head_dim)
    out_view = out.view(-1, num_heads, head_dim)
    i, n = 0, len(cu_seqlens) - 1
    while i < n:
        length = cu_seqlens[i + 1] - cu_seqlens[i]
        j = i + 1
        while j < n and cu_seqlens[j + 1] - cu_seqlens[j] == length:
            j += 1
        start, end, count = cu_seqlens[i], cu_seqlens[j], j - i
        seqs = view[start:end].view(count, length, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).contiguous()
        mask = None
        if position_bias is not None:
            center = (position_bias.shape[1] - 1) // 2
            offsets = torch.arange(length, device=qkv.device)
            mask = position_bias[:, center + offsets[None, :] - offsets[:, None]].to(seqs.dtype)   # [nh, L, L]
        o = F.scaled_dot_product_attention(seqs[0], seqs[1], seqs[2], attn_mask=mask, scale=scale)  # [B, nh, L, d]
        out_view[start:end].view(count, length, num_heads, head_dim).copy_(o.transpose(1, 2))
        i = j
    return out


# ---------------------------------------------------------------------- decoder ops
def decoder_act_dtype(dtype: str) -> torch.dtype:
    """The activations' dtype of a decoder of `dtype`: int8 is W8A8 here, fp32 between the linears."""
    return torch.bfloat16 if dtype == "bf16" else torch.float32


def attention_dtype(act_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the q, k, v a decoder hands to write_kv and paged_attention: fp32, what the
    native RoPE, KV-write and attention kernels take, whatever the activations' dtype."""
    return torch.float32


def make_decoder_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: str):
    """Decoders: fp32, bf16 (weights and activations) or int8 W8A8 (per-channel weights, per-token
    dynamic activations, `_int_mm`). Not weight-only int8: torch's `_weight_int8pack_mm` measured
    1.6 ms at 1 row and 99 ms at 64 rows for a 768x3072 weight on this CPU, against fp32's 0.21 and
    1.85 ms and W8A8's 0.27 and 0.71 ms (docs/generation.md)."""
    if dtype == "int8":
        return Int8Linear(weight, bias, small_rows=True)
    return DenseLinear(weight, bias, torch.bfloat16 if dtype == "bf16" else torch.float32)


def lm_head(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits h [T, H] @ weight^T for an fp32 / bf16 LM head stored [V, H] (often the token embedding
    itself, so it is used as stored): the native kernel where fp32 linears take it (MKL ran GPT-2's
    head at 5-6 GFLOP/s for 1-4 rows and 20 at 16 on an AVX2 EPYC: kernels.c f32_gemm_nt)."""
    if h.dtype == weight.dtype == torch.float32 and native.f32_gemm_native():
        return native.f32_gemm_nt(h.contiguous(), weight, torch.empty(h.shape[0], weight.shape[0]))
    return h @ weight.t()


def linear(lin, x, act: str | None = None, quant_for=None):
    """A fresh [T, N] output of a DenseLinear / Int8Linear, `act` applied (int8: in the dequantizing
    pass). x: a float tensor, or the Quantized input `norm` or `linear` made for this int8 linear.
    quant_for: an int8 linear to hand the output to; the output then exists only as its Quantized
    input (the [T, N] floats are never written)."""
    if isinstance(x, Quantized):
        x, xq, rows = None, x, x.q.shape[0]
    else:
        x, xq = x.to(lin.dtype).contiguous(), None
        rows = x.shape[0]
    out = None if quant_for is not None else torch.empty(rows, lin.out_features, dtype=lin.dtype)
    y, q = lin(x, xq, out=out, act=act, quant_for=quant_for)
    return q if quant_for is not None else y


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, kind: str,
         quant_for=None, out_dtype: torch.dtype | None = None):
    """RMSNorm / LayerNorm of each row. quant_for: the int8 linear that takes the result; the norm
    then runs in that linear's quantizing pass and returns its Quantized input. out_dtype: the
    result's (default x's; here x is converted first, so bf16 models normalize bf16 rows)."""
    if out_dtype is not None:
        x = x.to(out_dtype)
    if quant_for is not None and x.dtype == torch.float32:
        return epilogue(x.contiguous(), ln=(weight, bias, eps), rms=kind == "rmsnorm", quant_for=quant_for)[1]
    # one native pass for fp32 rows, and bf16 rows with bf16 weights (torch's RMSNorm is five: square,
    # mean, rsqrt, two multiplies; 4% of a Qwen3 embedding forward with its per-head q / k norms); in
    # fp32 arithmetic, rounded once (the torch fallback computes the same)
    x = x.contiguous()
    return epilogue(x, out=torch.empty_like(x), ln=(weight, bias, eps), rms=kind == "rmsnorm")[0]


def act_and_mul(gate_up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """[T, 2I] (gate | up) -> act(gate) * up, [T, I] (SwiGLU with silu, GeGLU with gelu): fp32 or bf16
    rows in one native pass."""
    if gate_up.is_contiguous():
        out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype)
        return epilogue(gate_up, out=out, act=f"{act}_mul")[0]
    return _act_and_mul_torch(gate_up, act)


def _act_and_mul_torch(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return activation_(gate.clone(), act).mul_(up)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> None:
    """Rotary embedding in place, HF's rotate-half layout. x: [T, num_heads * d] (a view);
    cos, sin: [T, d / 2] for each token's position."""
    if (native.lib() is not None and x.dtype == cos.dtype == sin.dtype == torch.float32 and x.stride(1) == 1
            and cos.is_contiguous() and sin.is_contiguous()):
        native.rope_(x, cos, sin, num_heads)
        return
    rope_torch_(x, cos, sin, num_heads)


def rope_torch_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> None:
    """rope_ in PyTorch ops (any device and dtype; computed in the wider of x's and the tables')."""
    xh = x.view(x.shape[0], num_heads, -1)
    half = xh.shape[-1] // 2
    x1, x2 = xh[..., :half], xh[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    r1 = x1 * c - x2 * s
    x2.copy_(x2 * c + x1 * s)
    x1.copy_(r1)


KV_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


class PagedKV(NamedTuple):
    """One layer's paged KV cache on the CPU.

    k: [num_blocks, kv_heads, head_dim, block_size], keys transposed inside a block (the attention
       kernel loads one dimension of 16 keys as one vector; kernels.c);
    v: [num_blocks, kv_heads, block_size, head_dim];
    in fp32, bf16 or int8. int8 keeps one fp32 scale per token and KV head (k_scale, v_scale:
    [num_blocks, kv_heads, block_size]): symmetric, max |x| / 127 over the head's d values. int8 keeps
    the same shapes with the bytes of a block part in the order VNNI dot products read them (kernels.c
    paged_heads_i8): K as [head_dim / 4, block_size, 4] (four dimensions of a key side by side), V as
    [block_size / 4, head_dim, 4] (four keys of a dimension side by side); `int8_views` gives them.
    """
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


def int8_views(cache: PagedKV) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 cache's K as [blocks, kv_heads, d / 4, block_size, 4] and V as
    [blocks, kv_heads, block_size / 4, d, 4] (see PagedKV)."""
    nb, kvh, d, bs = cache.k.shape
    return cache.k.view(nb, kvh, d // 4, bs, 4), cache.v.view(nb, kvh, bs // 4, d, 4)


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, kv_dtype: str) -> int:
    elem = {"fp32": 4, "bf16": 2, "int8": 1}[kv_dtype]
    return 2 * num_layers * kv_heads * (head_dim * elem + (4 if kv_dtype == "int8" else 0))


def allocate_kv_cache(num_layers: int, num_blocks: int, kv_heads: int, block_size: int, head_dim: int,
                      kv_dtype: str) -> list[PagedKV]:
    dt = KV_DTYPES[kv_dtype]
    if dt == torch.int8 and (head_dim % 4 or block_size % 4):
        raise ValueError(f"an int8 KV cache needs head_dim and block_size divisible by 4 (got {head_dim}, "
                         f"{block_size}); use kv_dtype bf16 or fp32")

    def layer():
        scales = (torch.zeros(num_blocks, kv_heads, block_size), torch.zeros(num_blocks, kv_heads, block_size)) \
            if dt == torch.int8 else (None, None)
        return PagedKV(torch.zeros(num_blocks, kv_heads, head_dim, block_size, dtype=dt),
                       torch.zeros(num_blocks, kv_heads, block_size, head_dim, dtype=dt), *scales)
    return [layer() for _ in range(num_layers)]


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, heads, d] -> int8 values and one fp32 scale per (token, head): the int8 KV cache's
    quantization on both backends (the native and Triton KV writes do it in their pass; this is
    their reference)."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp(min=1e-8) / 127.0
    return torch.round(x / scale[..., None]).clamp_(-127, 127).to(torch.int8), scale


def write_kv(cache: PagedKV, k: torch.Tensor, v: torch.Tensor, slot_blocks: torch.Tensor,
             slot_offsets: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """Store each token's K and V ([n, kv_heads, d] fp32) at its (block, offset) slot. rope = (q
    [n, q_heads * d], cos, sin [n, d / 2]): the rotary embedding applied to q in place and to K before
    it is stored (afterwards k itself may or may not be rotated: the GPU backend rotates it only on
    the way into its cache)."""
    if rope is not None:
        q, cos, sin = rope
        rope_(q, cos, sin, q.shape[1] // k.shape[2])
        if k.stride(2) != 1 or k.stride(1) != k.shape[2]:     # heads not adjacent: rotate a copy
            k = k.contiguous()
        rope_(k.view(k.shape[0], -1), cos, sin, k.shape[1])
    if (native.lib() is not None and k.dtype == v.dtype == torch.float32 and k.stride(2) == v.stride(2) == 1
            and k.stride(1) == v.stride(1) == k.shape[2] and all(t.is_contiguous() for t in cache if t is not None)):
        native.kv_write(cache, k, v, slot_blocks, slot_offsets)
        return
    _write_kv_torch(cache, k, v, slot_blocks, slot_offsets)


def _write_kv_torch(cache: PagedKV, k: torch.Tensor, v: torch.Tensor, slot_blocks: torch.Tensor,
                    slot_offsets: torch.Tensor) -> None:
    if cache.k.dtype == torch.int8:
        (k, ks), (v, vs) = quantize_heads(k), quantize_heads(v)
        cache.k_scale[slot_blocks, :, slot_offsets] = ks
        cache.v_scale[slot_blocks, :, slot_offsets] = vs
        kq, vq = int8_views(cache)
        n, kvh, d = k.shape
        kq[slot_blocks, :, :, slot_offsets, :] = k.view(n, kvh, d // 4, 4)
        vq[slot_blocks, :, slot_offsets // 4, :, slot_offsets % 4] = v
        return
    cache.k[slot_blocks, :, :, slot_offsets] = k.to(cache.k.dtype)
    cache.v[slot_blocks, :, slot_offsets] = v.to(cache.v.dtype)


def paged_attention(q: torch.Tensor, cache: PagedKV, block_tables: torch.Tensor, cu_q: torch.Tensor,
                    ctx_len: torch.Tensor, num_heads: int, window: int, scale: float, max_ctx: int,
                    softcap: float = 0.0) -> torch.Tensor:
    """Causal attention of each sequence's new query tokens over its cached context; see kernels.c.
    softcap > 0: the scaled scores become softcap * tanh(s / softcap) before the softmax (Gemma 2)."""
    T = q.shape[0]
    d = cache.v.shape[-1]
    out = torch.empty(T, num_heads * d, dtype=torch.float32)
    if q.dtype == torch.float32 and _native_ok(out) and all(t.is_contiguous() for t in cache if t is not None):
        return native.paged_attention(q, cache, block_tables, cu_q, ctx_len, num_heads, window, scale, max_ctx, out,
                                      softcap)
    return _paged_attention_torch(q, cache, block_tables, cu_q, ctx_len, num_heads, window, scale, out, softcap)


def _gather_kv(cache: PagedKV, blocks: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's first n keys and values, fp32 [kv_heads, n, d]."""
    kv_heads, d = cache.k.shape[1], cache.k.shape[2]
    if cache.k.dtype == torch.int8:
        kq, vq = int8_views(cache)
        k = kq[blocks].permute(1, 0, 3, 2, 4).reshape(kv_heads, -1, d)[:, :n].float()
        v = vq[blocks].permute(1, 0, 2, 4, 3).reshape(kv_heads, -1, d)[:, :n].float()
    else:
        k = cache.k[blocks].permute(1, 0, 3, 2).reshape(kv_heads, -1, d)[:, :n].float()
        v = cache.v[blocks].transpose(0, 1).reshape(kv_heads, -1, d)[:, :n].float()
    if cache.k_scale is not None:
        k = k * cache.k_scale[blocks].transpose(0, 1).reshape(kv_heads, -1)[:, :n, None]
        v = v * cache.v_scale[blocks].transpose(0, 1).reshape(kv_heads, -1)[:, :n, None]
    return k, v


def _paged_attention_torch(q, cache: PagedKV, block_tables, cu_q, ctx_len, num_heads, window, scale, out,
                           softcap=0.0):
    kv_heads, block_size, d = cache.v.shape[1], cache.v.shape[2], cache.v.shape[3]
    cu, lens = cu_q.tolist(), ctx_len.tolist()
    for s in range(len(lens)):
        a, b, n = cu[s], cu[s + 1], lens[s]
        nblk = -(-n // block_size)
        k, v = _gather_kv(cache, block_tables[s, :nblk].long(), n)
        qs = q[a:b, :num_heads * d].float().reshape(b - a, num_heads, d).transpose(0, 1)  # [nh, nq, d]
        pos = torch.arange(n - (b - a), n)[:, None]
        keys = torch.arange(n)[None, :]
        allowed = keys <= pos
        if window > 0:
            allowed &= keys > pos - window
        if softcap > 0:         # SDPA has no soft-capping: the scores explicitly
            k, v = (x.repeat_interleave(num_heads // kv_heads, 0) for x in (k, v))
            s = torch.tanh(qs @ k.transpose(1, 2) * (scale / softcap)) * softcap
            o = s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        else:
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=allowed, scale=scale,
                                               enable_gqa=kv_heads != num_heads)
        out[a:b] = o.transpose(0, 1).reshape(b - a, num_heads * d)
    return out
