"""Access to the compiled module ``elastic_kernels._C`` (optional at import time)."""
from __future__ import annotations

import torch

try:  # the package must import without _C
    import elastic_kernels._C as _C  # the compiled csrc/ module (absolute: the submodule, not a name of the face)
    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _C = None
    _IMPORT_ERROR = str(exc)

BUILD_HINT = ("build it with `pip install -e .` on a machine with nvcc (CUDA toolkit) in PATH "
              "and ELASTIC_KERNELS_SKIP_CUDA unset")

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def c_built() -> bool:
    return _C is not None


def c_has_cuda() -> bool:
    return _C is not None and bool(getattr(_C, "built_with_cuda", False))


def require_cuda_ext(op: str):
    """Return ``_C`` or raise a RuntimeError saying how to build it."""
    if _C is None:
        raise RuntimeError(f"{op}: backend 'cuda' needs elastic_kernels._C, which failed to import "
                           f"({_IMPORT_ERROR}); {BUILD_HINT}")
    if not c_has_cuda():
        raise RuntimeError(f"{op}: backend 'cuda' needs elastic_kernels._C built with CUDA, but it was "
                           f"built without nvcc; {BUILD_HINT}")
    return _C


def stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream
