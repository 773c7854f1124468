"""Public ops, registered with torch.library (namespace ``elastic_kernels``)."""
from .moe import moe_experts, moe_route
from .ssd import ssd_scan, ssd_state_update

__all__ = ["moe_experts", "moe_route", "ssd_scan", "ssd_state_update"]
