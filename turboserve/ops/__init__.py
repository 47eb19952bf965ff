"""The ops interface: one place that picks the kernels for a device.

Model code asks `backend_for(device)` for its ops and never imports a backend module itself. A backend
provides: `make_linear(weight, bias, dtype)`, `add_layer_norm`, `activation_`, `varlen_attention`,
`embed`. The CPU backend is `cpu.py`; a Triton backend for GPUs registers under "cuda".
"""
from __future__ import annotations

import importlib

_BACKENDS = {"cpu": "turboserve.ops.cpu", "cuda": "turboserve.ops.cuda"}


def backend_for(device: str):
    kind = device.split(":")[0]
    if kind not in _BACKENDS:
        raise ValueError(f"no ops backend for device {device!r}; available: {', '.join(_BACKENDS)}")
    return importlib.import_module(_BACKENDS[kind])
