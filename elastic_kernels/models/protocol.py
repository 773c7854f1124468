"""The per-layer protocol every elastic layer implements (docs/design.md §2-§3).

A layer kind of the hybrid model is one :class:`ElasticLayer` subclass named by a pattern letter
(``M`` Mamba2, ``E`` MoE, ``*`` attention, ``-`` dense FFN) and listed once in
:data:`elastic_kernels.models.layers.LAYER_KINDS`; the config, the model, importance, slicing,
caches and checkpoints read everything they need about a kind from that class:

- ``letter``, ``kind_name`` and ``axes``: the elastic axes the layer carries besides ``hidden``
  (:class:`LayerAxis`: the config field holding the full size, size rules, forward keywords);
- ``from_config(config, occurrence)``: the layer of the ``occurrence``-th letter of the pattern;
- ``sizes()``: the full size of each of its axes;
- ``sliced_shapes(k, sizes, active=False)``: prefix shape of every parameter and buffer at hidden
  width ``k`` and ``sizes = {axis: units}`` of its axes;
- ``permute_(axis, perm)`` and ``permute_by_importance_(scores)``: reorder units (``perm[new] =
  old``) so that the most important come first;
- ``importance(x)``: activation-based scores of its axes from its input ``x`` (forward only);
- ``quantizable_weights()``: the linear weights a quantized checkpoint stores in NVFP4/FP8;
- ``new_cache(batch, device, dtype)`` and ``cache_axis`` for layers with decode state;
- ``mixes_tokens``: whether the layer mixes positions (then ``forward`` takes ``seq_lens``, a
  packed prefill of several sequences in one row); a layer without it is per-token and sees a
  packed batch as one token per row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn
from torch import Tensor


@dataclass(frozen=True)
class LayerAxis:
    """One elastic axis of a layer kind.

    ``name``: the axis (a key of budgets, sizes, soft masks and scores); ``size_field``: the config
    field with its full size; ``min_field`` / ``multiple_field``: config fields bounding a size from
    below / that a size must be a multiple of (None: 1); ``width_kw``, ``max_kw``, ``mask_kw``: the
    layer's forward keywords of the hard width, of the host maximum of per-sample widths (None:
    not taken) and of the soft mask.
    """

    name: str
    size_field: str
    width_kw: str
    mask_kw: str
    max_kw: str | None = None
    min_field: str | None = None
    multiple_field: str | None = None

    def bounds(self, config) -> tuple[int, int]:
        """``(minimum, multiple)`` of a size of this axis under ``config``."""
        mult = getattr(config, self.multiple_field) if self.multiple_field else 1
        lo = getattr(config, self.min_field) if self.min_field else 1
        return max(lo, mult), mult


def descending(score: Tensor) -> Tensor:
    """Indices by descending score (stable: ties keep their order)."""
    return torch.sort(score, descending=True, stable=True).indices


def check_score(label: str, t: Any, shape: tuple) -> Tensor:
    """``t`` as a score tensor of ``shape``; TypeError/ValueError naming ``label``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"permute_by_importance: {label} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"permute_by_importance: {label} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def permute_rows_(p: nn.Parameter | Tensor, perm: Tensor, dim: int = 0) -> None:
    """Reorder ``p`` in place along ``dim`` by ``perm`` (``perm[new] = old``)."""
    p.data = p.data.index_select(dim, perm.to(p.device)).contiguous()


def unit_weights(width, mask, n: int, x: Tensor, name: str) -> Tensor | None:
    """Combined 0/1 per-sample prefix mask (``width``: LongTensor ``(batch,)``, else ignored) and
    soft mask (``(units,)`` or ``(batch, units)``) over the first ``n`` units, as every layer applies
    them (docs/design.md §3): None, ``(n,)`` or ``(batch, n)`` float (float32 at least); errors
    name ``name``."""
    w = None
    if isinstance(width, Tensor):
        if width.dim() != 1 or width.shape[0] != x.shape[0]:
            raise ValueError(f"{name}: per-sample width must have shape (batch={x.shape[0]},), "
                             f"got {tuple(width.shape)}")
        w = (torch.arange(n, device=x.device)[None, :] < width[:, None]).to(torch.float32)
    if mask is not None:
        if not isinstance(mask, Tensor) or not mask.is_floating_point():
            raise TypeError(f"{name}: soft mask must be a float tensor, got {type(mask).__name__}")
        if mask.dim() not in (1, 2) or mask.shape[-1] < n or (mask.dim() == 2 and mask.shape[0] != x.shape[0]):
            raise ValueError(f"{name}: soft mask must have shape (units,) or (batch={x.shape[0]}, units) "
                             f"with units >= {n}, got {tuple(mask.shape)}")
        m = mask[..., :n].to(torch.promote_types(mask.dtype, torch.float32))
        w = m if w is None else w * m
    return w


class ElasticLayer(nn.Module):
    """Base of the elastic layers: the protocol's defaults (no elastic axis beside ``hidden``, no
    importance scores, no quantizable weights, no decode state)."""

    letter: ClassVar[str | None] = None
    kind_name: ClassVar[str] = ""
    axes: ClassVar[tuple[LayerAxis, ...]] = ()
    cache_axis: ClassVar[str | None] = None
    mixes_tokens: ClassVar[bool] = False

    def sliced_shapes(self, k: int, sizes: Mapping[str, int] | None = None,
                      active: bool = False) -> dict[str, tuple]:
        """Prefix shape of every parameter and buffer (names relative to the layer)."""
        raise NotImplementedError

    def permute_(self, axis: str, perm: Tensor) -> None:
        """Reorder the units of ``axis`` (``"hidden"`` or one of ``axes``): ``perm[new] = old``."""
        raise NotImplementedError

    def importance(self, x: Tensor) -> dict[str, Tensor]:
        """Scores ``{axis: float64 tensor}`` of this layer's axes, summed over the tokens of its
        input ``x: (batch, seqlen, hidden)`` at full width."""
        return {}

    def permute_by_importance_(self, scores: Mapping[str, Tensor], where: str = "") -> dict[str, Tensor]:
        """Apply the permutation that sorts each axis of ``scores`` (a subset of this layer's axes)
        by descending score; returns ``{axis: perm}``. ``where`` names the layer in errors."""
        perms = {}
        for axis in self.axes:
            if axis.name in scores:
                s = check_score(f"scores[{axis.name!r}]{where}", scores[axis.name], (self.sizes()[axis.name],))
                perms[axis.name] = descending(s)
                self.permute_(axis.name, perms[axis.name])
        return perms

    def sizes(self) -> dict[str, int]:
        """Full size of each of this layer's axes: ``{axis: units}``."""
        return {}

    def new_cache(self, batch: int, device=None, dtype: torch.dtype = torch.float32):
        """Empty decode state for ``batch`` sequences (a ``LayerCache``), or None for a layer
        without state between tokens."""
        return None

    def quantizable_weights(self) -> dict[str, str]:
        """``{parameter name: layout}`` of the linear weights stored in NVFP4/FP8 by a quantized
        checkpoint; layouts: ``"2d"`` (N, K), ``"flat"`` (stored as (prod(lead), K)),
        ``"stacked"`` (E, N, K)."""
        return {}
