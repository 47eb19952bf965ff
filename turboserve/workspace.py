"""The torch side of the memory planner: turns a `planner.Plan` into tensor views over reused chunks.

Plans depend on the token count T; they are cached per T bucket (T rounded up to a multiple of
`bucket_tokens`), and each tensor view is cut to the batch's exact T. Chunk buffers are kept across
calls and layers and only grown, so a steady workload allocates nothing after warm-up: the win is no
page faults from fresh multi-megabyte allocations on every op.
"""
from __future__ import annotations

import math

import torch

from .planner import Plan, UsageRecord, plan


class Workspace:
    def __init__(self, tensor_specs, bucket_tokens: int = 256, device: torch.device | str = "cpu"):
        """tensor_specs: list of (name, first_op, last_op, columns, dtype) for one layer; each tensor
        is [T, columns], on `device`."""
        self.device = torch.device(device)
        self.specs = {name: (first, last, cols, dtype) for name, first, last, cols, dtype in tensor_specs}
        self.bucket_tokens = bucket_tokens
        self._plans: dict[int, Plan] = {}
        self._chunks: list[torch.Tensor] = []

    def _records(self, tokens: int) -> list[UsageRecord]:
        return [UsageRecord(name, first, last, tokens * cols * torch.empty(0, dtype=dtype).element_size())
                for name, (first, last, cols, dtype) in self.specs.items()]

    def bytes_for(self, tokens: int) -> int:
        """Memory the activations of a `tokens`-token batch take (the plan's footprint)."""
        return self.plan_for(tokens).footprint

    def plan_for(self, tokens: int) -> Plan:
        bucket = max(1, math.ceil(tokens / self.bucket_tokens)) * self.bucket_tokens
        if bucket not in self._plans:
            self._plans[bucket] = plan(self._records(bucket))
        return self._plans[bucket]

    def views(self, tokens: int) -> dict[str, torch.Tensor]:
        p = self.plan_for(tokens)
        for i, size in enumerate(p.chunk_sizes):      # chunks are kept and only grown, whatever T comes next
            if i == len(self._chunks):
                self._chunks.append(torch.empty(size, dtype=torch.uint8, device=self.device))
            elif self._chunks[i].numel() < size:
                self._chunks[i] = torch.empty(size, dtype=torch.uint8, device=self.device)
        out = {}
        for name, (first, last, cols, dtype) in self.specs.items():
            place = p.placements[name]
            itemsize = torch.empty(0, dtype=dtype).element_size()
            nbytes = tokens * cols * itemsize
            raw = self._chunks[place.chunk][place.offset: place.offset + nbytes]
            out[name] = raw.view(dtype).view(tokens, cols)
        return out

    @property
    def reserved_bytes(self) -> int:
        return sum(c.numel() for c in self._chunks)


class NoWorkspace:
    """The planner switched off: every activation is a fresh allocation (for comparison)."""

    def __init__(self, tensor_specs, device: torch.device | str = "cpu"):
        self.specs = {name: (cols, dtype) for name, _, _, cols, dtype in tensor_specs}
        self.device = torch.device(device)

    def views(self, tokens: int) -> dict[str, torch.Tensor]:
        return {name: torch.empty(tokens, cols, dtype=dtype, device=self.device)
                for name, (cols, dtype) in self.specs.items()}

    def bytes_for(self, tokens: int) -> int:
        return sum(tokens * cols * torch.empty(0, dtype=dtype).element_size() for cols, dtype in self.specs.values())

    reserved_bytes = 0


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free for new allocations: the kernel's MemAvailable on the CPU, the driver's free memory on
    a GPU; None where neither can be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
