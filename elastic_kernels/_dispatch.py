"""The one dispatch rule for every op (docs/design.md §4), and the backend table of each op.

``backend="auto"`` (or ``None``) takes ``ELASTIC_KERNELS_BACKEND`` when set and supported by the
op; otherwise CUDA tensors go to Triton (or CUDA C++ where the op prefers it) and CPU tensors
to the PyTorch reference. An explicitly requested backend that cannot run raises a RuntimeError
naming what is missing and how to get it.

Each op declares its implementations once, as a :class:`Backends` table::

    _SCAN = Backends("ssd_scan", reference=ssd_scan_reference, triton=lazy("triton.ssd:ssd_scan_fwd"))
    be = _SCAN.resolve(backend, x.device)      # validation time: "reference" | "triton"
    y = _SCAN[be](x, dt, ...)                 # inside the custom op
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable, Sequence

import torch

from . import _ext

BACKENDS = ("auto", "triton", "cuda", "reference")
ENV_VAR = "ELASTIC_KERNELS_BACKEND"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable(op: str, backend: str, device: torch.device) -> str | None:
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
        if env != "auto" and env in supported and unavailable(op, env, device) is None:
            return env
        if device.type == "cuda":
            for cand in cuda_preference:
                if cand in supported and unavailable(op, cand, device) is None:
                    return cand
        return "reference"
    if backend not in supported:
        raise ValueError(f"{op}: backend {backend!r} is not implemented for this op; "
                         f"available: {tuple(supported)}")
    why = unavailable(op, backend, device)
    if why is not None:
        raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {why}")
    return backend


def lazy(target: str) -> Callable:
    """The function ``"module:name"`` (a module of this package, e.g. ``"triton.ssd:ssd_scan_fwd"``),
    imported on its first call: Triton is imported only when a Triton kernel runs."""
    module, _, name = target.partition(":")
    fn = None

    def call(*args, **kwargs):
        nonlocal fn
        if fn is None:
            fn = getattr(importlib.import_module(f"{__package__}.{module}"), name)
        return fn(*args, **kwargs)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{module}.{name} (imported on first call)"
    return call


class Backends:
    """The implementations of one op by backend (``reference=``, ``triton=``, ``cuda=``), all
    with one signature. ``cuda_preference`` orders the GPU backends ``"auto"`` tries;
    ``dtypes`` limits the input dtypes of a backend (``{"triton": (torch.float32, ...)}``)."""

    def __init__(self, op: str, *, cuda_preference: Sequence[str] = ("triton", "cuda"),
                 dtypes: dict[str, Sequence[torch.dtype]] | None = None, **impls: Callable) -> None:
        unknown = set(impls) - set(BACKENDS[1:])
        if unknown or "reference" not in impls or not set(dtypes or {}) <= set(impls):
            raise ValueError(f"Backends({op!r}): implementations must be a subset of {BACKENDS[1:]} "
                             f"including 'reference' (and dtypes name only those), got {tuple(impls)}")
        self.op, self.impls, self.cuda_preference = op, impls, tuple(cuda_preference)
        self.dtypes = {be: tuple(d) for be, d in (dtypes or {}).items()}

    def resolve(self, backend: str | None, device: torch.device, op: str | None = None,
                dtype: torch.dtype | None = None) -> str:
        """The concrete backend for one call (see :func:`resolve_backend`); ``op`` names the
        public entry point in error messages (default: the table's op). A ``dtype`` (of the
        op's main input) the chosen backend does not support raises a TypeError."""
        op = op or self.op
        be = resolve_backend(op, backend, device, tuple(self.impls), self.cuda_preference)
        allowed = self.dtypes.get(be)
        if dtype is not None and allowed is not None and dtype not in allowed:
            names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
            raise TypeError(f"{op}: backend {be!r} supports x of dtype ({names}), got "
                            f"{str(dtype).removeprefix('torch.')}")
        return be

    def __getitem__(self, backend: str) -> Callable:
        return self.impls[backend]
