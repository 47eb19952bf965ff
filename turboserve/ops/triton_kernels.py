"""Triton kernels of the CUDA backend, and thin launchers that pick block sizes and grids.

Every launcher takes tensors on one device and returns (or writes) tensors there; it never reads a
device tensor back to the host, so the decode step that calls them can be captured as a CUDA graph.
With TRITON_INTERPRET=1 set before this module is imported, the same kernels run on CPU tensors in
Triton's interpreter: that is how tests/test_triton_kernels.py checks them on machines without a GPU.

Kernels
  varlen_attention    flash-style attention of packed sequences over their own tokens (cu_seqlens),
                      bidirectional (encoders) or causal; reads Q, K, V straight from the packed
                      [T, 3H] projection
  paged_attention     causal attention of each sequence's new tokens (prefill chunks and decode tokens
                      in one launch) over its paged KV cache (fp32, bf16, or int8 with per-token scales,
                      dequantized as loaded); GQA: the query heads that share a KV head
                      are rows of one tile, so each K/V block is loaded once per group; sliding window;
                      flash-decoding: when its programs cannot fill the GPU (small decode batches, long
                      contexts) each program's keys are split and _combine_splits_kernel merges them
  kv_write            a step's K and V into their cache slots, all heads of a token per program;
                      int8 caches quantized on the way (one scale per token and head); RoPE fused:
                      the token's queries rotated in place, its keys on the way into the cache
  row_norm            one pass per row: act(x + bias) + residual, then LayerNorm or RMSNorm
  bias_act            elementwise act(x + bias) (+ residual): bias+GELU after a GEMM
  act_and_mul         [T, 2I] (gate | up) -> act(gate) * up (silu: SwiGLU, gelu / gelu_tanh: GeGLU)
  w8_matmul           x @ dequant(W_int8): per-output-channel scales, the int8 -> float conversion
                      inside the K loop, fp32 accumulation; split-K (_w8_reduce_kernel adds the
                      partial sums) when decode's few output tiles cannot fill the GPU

Numerics: accumulation and softmax statistics in fp32. fp32 inputs take IEEE fp32 dot products (not
TF32) so the fp32 path keeps the reference contract of the CPU backend; bf16/fp16 are the fast path.
Head dimensions that are not powers of two (80, 96) run in a padded BLOCK_D with masked lanes.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"     # the latter is ignored for 16-bit inputs


# ---------------------------------------------------------------------------------- shared pieces
@triton.jit
def _activate(v, ACT: tl.constexpr):
    """v in fp32; ACT one of "", "gelu", "gelu_tanh", "relu", "silu"."""
    if ACT == "gelu":
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        inner = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        inner = tl.minimum(tl.maximum(inner, -15.0), 15.0)     # tanh is +-1 in fp32 there; exp stays finite
        # tanh(z) = 2 sigmoid(2z) - 1, without a libdevice call
        v = 0.5 * v * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
    elif ACT == "relu":
        v = tl.maximum(v, 0.0)
    elif ACT == "silu":
        v = v / (1.0 + tl.exp(-v))
    return v


@triton.jit
def _online_softmax_step(acc, m_i, l_i, q, k, v, valid, qk_scale, bias, softcap, DOT: tl.constexpr,
                         SOFTCAP: tl.constexpr):
    """One key block of flash attention. s is in log2 units (qk_scale includes log2 e; `bias`, added
    to it, is in log2 units too: a [BLOCK_M, BLOCK_N] block or 0.0). m_i starts at a large finite
    negative value, so a row whose keys are all masked in this block keeps alpha = 1 and gets p = 0
    instead of NaN. SOFTCAP: s becomes softcap tanh(s / softcap) (Gemma 2; softcap in log2 units too,
    which scales the same way), tanh as 1 - 2 / (1 + e^2x) with 2x clamped at 80."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT) * qk_scale
    if SOFTCAP:
        s = softcap - 2.0 * softcap / (1.0 + tl.exp(tl.minimum(s * (2.0 / softcap), 80.0)))
    s = s + bias
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
    return acc, m_new, l_i


# ---------------------------------------------------------------------------------- varlen attention
@triton.jit
def _varlen_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, order_ptr, bias_ptr, stride_t, stride_o, qk_scale,
                             stride_bias, bias_center, window, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                             HAS_BIAS: tl.constexpr, DOT: tl.constexpr):
    qblk = tl.program_id(0)
    seq = tl.load(order_ptr + tl.program_id(1))        # longest sequences first: better tail balance
    head = tl.program_id(2)
    start = tl.load(cu_ptr + seq)
    length = (tl.load(cu_ptr + seq + 1) - start).to(tl.int32)
    if qblk * BLOCK_M >= length:
        return
    offs_m = qblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < HEAD_DIM
    col = head * HEAD_DIM + offs_d[None, :]
    m_mask = offs_m[:, None] < length
    q = tl.load(q_ptr + (start + offs_m)[:, None] * stride_t + col, mask=m_mask & d_mask, other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = 0
    hi = length
    if CAUSAL:
        hi = tl.minimum(length, (qblk + 1) * BLOCK_M)
    if window > 0:        # only the key blocks the rows' windows |j - i| < window reach
        lo = tl.maximum(qblk * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(hi, (qblk + 1) * BLOCK_M - 1 + window)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n[:, None] < hi
        kv_off = (start + offs_n)[:, None] * stride_t + col
        k = tl.load(k_ptr + kv_off, mask=n_mask & d_mask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=n_mask & d_mask, other=0.0)
        valid = offs_n[None, :] < hi
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        if window > 0:
            valid = valid & (tl.abs(offs_n[None, :] - offs_m[:, None]) < window)
        bias = 0.0
        if HAS_BIAS:      # relative position bias of key j for query i at [head, center + j - i]
            rel = bias_center + offs_n[None, :] - offs_m[:, None]
            bias = tl.load(bias_ptr + head * stride_bias + rel, mask=valid & m_mask, other=0.0) * 1.4426950408889634
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, valid, qk_scale, bias, 0.0, DOT, False)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)               # rows past the sequence end (never stored)
    out = acc / l_i[:, None]
    tl.store(o_ptr + (start + offs_m)[:, None] * stride_o + col, out.to(o_ptr.dtype.element_ty),
             mask=m_mask & d_mask)


def varlen_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, order: torch.Tensor, num_heads: int,
                     max_len: int, out: torch.Tensor, causal: bool = False, scale: float | None = None,
                     position_bias: torch.Tensor | None = None, window: int = 0) -> torch.Tensor:
    """qkv: [T, 3H] (Q | K | V, head-major inside each); out: [T, H]; cu_seqlens int64 [B + 1]; order:
    sequence indices (any permutation; longest first balances the grid's tail); position_bias: None or
    fp32 [num_heads, 2 * max_len - 1], key j of query i adding [h, max_len - 1 + j - i] to the scaled
    scores (MPNet); window > 0: keys |j - i| < window only, the key blocks outside every row's window
    of a query block skipped."""
    hidden = qkv.shape[1] // 3
    head_dim = hidden // num_heads
    assert qkv.stride(1) == 1 and out.stride(1) == 1
    scale = head_dim ** -0.5 if scale is None else scale
    block_m = 64 if max_len > 32 else 16
    block_n = 64 if head_dim <= 64 else 32
    grid = (triton.cdiv(max(max_len, 1), block_m), cu_seqlens.numel() - 1, num_heads)
    if position_bias is not None:
        assert position_bias.shape == (num_heads, 2 * max_len - 1) and position_bias.dtype == torch.float32
        position_bias = position_bias.contiguous()
    _varlen_attention_kernel[grid](
        qkv, qkv[:, hidden:], qkv[:, 2 * hidden:], out, cu_seqlens, order,
        qkv if position_bias is None else position_bias, qkv.stride(0), out.stride(0), scale * LOG2E,
        2 * max_len - 1, max_len - 1, window, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, HAS_BIAS=position_bias is not None,
        DOT=_dot_precision(qkv.dtype), num_warps=4)
    return out


# ---------------------------------------------------------------------------------- paged attention
@triton.jit(do_not_specialize=["num_seqs", "window", "split_size", "stride_table"])   # eager tables grow
def _paged_attention_kernel(q_ptr, k_cache, v_cache, ks_ptr, vs_ptr, o_ptr, part_ptr, stats_ptr, tables_ptr,
                            cu_q_ptr, ctx_ptr, num_seqs, stride_q, stride_o, stride_kb, stride_kh, stride_kt,
                            stride_vb, stride_vh, stride_vt, stride_sb, stride_sh, stride_table, qk_scale, window,
                            split_size, softcap,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, NUM_HEADS: tl.constexpr,
                            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
                            BLOCK_N: tl.constexpr, PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                            KV_INT8: tl.constexpr, DOT: tl.constexpr, SOFTCAP: tl.constexpr):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Program pid serves a block of BLOCK_Q query tokens. Sequence s owns programs from
    # cu_q[s] // BLOCK_Q + s on (an upper bound on the blocks of sequences before it, so the grid is
    # T // BLOCK_Q + S programs, known without reading cu_q on the host); binary search for s.
    lo = pid * 0                                        # int32 tensors: loop-carried values
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_q_ptr + mid).to(tl.int32) // BLOCK_Q + mid <= pid:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    q_start = tl.load(cu_q_ptr + seq)
    n_q = (tl.load(cu_q_ptr + seq + 1) - q_start).to(tl.int32)
    qblk = pid - (q_start.to(tl.int32) // BLOCK_Q + seq)
    if qblk * BLOCK_Q >= n_q:
        return
    ctx = tl.load(ctx_ptr + seq).to(tl.int32)

    # rows of the tile: (query token, head of the group); GROUP_PAD pads e.g. Qwen2's 7 to 8
    offs_m = tl.arange(0, BLOCK_Q * GROUP_PAD)
    tok = qblk * BLOCK_Q + offs_m // GROUP_PAD
    head = kv_head * GROUP + offs_m % GROUP_PAD
    row_ok = (tok < n_q) & (offs_m % GROUP_PAD < GROUP)
    pos = ctx - n_q + tok                               # each query's position in its sequence
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < HEAD_DIM
    q_off = (q_start + tok)[:, None] * stride_q + head[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_mask, other=0.0)

    m_i = tl.full([BLOCK_Q * GROUP_PAD], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, BLOCK_D], tl.float32)
    first_pos = ctx - n_q + qblk * BLOCK_Q
    key_end = tl.minimum(ctx, first_pos + BLOCK_Q)      # keys past the block's last query are masked
    key_start = tl.where(window > 0, tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N, 0)
    if NUM_SPLITS > 1:                                  # this program's share of the keys
        key_start = tl.maximum(key_start, split * split_size)
        key_end = tl.minimum(key_end, (split + 1) * split_size)
    table = tables_ptr + seq * stride_table
    for n0 in range(key_start, key_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < key_end
        block = tl.load(table + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
        slot = (offs_n % PAGE)[:, None]
        kv_mask = n_ok[:, None] & d_mask
        k = tl.load(k_cache + block[:, None] * stride_kb + kv_head * stride_kh + slot * stride_kt + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_cache + block[:, None] * stride_vb + kv_head * stride_vh + slot * stride_vt + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if KV_INT8:                                     # one scale per (token, KV head), both caches
            s_off = block * stride_sb + kv_head * stride_sh + offs_n % PAGE
            k = k.to(tl.float32) * tl.load(ks_ptr + s_off, mask=n_ok, other=0.0)[:, None]
            v = v.to(tl.float32) * tl.load(vs_ptr + s_off, mask=n_ok, other=0.0)[:, None]
        valid = n_ok[None, :] & (offs_n[None, :] <= pos[:, None])
        valid = valid & ((window == 0) | (offs_n[None, :] > pos[:, None] - window))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k.to(q.dtype), v.to(q.dtype), valid, qk_scale, 0.0,
                                             softcap, DOT, SOFTCAP)
    if NUM_SPLITS == 1:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        o_off = (q_start + tok)[:, None] * stride_o + head[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(o_ptr + o_off, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_mask)
    else:
        # unnormalized partial result and its (max, sum) for _combine_splits_kernel; a split past the
        # context (or before the window) stores max -1e30, sum 0 and weighs nothing there
        row = ((q_start + tok) * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(part_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None] & d_mask)
        tl.store(stats_ptr + 2 * row, m_i, mask=row_ok)
        tl.store(stats_ptr + 2 * row + 1, l_i, mask=row_ok)


@triton.jit
def _combine_splits_kernel(part_ptr, stats_ptr, o_ptr, stride_o, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """out[t, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s with M = max_s m_s (flash-decoding;
    NUM_SPLITS a power of two)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    row = (t * NUM_HEADS + h) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    m = tl.load(stats_ptr + 2 * row)
    l = tl.load(stats_ptr + 2 * row + 1)
    w = tl.exp2(m - tl.max(m, 0))
    acc = tl.load(part_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(o_ptr + t * stride_o + h * HEAD_DIM + offs_d, out.to(o_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


MIN_SPLIT = 256


def _scale_args(k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> tuple:
    """(is the cache int8, the kernel's k/v scale pointers and their block and head strides): for
    fp32 / bf16 caches the cache itself stands in for the unused pointers."""
    kv_int8 = k_cache.dtype == torch.int8
    assert kv_int8 == (k_scale is not None) and (not kv_int8 or k_scale.stride(2) == 1 and
                                                 v_scale.stride() == k_scale.stride())
    return kv_int8, ((k_scale, v_scale, *k_scale.stride()[:2]) if kv_int8 else (k_cache, k_cache, 0, 0))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132                                      # the interpreter on CPU tensors: an H100/H200's count
    return torch.cuda.get_device_properties(device).multi_processor_count


class PagedPlan(NamedTuple):
    block_q: int         # query tokens per program (times the GQA group's heads: the tile's rows)
    block_n: int         # keys per inner step
    programs: int        # programs per KV head and split
    split_size: int      # keys per split: a multiple of block_n when chosen here, or the whole key span
    splits: int          # a power of two: few compiled variants while eager steps' tables grow


def paged_plan(T: int, num_seqs: int, num_heads: int, kv_heads: int, head_dim: int, key_span: int,
               device: torch.device, split_size: int | None = None) -> PagedPlan:
    """Tiles and key splits of paged_attention, from shapes only (key_span: the block tables' width
    in tokens, fixed under a CUDA graph, which pads tables to max_blocks).

    Flash-decoding: when the (query tile, KV head) programs cannot fill the GPU twice over (small
    decode batches), each also splits its keys, into splits of at least MIN_SPLIT keys, and a second
    kernel combines the splits. split_size forces keys per split (tests, sweeps)."""
    group_pad = triton.next_power_of_2(num_heads // kv_heads)
    rows = 16 if T == num_seqs else 64   # a decode-only step wants few query rows per tile; prefill 64
    block_q = max(1, rows // group_pad)
    block_n = 64 if head_dim <= 64 else 32
    programs = T // block_q + num_seqs
    if split_size is not None:          # a power of two >= 16 (tl.arange, tl.dot), at most the split
        block_n = max(16, min(block_n, 1 << (max(split_size, 1).bit_length() - 1)))
        return PagedPlan(block_q, block_n, programs, split_size,
                         triton.next_power_of_2(max(1, triton.cdiv(key_span, split_size))))
    splits = min(triton.cdiv(2 * _sm_count(device), programs * kv_heads), key_span // MIN_SPLIT)
    if splits <= 1:
        return PagedPlan(block_q, block_n, programs, key_span, 1)
    splits = 1 << (splits.bit_length() - 1)            # a power of two, each split still >= MIN_SPLIT
    return PagedPlan(block_q, block_n, programs, triton.cdiv(key_span, splits * block_n) * block_n, splits)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    cu_q: torch.Tensor, ctx_len: torch.Tensor, num_heads: int, window: int, scale: float,
                    out: torch.Tensor, split_size: int | None = None, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None, softcap: float = 0.0) -> torch.Tensor:
    """q: [T, num_heads * d] (rows may be strided, e.g. a view of the qkv projection); caches
    [num_blocks, kv_heads, block_size, d]; block_tables int32 [S, W]; cu_q int64 [S + 1]; ctx_len int64
    [S] (context length after this step's tokens); out [T, num_heads * d]. window > 0 keeps the keys
    in (pos - window, pos]. split_size: keys per split, None to choose (paged_plan). int8 caches come
    with k_scale, v_scale [num_blocks, kv_heads, block_size] (fp32, one per token and head). softcap
    > 0: scaled scores soft-capped, softcap tanh(s / softcap) (Gemma 2). The grids depend only on
    tensor shapes (graph capture safe)."""
    T = q.shape[0]
    _, kv_heads, page, d = k_cache.shape
    assert q.stride(1) == 1 and out.stride(1) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    group = num_heads // kv_heads
    num_seqs = ctx_len.numel()
    plan = paged_plan(T, num_seqs, num_heads, kv_heads, d, block_tables.shape[1] * page, q.device, split_size)
    kv_int8, scales = _scale_args(k_cache, k_scale, v_scale)
    part = stats = out
    if plan.splits > 1:
        part = torch.empty(T * num_heads * plan.splits, d, dtype=torch.float32, device=q.device)
        stats = torch.empty(T * num_heads * plan.splits, 2, dtype=torch.float32, device=q.device)
    _paged_attention_kernel[(plan.programs, kv_heads, plan.splits)](
        q, k_cache, v_cache, scales[0], scales[1], out, part, stats, block_tables, cu_q, ctx_len, num_seqs,
        q.stride(0), out.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3], *scales[2:],
        block_tables.stride(0), scale * LOG2E, window, plan.split_size, softcap * LOG2E, GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group), NUM_HEADS=num_heads, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_Q=plan.block_q, BLOCK_N=plan.block_n, PAGE=page, NUM_SPLITS=plan.splits, KV_INT8=kv_int8,
        DOT=_dot_precision(q.dtype), SOFTCAP=softcap > 0, num_warps=4)
    if plan.splits > 1:
        _combine_splits_kernel[(T, num_heads)](part, stats, out, out.stride(0), NUM_HEADS=num_heads, HEAD_DIM=d,
                                               BLOCK_D=triton.next_power_of_2(d), NUM_SPLITS=plan.splits,
                                               num_warps=4)
    return out


# ---------------------------------------------------------------------------------- KV cache writes
@triton.jit
def _quantize_halves(x1, x2):
    """int8 steps of a head's two halves [H, HALF] and its scale [H]: symmetric, max |x| / 127 over
    the head (as the CPU cache), rounded half away from zero (torch.round's half-to-even differs only
    on exact ties)."""
    scale = tl.maximum(tl.maximum(tl.max(tl.abs(x1), 1), tl.max(tl.abs(x2), 1)), 1e-8) / 127.0
    y1 = x1 / scale[:, None]
    y2 = x2 / scale[:, None]
    y1 = tl.minimum(tl.maximum(tl.where(y1 >= 0, y1 + 0.5, y1 - 0.5).to(tl.int32), -127), 127)
    y2 = tl.minimum(tl.maximum(tl.where(y2 >= 0, y2 + 0.5, y2 - 0.5).to(tl.int32), -127), 127)
    return y1, y2, scale


@triton.jit
def _rotate(x1, x2, c, s):
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _kv_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, blocks_ptr, offsets_ptr, q_ptr, cos_ptr, sin_ptr,
                     stride_k, stride_v, stride_q, stride_c, stride_cb, stride_ch, stride_ct, stride_sb, stride_sh,
                     KV_HEADS: tl.constexpr, Q_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_QH: tl.constexpr, BLOCK_HALF: tl.constexpr, KV_INT8: tl.constexpr, ROPE: tl.constexpr):
    """One token's K and V, all KV heads, into its cache slot, each head as its two halves (RoPE's
    rotate-half pairs); ROPE: the token's query heads rotated in place and its keys rotated on the
    way; int8: quantized per head."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < KV_HEADS) & (j < HALF)
    block = tl.load(blocks_ptr + t).to(tl.int64)        # caches of many GB: 64-bit offsets
    slot = tl.load(offsets_ptr + t).to(tl.int64)
    src_k = k_ptr + t * stride_k + h * (2 * HALF) + j
    src_v = v_ptr + t * stride_v + h * (2 * HALF) + j
    k1 = tl.load(src_k, mask=mask, other=0.0).to(tl.float32)
    k2 = tl.load(src_k + HALF, mask=mask, other=0.0).to(tl.float32)
    v1 = tl.load(src_v, mask=mask, other=0.0).to(tl.float32)
    v2 = tl.load(src_v + HALF, mask=mask, other=0.0).to(tl.float32)
    if ROPE:
        c = tl.load(cos_ptr + t * stride_c + j, mask=j < HALF, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + t * stride_c + j, mask=j < HALF, other=0.0).to(tl.float32)
        k1, k2 = _rotate(k1, k2, c, s)
        qh = tl.arange(0, BLOCK_QH)[:, None]
        q_mask = (qh < Q_HEADS) & (j < HALF)
        q_at = q_ptr + t * stride_q + qh * (2 * HALF) + j
        q1, q2 = _rotate(tl.load(q_at, mask=q_mask, other=0.0).to(tl.float32),
                         tl.load(q_at + HALF, mask=q_mask, other=0.0).to(tl.float32), c, s)
        tl.store(q_at, q1.to(q_ptr.dtype.element_ty), mask=q_mask)
        tl.store(q_at + HALF, q2.to(q_ptr.dtype.element_ty), mask=q_mask)
    if KV_INT8:
        k1, k2, k_scale = _quantize_halves(k1, k2)
        v1, v2, v_scale = _quantize_halves(v1, v2)
        s_dst = block * stride_sb + tl.arange(0, BLOCK_H) * stride_sh + slot
        h_ok = tl.arange(0, BLOCK_H) < KV_HEADS
        tl.store(ks_ptr + s_dst, k_scale, mask=h_ok)
        tl.store(vs_ptr + s_dst, v_scale, mask=h_ok)
    dst = block * stride_cb + h * stride_ch + slot * stride_ct + j
    tl.store(kc_ptr + dst, k1.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(kc_ptr + dst + HALF, k2.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v1.to(vc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst + HALF, v2.to(vc_ptr.dtype.element_ty), mask=mask)


def kv_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, slot_blocks: torch.Tensor,
             slot_offsets: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """Each token's K and V [n, kv_heads, d] (rows may be strided: views of the qkv projection) into
    caches [num_blocks, kv_heads, block_size, d] at (slot_blocks, slot_offsets) (int64 [n]); int8
    caches take one fp32 scale per token and head into k_scale, v_scale [num_blocks, kv_heads,
    block_size]. rope = (q [n, q_heads * d], cos, sin [n, d / 2]): rotary embedding (rotate-half) on q
    in place and on K as it is stored (k itself is left as it was). One launch for all of it, where
    torch's RoPE and index_put took four to twelve kernels."""
    n, kv_heads, d = k.shape
    assert d % 2 == 0 and k.stride(1) == d and k.stride(2) == 1 and v.stride(1) == d and v.stride(2) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    kv_int8, scales = _scale_args(k_cache, k_scale, v_scale)
    q, cos, sin = rope if rope is not None else (k, k, k)
    q_heads = q.shape[1] // d if rope is not None else 1
    assert q.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride() == cos.stride()
    _kv_write_kernel[(n,)](k, v, k_cache, v_cache, scales[0], scales[1], slot_blocks, slot_offsets, q, cos, sin,
                           k.stride(0), v.stride(0), q.stride(0), cos.stride(0), *k_cache.stride()[:3], *scales[2:],
                           KV_HEADS=kv_heads, Q_HEADS=q_heads, HALF=d // 2, BLOCK_H=triton.next_power_of_2(kv_heads),
                           BLOCK_QH=triton.next_power_of_2(q_heads), BLOCK_HALF=triton.next_power_of_2(d // 2),
                           KV_INT8=kv_int8, ROPE=rope is not None,
                           num_warps=4 if (q_heads + kv_heads) * d <= 4096 else 8)


# ---------------------------------------------------------------------------------- row and elementwise fusions
@triton.jit
def _row_norm_kernel(x_ptr, bias_ptr, res_ptr, w_ptr, b_ptr, o_ptr, N, stride_x, stride_r, stride_o, eps,
                     HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr,
                     HAS_NORM_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    v = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    v = _activate(v, ACT)
    if HAS_RES:
        v += tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    if NORM == "layer":
        mean = tl.sum(v, 0) / N
        v = tl.where(mask, v - mean, 0.0)
    y = v * tl.math.rsqrt(tl.sum(v * v, 0) / N + eps)
    y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * stride_o + cols, y.to(o_ptr.dtype.element_ty), mask=mask)


def row_norm(x: torch.Tensor, weight: torch.Tensor, norm_bias: torch.Tensor | None, eps: float, kind: str,
             out: torch.Tensor, bias: torch.Tensor | None = None, act: str | None = None,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """out = norm(act(x + bias) + residual) per row; kind "layer" or "rms". out may alias x."""
    M, N = x.shape
    for t in (x, out, residual):
        assert t is None or t.stride(1) == 1
    _row_norm_kernel[(M,)](
        x, x if bias is None else bias, x if residual is None else residual, weight,
        weight if norm_bias is None else norm_bias, out, N, x.stride(0),
        0 if residual is None else residual.stride(0), out.stride(0), eps, HAS_BIAS=bias is not None,
        ACT=act or "", HAS_RES=residual is not None, NORM=kind, HAS_NORM_BIAS=norm_bias is not None,
        BLOCK_N=triton.next_power_of_2(N), num_warps=4 if N <= 2048 else 8)
    return out


@triton.jit
def _bias_act_kernel(x_ptr, bias_ptr, res_ptr, o_ptr, M, N, stride_x, stride_r, stride_o,
                     HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    v = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    v = _activate(v, ACT)
    if HAS_RES:
        v += tl.load(res_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + rows[:, None] * stride_o + cols[None, :], v.to(o_ptr.dtype.element_ty), mask=mask)


def bias_act(x: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None, act: str | None = None,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """out = act(x + bias) + residual, elementwise over [M, N]; out may alias x (in place)."""
    M, N = x.shape
    for t in (x, out, residual):
        assert t is None or t.stride(1) == 1
    grid = (triton.cdiv(M, 16), triton.cdiv(N, 128))
    _bias_act_kernel[grid](x, x if bias is None else bias, x if residual is None else residual, out, M, N,
                           x.stride(0), 0 if residual is None else residual.stride(0), out.stride(0),
                           HAS_BIAS=bias is not None, ACT=act or "", HAS_RES=residual is not None,
                           BLOCK_M=16, BLOCK_N=128, num_warps=4)
    return out


@triton.jit
def _act_and_mul_kernel(x_ptr, o_ptr, M, N, stride_x, stride_o, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    src = x_ptr + rows[:, None] * stride_x + cols[None, :]
    gate = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(src + N, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + rows[:, None] * stride_o + cols[None, :], (_activate(gate, ACT) * up).to(o_ptr.dtype.element_ty),
             mask=mask)


def act_and_mul(gate_up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """[T, 2I] (gate | up) -> act(gate) * up, [T, I]; act "silu", "gelu" or "gelu_tanh"."""
    M, two_n = gate_up.shape
    assert gate_up.stride(1) == 1
    out = torch.empty(M, two_n // 2, dtype=gate_up.dtype, device=gate_up.device)
    grid = (triton.cdiv(M, 16), triton.cdiv(two_n // 2, 128))
    _act_and_mul_kernel[grid](gate_up, out, M, two_n // 2, gate_up.stride(0), out.stride(0), ACT=act,
                              BLOCK_M=16, BLOCK_N=128, num_warps=4)
    return out


# ---------------------------------------------------------------------------------- int8 weight-only GEMM
@triton.jit
def _w8_matmul_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, o_ptr, part_ptr, M, N, K, k_per_split, stride_x, stride_w,
                      stride_o, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) output tile over keys [program_id(2) * k_per_split, + k_per_split). SPLIT: the
    unscaled fp32 partial sum goes to part_ptr [splits, M, N] for _w8_reduce_kernel; else the tile is
    scaled, biased and stored."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N
    k_start = tl.program_id(2) * k_per_split
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):   # k_per_split: BLOCK_K multiple
        k = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_x + k[None, :], mask=m_ok & (k[None, :] < K),
                    other=0.0)
        w = tl.load(w_ptr + k[:, None].to(tl.int64) * stride_w + offs_n[None, :], mask=(k[:, None] < K) & n_ok,
                    other=0)
        # per-output-channel scales factor out of the K sum: convert, multiply, scale once at the end.
        # int8 -> fp32 -> x's type is exact (|w| <= 127) and is how int8 -> bf16 lowers on GPUs anyway;
        # it also avoids Triton 3.9's interpreter, which converts int8 -> bf16 wrongly.
        acc = tl.dot(x, w.to(tl.float32).to(x.dtype), acc, input_precision=DOT)
    if SPLIT:
        dst = part_ptr + (tl.program_id(2) * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(dst, acc, mask=m_ok & n_ok)
    else:
        acc = acc * tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(o_ptr + offs_m[:, None].to(tl.int64) * stride_o + offs_n[None, :], acc.to(o_ptr.dtype.element_ty),
                 mask=m_ok & n_ok)


@triton.jit
def _w8_reduce_kernel(part_ptr, scale_ptr, bias_ptr, o_ptr, M, N, stride_o, HAS_BIAS: tl.constexpr,
                      SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split-K's second pass: one row's partial sums added in split order (deterministic, unlike
    atomics, so a request's output does not depend on timing), scaled, biased, stored."""
    m = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs_n < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for s in range(SPLITS):
        acc += tl.load(part_ptr + (s * M + m) * N + offs_n, mask=ok, other=0.0)
    acc = acc * tl.load(scale_ptr + offs_n, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=ok, other=0.0).to(tl.float32)
    tl.store(o_ptr + m * stride_o + offs_n, acc.to(o_ptr.dtype.element_ty), mask=ok)


W8_DECODE_TILES = (16, 64, 128, 4, 3)     # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) up to 16 rows
W8_TILES = (64, 64, 64, 4, 3)             # above: first guesses; benchmarks/gpu.py sweeps them on a GPU
W8_MIN_SPLIT_K = 512                      # keys per split (but the last) at least: a few pipelined K steps


class W8Plan(NamedTuple):
    tiles: tuple[int, int, int, int, int]
    splits: int          # a power of two; 1: no split, no second pass
    k_per_split: int     # a multiple of BLOCK_K


def w8_plan(M: int, N: int, K: int, device: torch.device, tiles: tuple | None = None,
            splits: int | None = None) -> W8Plan:
    """Tiles and split-K of w8_matmul, from shapes only (graph capture safe). Decode GEMMs have one
    row tile, so a 4096-wide output is 64 programs for the H200's 132 SMs, each streaming a 4096-deep
    weight panel: when the tiles cannot fill the GPU twice over, K splits too (into W8_MIN_SPLIT_K
    keys or more each, the last split what is left) and a second pass adds the partial sums. The
    partials cost 8 bytes per split, row and column (written, read back) against the weight's K
    bytes per column, so splits stay under K / (64 M): at most an eighth more traffic (4096 deep:
    4 splits at 16 rows, none at 64). splits forces the count (sweeps; fewer if K runs out)."""
    tiles = tiles or (W8_DECODE_TILES if M <= 16 else W8_TILES)
    block_m, block_n, block_k = tiles[:3]
    if splits is None:
        programs = max(1, triton.cdiv(M, block_m) * triton.cdiv(N, block_n))
        splits = max(1, min(triton.cdiv(2 * _sm_count(device), programs), K // W8_MIN_SPLIT_K,
                            K // (64 * max(M, 1))))
        splits = 1 << (splits.bit_length() - 1)
    k_per_split = triton.cdiv(K, splits * block_k) * block_k
    return W8Plan(tiles, triton.cdiv(K, k_per_split), k_per_split)


def w8_matmul(x: torch.Tensor, weight_q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              out: torch.Tensor, tiles: tuple[int, int, int, int, int] | None = None,
              splits: int | None = None) -> torch.Tensor:
    """out = (x @ weight_q) * scale + bias. x [M, K] float; weight_q int8 [K, N] (row-major, so a tile's
    rows are contiguous along N); scale fp32 [N]. tiles: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages),
    default W8_DECODE_TILES / W8_TILES by row count; splits: split-K's count, None to choose (w8_plan)."""
    M, K = x.shape
    N = weight_q.shape[1]
    if M == 0 or N == 0:            # e.g. the LM head on a step that only carries a prompt's middle chunk
        return out
    assert x.stride(1) == 1 and weight_q.stride(1) == 1 and out.stride(1) == 1
    plan = w8_plan(M, N, K, x.device, tiles, splits)
    block_m, block_n, block_k, warps, stages = plan.tiles
    split = plan.splits > 1
    part = torch.empty(plan.splits, M, N, dtype=torch.float32, device=x.device) if split else out
    bias_arg = scale if bias is None else bias
    _w8_matmul_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n), plan.splits)](
        x, weight_q, scale, bias_arg, out, part, M, N, K, plan.k_per_split, x.stride(0), weight_q.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, SPLIT=split, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT=_dot_precision(x.dtype), num_warps=warps, num_stages=stages)
    if split:
        _w8_reduce_kernel[(M, triton.cdiv(N, 256))](part, scale, bias_arg, out, M, N, out.stride(0),
                                                   HAS_BIAS=bias is not None, SPLITS=plan.splits, BLOCK_N=256,
                                                   num_warps=4)
    return out
