"""NVFP4 weights: quantize, the :class:`NVFP4Tensor` container, nested slicing, serialization.

The recipe (one everywhere, bit-exact across backends) is DESIGN §5, spelled out with its
conventions (all-zero tensors, tiny magnitudes, rounding ties) in
:mod:`elastic_kernels.reference.nvfp4`.

Serialization follows NVIDIA Model-Optimizer's names for an NVFP4 linear ``prefix``:
``prefix.weight`` (packed uint8, ``(N, K/2)``), ``prefix.weight_scale`` (float8_e4m3fn,
``(N, K/16)``) and ``prefix.weight_scale_2`` (float32 decode scale ``g``, shape ``()``; ``(E,)``
for stacked expert weights). :func:`save_file` / :func:`load_file` write and read safetensors
files atomically (temp file + rename).

Example::

    q = quantize(w)                         # w: (N, K), K % 16 == 0
    q_small = q.narrow_nested(out_features=n, in_features=k)   # == q[:n, :k], zero-copy
    y = elastic_kernels.nvfp4_linear(x, q_small)
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

from ._io import atomic_path
from ._validation import _can_read_values, check_int, check_tensor
from .reference import nvfp4 as ref

BLOCK = ref.BLOCK
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SUFFIXES = ("weight", "weight_scale", "weight_scale_2")


class NVFP4Tensor:
    """An NVFP4-quantized weight ``(..., N, K)``: ``(N, K)`` or stacked experts ``(E, N, K)``.

    Attributes:
        data: (..., N, K/2) uint8, two E2M1 codes per byte (element 2i in the low nibble).
        scales: (..., N, K/16) float8_e4m3fn block decode scales.
        global_scale: float32 decode scale ``g``, shape ``(...)``: ``()`` or ``(E,)``.

    Slices (``q[..., :n, :k]``, :meth:`narrow_nested`, ``q[e]``) are views of the same storage.
    """

    __slots__ = ("data", "scales", "global_scale")

    def __init__(self, data: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor) -> None:
        op = "NVFP4Tensor"
        check_tensor(op, "data", data, dtypes=(torch.uint8,))
        check_tensor(op, "scales", scales, dtypes=(torch.float8_e4m3fn,), device=data.device)
        check_tensor(op, "global_scale", global_scale, dtypes=(torch.float32,), device=data.device)
        if data.dim() not in (2, 3):
            raise ValueError(f"{op}: data must have shape (N, K/2) or (E, N, K/2), got {tuple(data.shape)}")
        *lead, n, half = data.shape
        want = (*lead, n, (2 * half) // BLOCK)
        if (2 * half) % BLOCK or tuple(scales.shape) != want:
            raise ValueError(f"{op}: scales has shape {tuple(scales.shape)}, expected {want} for data of "
                             f"shape {tuple(data.shape)} (one scale per 16 elements, K = 2 * {half})")
        if tuple(global_scale.shape) != tuple(lead):
            raise ValueError(f"{op}: global_scale has shape {tuple(global_scale.shape)}, expected "
                             f"{tuple(lead)} (one per stacked matrix)")
        if data.stride(-1) != 1 or scales.stride(-1) != 1:
            raise ValueError(f"{op}: data and scales must be contiguous along the last dimension")
        self.data, self.scales, self.global_scale = data, scales, global_scale

    # ---- shape -------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.data.shape[:-1], self.data.shape[-1] * 2))

    @property
    def ndim(self) -> int:
        return self.data.dim()

    def dim(self) -> int:
        """Number of dimensions, as ``torch.Tensor.dim`` (for shape checks shared with tensors)."""
        return self.data.dim()

    @property
    def out_features(self) -> int:
        return self.data.shape[-2]

    @property
    def in_features(self) -> int:
        return self.data.shape[-1] * 2

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __repr__(self) -> str:
        return f"NVFP4Tensor(shape={tuple(self.shape)}, device={self.device})"

    # ---- decode ------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """``e2m1(code) * s * g`` as ``dtype`` (computed in float32, or exactly in float64)."""
        if dtype not in (*WEIGHT_DTYPES, torch.float64):
            raise TypeError(f"NVFP4Tensor.dequantize: dtype must be a float dtype, got {dtype}")
        return ref.dequantize_reference(self.data, self.scales, self.global_scale, dtype)

    # ---- nested slicing ----------------------------------------------------------------------
    def narrow_nested(self, out_features: int | None = None, in_features: int | None = None) -> "NVFP4Tensor":
        """The nested submodel's weight ``q[..., :out_features, :in_features]`` (a view).

        ``in_features`` must be a multiple of 16; the global scale is shared, nothing is requantized.
        """
        op = "NVFP4Tensor.narrow_nested"
        n = self.out_features if out_features is None else check_int(
            op, "out_features", out_features, min_value=0, max_value=self.out_features)
        k = self.in_features if in_features is None else check_int(
            op, "in_features", in_features, min_value=0, max_value=self.in_features)
        if k % BLOCK:
            raise ValueError(f"{op}: in_features ({k}) must be a multiple of the block size (16)")
        return NVFP4Tensor(self.data[..., :n, : k // 2], self.scales[..., :n, : k // BLOCK],
                           self.global_scale)

    def __getitem__(self, key) -> "NVFP4Tensor":
        """``q[..., rows, cols]``: unit-step slices; ints or slices on the expert dimension;
        column bounds must be multiples of 16. Always a view."""
        op = "NVFP4Tensor.__getitem__"
        key = key if isinstance(key, tuple) else (key,)
        if sum(k is Ellipsis for k in key) > 1:
            raise IndexError(f"{op}: at most one Ellipsis, got {key!r}")
        if Ellipsis in key:
            i = key.index(Ellipsis)
            fill = self.ndim - (len(key) - 1)
            if fill < 0:
                raise IndexError(f"{op}: too many indices for a {self.ndim}-d NVFP4Tensor: {key!r}")
            key = key[:i] + (slice(None),) * fill + key[i + 1:]
        if len(key) > self.ndim:
            raise IndexError(f"{op}: too many indices for a {self.ndim}-d NVFP4Tensor: {key!r}")
        key = key + (slice(None),) * (self.ndim - len(key))
        lead, rows, cols = key[:-2], key[-2], key[-1]
        for k in lead:
            if not isinstance(k, (int, slice)) or isinstance(k, bool) or (isinstance(k, slice) and k.step not in (None, 1)):
                raise TypeError(f"{op}: expert indices must be ints or unit-step slices, got {k!r}")
        for name, k in (("row", rows), ("column", cols)):
            if not isinstance(k, slice) or k.step not in (None, 1):
                raise TypeError(f"{op}: {name} index must be a unit-step slice (the result stays 2-d), got {k!r}")
        k0, k1, _ = cols.indices(self.in_features)
        k1 = max(k0, k1)
        if k0 % BLOCK or k1 % BLOCK:
            raise ValueError(f"{op}: column slice [{k0}:{k1}] must start and stop at multiples of 16")
        data = self.data[(*lead, rows, slice(k0 // 2, k1 // 2))]
        scales = self.scales[(*lead, rows, slice(k0 // BLOCK, k1 // BLOCK))]
        return NVFP4Tensor(data, scales, self.global_scale[lead] if lead else self.global_scale)

    def to(self, device) -> "NVFP4Tensor":
        return NVFP4Tensor(self.data.to(device), self.scales.to(device), self.global_scale.to(device))


# ---------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------

def quantize(w: torch.Tensor, *, global_scale: torch.Tensor | float | None = None,
             backend: str = "auto") -> NVFP4Tensor:
    """Quantize ``w: (N, K)`` or stacked experts ``(E, N, K)`` (fp32/fp16/bf16, K % 16 == 0).

    Args:
        global_scale: the decode scale ``g`` (float32 ``()`` or ``(E,)``, or a float), positive and
            finite; default ``amax / 2688`` per matrix (per expert), ``1`` for an all-zero matrix.
        backend: "auto" | "reference" | "triton" | "cuda".
    Raises:
        ValueError if ``w`` holds NaN/Inf (checked outside tracing/graph capture).
    """
    from .ops.nvfp4 import quantize_raw
    op = "nvfp4.quantize"
    check_tensor(op, "w", w, dtypes=WEIGHT_DTYPES)
    if w.dim() not in (2, 3):
        raise ValueError(f"{op}: w must have shape (N, K) or (E, N, K), got {tuple(w.shape)}")
    if w.shape[-1] % BLOCK:
        raise ValueError(f"{op}: w's last dimension K ({w.shape[-1]}) must be a multiple of 16")
    if _can_read_values(w) and w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{op}: w contains NaN or Inf; NVFP4 quantization needs finite values")
    g = resolve_global_scale(op, global_scale, tuple(w.shape[:-2]), w.device)
    if g is None:
        g = ref.global_scale_of(w.detach(), (-2, -1))
    data, scales = quantize_raw(w.detach(), g, backend=backend)
    return NVFP4Tensor(data, scales, g)


def resolve_global_scale(op: str, global_scale, shape: tuple, device: torch.device):
    """Validate a user decode scale: None, a float, or a float32-castable tensor of ``shape``."""
    if global_scale is None:
        return None
    if isinstance(global_scale, (int, float)) and not isinstance(global_scale, bool):
        g = torch.full(shape, float(global_scale), dtype=torch.float32, device=device)
    else:
        check_tensor(op, "global_scale", global_scale, dtypes=(torch.float32, torch.float64), device=device)
        if tuple(global_scale.shape) != shape:
            raise ValueError(f"{op}: global_scale must have shape {shape}, got {tuple(global_scale.shape)}")
        g = global_scale.detach().float()
    if _can_read_values(g) and g.numel() and not bool(((g > 0) & torch.isfinite(g)).all()):
        raise ValueError(f"{op}: global_scale must be positive and finite, got {g.tolist()}")
    return g


# ---------------------------------------------------------------------------------------------
# serialization (Model-Optimizer names)
# ---------------------------------------------------------------------------------------------

def _key(prefix: str, suffix: str) -> str:
    return f"{prefix}.{suffix}" if prefix else suffix


def to_state_dict(q: NVFP4Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{prefix.weight, prefix.weight_scale, prefix.weight_scale_2}`` (contiguous copies of views)."""
    if not isinstance(q, NVFP4Tensor):
        raise TypeError(f"nvfp4.to_state_dict: q must be an NVFP4Tensor, got {type(q).__name__}")
    return {_key(prefix, "weight"): q.data.contiguous(), _key(prefix, "weight_scale"): q.scales.contiguous(),
            _key(prefix, "weight_scale_2"): q.global_scale.contiguous()}


def from_state_dict(sd: Mapping[str, torch.Tensor], prefix: str = "") -> NVFP4Tensor:
    """Rebuild one NVFP4 weight from its three Model-Optimizer tensors (validated)."""
    op = "nvfp4.from_state_dict"
    missing = [_key(prefix, s) for s in _SUFFIXES if _key(prefix, s) not in sd]
    if missing:
        raise ValueError(f"{op}: state dict lacks {missing} for NVFP4 weight {prefix!r}")
    data, scales, g = (sd[_key(prefix, s)] for s in _SUFFIXES)
    names = [_key(prefix, s) for s in _SUFFIXES]
    check_tensor(op, names[0], data, dtypes=(torch.uint8,))
    check_tensor(op, names[1], scales, dtypes=(torch.float8_e4m3fn,), device=data.device)
    check_tensor(op, names[2], g, dtypes=(torch.float32,), device=data.device)
    if data.dim() == 2 and tuple(g.shape) == (1,):
        g = g.reshape(())
    try:
        q = NVFP4Tensor(data, scales, g)
    except ValueError as exc:
        raise ValueError(f"{op}: mismatched tensors for NVFP4 weight {prefix!r}: {exc}") from None
    if _can_read_values(g):
        if g.numel() and not bool(((g > 0) & torch.isfinite(g)).all()):
            raise ValueError(f"{op}: {names[2]} must be positive and finite")
        if scales.numel() and not bool(torch.isfinite(scales.float()).all() and (scales.float() >= 0).all()):
            raise ValueError(f"{op}: {names[1]} holds NaN or negative block scales (corrupt checkpoint?)")
    return q


def pack_state_dict(tensors: Mapping[str, "torch.Tensor | NVFP4Tensor"]) -> dict[str, torch.Tensor]:
    """Flatten ``{name: Tensor | NVFP4Tensor}``; an NVFP4 entry ``p.weight`` becomes the three
    Model-Optimizer tensors of prefix ``p``."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if isinstance(t, NVFP4Tensor):
            if not (name == "weight" or name.endswith(".weight")):
                raise ValueError(f"nvfp4.pack_state_dict: NVFP4 entry {name!r} must be named '<prefix>.weight'")
            out.update(to_state_dict(t, name[: -len("weight")].rstrip(".")))
        elif isinstance(t, torch.Tensor):
            out[name] = t.contiguous()
        else:
            raise TypeError(f"nvfp4.pack_state_dict: {name!r} must be a Tensor or NVFP4Tensor, got {type(t).__name__}")
    return out


def unpack_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, "torch.Tensor | NVFP4Tensor"]:
    """Inverse of :func:`pack_state_dict`: every ``p.weight_scale_2`` groups its prefix into an
    :class:`NVFP4Tensor` stored under ``p.weight``."""
    out: dict = {}
    used: set[str] = set()
    for name in sd:
        if name == "weight_scale_2" or name.endswith(".weight_scale_2"):
            prefix = name[: -len("weight_scale_2")].rstrip(".")
            out[_key(prefix, "weight")] = from_state_dict(sd, prefix)
            used.update(_key(prefix, s) for s in _SUFFIXES)
    for name, t in sd.items():
        if name not in used:
            if name == "weight_scale" or name.endswith(".weight_scale"):
                raise ValueError(f"nvfp4.unpack_state_dict: {name!r} has no matching weight_scale_2")
            out[name] = t
    return out


def save_file(tensors: Mapping[str, "torch.Tensor | NVFP4Tensor"], path: str | os.PathLike,
              metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temp file in the same folder, then rename)."""
    from safetensors.torch import save_file as _save
    flat = {k: v.detach().cpu() for k, v in pack_state_dict(tensors).items()}
    with atomic_path(path) as tmp:
        _save(flat, str(tmp), metadata=metadata)


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """Read a safetensors file written by :func:`save_file` (or Model-Optimizer-style names)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file as _load
    try:
        sd = _load(os.fspath(path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"nvfp4.load_file: cannot read {os.fspath(path)!r} as safetensors: {exc}") from None
    return unpack_state_dict(sd)
