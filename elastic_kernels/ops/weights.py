"""Format-generic weight ops: a layer calls these with whatever weight it holds (a dense tensor or
a quantized container of :mod:`elastic_kernels.formats`) and never looks at the format
(docs/design.md §2). The kernel is chosen by the weight's type, in one table here.

- :func:`linear`: ``F.linear`` for dense tensors, :func:`~elastic_kernels.nvfp4_linear` (W4A16)
  for :class:`~elastic_kernels.formats.NVFP4Tensor`.
- :func:`quantize_weight`: a dense weight in a named format (``"nvfp4"``, ``"fp8"``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..formats import FP8Tensor, NVFP4Tensor, QuantizedTensor, quantize_fp8
from .nvfp4 import nvfp4_linear, quantize

#: ``{weight type: fn(x, weight, bias)}``; the most derived registered type of a weight wins
LINEAR: dict[type, Callable] = {torch.Tensor: F.linear, NVFP4Tensor: nvfp4_linear}
#: ``{format name: fn(dense weight) -> container}``
QUANTIZE: dict[str, Callable[[Tensor], QuantizedTensor]] = {NVFP4Tensor.format: quantize,
                                                            FP8Tensor.format: quantize_fp8}


def linear(x: Tensor, weight, bias: Tensor | None = None) -> Tensor:
    """``y = x @ weight.T + bias`` for any weight type in :data:`LINEAR`.

    Args:
        x: (..., K); weight: (N, K) dense tensor or 2-d quantized container (for example a nested
            slice ``q[:n, :k]``); bias: (N,) or None.
    Returns:
        y: (..., N) in x's dtype (quantized weights: W4A16, no gradient to the weight).
    """
    for cls in type(weight).__mro__:
        fn = LINEAR.get(cls)
        if fn is not None:
            return fn(x, weight, bias)
    raise TypeError(f"linear: weight must be one of {[c.__name__ for c in LINEAR]}, got {type(weight).__name__}")


def quantize_weight(w: Tensor, fmt: str) -> QuantizedTensor:
    """``w`` ((N, K) or stacked (E, N, K), float) quantized in format ``fmt`` (a key of :data:`QUANTIZE`)."""
    if fmt not in QUANTIZE:
        raise ValueError(f"quantize_weight: fmt must be one of {tuple(QUANTIZE)}, got {fmt!r}")
    return QUANTIZE[fmt](w)
