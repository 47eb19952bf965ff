"""CPU ops for the packed-token encoder.

Everything runs on [T, H] tensors of real tokens. GEMMs go through oneDNN/MKL via `torch.addmm` with
a pre-transposed, contiguous weight (measured on this Ice Lake machine: 210-280 GFLOP/s at 2 threads,
the same as oneDNN's prepacked `_linear_pointwise`, which has no `out=` and so cannot write into the
memory planner's workspace). Ops take an `out` so the planner decides where activations live.

int8 linears are W8A8 with per-output-channel weight scales and per-token activation scales: rows are
quantized independently, so a text's result does not depend on its batch neighbours, and the int32
accumulation of `torch._int_mm` (VNNI) is exact.

The work between GEMMs runs in the native kernels (turboserve/native, one pass each): at [4096, 1536]
eager PyTorch dequantization takes 19 ms, the native pass 2.1 ms, against 5.3 ms for the int8 GEMM;
add+LayerNorm 0.65 ms against 1.0-1.4 ms; varlen attention 11.5 ms against 19.5 ms for SDPA on a
64-sequence `short` batch. Where the native library is unavailable (no C compiler), or for bf16
activations, the PyTorch versions below run instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import native


class DenseLinear:
    """y = x @ W^T + b in fp32 or bf16."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.weight_t = weight.detach().to(dtype).t().contiguous()    # [K, N]
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self.in_features, self.out_features = self.weight_t.shape
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.bias is None:
            return torch.mm(x, self.weight_t, out=out)
        return torch.addmm(self.bias, x, self.weight_t, out=out)

    def nbytes(self) -> int:
        return self.weight_t.numel() * self.weight_t.element_size()


def quantize_rows(x: torch.Tensor, inv_smooth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of x / s: returns (int8 values, fp32 scale per row)."""
    if native.lib() is not None and x.dtype == torch.float32 and x.is_contiguous():
        return native.quantize_rows(x, inv_smooth)
    xs = x.float() * inv_smooth
    scale = xs.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    return torch.round(xs / scale).clamp(-127, 127).to(torch.int8), scale


def dequantize_into(acc, row_scale, col_scale, bias, out) -> torch.Tensor:
    """out = acc * row_scale * col_scale + bias."""
    if native.lib() is not None and out.is_contiguous():
        native.dequantize_into(acc, row_scale, col_scale, bias, out)
        return out
    return torch.addcmul(bias, acc.float() * row_scale, col_scale, out=out)


class Int8Linear:
    """W8A8 linear: per-channel int8 weights, per-token dynamic int8 activations.

    `smooth` (SmoothQuant) moves activation outliers into the weights: the input's columns are divided by
    s and the weight's multiplied. It cannot be folded into the producing LayerNorm here, because in a
    post-LN encoder that LayerNorm's output is also the residual; the division rides along in the
    quantization pass instead. Output is fp32.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, smooth: torch.Tensor | None = None):
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

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        xq, row_scale = quantize_rows(x, self.inv_smooth)
        acc = torch._int_mm(xq, self.weight_q)                        # exact int32
        if out is None:
            out = torch.empty(acc.shape, dtype=torch.float32)
        return dequantize_into(acc, row_scale, self.weight_scale, self.bias, out)

    def nbytes(self) -> int:
        return self.weight_q.numel() + self.weight_scale.numel() * 4


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: str,
                smooth: torch.Tensor | None = None):
    if dtype == "int8":
        return Int8Linear(weight, bias, smooth)
    return DenseLinear(weight, bias, torch.bfloat16 if dtype == "bf16" else torch.float32)


def activation_(x: torch.Tensor, kind: str) -> torch.Tensor:
    """In-place activation after FFN up (its bias is already added by the GEMM)."""
    if kind == "gelu":
        return torch._C._nn.gelu_(x)
    if kind == "gelu_tanh":
        return torch._C._nn.gelu_(x, approximate="tanh")
    if kind == "relu":
        return torch.relu_(x)
    raise ValueError(f"unknown activation {kind!r}")


def _native_ok(*tensors: torch.Tensor) -> bool:
    return native.lib() is not None and all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float, out: torch.Tensor) -> torch.Tensor:
    """out = LayerNorm(x + residual), one pass; x may be overwritten (it is dead afterwards)."""
    if _native_ok(x, residual, weight, bias, out):
        return native.add_layer_norm(x, residual, weight, bias, eps, out)
    return layer_norm(x.add_(residual), weight, bias, eps, out)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               out: torch.Tensor) -> torch.Tensor:
    """out = LayerNorm(x), written into `out` (a workspace view)."""
    torch.ops.aten.native_layer_norm.out(x, [x.shape[-1]], weight, bias, eps, out0=out,
                                         out1=torch.empty(0, dtype=x.dtype), out2=torch.empty(0, dtype=x.dtype))
    return out


def varlen_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, num_heads: int, out: torch.Tensor,
                     order: torch.Tensor, max_len: int) -> torch.Tensor:
    """Bidirectional attention of each packed sequence over exactly its own tokens.

    qkv: [T, 3 * H] (Q, K, V blocks of H columns); out: [T, H]; cu_seqlens: int64 [B + 1];
    order: sequence indices longest first (the native kernel's work order).
    """
    if _native_ok(qkv, out):
        return native.varlen_attention(qkv, cu_seqlens, order, num_heads, max_len, out)
    return _sdpa_varlen(qkv, cu_seqlens.tolist(), num_heads, out)


def _sdpa_varlen(qkv: torch.Tensor, cu_seqlens: list[int], num_heads: int, out: torch.Tensor) -> torch.Tensor:
    """The PyTorch version: adjacent sequences of equal length (batches arrive length-sorted) share one
    SDPA call as a [B, heads, L, d] batch, with no padding and no mask. q, k and v are made contiguous
    first: with strided inputs SDPA leaves its flash kernel for the math path, 3-5x slower at L >= 128."""
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
        o = F.scaled_dot_product_attention(seqs[0], seqs[1], seqs[2], scale=scale)   # [B, nh, L, d]
        out_view[start:end].view(count, length, num_heads, head_dim).copy_(o.transpose(1, 2))
        i = j
    return out
