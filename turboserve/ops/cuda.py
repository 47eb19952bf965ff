"""CUDA ops: the functions of ops/cpu.py for NVIDIA GPUs, registered under "cuda" in ops/__init__.py.

GEMMs run in cuBLAS through torch; everything between two GEMMs is one Triton pass
(ops/triton_kernels.py): bias + activation (+ residual), bias + residual + LayerNorm or RMSNorm,
SiLU-and-multiply, the KV cache write with RoPE fused (q rotated in place, K on its way into the
cache), and attention (varlen for encoders, paged with GQA and split-KV for decoders).
Model code calls these exactly as it calls the CPU backend's; Triton is imported only when a model
asks for this backend (the registry imports backends lazily), so the CPU path never needs it.

int8 here is weight-only: int8 weights with per-output-channel scales, activations stay in floating
point and the dequantization happens inside the Triton GEMM's K loop. Decode GEMMs (a few rows) are
bound by reading the weights, so halving their bytes against bf16 is the win; at many rows the GEMM is
compute bound and cuBLAS on a dequantized copy is the better kernel. The row count where one overtakes
the other (`Int8WeightOnlyLinear.triton_max_rows`) is a placeholder until benchmarks/gpu.py measures it
on a GPU (docs/gpu.md). There is no W8A8 path, so no linear here takes int8 input (`takes_int8` is
False) and no epilogue quantizes (`quant_for` must be None).

Linears put their weights on `device` ("cuda" unless a test asks for "cpu" to run the kernels in
Triton's interpreter).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .cpu import rope_torch_

try:
    from . import triton_kernels as tk
except ModuleNotFoundError as exc:        # triton itself missing: say what to install
    raise ModuleNotFoundError(f"the cuda ops backend needs Triton (pip install triton): {exc}") from exc


def _no_int8_consumer(quant_for) -> None:
    if quant_for is not None:
        raise ValueError("the cuda backend's int8 linears are weight-only and take floating-point input")


def epilogue(src: torch.Tensor, *, out: torch.Tensor | None = None, act: str | None = None, residual=None,
             ln=None, quant_for=None, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
    """out = LN(act(src + bias) + residual) in one pass; ln: (gamma, beta, eps). out may alias src
    (None means in place). Returns (out, None): nothing here is quantized for a next GEMM."""
    _no_int8_consumer(quant_for)
    out = src if out is None else out
    if ln is not None:
        tk.row_norm(src, ln[0], ln[1], ln[2], "layer", out, bias=bias, act=act, residual=residual)
    elif act is not None or residual is not None or bias is not None:
        tk.bias_act(src, out, bias=bias, act=act, residual=residual)
    elif out is not src:
        out.copy_(src)
    return out, None


def activation_(x: torch.Tensor, kind: str) -> torch.Tensor:
    """act(x) in place on a [rows, cols] tensor with unit column stride."""
    if kind not in ("gelu", "gelu_tanh", "relu", "silu"):
        raise ValueError(f"unknown activation {kind!r}")
    return tk.bias_act(x, x, act=kind)


class _Linear:
    """What both linears share: the call convention of ops/cpu.py's linears. The GEMM writes straight
    into `out` when the dtypes agree; with an epilogue, the bias rides in the epilogue's one pass."""
    takes_int8 = False
    dtype: torch.dtype
    bias: torch.Tensor | None

    def _gemm(self, x: torch.Tensor, out: torch.Tensor | None, with_bias: bool) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, xq=None, *, out: torch.Tensor | None, act: str | None = None,
                 residual=None, ln=None, quant_for=None):
        _no_int8_consumer(quant_for)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)          # e.g. a bf16 linear inside an fp32 model
        fused = act is not None or residual is not None or ln is not None
        direct = out is not None and out.dtype == self.dtype
        y = self._gemm(x, out if direct else None, with_bias=not fused)
        if fused:
            return epilogue(y, out=out, act=act, residual=residual, ln=ln, bias=self.bias)
        if out is not None and not direct:
            y = out.copy_(y)
        return y, None


class DenseLinear(_Linear):
    """y = x @ W^T + b in fp32 or bf16 (cuBLAS); W stays [N, K] as checkpoints store it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device="cuda"):
        self.weight = weight.detach().to(device=device, dtype=dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(device=device, dtype=dtype).contiguous()
        self.out_features, self.in_features = self.weight.shape
        self.dtype = dtype

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def _gemm(self, x, out, with_bias):
        w_t = self.weight.t()
        if with_bias and self.bias is not None:
            return torch.addmm(self.bias, x, w_t) if out is None else torch.addmm(self.bias, x, w_t, out=out)
        return torch.mm(x, w_t) if out is None else torch.mm(x, w_t, out=out)


class Int8WeightOnlyLinear(_Linear):
    """y = x @ (W_q * scale)^T + b: int8 weights [K, N] with fp32 per-output-channel scales.

    Up to `triton_max_rows` rows, the Triton GEMM converts int8 tiles inside its K loop (reads 1 byte a
    weight); above it, the weight is dequantized once for a cuBLAS GEMM. 64 is a first guess to be
    replaced by the crossover benchmarks/gpu.py measures."""
    triton_max_rows = 64

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_dtype: torch.dtype = torch.float32,
                 device="cuda"):
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0                     # [N]
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.weight_q = q.t().contiguous().to(device)                            # [K, N]
        self.weight_scale = scale.to(device)
        self.bias = None if bias is None else bias.detach().to(device=device, dtype=act_dtype).contiguous()
        self.in_features, self.out_features = self.weight_q.shape
        self.dtype = act_dtype

    @property
    def nbytes(self) -> int:
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.weight_q.numel() + 4 * self.weight_scale.numel() + bias

    def _gemm(self, x, out, with_bias):
        bias = self.bias if with_bias else None
        x = x.contiguous()
        if x.shape[0] <= self.triton_max_rows:
            if out is None:
                out = torch.empty(x.shape[0], self.out_features, dtype=self.dtype, device=x.device)
            return tk.w8_matmul(x, self.weight_q, self.weight_scale, bias, out)
        w = self.weight_q.to(self.dtype) * self.weight_scale.to(self.dtype)
        if bias is None:
            return torch.mm(x, w) if out is None else torch.mm(x, w, out=out)
        return torch.addmm(bias, x, w) if out is None else torch.addmm(bias, x, w, out=out)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: str, smooth: torch.Tensor | None = None,
                device="cuda"):
    """Encoder linears. `smooth` (SmoothQuant factors) only matters for W8A8, which this backend does
    not have: a weight-only linear keeps activations in floating point, so it is not applied."""
    if dtype == "int8":
        return Int8WeightOnlyLinear(weight, bias, torch.float32, device)
    return DenseLinear(weight, bias, torch.bfloat16 if dtype == "bf16" else torch.float32, device)


def decoder_act_dtype(dtype: str) -> torch.dtype:
    """The activations' dtype of a decoder of `dtype`: int8 is weight-only here, so bf16 (the W8
    GEMM's bf16 dot)."""
    return torch.float32 if dtype == "fp32" else torch.bfloat16


def attention_dtype(act_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the q, k, v a decoder hands to write_kv and paged_attention: the activations'
    own (the Triton kernels take any; a bf16 decoder's qkv is not widened to fp32 and back)."""
    return act_dtype


def make_decoder_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: str, device="cuda"):
    """Decoders: fp32, bf16, or weight-only int8 with bf16 activations (decoder_act_dtype)."""
    if dtype == "int8":
        return Int8WeightOnlyLinear(weight, bias, decoder_act_dtype(dtype), device)
    return make_linear(weight, bias, dtype, device=device)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               out: torch.Tensor) -> torch.Tensor:
    return tk.row_norm(x, weight, bias, eps, "layer", out)


def varlen_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, num_heads: int, out: torch.Tensor,
                     order: torch.Tensor, max_len: int, causal: bool = False,
                     position_bias: torch.Tensor | None = None, window: int = 0) -> torch.Tensor:
    """Attention of each packed sequence over its own tokens (causal=True: each token over the ones
    before it). qkv [T, 3H]; out [T, H]; cu_seqlens int64 [B + 1]; order: the grid's sequence order
    (longest first); position_bias: an additive [heads, 2 max_len - 1] table (MPNet's relative positions);
    window > 0: keys |j - i| < window only (see ops/cpu.py)."""
    return tk.varlen_attention(qkv, cu_seqlens, order, num_heads, max_len, out, causal=causal,
                               position_bias=position_bias, window=window)


# ---------------------------------------------------------------------- decoder ops
def lm_head(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits h [T, H] @ weight^T for an LM head stored [V, H] (cuBLAS takes the transpose as is)."""
    return h @ weight.t()


def linear(lin, x: torch.Tensor, act: str | None = None, quant_for=None) -> torch.Tensor:
    """A fresh [T, N] output of a DenseLinear / Int8WeightOnlyLinear, in the linear's dtype, `act`
    applied in the bias epilogue. No linear here takes int8 input, so quant_for must be None."""
    _no_int8_consumer(quant_for)
    return lin(x, None, out=None, act=act)[0]


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, kind: str,
         quant_for=None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm / LayerNorm of each row in one pass, written in out_dtype (default x's): a bf16
    decoder's fp32 residual stream is normalized as it is, with no conversion pass before."""
    _no_int8_consumer(quant_for)
    return tk.row_norm(x, weight, bias, eps, "rms" if kind == "rmsnorm" else "layer",
                       torch.empty_like(x, dtype=out_dtype or x.dtype))


def act_and_mul(gate_up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """[T, 2I] (gate | up) -> act(gate) * up, [T, I] (SwiGLU, GeGLU)."""
    return tk.act_and_mul(gate_up, act)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> None:
    """Rotary embedding in place (rotate-half), x: [T, num_heads * d] (a view), cos / sin: [T, d / 2].
    Bidirectional encoders (ModernBERT) rotate q and k before varlen attention; decoders rotate inside
    write_kv instead."""
    rope_torch_(x, cos, sin, num_heads)


class PagedKV(NamedTuple):
    """One layer's paged KV cache on the GPU: k, v [num_blocks, kv_heads, block_size, head_dim] (the
    Triton kernel's layout) in fp32, bf16 or int8. int8 keeps one fp32 scale per token and KV head
    (k_scale, v_scale [num_blocks, kv_heads, block_size]: symmetric, max |x| / 127 over the head's d
    values, as the CPU backend's int8 cache; the kernel dequantizes each tile as it loads it)."""
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


_KV_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


def _kv_dtype(kv_dtype: str) -> torch.dtype:
    if kv_dtype not in _KV_DTYPES:
        raise ValueError(f"the cuda backend's KV cache is fp32, bf16 or int8, not {kv_dtype!r}")
    return _KV_DTYPES[kv_dtype]


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, kv_dtype: str) -> int:
    dt = _kv_dtype(kv_dtype)
    return 2 * num_layers * kv_heads * (head_dim * dt.itemsize + (4 if dt == torch.int8 else 0))


def allocate_kv_cache(num_layers: int, num_blocks: int, kv_heads: int, block_size: int, head_dim: int,
                      kv_dtype: str, device="cuda") -> list[PagedKV]:
    shape, dt = (num_blocks, kv_heads, block_size, head_dim), _kv_dtype(kv_dtype)

    def scales():
        return torch.zeros(shape[:3], device=device) if dt == torch.int8 else None
    return [PagedKV(torch.zeros(shape, dtype=dt, device=device), torch.zeros(shape, dtype=dt, device=device),
                    scales(), scales()) for _ in range(num_layers)]


def write_kv(cache: PagedKV, k: torch.Tensor, v: torch.Tensor, slot_blocks: torch.Tensor,
             slot_offsets: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """Store each token's K and V ([n, kv_heads, d]) at its (block, offset) slot (int8: quantized as
    cpu.quantize_heads does); rope = (q, cos, sin): q rotated in place and K rotated as stored (cpu's
    contract). One Triton launch for all of it."""
    tk.kv_write(k, v, cache.k, cache.v, cache.k_scale, cache.v_scale, slot_blocks, slot_offsets,
                None if rope is None else (rope[0], rope[1].contiguous(), rope[2].contiguous()))


def paged_attention(q: torch.Tensor, cache: PagedKV, block_tables: torch.Tensor, cu_q: torch.Tensor,
                    ctx_len: torch.Tensor, num_heads: int, window: int, scale: float, max_ctx: int,
                    softcap: float = 0.0) -> torch.Tensor:
    """Causal attention of each sequence's new query tokens over its cached context, [T, nh * d] in
    q's dtype; softcap > 0 soft-caps the scaled scores (Gemma 2). `max_ctx` is not needed: the kernel
    reads each context length on the device, so a decode step calling this can be captured as a CUDA
    graph."""
    out = torch.empty(q.shape[0], num_heads * cache.k.shape[-1], dtype=q.dtype, device=q.device)
    # a bf16 or int8 cache: bf16 dot products (tensor cores); an fp32 cache: fp32 ones
    q = q.to(torch.float32 if cache.k.dtype == torch.float32 else torch.bfloat16)
    return tk.paged_attention(q, cache.k, cache.v, block_tables, cu_q, ctx_len, num_heads, window, scale, out,
                              k_scale=cache.k_scale, v_scale=cache.v_scale, softcap=softcap)
