"""Decode caches: one per layer that keeps state (Mamba2 mixer, attention), and the model's
:class:`HybridCache` that owns the row (batch entry) operations batched decoding needs.

Every layer cache is a dataclass whose tensor fields all have the batch as their first dim, so
selecting and merging rows is the same for every kind of layer. Buffers are full-size; a budget
uses (and updates) the prefixes of the units it keeps (docs/design.md §3).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor


class LayerCache:
    """Row operations shared by every layer cache (a dataclass whose tensor fields are
    ``(batch, ...)``)."""

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), Tensor)}

    def select_rows(self, rows: Tensor):
        """A new cache of the same kind holding ``rows`` (LongTensor ``(n,)`` of batch entries)."""
        return dataclasses.replace(self, **{n: t[rows] for n, t in self._tensors().items()})

    @classmethod
    def merge(cls, parts: Sequence[tuple[Tensor, "LayerCache"]], batch: int):
        """One cache of ``batch`` rows from ``(rows, cache)`` parts: part ``i``'s cache row ``j``
        goes to row ``rows[j]``. Non-tensor fields come from the first part."""
        first = parts[0][1]
        merged = {}
        for name, t in first._tensors().items():
            out = t.new_empty((batch,) + tuple(t.shape[1:]))
            for rows, c in parts:
                out[rows] = getattr(c, name).to(out.dtype)
            merged[name] = out
        return dataclasses.replace(first, **merged)

    def clear_outside(self, row: int, units: int) -> None:
        """Zero the state of batch entry ``row`` beyond its first ``units`` elastic units (a no-op
        for a cache without elastic units)."""


@dataclass
class MambaLayerCache(LayerCache):
    """Decode state of one Mamba2 mixer (full-size buffers; narrower budgets use prefixes).

    conv_x: (batch, nheads, headdim, conv_kernel - 1); conv_bc: (batch, 2 * ngroups * d_state,
    conv_kernel - 1); ssm: (batch, nheads, headdim, d_state) float32 (float64 for a float64
    model); has_state: whether any token has been consumed.
    """

    conv_x: Tensor
    conv_bc: Tensor
    ssm: Tensor
    has_state: bool = False

    def clear_outside(self, row: int, units: int) -> None:
        """Zero row ``row``'s conv window and SSM state of the heads from ``units`` on."""
        self.conv_x[row, units:] = 0
        self.ssm[row, units:] = 0


@dataclass
class AttentionLayerCache(LayerCache):
    """KV cache of one attention layer: k, v: (batch, nkv_heads, slots, head_dim).

    lengths: None (every row holds ``slots`` keys) or LongTensor ``(batch,)``: row ``r`` holds its
    first ``lengths[r]`` slots, the rest are free (per-sample cache lengths of ragged batches,
    docs/serving.md; attention masks the free slots, new keys go to each row's own position).
    """

    k: Tensor
    v: Tensor
    lengths: Tensor | None = None

    def row_lengths(self) -> Tensor:
        """Keys held per row: LongTensor ``(batch,)``."""
        if self.lengths is not None:
            return self.lengths
        return torch.full((self.k.shape[0],), self.k.shape[2], dtype=torch.int64, device=self.k.device)

    def select_rows(self, rows: Tensor):
        """The rows ``rows``; free slots beyond twice the longest kept row are dropped (the rows
        of long sequences left)."""
        out = super().select_rows(rows)
        if out.lengths is not None and out.lengths.numel():
            need = int(out.lengths.max())
            if out.k.shape[2] > 2 * need:
                out.k, out.v = out.k[:, :, :need].contiguous(), out.v[:, :, :need].contiguous()
        return out

    @classmethod
    def merge(cls, parts: Sequence[tuple[Tensor, "AttentionLayerCache"]], batch: int):
        """Rows of parts holding different numbers of keys: slots padded to the longest part,
        per-row ``lengths`` kept."""
        first = parts[0][1]
        if all(c.lengths is None and c.k.shape[2] == first.k.shape[2] for _, c in parts):
            return super().merge(parts, batch)
        slots = max(c.k.shape[2] for _, c in parts)
        k = first.k.new_zeros((batch, first.k.shape[1], slots, first.k.shape[3]))
        v = first.v.new_zeros(k.shape)
        lengths = torch.zeros(batch, dtype=torch.int64, device=k.device)
        for rows, c in parts:
            n = c.k.shape[2]
            k[rows, :, :n] = c.k.to(k.dtype)
            v[rows, :, :n] = c.v.to(v.dtype)
            lengths[rows] = c.row_lengths().to(k.device)
        return dataclasses.replace(first, k=k, v=v, lengths=lengths)


@dataclass
class HybridCache:
    """Decode caches of every layer (a :class:`LayerCache` or None) and the number of tokens
    consumed so far. ``units[i]`` is ``(axis, occurrence)`` of the elastic axis that bounds layer
    ``i``'s state (``("mamba_heads", 0)`` for the first Mamba layer), or None."""

    layers: list = field(default_factory=list)
    batch: int = 0
    seqlen: int = 0
    units: list = field(default_factory=list)

    def select_rows(self, rows: Tensor) -> "HybridCache":
        """A new cache holding ``rows`` (LongTensor ``(n,)``) of this one, in that order."""
        return dataclasses.replace(self, layers=[None if lc is None else lc.select_rows(rows) for lc in self.layers],
                                   batch=int(rows.numel()))

    @staticmethod
    def merge(parts: Sequence[tuple[Tensor, "HybridCache"]], batch: int, ragged: bool = False) -> "HybridCache":
        """One cache of ``batch`` rows from ``(rows, cache)`` parts (rows: LongTensor ``(n_i,)``
        saying where each part's rows go). Every part at the same length, unless ``ragged``: then
        rows keep their own lengths (attention caches hold per-row ``lengths``; ``seqlen`` becomes
        the longest)."""
        if not parts:
            raise ValueError("HybridCache.merge: parts must not be empty")
        first = parts[0][1]
        lengths = [c.seqlen for _, c in parts]
        if len(set(lengths)) != 1 and not ragged:
            raise ValueError(f"HybridCache.merge: every part must be at the same length, got {lengths} "
                             "(ragged=True keeps per-row lengths)")
        if any(len(c.layers) != len(first.layers) for _, c in parts):
            raise ValueError("HybridCache.merge: parts come from different models")
        layers = [None if lc is None else type(lc).merge([(rows, c.layers[i]) for rows, c in parts], batch)
                  for i, lc in enumerate(first.layers)]
        return dataclasses.replace(first, layers=layers, batch=batch, seqlen=max(lengths))

    def clear_outside(self, row: int, sizes: Mapping[str, Sequence[int]]) -> None:
        """Zero the state of batch entry ``row`` outside the units of ``sizes`` (per-layer sizes as
        from ``ElasticHybridLM.resolve_budget(budget)``): a row decoded next to wider rows then holds
        exactly what a decode at its own budget alone leaves behind."""
        if not 0 <= row < self.batch:
            raise ValueError(f"HybridCache.clear_outside: row must lie in [0, {self.batch}), got {row}")
        if len(self.units) != len(self.layers):
            raise ValueError(f"HybridCache.clear_outside: units has {len(self.units)} entries for {len(self.layers)} "
                             f"layers (make caches with ElasticHybridLM.new_cache)")
        for lc, unit in zip(self.layers, self.units):
            if lc is not None and unit is not None:
                axis, occ = unit
                lc.clear_outside(row, int(sizes[axis][occ]))
