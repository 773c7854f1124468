"""The one dispatch rule for every op (DESIGN §4).

``backend="auto"`` (or ``None``) takes ``ELASTIC_KERNELS_BACKEND`` when set and supported by the
op; otherwise CUDA tensors go to Triton (or CUDA C++ where the op prefers it) and CPU tensors
to the PyTorch reference. An explicitly requested backend that cannot run raises a RuntimeError
naming what is missing and how to get it.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import torch

from . import _ext

BACKENDS = ("auto", "triton", "cuda", "reference")
ENV_VAR = "ELASTIC_KERNELS_BACKEND"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unavailable(op: str, backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    if backend == "reference":
        return None
    if backend == "triton":
        if not triton_available():
            return "triton is not installed (pip install triton)"
        if device.type == "cpu" and not triton_interpret():
            return "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before import"
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device.type} tensors"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"CUDA kernels need CUDA tensors, got {device.type} tensors"
        if not _ext.c_has_cuda():
            return "elastic_kernels._C was not built with CUDA; " + _ext.BUILD_HINT
        return None
    return f"unknown backend {backend!r}"


def resolve_backend(op: str, backend: str | None, device: torch.device,
                    supported: Sequence[str], cuda_preference: Sequence[str] = ("triton", "cuda")) -> str:
    """Return the concrete backend (``"triton" | "cuda" | "reference"``) for one call."""
    if backend is None:
        backend = "auto"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "auto")
        if env not in BACKENDS:
            raise ValueError(f"{op}: {ENV_VAR} must be one of {BACKENDS}, got {env!r}")
        if env != "auto" and env in supported and _unavailable(op, env, device) is None:
            return env
        if device.type == "cuda":
            for cand in cuda_preference:
                if cand in supported and _unavailable(op, cand, device) is None:
                    return cand
        return "reference"
    if backend not in supported:
        raise ValueError(f"{op}: backend {backend!r} is not implemented for this op; "
                         f"available: {tuple(supported)}")
    why = _unavailable(op, backend, device)
    if why is not None:
        raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {why}")
    return backend
