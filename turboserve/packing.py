"""The one batch format: a flat run of real tokens plus cu_seqlens (ByteTransformer)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor      # [T] int64
    positions: torch.Tensor      # [T] int64
    token_types: torch.Tensor    # [T] int64
    cu_seqlens: list[int]        # [B + 1], exclusive prefix sum of lengths
    max_len: int
    cu_tensor: torch.Tensor      # cu_seqlens as int64, for kernels
    longest_first: torch.Tensor  # sequence indices by decreasing length (attention work order)

    @property
    def num_tokens(self) -> int:
        return self.cu_seqlens[-1]

    @property
    def num_seqs(self) -> int:
        return len(self.cu_seqlens) - 1

    def lengths(self) -> torch.Tensor:
        cu = torch.tensor(self.cu_seqlens)
        return cu[1:] - cu[:-1]

    def to(self, device: torch.device) -> "PackedBatch":
        """The batch with its tensors on `device` (itself when they are there already)."""
        return batch_to(self, device)


def batch_to(batch, device: torch.device):
    """A batch dataclass (PackedBatch, decoder.StepBatch) with every tensor field moved to `device`;
    the batch itself when its tensors are there already."""
    if batch.input_ids.device == device:
        return batch
    return replace(batch, **{f.name: getattr(batch, f.name).to(device, non_blocking=True)
                             for f in fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)})


def pack_tokens(ids: list[list[int]], type_ids: list[list[int]] | None = None,
                position_offset: int | None = None) -> PackedBatch:
    """Concatenate sequences without padding.

    position_offset=None counts positions 0..L-1 (BERT, DistilBERT). An integer p gives RoBERTa's
    scheme: real tokens count from p + 1 and tokens equal to p (the pad id) sit at position p, which is
    what transformers' `create_position_ids_from_input_ids` computes.
    """
    cu = [0]
    for seq in ids:
        cu.append(cu[-1] + len(seq))
    flat = torch.tensor([t for seq in ids for t in seq], dtype=torch.int64)
    lengths = [len(seq) for seq in ids]
    if position_offset is None:
        positions = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.empty(0, dtype=torch.int64)
    else:
        mask = (flat != position_offset).long()
        chunks = []
        for i in range(len(lengths)):
            m = mask[cu[i]:cu[i + 1]]
            chunks.append(torch.cumsum(m, 0) * m + position_offset)
        positions = torch.cat(chunks)
    if type_ids is None:
        types = torch.zeros_like(flat)
    else:
        types = torch.tensor([t for seq in type_ids for t in seq], dtype=torch.int64)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return PackedBatch(flat, positions, types, cu, max(lengths, default=0),
                       torch.tensor(cu, dtype=torch.int64), torch.tensor(order, dtype=torch.int64))
