"""Argument validation shared by every public op.

Every check raises ``ValueError`` (bad value/shape/device) or ``TypeError`` (bad type/dtype)
with a message that names the op, the argument, what was expected and what was given.

Shapes are checked against *named* dimensions bound on first sight, so mismatches read as
``ssd_scan: C has shape (2, 17, 3, 16), expected (batch=2, seqlen=17, ngroups=2, dstate=16)``.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)


class Dims:
    """Named sizes bound by the first tensor that mentions them."""

    def __init__(self, op: str, **known: int) -> None:
        self.op = op
        self.sizes: dict[str, int] = dict(known)

    def __getitem__(self, name: str) -> int:
        return self.sizes[name]

    def check(self, name: str, t: torch.Tensor, dims: Sequence[str | int]) -> None:
        """Check ``t.shape`` against ``dims`` (names bind; ints must match exactly)."""
        if t.dim() != len(dims):
            raise ValueError(f"{self.op}: {name} must have {len(dims)} dimensions "
                             f"{_fmt_dims(dims)}, got shape {tuple(t.shape)}")
        for d, size in zip(dims, t.shape):
            if isinstance(d, str) and d not in self.sizes:
                self.sizes[d] = int(size)
        want = [self.sizes[d] if isinstance(d, str) else d for d in dims]
        if list(t.shape) != want:
            expected = ", ".join(f"{d}={w}" if isinstance(d, str) else str(w) for d, w in zip(dims, want))
            raise ValueError(f"{self.op}: {name} has shape {tuple(t.shape)}, expected ({expected})")


def _fmt_dims(dims: Sequence[str | int]) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


def check_tensor(op: str, name: str, t, *, dtypes: Iterable[torch.dtype] | None = None,
                 device: torch.device | None = None, optional: bool = False) -> None:
    """Check that ``t`` is a tensor (or None when ``optional``), of an allowed dtype, on ``device``."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{op}: {name} is required, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{op}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")


def check_choice(op: str, name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {tuple(choices)}, got {value!r}")


def check_int(op: str, name: str, value, *, min_value: int | None = None,
              max_value: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if min_value is not None and value < min_value:
        raise ValueError(f"{op}: {name} must be >= {min_value}, got {value}")
    if max_value is not None and value > max_value:
        raise ValueError(f"{op}: {name} must be <= {max_value}, got {value}")
    return value


def check_divisible(op: str, name: str, value: int, divisor: int, divisor_name: str) -> None:
    if divisor <= 0 or value % divisor:
        raise ValueError(f"{op}: {name} ({value}) must be a multiple of {divisor_name} ({divisor})")


def can_read_values(t: torch.Tensor) -> bool:
    """Whether values may be read on the host: never during tracing, CUDA graph capture, or while
    ``torch.cuda.set_sync_debug_mode`` asks for no host synchronization."""
    if torch.compiler.is_compiling():
        return False
    if t.is_cuda and (torch.cuda.is_current_stream_capturing() or torch.cuda.get_sync_debug_mode() != 0):
        return False
    return t.device.type != "meta"


def check_nondecreasing(op: str, name: str, t: torch.Tensor, dim_name: str) -> None:
    """Values of ``t`` must not decrease along its last dimension (named ``dim_name``).

    Needs a host read, so like the value checks of :func:`check_width` it is skipped while
    tracing, during CUDA graph capture and under ``torch.cuda.set_sync_debug_mode``.
    """
    if t.dim() == 0 or t.shape[-1] < 2 or not can_read_values(t):
        return
    down = t.diff(dim=-1) < 0
    if bool(down.any()):
        *lead, pos = down.nonzero()[0].tolist()
        at = ", ".join(str(i) for i in (*lead, pos + 1))
        raise ValueError(f"{op}: {name} must be non-decreasing along {dim_name}, got "
                         f"{int(t[(*lead, pos)])} then {int(t[(*lead, pos + 1)])} at index ({at})")


def check_width(op: str, name: str, width, *, full: int, batch: int, device: torch.device,
                multiple_of: int = 1, multiple_name: str = "1", min_value: int = 0):
    """Normalize an elastic width argument (docs/design.md §3).

    Args:
        width: ``None`` (full width), an ``int`` in ``[min_value, full]``, or a ``LongTensor`` of
            shape ``(batch,)`` (per-sample widths) on ``device``.
    Returns:
        ``(width_int, width_tensor)``: ``(-1, None)`` for full width, ``(k, None)`` for an int,
        ``(-1, tensor)`` for per-sample widths (int64, contiguous).
    """
    if width is None:
        return -1, None
    if isinstance(width, torch.Tensor):
        check_tensor(op, name, width, dtypes=INT_DTYPES, device=device)
        if tuple(width.shape) != (batch,):
            raise ValueError(f"{op}: {name} as a tensor must have shape (batch={batch},), got {tuple(width.shape)}")
        if can_read_values(width) and width.numel():
            lo, hi = int(width.min()), int(width.max())
            if lo < min_value or hi > full:
                raise ValueError(f"{op}: {name} values must lie in [{min_value}, {full}], got [{lo}, {hi}]")
            if multiple_of > 1 and bool((width % multiple_of != 0).any()):
                raise ValueError(f"{op}: every {name} value must be a multiple of {multiple_name} ({multiple_of})")
        return -1, width.to(torch.int64).contiguous()
    check_int(op, name, width, min_value=min_value, max_value=full)
    if multiple_of > 1:
        check_divisible(op, name, width, multiple_of, multiple_name)
    return (-1 if width == full else width), None


def check_scale(op: str, name: str, t, shape: Sequence[int], device: torch.device) -> None:
    """A soft scale: optional float tensor of exactly ``shape``."""
    check_tensor(op, name, t, dtypes=FLOAT_DTYPES, device=device, optional=True)
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
