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


def check_device(device) -> None:
    """A model's device must exist: a clear error, not torch's assertion at the first tensor moved."""
    import torch

    from ..errors import InvalidInputError
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r}: this torch build sees no CUDA GPU (torch {torch.__version__}); "
                                "use cpu")


def use_device_on_this_thread(device) -> None:
    """A worker thread running a model on GPU N makes N its current device first: the current GPU
    is per thread, and Triton launches on it (backend_for set it only on the loading thread)."""
    import torch
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def backend_for(device: str):
    from ..errors import InvalidInputError
    kind = str(device).split(":")[0]
    if kind not in _BACKENDS:
        raise InvalidInputError(f"no ops backend for device {device!r}; available: {', '.join(_BACKENDS)}")
    backend = importlib.import_module(_BACKENDS[kind])
    use_device_on_this_thread(device)           # "cuda:N": the loading thread's tensors land on N
    return backend
