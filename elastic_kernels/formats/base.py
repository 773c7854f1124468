"""The protocol every quantized weight container follows (docs/design.md §2, §5).

A quantized weight stands where a dense ``torch.Tensor`` weight would: it has a ``shape``, slices
as prefix views (``w[:n, :k]``, zero-copy), reshapes its leading dimensions, moves between devices
and decodes with :meth:`QuantizedTensor.dequantize`. Layers use it exactly as a dense weight and
hand it to :func:`elastic_kernels.ops.linear` / :func:`elastic_kernels.moe_experts`, which pick the
kernel by the weight's type; no layer looks at the format.

Storage is a few plain tensors, its *parts*, named by the serialization suffix of Model-Optimizer's
Hugging Face layout: for a weight stored under the name ``N``, part ``""`` is stored as ``N`` (the
codes), ``"_scale"`` as ``N_scale`` and so on (see :mod:`elastic_kernels.formats.state_dict`).
"""
from __future__ import annotations

import abc
from typing import ClassVar, Mapping

import torch


class QuantizedTensor(abc.ABC):
    """Base of the quantized weight containers (:class:`~elastic_kernels.formats.NVFP4Tensor`,
    :class:`~elastic_kernels.formats.FP8Tensor`)."""

    __slots__ = ()
    #: format name, as in checkpoints' quantization tables ("nvfp4", "fp8")
    format: ClassVar[str]
    #: input features (last dimension) slice and are stored at multiples of this
    BLOCK: ClassVar[int]
    #: ``{serialization suffix: dtype}`` of the stored parts, codes (suffix ``""``) first
    PARTS: ClassVar[dict[str, torch.dtype]]

    # ---- what each format defines ------------------------------------------------------------
    @property
    @abc.abstractmethod
    def shape(self) -> torch.Size:
        """The logical (decoded) shape ``(..., N, K)``."""

    @abc.abstractmethod
    def parts(self) -> dict[str, torch.Tensor]:
        """``{suffix: tensor}`` in :attr:`PARTS` order (views of the storage, not copies)."""

    @classmethod
    @abc.abstractmethod
    def from_parts(cls, parts: Mapping[str, torch.Tensor]) -> "QuantizedTensor":
        """Rebuild a weight from :meth:`parts` (validated)."""

    @classmethod
    @abc.abstractmethod
    def part_shapes(cls, shape: tuple) -> dict[str, tuple[tuple, torch.dtype]]:
        """``{suffix: (shape, dtype)}`` of the parts of a weight of logical ``shape``."""

    @abc.abstractmethod
    def bad_part(self) -> tuple[str, str] | None:
        """``(suffix, what is wrong)`` for a part holding impossible values (a corrupt file), else
        None; reads values only where the host may (see :func:`elastic_kernels._validation.can_read_values`)."""

    @abc.abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The decoded weight as ``dtype`` (a new tensor of :attr:`shape`)."""

    @abc.abstractmethod
    def __getitem__(self, key) -> "QuantizedTensor":
        """A prefix/unit-step slice, as a view of the same storage."""

    @abc.abstractmethod
    def reshape(self, *shape) -> "QuantizedTensor":
        """The same weight with its leading dimensions regrouped (the last one kept); a view
        where the storage allows, as ``torch.Tensor.reshape``."""

    # ---- shared ------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        """Number of dimensions, as ``torch.Tensor.dim`` (for shape checks shared with tensors)."""
        return len(self.shape)

    @property
    def device(self) -> torch.device:
        return next(iter(self.parts().values())).device

    @property
    def nbytes(self) -> int:
        """Bytes of storage the weight's parts view (as ``torch.Tensor.nbytes``)."""
        return sum(t.nbytes for t in self.parts().values())

    def to(self, device) -> "QuantizedTensor":
        return type(self).from_parts({k: t.to(device) for k, t in self.parts().items()})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)}, device={self.device})"
