"""CUDA graphs for decode steps: one captured graph per bucketed batch size.

A decode step (one new token per running sequence) launches a few hundred small kernels; at small
batch sizes their launch overhead, not the GPU, sets the step time. A CUDA graph replays the whole
step with one launch, but it replays fixed shapes at fixed addresses. So each step is padded up to
the next bucket size (1, 2, 4, 8, ... sequences), its tensors are copied into that bucket's static
buffers, and the bucket's graph replays.

Padding sequences are one token at position 0 with a context of 1 whose only block is `pad_block`,
a KV block the block manager never hands out (the engine allocates one block more than it manages):
their cache writes land there and their attention reads only that block, so real sequences' caches
and logits are untouched. Block tables are padded to a fixed width (the most blocks a sequence can
hold) with `pad_block` as well; the attention kernel never reads past a sequence's context length.

Everything else (prefill or mixed steps, batches above the largest bucket, tables wider than
`max_blocks`, any device but CUDA) runs eagerly. The forward must not read device values back to the
host during a decode step: ops/cuda.py's kernels size their grids from shapes only, and
`StepBatch.max_ctx`, which the CPU kernels use, is frozen into a graph at capture and ignored there.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

log = logging.getLogger("turboserve")

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_STEP_TENSORS = ("input_ids", "positions", "cu_q", "ctx_len", "block_tables", "slot_blocks", "slot_offsets",
                 "logit_rows")


def bucket_for(num_seqs: int, buckets: tuple[int, ...] = BUCKETS) -> int | None:
    """The smallest bucket holding `num_seqs` sequences, or None when the batch is larger than all."""
    return next((b for b in buckets if b >= num_seqs), None)


def is_decode_only(step) -> bool:
    """One new token per sequence, every one of them sampled: the step shape a graph replays."""
    num_seqs = step.ctx_len.numel()
    return (step.input_ids.numel() == num_seqs and step.logit_rows.numel() == num_seqs
            and bool((step.logit_rows == torch.arange(num_seqs, device=step.logit_rows.device)).all()))


def pad_decode_step(step, bucket: int, max_blocks: int, pad_block: int):
    """A copy of decode step `step` (a decoder.StepBatch) with `bucket` sequences and block tables
    `max_blocks` wide; the added sequences read and write only `pad_block`."""
    num_seqs = step.ctx_len.numel()
    extra = bucket - num_seqs
    if extra < 0 or step.block_tables.shape[1] > max_blocks:
        raise ValueError(f"a step of {num_seqs} sequences x {step.block_tables.shape[1]} blocks does not fit "
                         f"bucket {bucket} x {max_blocks}")

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([t, torch.full((extra,), value, dtype=t.dtype, device=t.device)])

    tables = torch.full((bucket, max_blocks), pad_block, dtype=step.block_tables.dtype,
                        device=step.block_tables.device)
    tables[:num_seqs, :step.block_tables.shape[1]] = step.block_tables
    return dataclasses.replace(
        step, input_ids=pad(step.input_ids, 0), positions=pad(step.positions, 0),
        cu_q=torch.arange(bucket + 1, dtype=step.cu_q.dtype, device=step.cu_q.device),
        ctx_len=pad(step.ctx_len, 1), block_tables=tables, slot_blocks=pad(step.slot_blocks, pad_block),
        slot_offsets=pad(step.slot_offsets, 0),
        logit_rows=torch.arange(bucket, dtype=step.logit_rows.dtype, device=step.logit_rows.device))


class DecodeGraphs:
    """Runs `forward(step) -> logits` for decode steps through CUDA graphs captured per bucket.

    forward: the model's step function with its (static) KV cache bound, e.g.
    `lambda step: model.forward(step, cache)`; it must accept steps whose tensors are on `device`.
    Graphs are captured on first use of a bucket; all of them share one memory pool."""

    def __init__(self, forward: Callable, max_blocks: int, pad_block: int, device: str | torch.device,
                 buckets: tuple[int, ...] = BUCKETS):
        self.forward = forward
        self.max_blocks, self.pad_block = max_blocks, pad_block
        self.device = torch.device(device)
        self.buckets = buckets
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, object, torch.Tensor] | None] = {}   # None: failed
        self._pool = None

    def replayable(self, step) -> bool:
        return (self.device.type == "cuda" and bucket_for(step.ctx_len.numel(), self.buckets) is not None
                and step.block_tables.shape[1] <= self.max_blocks and is_decode_only(step))

    def __call__(self, step) -> torch.Tensor:
        """Logits [S, vocab] of the step's sequences: replayed from a graph when the step is
        replayable, else the eager forward's result."""
        if not self.replayable(step):
            return self.forward(step)
        num_seqs = step.ctx_len.numel()
        bucket = bucket_for(num_seqs, self.buckets)
        padded = pad_decode_step(step, bucket, self.max_blocks, self.pad_block)
        if bucket not in self._graphs:
            try:
                self._graphs[bucket] = self._capture(padded)
            except Exception:   # noqa: BLE001 - a capture failure must cost speed, not the request
                log.exception("CUDA graph capture failed for decode bucket %d; that bucket runs eagerly", bucket)
                self._graphs[bucket] = None
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
        if self._graphs[bucket] is None:
            return self.forward(step)
        graph, static, logits = self._graphs[bucket]
        for name in _STEP_TENSORS:
            getattr(static, name).copy_(getattr(padded, name), non_blocking=True)
        graph.replay()
        return logits[:num_seqs].clone()      # the static output is overwritten by the next replay

    def _capture(self, padded):
        static = dataclasses.replace(padded, **{n: getattr(padded, n).to(self.device) for n in _STEP_TENSORS})
        # Warm up outside the capture (Triton compiles, cuBLAS picks its kernels), on a side stream as
        # capture requires. It writes the same K/V to the same slots as the real step does.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.forward(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.forward(static)
        self._pool = graph.pool()
        return graph, static, logits
