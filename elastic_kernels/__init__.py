"""elastic_kernels: kernels and a reference loop for Star Elastic nested reasoning LLMs.

Ops (torch.library custom ops with fake kernels and autograd; ``backend=`` selects
"auto" | "triton" | "cuda" | "reference", default from ``ELASTIC_KERNELS_BACKEND``):

- :func:`ssd_scan`, :func:`ssd_state_update`: width-masked Mamba2 SSD.
- :func:`moe_route`, :func:`moe_experts`: elastic MoE routing (first E' experts) and sliced
  grouped-GEMM experts (first d' channels, per-token widths).
- :func:`nvfp4_linear`, :func:`fake_quant_nvfp4`, :func:`fake_quant_fp8`: NVFP4 W4A16 matmul
  (nested slices of one quantized weight) and straight-through fake quantization for QAD;
  :mod:`elastic_kernels.nvfp4` gathers NVFP4 for users (quantize, NVFP4Tensor, safetensors I/O).
- :func:`elastic_kernels.ops.linear`: one linear for every weight type (dense or quantized).

Layers (bottom up): ``_*.py`` base, :mod:`.formats` (quantized weight containers and their one
serialization), :mod:`.reference` / :mod:`.triton` / :mod:`.cuda` (backends), :mod:`.ops`.
"""
import importlib

from ._version import __version__

__all__ = ["nvfp4", "nvfp4_linear", "fake_quant_nvfp4", "fake_quant_fp8", "moe_experts", "moe_route", "ssd_scan", "ssd_state_update", "__version__"]

_OPS = frozenset(__all__) - {"nvfp4", "__version__"}


def __getattr__(name: str):
    # The ops (and torch) load on first use, not at `import elastic_kernels`: the command lines
    # under this package parse and check their arguments before torch is imported.
    if name in _OPS:
        value = getattr(importlib.import_module(".ops", __name__), name)
    elif name == "nvfp4":
        value = importlib.import_module(".nvfp4", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
