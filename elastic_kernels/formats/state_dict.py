"""The one serialization of quantized weights: Model-Optimizer's Hugging Face names.

A weight stored under the name ``N`` (e.g. ``model.layers.0.mlp.up_proj.weight``) is written as

    NVFP4: ``N`` (uint8 packed codes ``(..., N, K/2)``), ``N_scale`` (float8_e4m3fn block scales
           ``(..., N, K/16)``), ``N_scale_2`` (float32 per-tensor decode scale, ``()``, or one per
           stacked matrix ``(E,)``)
    FP8:   ``N`` (float8_e4m3fn codes), ``N_scale`` (float32 ``()``)
    dense: ``N``

:func:`pack_state_dict` / :func:`unpack_state_dict` convert between ``{name: Tensor |
QuantizedTensor}`` and flat tensors; :func:`save_file` / :func:`load_file` write and read
safetensors files atomically (temp file + rename).
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

from .._io import atomic_path
from .._validation import check_tensor
from .base import QuantizedTensor
from .fp8 import FP8Tensor
from .nvfp4 import NVFP4Tensor

#: the quantized formats by name (checkpoints' quantization tables use these names)
FORMATS: dict[str, type[QuantizedTensor]] = {"nvfp4": NVFP4Tensor, "fp8": FP8Tensor}


def to_state_dict(w: "torch.Tensor | QuantizedTensor", name: str) -> dict[str, torch.Tensor]:
    """``{name + suffix: contiguous part}`` of one weight (``{name: w}`` for a dense tensor)."""
    if isinstance(w, QuantizedTensor):
        return {name + sfx: t.contiguous() for sfx, t in w.parts().items()}
    if isinstance(w, torch.Tensor):
        return {name: w.contiguous()}
    raise TypeError(f"formats.to_state_dict: {name!r} must be a Tensor or a QuantizedTensor "
                    f"(NVFP4Tensor, FP8Tensor), got {type(w).__name__}")


def format_of(sd: Mapping[str, torch.Tensor], name: str) -> type[QuantizedTensor] | None:
    """The quantized format stored under ``name`` in ``sd`` (None for a dense tensor)."""
    if name + "_scale_2" in sd:
        return NVFP4Tensor
    if name + "_scale" in sd and name in sd and isinstance(sd[name], torch.Tensor):
        if sd[name].dtype == torch.float8_e4m3fn:
            return FP8Tensor
        if sd[name].dtype == torch.uint8:
            raise ValueError(f"formats.format_of: {name + '_scale'!r} has no matching {name + '_scale_2'!r} "
                             f"(an NVFP4 weight needs both)")
    return None


def from_state_dict(sd: Mapping[str, torch.Tensor], name: str) -> "torch.Tensor | QuantizedTensor":
    """Rebuild the weight stored under ``name`` (validated dtypes, shapes and scale values)."""
    op = "formats.from_state_dict"
    cls = format_of(sd, name)
    if cls is None:
        if name not in sd:
            raise ValueError(f"{op}: state dict lacks {name!r}")
        return sd[name]
    keys = {sfx: name + sfx for sfx in cls.PARTS}
    missing = [k for k in keys.values() if k not in sd]
    if missing:
        raise ValueError(f"{op}: state dict lacks {missing} for {cls.format} weight {name!r}")
    parts = {sfx: sd[k] for sfx, k in keys.items()}
    dev = parts[""].device if isinstance(parts[""], torch.Tensor) else None
    for sfx, dtype in cls.PARTS.items():
        check_tensor(op, keys[sfx], parts[sfx], dtypes=(dtype,), device=dev)
    try:
        w = cls.from_parts(parts)
    except ValueError as exc:
        raise ValueError(f"{op}: mismatched tensors for {cls.format} weight {name!r}: {exc}") from None
    bad = w.bad_part()
    if bad is not None:
        raise ValueError(f"{op}: {keys[bad[0]]} {bad[1]}")
    return w


def pack_state_dict(tensors: Mapping[str, "torch.Tensor | QuantizedTensor"]) -> dict[str, torch.Tensor]:
    """Flatten ``{name: Tensor | QuantizedTensor}`` into the stored tensors (contiguous)."""
    out: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        for key, t in to_state_dict(w, name).items():
            if key in out or key in tensors and key != name:
                raise ValueError(f"formats.pack_state_dict: the stored name {key!r} of {name!r} collides "
                                 f"with another entry")
            out[key] = t
    return out


def unpack_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, "torch.Tensor | QuantizedTensor"]:
    """Inverse of :func:`pack_state_dict`: quantized weights are grouped back by their names."""
    quantized = {}
    for key in sd:
        for sfx in ("_scale_2", "_scale"):
            if key.endswith(sfx) and format_of(sd, key[: -len(sfx)]) is not None:
                quantized[key[: -len(sfx)]] = None
                break
    out: dict = {name: from_state_dict(sd, name) for name in quantized}
    parts = {name + sfx for name, w in out.items() for sfx in w.PARTS}
    out.update({k: t for k, t in sd.items() if k not in parts})
    return out


def save_file(tensors: Mapping[str, "torch.Tensor | QuantizedTensor"], path: str | os.PathLike,
              metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temp file in the same folder, then rename)."""
    from safetensors.torch import save_file as _save
    flat = {k: v.detach().cpu() for k, v in pack_state_dict(tensors).items()}
    with atomic_path(path) as tmp:
        _save(flat, str(tmp), metadata=metadata)


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """Read a safetensors file written by :func:`save_file` (or with Model-Optimizer's names)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file as _load
    try:
        sd = _load(os.fspath(path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"formats.load_file: cannot read {os.fspath(path)!r} as safetensors: {exc}") from None
    return unpack_state_dict(sd)
