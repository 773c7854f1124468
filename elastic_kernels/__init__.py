"""elastic_kernels: kernels and a reference loop for Star Elastic nested reasoning LLMs.

Ops (torch.library custom ops with fake kernels and autograd; ``backend=`` selects
"auto" | "triton" | "cuda" | "reference", default from ``ELASTIC_KERNELS_BACKEND``):

- :func:`ssd_scan`, :func:`ssd_state_update`: width-masked Mamba2 SSD.
"""
from .ops import ssd_scan, ssd_state_update

__version__ = "0.1.0"
__all__ = ["ssd_scan", "ssd_state_update", "__version__"]
