"""elastic_kernels: kernels and a reference loop for Star Elastic nested reasoning LLMs.

Ops (torch.library custom ops with fake kernels and autograd; ``backend=`` selects
"auto" | "triton" | "cuda" | "reference", default from ``ELASTIC_KERNELS_BACKEND``):

- :func:`ssd_scan`, :func:`ssd_state_update`: width-masked Mamba2 SSD.
- :func:`moe_route`, :func:`moe_experts`: elastic MoE routing (first E' experts) and sliced
  grouped-GEMM experts (first d' channels, per-token widths).
"""
from .ops import moe_experts, moe_route, ssd_scan, ssd_state_update

__version__ = "0.1.0"
__all__ = ["moe_experts", "moe_route", "ssd_scan", "ssd_state_update", "__version__"]
