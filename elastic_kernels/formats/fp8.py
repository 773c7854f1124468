"""The FP8 (E4M3) weight format: the one encode, the per-tensor scale and :class:`FP8Tensor`.

Per-tensor scaling (docs/design.md §5): ``scale = amax / 448`` (float32; 1 for an all-zero
tensor, at least ``2**-126``), ``code = e4m3(clamp(x / scale, -448, 448))`` (round to nearest
even), ``value = float(code) * scale``. Stored, as in Model-Optimizer's Hugging Face layout, as
``N`` (float8_e4m3fn codes) and ``N_scale`` (float32 ``()``).
"""
from __future__ import annotations

from typing import Mapping

import torch

from .._validation import can_read_values, check_tensor
from .base import QuantizedTensor
from .nvfp4 import E4M3_MAX

SCALE_MIN = 2.0 ** -126   # the smallest normal float32: x / scale cannot overflow for |x| <= amax


def fp8_scale_of(x: torch.Tensor) -> torch.Tensor:
    """``amax / 448`` in float32 (1 for an all-zero tensor, >= 2**-126; NaN/Inf for a NaN/Inf amax)."""
    amax = x.abs().amax().float() if x.numel() else x.new_zeros((), dtype=torch.float32)
    s = torch.clamp(amax / E4M3_MAX, min=SCALE_MIN)
    return torch.where(amax == 0, torch.ones_like(s), s)


def encode(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 codes of ``x`` (any shape and float dtype) for decode scale ``scale`` (float32 ``()``):
    ``e4m3(clamp(x / scale, -448, 448))``, computed in float32."""
    return torch.clamp(x.float() / scale.float(), min=-E4M3_MAX, max=E4M3_MAX).to(torch.float8_e4m3fn)


def decode(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``float(code) * scale`` in float32 (float64 for a float64 ``dtype``), cast to ``dtype``."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (codes.to(work) * scale.to(work)).to(dtype)


def quantize_fp8(w: torch.Tensor, scale: torch.Tensor | None = None) -> "FP8Tensor":
    """Quantize ``w`` (any shape, float) to FP8 with ``scale`` (default :func:`fp8_scale_of`)."""
    check_tensor("quantize_fp8", "w", w, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    scale = fp8_scale_of(w.detach()) if scale is None else scale.detach().float()
    return FP8Tensor(encode(w.detach(), scale), scale)


class FP8Tensor(QuantizedTensor):
    """An FP8 (E4M3, per-tensor scale) weight of any shape.

    Attributes:
        codes: float8_e4m3fn, the weight's shape.
        scale: float32 ``()`` decode scale, shared by every slice.
    """

    __slots__ = ("codes", "scale")
    format = "fp8"
    BLOCK = 1
    PARTS = {"": torch.float8_e4m3fn, "_scale": torch.float32}

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        op = "FP8Tensor"
        check_tensor(op, "codes", codes, dtypes=(torch.float8_e4m3fn,))
        check_tensor(op, "scale", scale, dtypes=(torch.float32,), device=codes.device)
        if scale.dim() != 0:
            raise ValueError(f"{op}: scale must have shape () (one per tensor), got {tuple(scale.shape)}")
        self.codes, self.scale = codes, scale

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def parts(self) -> dict[str, torch.Tensor]:
        return {"": self.codes, "_scale": self.scale}

    @classmethod
    def from_parts(cls, parts: Mapping[str, torch.Tensor]) -> "FP8Tensor":
        return cls(parts[""], parts["_scale"])

    @classmethod
    def part_shapes(cls, shape: tuple) -> dict[str, tuple[tuple, torch.dtype]]:
        shapes = {"": tuple(shape), "_scale": ()}
        return {sfx: (shapes[sfx], dtype) for sfx, dtype in cls.PARTS.items()}

    def bad_part(self) -> tuple[str, str] | None:
        s = self.scale
        if can_read_values(s) and not bool((s > 0) & torch.isfinite(s)):
            return "_scale", "must be positive and finite"
        return None

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        if not dtype.is_floating_point:
            raise TypeError(f"FP8Tensor.dequantize: dtype must be a float dtype, got {dtype}")
        return decode(self.codes, self.scale, dtype)

    def __getitem__(self, key) -> "FP8Tensor":
        return FP8Tensor(self.codes[key], self.scale)

    def reshape(self, *shape) -> "FP8Tensor":
        return FP8Tensor(self.codes.reshape(*shape), self.scale)
