"""Optimizer and learning-rate schedule of every stage.

:class:`AdamW` is ``torch.optim.AdamW`` with the same numerics; it only avoids importing
``torch._dynamo`` (seconds of start-up) while nothing has imported it. ``torch.optim``'s
``Optimizer`` methods are wrapped in ``torch._disable_dynamo`` / ``torch._dynamo.graph_break()``,
whose first call imports the compiler stack even when nothing is compiled. Those wrappers only
matter inside a ``torch.compile`` trace, and no trace can run before ``torch._dynamo`` is
imported; so while it is absent the methods run their undecorated bodies (``inspect.unwrap``; the
step under ``torch.no_grad()``, as its wrapper would do), and once anything imports it (a
``--compile`` run, a test) they run the ordinary decorated path.
"""
from __future__ import annotations

import inspect
import math
import sys

import torch

__all__ = ["AdamW", "lr_at", "set_lr"]

_OPT = torch.optim.Optimizer
_DECORATED = {name: getattr(_OPT, name) for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict")}
_UNDECORATED = {name: inspect.unwrap(fn) for name, fn in _DECORATED.items()}
_STEP = torch.optim.AdamW.step
_RAW_STEP = inspect.unwrap(_STEP)


def _compiler_loaded() -> bool:
    return "torch._dynamo" in sys.modules


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (same arguments, same results) that does not pull in
    ``torch._dynamo`` at construction and step (see the module docstring). Parameter groups of
    plain CPU tensors that choose no implementation get the multi-tensor (``foreach``) one, which
    torch picks only for CUDA: the same arithmetic, bit for bit, in fewer kernel launches."""

    def __init__(self, params, *args, **kwargs) -> None:
        super().__init__(params, *args, **kwargs)
        for group in self.param_groups:
            if group["foreach"] is None and not (group["fused"] or group["differentiable"] or group["capturable"]) \
                    and all(type(p.data) is torch.Tensor and p.device.type == "cpu" for p in group["params"]):
                group["foreach"] = True

    def add_param_group(self, param_group: dict) -> None:
        name = "add_param_group"
        return (_DECORATED if _compiler_loaded() else _UNDECORATED)[name](self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        return (_DECORATED if _compiler_loaded() else _UNDECORATED)["zero_grad"](self, set_to_none)

    def state_dict(self):
        return (_DECORATED if _compiler_loaded() else _UNDECORATED)["state_dict"](self)

    def load_state_dict(self, state_dict) -> None:
        return (_DECORATED if _compiler_loaded() else _UNDECORATED)["load_state_dict"](self, state_dict)

    def step(self, closure=None):
        if _compiler_loaded() or self.defaults["differentiable"]:
            return _STEP(self, closure)
        with torch.no_grad():
            return _RAW_STEP(self, closure)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of ``peak``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def set_lr(opt: torch.optim.Optimizer, *lrs: float) -> None:
    """Set the learning rate of every parameter group: one value for all, or one per group."""
    groups = opt.param_groups
    if len(lrs) not in (1, len(groups)):
        raise ValueError(f"set_lr: expected 1 or {len(groups)} learning rates, got {len(lrs)}")
    for g, lr in zip(groups, lrs * len(groups) if len(lrs) == 1 else lrs):
        g["lr"] = lr
