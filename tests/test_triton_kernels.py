"""The CUDA backend without a GPU: every Triton kernel in Triton's interpreter on CPU tensors against a
PyTorch reference, the backend's functions inside the real encoder and decoder, the kernels compiled
for a Hopper GPU (to PTX and cubin: no GPU needed), and the CUDA-graph padding of decode steps.

Inputs are random with mixed lengths (1, odd, crossing tile and KV block boundaries). Errors are
max |got - ref| / max |ref| with the reference computed in fp32 from the same (rounded) inputs;
bounds by input dtype: fp32 1e-4 (1e-5 for elementwise kernels), fp16 5e-3, bf16 3e-2 (8 mantissa bits).

Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, so it is set before
turboserve.ops.triton_kernels is first imported, and stays set for this test process. A missing
Triton fails the import (it is in the `test` extra): these tests must run in CI, not skip.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import dataclasses
import functools
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton.language as tl  # a missing Triton fails here, loudly
from triton.runtime import interpreter

from tests.conftest import build_model, random_sequences
from turboserve.ops import cpu, cuda, cuda_graphs
from turboserve.ops import triton_kernels as tk


def _widen_bf16_in_interpreted_dot():
    """Triton 3.9's interpreter keeps bf16 as its uint16 bit patterns and its tl.dot multiplies those
    integers. Widen bf16 operands to fp32 first, which is what a GPU's bf16 MMA computes (exact
    products, fp32 accumulation); everything else in the interpreter handles bf16 correctly."""
    dot = interpreter.InterpreterBuilder.create_dot

    def widen(t):
        if t.dtype.scalar != tl.bfloat16:
            return t
        return interpreter.TensorHandle((t.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


def _round_bf16_in_interpreted_casts():
    """Triton 3.9's interpreter casts fp32 -> bf16 by truncation (toward zero: a bias the length of a
    model accumulates); a GPU's cast, like torch's, rounds to nearest even. Round here as well."""
    cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if not (src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16):
            return cast(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(src.data)
        rounded[nan] = 0x7FC0
        return interpreter.TensorHandle(rounded, tl.bfloat16)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


_widen_bf16_in_interpreted_dot()
_round_bf16_in_interpreted_casts()

BOUND = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2,
         torch.int8: 3e-2}      # int8 KV caches: bf16 queries against the dequantized cache
ELEMENTWISE_BOUND = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def rand(*shape, dtype=torch.float32, gen=None) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def cu_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)


# ---------------------------------------------------------------------- attention
VARLEN_CASES = [(d, causal, DTYPES[i % 3]) for i, (d, causal) in
                enumerate((d, c) for d in (64, 80, 96, 128) for c in (False, True))]


@pytest.mark.parametrize("head_dim,causal,dtype", VARLEN_CASES)
def test_varlen_attention_matches_sdpa(head_dim, causal, dtype):
    gen = torch.Generator().manual_seed(head_dim + causal)
    lengths = [1, 70, 2, 33, int(torch.randint(3, 40, (1,), generator=gen))]   # 70: two 64-row tiles
    heads, cu = 2, cu_of(lengths)
    T = int(cu[-1])
    qkv = rand(T, 3 * heads * head_dim, dtype=dtype, gen=gen)
    order = torch.tensor(sorted(range(len(lengths)), key=lambda i: -lengths[i]))
    out = torch.full((T, heads * head_dim), float("nan"), dtype=dtype)
    tk.varlen_attention(qkv, cu, order, heads, max(lengths), out, causal=causal)
    view = qkv.float().view(T, 3, heads, head_dim)
    ref = torch.cat([F.scaled_dot_product_attention(*view[a:b].permute(1, 2, 0, 3), is_causal=causal)
                     .transpose(0, 1).reshape(b - a, -1) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    assert rel_err(out, ref) < BOUND[dtype]


@pytest.mark.parametrize("dtype,with_bias,window", [(torch.float32, True, 0), (torch.bfloat16, True, 0),
                                                     (torch.float32, False, 9), (torch.bfloat16, True, 40)])
def test_varlen_attention_with_a_relative_position_bias(dtype, with_bias, window):
    """MPNet's bias table [heads, 2 * max_len - 1] (key j of query i: [h, max_len - 1 + j - i]), added
    to the scaled scores, and / or a window |j - i| < w (ModernBERT's sliding layers; at w = 9 the last
    64-row query block of the 150-token sequence skips the first key block), against SDPA with the
    per-sequence [heads, L, L] slice as its mask."""
    gen = torch.Generator().manual_seed(17)
    lengths, heads, head_dim = [150, 1, 33, 5], 2, 64
    cu, T, max_len = cu_of(lengths), sum(lengths), max(lengths)
    qkv = rand(T, 3 * heads * head_dim, dtype=dtype, gen=gen)
    bias = rand(heads, 2 * max_len - 1, gen=gen) * 3 if with_bias else torch.zeros(heads, 2 * max_len - 1)
    out = torch.full((T, heads * head_dim), float("nan"), dtype=dtype)
    tk.varlen_attention(qkv, cu, torch.arange(len(lengths)), heads, max_len, out,
                        position_bias=bias if with_bias else None, window=window)
    view = qkv.float().view(T, 3, heads, head_dim)
    ref = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        pos = torch.arange(b - a)
        mask = bias[:, max_len - 1 + pos[None, :] - pos[:, None]]
        if window:
            mask = mask.masked_fill((pos[None, :] - pos[:, None]).abs() >= window, float("-inf"))
        ref.append(F.scaled_dot_product_attention(*view[a:b].permute(1, 2, 0, 3), attn_mask=mask)
                   .transpose(0, 1).reshape(b - a, -1))
    assert rel_err(out, torch.cat(ref)) < BOUND[dtype]


PAGED_CASES = [  # (query heads, kv heads, head dim, page size, window, dtype)
    (8, 2, 64, 4, 0, torch.float32),       # GQA 4
    (7, 1, 80, 16, 0, torch.bfloat16),     # GQA 7: a group padded to 8 rows
    (4, 4, 96, 4, 5, torch.float16),       # no GQA, sliding window
    (4, 2, 128, 8, 11, torch.float32),     # window across page boundaries
    (8, 2, 64, 16, 0, torch.int8),         # int8 cache (per-token scales), bf16 queries
    (4, 2, 128, 8, 11, torch.int8),        # int8 with a window across pages
]


def paged_case(nh, kvh, d, page, window, dtype, q_counts, ctx, split_size, gen, softcap=0.0, q_scale=1.0):
    """Run the paged kernel on random caches with scattered blocks; its error against the CPU reference
    (queries times q_scale, scores soft-capped at softcap if > 0)."""
    width = max(-(-n // page) for n in ctx)
    num_blocks = 2 + width * len(ctx)
    q_dtype = torch.bfloat16 if dtype == torch.int8 else dtype
    k_cache, v_cache = (rand(num_blocks, kvh, page, d, dtype=q_dtype, gen=gen) for _ in range(2))
    scales = {}
    if dtype == torch.int8:               # quantized as write_kv does; the reference reads them dequantized
        (k_cache, ks), (v_cache, vs) = cpu.quantize_heads(k_cache), cpu.quantize_heads(v_cache)
        scales = {"k_scale": ks, "v_scale": vs}
    perm = torch.randperm(num_blocks, generator=gen).int()           # blocks scattered over the cache
    tables = torch.stack([perm[i * width:(i + 1) * width] for i in range(len(ctx))])
    cu = cu_of(q_counts)
    T = int(cu[-1])
    qkv = rand(T, (nh + 2 * kvh) * d, dtype=q_dtype, gen=gen)
    qkv[:, :nh * d] *= q_scale
    q = qkv[:, :nh * d]                    # strided rows, as the decoder passes them
    args = (tables, cu, torch.tensor(ctx), nh, window, d ** -0.5)
    out = torch.full((T, nh * d), float("nan"), dtype=torch.float32)
    tk.paged_attention(q, k_cache, v_cache, *args, out, split_size=split_size, softcap=softcap, **scales)
    k_ref, v_ref = k_cache.float(), v_cache.float()
    if scales:
        k_ref, v_ref = k_ref * scales["k_scale"][..., None], v_ref * scales["v_scale"][..., None]
    # the CPU reference takes its own layout: keys transposed inside a block
    ref = cpu._paged_attention_torch(q.float(), cpu.PagedKV(k_ref.transpose(2, 3), v_ref), *args,
                                     torch.empty(T, nh * d), softcap)
    return rel_err(out, ref)


@pytest.mark.parametrize("nh,kvh,d,page,window,dtype", PAGED_CASES)
@pytest.mark.parametrize("decode_only", [False, True])
@pytest.mark.parametrize("split_size", [None, 16])       # 16: flash-decoding splits of 16 keys, combined
def test_paged_attention_matches_torch(nh, kvh, d, page, window, dtype, decode_only, split_size):
    gen = torch.Generator().manual_seed(nh * d + window)
    if decode_only:                         # one token per sequence: the decode tile shape
        q_counts, ctx = [1, 1, 1], [1, 37, page + 1]
    else:                                   # decode, whole prefill, decode, chunked prefill
        q_counts, ctx = [1, 7, 1, 12], [9, 7, 30, page * 3 + 1]
    assert paged_case(nh, kvh, d, page, window, dtype, q_counts, ctx, split_size, gen) < BOUND[dtype]


@pytest.mark.parametrize("nh,kvh,d,page,window,dtype", [PAGED_CASES[0], PAGED_CASES[3], PAGED_CASES[4]])
@pytest.mark.parametrize("split_size", [None, 16])
def test_paged_attention_softcap_matches_torch(nh, kvh, d, page, window, dtype, split_size):
    """Gemma 2's soft-capped scores (cap 5; queries scaled 4x so the scores reach 10-30 and the cap
    bends them), prefill and decode, split and unsplit, fp32 / int8 caches, with and without a window."""
    gen = torch.Generator().manual_seed(nh + d)
    args = (nh, kvh, d, page, window, dtype, [1, 7, 1, 12], [9, 7, 30, page * 3 + 1], split_size)
    assert paged_case(*args, gen, softcap=5.0, q_scale=4.0) < BOUND[dtype]


def test_paged_attention_splits_long_contexts_at_small_batch():
    """One sequence decoding over 1,500 keys fills 2 programs: the launcher splits its keys (each
    split at least MIN_SPLIT keys) and the combined result is the unsplit one."""
    key_span, cpu_device = 94 * 16, torch.device("cpu")
    plan = tk.paged_plan(1, 1, 8, 2, 64, key_span, cpu_device)
    assert plan.splits == 4 and plan.split_size >= tk.MIN_SPLIT and plan.split_size % plan.block_n == 0
    assert plan.split_size * plan.splits >= key_span
    assert tk.paged_plan(256, 256, 8, 2, 64, key_span, cpu_device).splits == 1     # a full GPU: no split
    # forced splits round up to a power of two (extra splits are empty): few compiled variants
    assert tk.paged_plan(1, 1, 8, 2, 64, key_span, cpu_device, split_size=512).splits == 4
    gen = torch.Generator().manual_seed(5)
    assert paged_case(8, 2, 64, 16, 0, torch.bfloat16, [1], [1500], None, gen) < BOUND[torch.bfloat16]


@pytest.mark.parametrize("kv_dtype", ["fp32", "bf16", "int8"])
def test_kv_write_stores_every_token_and_head_at_its_slot(kv_dtype):
    """write_kv's kernel on strided K/V views (3 KV heads and d = 80: both padded in the tile), tokens
    scattered over blocks: the stored values are the inputs (fp32), within one bf16 step (bf16), or
    for int8 the reference's scales and values rounded to the nearest step (ties may go either way);
    nothing else in the cache changes."""
    gen = torch.Generator().manual_seed(len(kv_dtype))
    n, kvh, d, page, nh = 7, 3, 80, 4, 6
    cache = cuda.allocate_kv_cache(1, 6, kvh, page, d, kv_dtype, device="cpu")[0]
    for t in cache:
        if t is not None:
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype) if t.dtype != torch.int8 else
                    torch.randint(-127, 128, t.shape, generator=gen, dtype=torch.int8))
    before = [None if t is None else t.clone() for t in cache]
    qkv = rand(n, (nh + 2 * kvh) * d, gen=gen) * 3
    k, v = (qkv[:, a:b].view(n, kvh, d) for a, b in ((nh * d, (nh + kvh) * d), ((nh + kvh) * d, None)))
    slots = torch.randperm(6 * page, generator=gen)[:n]
    blocks, offsets = slots // page, slots % page
    cuda.write_kv(cache, k, v, blocks, offsets)
    written = torch.zeros(6, page, dtype=torch.bool)
    written[blocks, offsets] = True
    for got, old, src, scale_i in ((cache.k, before[0], k, 2), (cache.v, before[1], v, 3)):
        assert torch.equal(got.transpose(1, 2)[~written], old.transpose(1, 2)[~written])   # untouched slots
        stored = got[blocks, :, offsets]                                                   # [n, kvh, d]
        if kv_dtype == "fp32":
            assert torch.equal(stored, src)
            continue
        if kv_dtype == "bf16":          # within a bf16 step
            assert ((stored.float() - src).abs() <= src.abs() * 2 ** -7).all()
            continue
        ref_q, ref_scale = cpu.quantize_heads(src)
        scale = cache[scale_i][blocks, :, offsets]
        assert torch.allclose(scale, ref_scale, rtol=1e-6, atol=0)
        assert ((stored.float() - src / scale[..., None]).abs() <= 0.5 + 1e-4).all()      # nearest step
        assert (stored != ref_q).float().mean() < 0.01                                     # ties only
        assert torch.equal(cache[scale_i].transpose(1, 2)[~written], before[scale_i].transpose(1, 2)[~written])


# ---------------------------------------------------------------------- row and elementwise fusions
ACTS = {"gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"), "relu": F.relu, "silu": F.silu,
        None: lambda v: v}


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_norm_fuses_bias_act_residual(kind, dtype):
    gen = torch.Generator().manual_seed(len(kind))
    M, N = 37, 200                               # N: a padded, masked row
    x, res, bias = rand(M, N, dtype=dtype, gen=gen), rand(M, N, dtype=dtype, gen=gen), rand(N, dtype=dtype, gen=gen)
    w, b = rand(N, dtype=dtype, gen=gen), rand(N, dtype=dtype, gen=gen)
    for act in ("gelu", None):
        v = ACTS[act](x.float() + bias.float()) + res.float()
        if kind == "layer":
            ref = F.layer_norm(v, (N,), w.float(), b.float(), 1e-5)
        else:
            ref = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float() + b.float()
        out = torch.empty(M, N, dtype=dtype)
        tk.row_norm(x, w, b, 1e-5, kind, out, bias=bias, act=act, residual=res)
        assert rel_err(out, ref) < BOUND[dtype], act
    # plain norm, in place
    ref = F.layer_norm(x.float(), (N,), w.float(), None, 1e-6) if kind == "layer" else \
        x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
    assert rel_err(tk.row_norm(x, w, None, 1e-6, kind, x), ref) < BOUND[dtype]


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu", "silu"])
def test_bias_act_and_residual(act):
    gen = torch.Generator().manual_seed(len(act))
    for dtype in DTYPES:
        x, res, bias = rand(33, 300, dtype=dtype, gen=gen) * 3, rand(33, 300, dtype=dtype, gen=gen), rand(300, dtype=dtype, gen=gen)
        ref = ACTS[act](x.float() + bias.float())
        out = tk.bias_act(x, torch.empty_like(x), bias=bias, act=act)
        assert rel_err(out, ref) < ELEMENTWISE_BOUND[dtype], dtype
        ref = ref + res.float()
        y = x.clone()
        tk.bias_act(y, y, bias=bias, act=act, residual=res)       # in place
        assert rel_err(y, ref) < ELEMENTWISE_BOUND[dtype], dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_act_and_mul(dtype):
    gate_up = rand(19, 2 * 150, dtype=dtype, gen=torch.Generator().manual_seed(1))
    for act in ("silu", "gelu", "gelu_tanh"):
        assert rel_err(tk.act_and_mul(gate_up, act), cpu.act_and_mul(gate_up.float(), act)) < ELEMENTWISE_BOUND[dtype]


@pytest.mark.parametrize("heads,kvh,d,kv_dtype", [(7, 1, 80, "fp32"), (4, 2, 64, "int8"), (6, 3, 128, "fp32")])
def test_kv_write_with_rope_rotates_q_in_place_and_k_into_the_cache(heads, kvh, d, kv_dtype):
    """RoPE fused into the KV write, on strided views of the qkv rows (head counts and half dims that
    pad the tile): q rotated in place as cpu.rope_ rotates it, the cache holds the rotated K (int8:
    its quantization) and V as given, and the qkv rows' K and V are left alone."""
    gen = torch.Generator().manual_seed(d + kvh)
    T, page = 21, 8
    qkv = rand(T, (heads + 2 * kvh) * d, gen=gen)
    angles = torch.rand(T, d // 2, generator=gen) * 6.28
    cos, sin = angles.cos(), angles.sin()
    ref = qkv.clone()
    cpu.rope_(ref[:, :heads * d], cos, sin, heads)
    cpu.rope_(ref[:, heads * d:(heads + kvh) * d], cos, sin, kvh)
    q, k, v = qkv[:, :heads * d], qkv[:, heads * d:(heads + kvh) * d], qkv[:, (heads + kvh) * d:]
    cache = cuda.allocate_kv_cache(1, 4, kvh, page, d, kv_dtype, device="cpu")[0]
    slots = torch.randperm(4 * page, generator=gen)[:T]
    blocks, offsets = slots // page, slots % page
    before = qkv[:, heads * d:].clone()
    cuda.write_kv(cache, k.view(T, kvh, d), v.view(T, kvh, d), blocks, offsets, rope=(q, cos, sin))
    assert rel_err(q, ref[:, :heads * d]) < ELEMENTWISE_BOUND[torch.float32]
    assert torch.equal(qkv[:, heads * d:], before)
    k_rot = ref[:, heads * d:(heads + kvh) * d].view(T, kvh, d)
    stored_k, stored_v = cache.k[blocks, :, offsets], cache.v[blocks, :, offsets]
    if kv_dtype == "fp32":
        assert rel_err(stored_k, k_rot) < ELEMENTWISE_BOUND[torch.float32]
        assert torch.equal(stored_v, v.view(T, kvh, d))
    else:
        scale = cache.k_scale[blocks, :, offsets]
        assert torch.allclose(scale, cpu.quantize_heads(k_rot)[1], rtol=1e-5, atol=0)
        assert ((stored_k.float() - k_rot / scale[..., None]).abs() <= 0.5 + 1e-3).all()


@pytest.mark.parametrize("rows,tiles,splits", [(1, None, None), (5, None, None), (33, None, None),
                                               (5, (16, 64, 32, 4, 3), 3), (33, (32, 32, 32, 4, 2), 2)])
def test_int8_weight_only_matmul(rows, tiles, splits):
    """Forced split-K: 3 splits of 96 keys (the last one 8 keys, inside a partial K tile), 2 of 128."""
    gen = torch.Generator().manual_seed(rows)
    K, N = 200, 100                                       # K: a partial last K tile
    w, bias = rand(N, K, gen=gen), rand(N, gen=gen)
    lin = cuda.Int8WeightOnlyLinear(w, bias, device="cpu")
    dequant = lin.weight_q.float() * lin.weight_scale
    if splits:
        assert tk.w8_plan(rows, N, K, torch.device("cpu"), tiles, splits).splits == splits
    for dtype in DTYPES:
        x = rand(rows, K, dtype=dtype, gen=gen)
        out = torch.empty(rows, N, dtype=dtype)
        tk.w8_matmul(x, lin.weight_q, lin.weight_scale, bias.to(dtype), out, tiles=tiles, splits=splits)
        assert rel_err(out, x.float() @ dequant + bias.to(dtype).float()) < BOUND[dtype], dtype
    # and against the fp32 weight: what int8 weights cost (per-channel rounding, K = 200)
    x = rand(rows, K, gen=gen)
    assert rel_err(tk.w8_matmul(x, lin.weight_q, lin.weight_scale, None, torch.empty(rows, N), tiles=tiles,
                                splits=splits), F.linear(x, w)) < 2e-2


def test_int8_weight_only_matmul_splits_k_when_tiles_cannot_fill_the_gpu():
    cpu_dev = torch.device("cpu")        # the interpreter plans for 132 SMs (an H100 / H200)
    assert tk.w8_plan(1, 4096, 4096, cpu_dev) == (tk.W8_DECODE_TILES, 4, 1024)     # 64 tiles
    assert tk.w8_plan(16, 11008, 4096, cpu_dev).splits == 2                        # 172 tiles < 264
    assert tk.w8_plan(16, 4096, 4096, cpu_dev).splits == 4                         # partials: 1/16 more bytes
    assert tk.w8_plan(64, 4096, 4096, cpu_dev).splits == 1                         # 1/4 more: not worth it
    assert tk.w8_plan(1, 32000, 4096, cpu_dev).splits == 1                         # an LM head: 500 tiles
    assert tk.w8_plan(1, 4096, 11008, cpu_dev) == (tk.W8_DECODE_TILES, 4, 2816)    # 4 x 22 K tiles
    assert tk.w8_plan(1, 4096, 256, cpu_dev).splits == 1                           # too shallow to split
    assert tk.w8_plan(64, 4096, 4096, cpu_dev).tiles == tk.W8_TILES
    gen = torch.Generator().manual_seed(7)
    K, N = 1100, 96                      # 2 tiles: split in 2 (640 + 460 keys), the last K tile partial
    lin = cuda.Int8WeightOnlyLinear(rand(N, K, gen=gen), None, device="cpu")
    assert tk.w8_plan(2, N, K, cpu_dev).splits == 2
    x = rand(2, K, dtype=torch.bfloat16, gen=gen)
    out = tk.w8_matmul(x, lin.weight_q, lin.weight_scale, None, torch.empty(2, N, dtype=torch.bfloat16))
    assert rel_err(out, x.float() @ (lin.weight_q.float() * lin.weight_scale)) < BOUND[torch.bfloat16]
    # no rows (the LM head of a step that carries only a prompt's middle chunk): nothing to launch
    empty = cuda.linear(lin, torch.empty(0, K, dtype=torch.bfloat16))
    assert empty.shape == (0, N)


# ---------------------------------------------------------------------- the backend's functions
def cuda_backend_on_cpu():
    """ops/cuda.py with its linears' weights on the CPU, so the kernels run in the interpreter."""
    ops = types.SimpleNamespace(**{k: v for k, v in vars(cuda).items() if not k.startswith("__")})
    ops.make_linear = functools.partial(cuda.make_linear, device="cpu")
    ops.make_decoder_linear = functools.partial(cuda.make_decoder_linear, device="cpu")
    ops.allocate_kv_cache = functools.partial(cuda.allocate_kv_cache, device="cpu")
    return ops


def test_backend_has_every_op_the_models_call():
    for name in ("make_linear", "make_decoder_linear", "epilogue", "activation_", "layer_norm", "varlen_attention",
                 "linear", "norm", "act_and_mul", "rope_", "paged_attention", "allocate_kv_cache", "write_kv", "decoder_act_dtype",
                 "attention_dtype",
                 "kv_bytes_per_token"):
        assert callable(getattr(cuda, name)), name
    from turboserve.ops import backend_for
    assert backend_for("cuda") is cuda      # "cuda:N" also sets the current GPU: needs one


def test_linears_and_their_epilogue():
    gen = torch.Generator().manual_seed(5)
    K, N, M = 96, 64, 70                     # 70 rows: the int8 linear's dequantize + GEMM path too
    w, b = rand(N, K, gen=gen), rand(N, gen=gen)
    x, res = rand(M, K, gen=gen), rand(M, N, gen=gen)
    gamma, beta = rand(N, gen=gen), rand(N, gen=gen)
    ref_lin = cpu.DenseLinear(w, b, torch.float32)
    epi = {"residual": res, "ln": (gamma, beta, 1e-5)}
    ref = ref_lin(x, None, out=torch.empty(M, N), **epi)[0]
    dense = cuda.make_linear(w, b, "fp32", device="cpu")
    assert rel_err(dense(x, None, out=torch.empty(M, N), **epi)[0], ref) < BOUND[torch.float32]
    ref_gelu = ref_lin(x, None, out=torch.empty(M, N), act="gelu")[0]
    assert rel_err(dense(x, None, out=torch.empty(M, N), act="gelu")[0], ref_gelu) < BOUND[torch.float32]
    bf16 = cuda.make_linear(w, b, "bf16", device="cpu")            # bf16 GEMM inside an fp32 model
    assert rel_err(bf16(x, None, out=torch.empty(M, N), **epi)[0], ref) < BOUND[torch.bfloat16]
    int8 = cuda.make_decoder_linear(w, b, "int8", device="cpu")
    assert not int8.takes_int8 and int8.nbytes < dense.nbytes / 3
    for rows in (3, M):                      # Triton kernel, then the dequantized cuBLAS-style path
        got = cuda.linear(int8, x[:rows])
        assert got.shape == (rows, N) and rel_err(got, F.linear(x[:rows], w, b)) < 2e-2
    with pytest.raises(ValueError, match="weight-only"):
        dense(x, None, out=None, quant_for=int8)


@pytest.mark.parametrize("dtype,bound", [("fp32", 1e-4), ("bf16", 3e-2),
                                         pytest.param("int8", 5e-2, marks=pytest.mark.slow)])  # 70 s calibrating
def test_encoder_forward_with_the_cuda_backend(tmp_path, monkeypatch, dtype, bound):
    """The unchanged encoder model code on the cuda backend (kernels interpreted) against the fp32 CPU
    one: fp32, bf16, and int8 (weight-only, with the calibration forward that SmoothQuant runs)."""
    from turboserve import Encoder
    from turboserve import model as model_mod
    path = build_model("bert", tmp_path / "bert")
    texts = [random_sequences([n], seed=n)[0] for n in (1, 9, 40)]
    ref = Encoder.load(path).hidden_states(texts)
    monkeypatch.setattr(model_mod, "backend_for", lambda device: cuda_backend_on_cpu())
    got = Encoder.load(path, dtype=dtype).hidden_states(texts)
    for g, r in zip(got, ref):
        assert rel_err(g, r) < bound


@pytest.mark.parametrize("kind", ["mpnet", "modernbert", "qwen3-embedding"])
def test_other_encoders_with_the_cuda_backend(kind, tmp_path, modernbert_dir, decoder_dirs, monkeypatch):
    """Per-token states on the cuda backend equal the CPU's (fp32) for the encoders beyond BERT: MPNet
    (relative position bias in every layer's attention), ModernBERT (RoPE in place on q and k,
    bidirectional varlen attention with the sliding layers' window (key blocks skipped), GeGLU, LayerNorms
    without bias) and a decoder as an embedding model (its scratch cache, whole prefills across blocks)."""
    from turboserve import Encoder
    from turboserve import decoder as decoder_mod
    from turboserve import model as model_mod
    if kind == "mpnet":
        path, module = build_model("mpnet", tmp_path / "mpnet"), model_mod
    else:
        path, module = modernbert_dir if kind == "modernbert" else decoder_dirs["qwen3"], decoder_mod
    seqs = random_sequences([1, 9, 17, 30], seed=6)
    ref = Encoder.load(path).hidden_states(seqs)
    monkeypatch.setattr(module, "backend_for", lambda device: cuda_backend_on_cpu())
    for g, r in zip(Encoder.load(path).hidden_states(seqs), ref):
        assert rel_err(g, r) < 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral", "qwen3", "gemma3", "gemma2"])
def test_generation_with_the_cuda_backend(decoder_dirs, arch, monkeypatch):
    """Greedy tokens and their logprobs from the unchanged decoder model code on the cuda backend:
    RMSNorm/LayerNorm, RoPE, SiLU-and-mul / GELU, paged GQA attention (chunked prefill, decode, and
    Mistral's sliding window of 24 crossed by a 30-token prompt)."""
    from turboserve import decoder as decoder_mod
    from turboserve.llm import LLM
    from turboserve.sampling import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=0, ignore_eos=True)
    prompts = random_sequences([1, 30, 17], seed=11)
    ref = LLM.load(decoder_dirs[arch], max_batch_tokens=32).generate(prompts, params)
    monkeypatch.setattr(decoder_mod, "backend_for", lambda device: cuda_backend_on_cpu())
    got = LLM.load(decoder_dirs[arch], max_batch_tokens=32).generate(prompts, params)
    for g, r in zip(got, ref):
        assert g.outputs[0].token_ids == r.outputs[0].token_ids
        logprobs = [torch.tensor([d.logprob for d in out.outputs[0].logprobs]) for out in (g, r)]
        assert torch.allclose(*logprobs, atol=1e-4)


# ---------------------------------------------------------------------- compiled for a GPU (no GPU needed)
COMPILE_CHECK = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from turboserve.ops import triton_kernels as tk

calls = []
class Record:                      # stands in for a kernel: keeps the launcher's arguments
    def __init__(self, fn): self.fn = fn
    def __getitem__(self, grid): return lambda *a, **kw: calls.append((self.fn, a, kw))
for name, obj in list(vars(tk).items()):
    if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
        setattr(tk, name, Record(obj))
TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int8: "i8", torch.int32: "i32", torch.int64: "i64"}
bf = torch.bfloat16
tk.varlen_attention(torch.empty(90, 480, dtype=bf), torch.tensor([0, 50, 90]), torch.tensor([0, 1]), 2, 50,
                    torch.empty(90, 160, dtype=bf), causal=True)
cache = torch.empty(9, 2, 16, 128, dtype=bf)
for T in (2, 40):                  # decode tile (GQA 7 padded to 8 rows), prefill tile
    tk.paged_attention(torch.empty(T, 14 * 128, dtype=bf), cache, cache, torch.empty(2, 4, dtype=torch.int32),
                       torch.tensor([0, 1, T]), torch.tensor([9, 50]), 14, 8, 0.1, torch.empty(T, 14 * 128))
tk.paged_attention(torch.empty(2, 14 * 128, dtype=bf), cache, cache, torch.empty(2, 40, dtype=torch.int32),
                   torch.tensor([0, 1, 2]), torch.tensor([9, 600]), 14, 0, 0.1, torch.empty(2, 14 * 128))  # splits
cache32 = torch.empty(9, 2, 16, 64)   # an fp32 cache: fp32 queries and IEEE dots (prefill tile)
tk.paged_attention(torch.empty(40, 8 * 64), cache32, cache32, torch.empty(2, 4, dtype=torch.int32),
                   torch.tensor([0, 1, 40]), torch.tensor([9, 50]), 8, 0, 0.1, torch.empty(40, 8 * 64))
cache8, scale8 = torch.empty(9, 2, 16, 128, dtype=torch.int8), torch.empty(9, 2, 16)   # int8 cache, decode
tk.paged_attention(torch.empty(2, 8 * 128, dtype=bf), cache8, cache8, torch.empty(2, 4, dtype=torch.int32),
                   torch.tensor([0, 1, 2]), torch.tensor([9, 50]), 8, 0, 0.1, torch.empty(2, 8 * 128),
                   k_scale=scale8, v_scale=scale8)
tk.paged_attention(torch.empty(2, 8 * 128, dtype=bf), cache, cache, torch.empty(2, 4, dtype=torch.int32),
                   torch.tensor([0, 1, 2]), torch.tensor([9, 50]), 8, 0, 0.1, torch.empty(2, 8 * 128),
                   softcap=50.0)      # Gemma 2's soft-capped scores
x = torch.empty(8, 768, dtype=bf)
tk.row_norm(x, x[0], None, 1e-5, "rms", x, bias=x[0], act="gelu_tanh", residual=x)
tk.bias_act(x, x, bias=x[0], act="gelu")
tk.act_and_mul(x)
cache80 = torch.empty(9, 2, 16, 80)     # RoPE fused, fp32 (the decoder's q and K), d = 80
tk.kv_write(torch.empty(5, 2, 80), torch.empty(5, 2, 80), cache80, cache80, None, None,
            torch.zeros(5, dtype=torch.int64), torch.arange(5), (torch.empty(5, 640), torch.empty(5, 40),
                                                                  torch.empty(5, 40)))
tk.kv_write(torch.empty(5, 2, 128, dtype=bf), torch.empty(5, 2, 128, dtype=bf), cache8, cache8, scale8, scale8,
            torch.zeros(5, dtype=torch.int64), torch.arange(5))
tk.w8_matmul(torch.empty(2, 768, dtype=bf), torch.empty(768, 256, dtype=torch.int8), torch.empty(256),
             None, torch.empty(2, 256, dtype=bf))
tk.w8_matmul(torch.empty(1, 4096, dtype=bf), torch.empty(4096, 512, dtype=torch.int8), torch.empty(256),  # split-K
             torch.empty(512, dtype=bf), torch.empty(1, 512, dtype=bf))
tk.w8_matmul(torch.empty(40, 768), torch.empty(768, 256, dtype=torch.int8), torch.empty(256),   # encoder: fp32
             torch.empty(256), torch.empty(40, 256))
for fn, args, kw in calls:
    sig, const = {}, {}
    for p in fn.params:
        a = args[p.num] if p.num < len(args) else kw[p.name]
        if p.is_constexpr:
            sig[p.name], const[(p.num,)] = "constexpr", a
        elif isinstance(a, torch.Tensor):
            sig[p.name] = "*" + TY[a.dtype]
        else:
            sig[p.name] = "fp32" if isinstance(a, float) else "i32"
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": kw["num_warps"]})
    assert k.asm["cubin"], fn.__name__
    assert k.metadata.shared <= 232448, (fn.__name__, k.metadata.shared)   # Hopper's shared memory per block
    print("compiled", fn.__name__)
"""


def test_kernels_compile_for_hopper():
    """The interpreter accepts programs the compiler rejects (dot tiles under 16, branch type
    mismatches): lower each kernel, as its launcher specializes it, through PTX to an sm_90 cubin."""
    env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET")
    run = subprocess.run([sys.executable, "-c", COMPILE_CHECK], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("compiled") == 17, run.stdout


# ---------------------------------------------------------------------- CUDA graphs: what runs without a GPU
def test_bucket_choice():
    assert [cuda_graphs.bucket_for(n) for n in (1, 2, 3, 8, 9, 256)] == [1, 2, 4, 8, 16, 256]
    assert cuda_graphs.bucket_for(257) is None
    assert cuda_graphs.bucket_for(5, (4, 12)) == 12


def _decode_step(decoder_dirs):
    """A real decode step of three sequences (contexts 2, 21, 38) from a llama engine, and the engine."""
    from turboserve.llm import LLM
    from turboserve.sampling import SamplingParams
    llm = LLM.load(decoder_dirs["llama"], block_size=4)
    eng = llm.engine
    for i, p in enumerate(random_sequences([1, 20, 37], seed=2)):
        eng.add_request(f"g{i}", p, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    eng.step()                                      # prefill all three
    step = eng._batch(eng.schedule())[0]
    assert cuda_graphs.is_decode_only(step)
    return eng, step


def test_padded_decode_step_leaves_real_sequences_alone(decoder_dirs):
    """Run a decode step padded to its bucket on the CPU model: the real sequences' logits are the
    unpadded step's, so is their KV cache, and the padding wrote only into the reserved pad block."""
    eng, step = _decode_step(decoder_dirs)
    model, num_blocks = eng.model, eng.cache[0][0].shape[0]
    pad_block = num_blocks                          # one block past what the block manager hands out

    def cache_copy():
        return [type(layer)(*(None if t is None else torch.cat([t, torch.zeros_like(t[:1])]) for t in layer))
                for layer in eng.cache]

    bucket = cuda_graphs.bucket_for(3)
    padded = cuda_graphs.pad_decode_step(step, bucket, max_blocks=16, pad_block=pad_block)
    assert padded.input_ids.shape == (bucket,) and padded.block_tables.shape == (bucket, 16)
    assert padded.cu_q.tolist() == list(range(bucket + 1)) and padded.ctx_len[3:].tolist() == [1]
    assert (padded.block_tables[3:] == pad_block).all() and (padded.slot_blocks[3:] == pad_block).all()
    plain_cache, padded_cache = cache_copy(), cache_copy()
    ref = model.forward(step, plain_cache)
    got = model.forward(padded, padded_cache)
    assert rel_err(got[:3], ref) < 1e-5          # GEMMs of 4 rows and of 3 may round differently
    for plain, padded_layer in zip(plain_cache, padded_cache):
        for a, b in ((plain.k, padded_layer.k), (plain.v, padded_layer.v)):
            assert torch.allclose(a[:pad_block], b[:pad_block], rtol=0, atol=1e-5)
        assert padded_layer.k[pad_block].abs().sum() > 0       # the padding sequence's K went to the pad block
    with pytest.raises(ValueError, match="does not fit"):
        cuda_graphs.pad_decode_step(step, 2, max_blocks=16, pad_block=pad_block)


def test_decode_graphs_run_eagerly_off_cuda(decoder_dirs):
    eng, step = _decode_step(decoder_dirs)
    calls = []

    def forward(s):
        calls.append(s)
        return eng.model.forward(s, eng.cache)

    graphs = cuda_graphs.DecodeGraphs(forward, max_blocks=16, pad_block=0, device="cpu")
    assert not graphs.replayable(step)
    logits = graphs(step)
    assert len(calls) == 1 and calls[0] is step and logits.shape[0] == 3
    prefill = dataclasses.replace(step, input_ids=torch.cat([step.input_ids, step.input_ids[:1]]))
    assert not cuda_graphs.is_decode_only(prefill)


def test_a_failed_graph_capture_falls_back_to_eager(decoder_dirs, monkeypatch, caplog):
    """Capture runs first on a real GPU; if it raises, that bucket runs eagerly from then on and the
    step still gets its logits (pretend-CUDA: replayable forced, the capture made to fail)."""
    eng, step = _decode_step(decoder_dirs)
    ref = eng.model.forward(step, eng.cache)
    graphs = cuda_graphs.DecodeGraphs(lambda s: eng.model.forward(s, eng.cache), max_blocks=16, pad_block=0,
                                      device="cpu")
    captures = []

    def failing_capture(padded):
        captures.append(padded)
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(graphs, "replayable", lambda s: True)
    monkeypatch.setattr(graphs, "_capture", failing_capture)
    for _ in range(2):
        assert torch.equal(graphs(step), ref)
    assert len(captures) == 1 and graphs._graphs == {cuda_graphs.bucket_for(3): None}
    assert "capture failed" in caplog.text


@pytest.mark.parametrize("arch,dtype,kv_dtype,cache_dtype,bound", [
    ("llama", "bf16", None, torch.bfloat16, 3e-2),   # the GPU's main path: bf16 throughout, bf16 cache
    ("gpt2", "bf16", None, torch.bfloat16, 3e-2),    # LayerNorm with biases, GELU-tanh, learned positions
    ("llama", "int8", None, torch.int8, 5e-2),       # W8A16 with the int8 cache, as int8 defaults
    ("llama", "int8", "bf16", torch.bfloat16, 5e-2)])
def test_16_bit_decoders_on_the_cuda_backend(decoder_dirs, monkeypatch, arch, dtype, kv_dtype, cache_dtype, bound):
    """bf16 and int8 decoders on cuda: bf16 activations (int8 is W8A16: bf16 into the W8 GEMM), the
    cache in bf16 or int8 (int8 by default for int8 models, as on the CPU; write_kv quantizes, the
    kernel dequantizes), bf16 queries with 16-bit dots either way. Logits of a prefill step of mixed
    lengths stay within the precision's error of the fp32 CPU model's (measured, with the
    interpreter's bf16 casts rounding as a GPU's do: bf16 1.9e-2 LLaMA, 8.6e-3 GPT-2; int8 2.0e-2
    with a bf16 cache, 2.4e-2 with the int8 one)."""
    from turboserve import decoder as decoder_mod
    from turboserve.llm import LLM
    from turboserve.sampling import SamplingParams
    ref = LLM.load(decoder_dirs[arch]).engine
    monkeypatch.setattr(decoder_mod, "backend_for", lambda device: cuda_backend_on_cpu())
    eng = LLM.load(decoder_dirs[arch], dtype=dtype, kv_dtype=kv_dtype).engine
    model = eng.model
    assert model.act_dtype == torch.bfloat16 and eng.cache[0].k.dtype == cache_dtype
    linear = cuda.Int8WeightOnlyLinear if dtype == "int8" else cuda.DenseLinear
    assert isinstance(model.layers[0].qkv, linear) and model.layers[0].qkv.dtype == torch.bfloat16
    logits = []
    for e in (ref, eng):
        for i, p in enumerate(random_sequences([1, 20, 37], seed=4)):
            e.add_request(f"q{i}", p, SamplingParams(temperature=0.0, max_tokens=2))
        step = e._batch(e.schedule())[0]
        logits.append(e.model.forward(step, e.cache))
    assert logits[1].shape == logits[0].shape and rel_err(logits[1], logits[0]) < bound
    assert logits[1].dtype == torch.float32          # the sampler's numpy argmax takes no bf16 (int8's LM head)
