"""Public ops, registered with torch.library (namespace ``elastic_kernels``)."""
from .ssd import ssd_scan, ssd_state_update

__all__ = ["ssd_scan", "ssd_state_update"]
