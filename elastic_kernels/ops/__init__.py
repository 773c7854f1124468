"""Public ops, registered with torch.library (namespace ``elastic_kernels``), and the
format-generic weight ops :func:`linear` / :func:`quantize_weight` (:mod:`.weights`)."""
from .moe import moe_experts, moe_route
from .nvfp4 import fake_quant_fp8, fake_quant_nvfp4, nvfp4_linear
from .ssd import ssd_scan, ssd_state_update
from .weights import linear, quantize_weight

__all__ = ["fake_quant_fp8", "fake_quant_nvfp4", "nvfp4_linear", "moe_experts", "moe_route", "ssd_scan",
           "ssd_state_update", "linear", "quantize_weight"]
