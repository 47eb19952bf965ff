"""The ops interface: one place that picks the kernels for a device.

Model code asks `backend_for(device)` for its ops and never imports a backend module itself. Both
backends provide the same functions with the same signatures (tests/test_triton_kernels.py lists
them): linears and their epilogues, norms, activations, attention (varlen and paged), the KV
cache (its writes apply RoPE). "cpu" is cpu.py; "cuda" (Triton, imported only when asked for) is
cuda.py, and "cuda:N" also makes GPU N the current device, so the backend's tensors land there.
"""
from __future__ import annotations

import importlib

_BACKENDS = {"cpu": "turboserve.ops.cpu", "cuda": "turboserve.ops.cuda"}


def use_device_on_this_thread(device) -> None:
    """A worker thread running a model on GPU N makes N its current device first: the current GPU
    is per thread, and Triton launches on it (backend_for set it only on the loading thread)."""
    import torch
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def backend_for(device: str):
    kind = device.split(":")[0]
    if kind not in _BACKENDS:
        raise ValueError(f"no ops backend for device {device!r}; available: {', '.join(_BACKENDS)}")
    backend = importlib.import_module(_BACKENDS[kind])
    if kind == "cuda" and ":" in device:
        import torch
        torch.cuda.set_device(torch.device(device))
    return backend
