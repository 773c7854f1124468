"""Shared pieces for registering ops with autograd."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

_AUTOGRAD_KEYS = [k for name, k in torch._C.DispatchKey.__members__.items()
                  if name.startswith("Autograd") or name == "ADInplaceOrView"]


def _autograd_enabled_guard():
    """Custom-op implementations run below the autograd dispatch keys; re-enable them locally."""
    excl = torch._C._dispatch_tls_local_exclude_set()
    for k in _AUTOGRAD_KEYS:
        excl = excl.remove(k)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excl)


def reference_vjp(fn: Callable, inputs: Sequence[torch.Tensor | None], grad_outputs: Sequence[torch.Tensor],
                  **kwargs) -> list[torch.Tensor]:
    """Vector-Jacobian product of ``fn(*inputs, **kwargs)`` by re-running it under autograd.

    Used as the backward of the reference backend (its forward is plain differentiable PyTorch).
    Floating inputs get gradients; absent (None) or integer inputs get an empty tensor, which
    :func:`unpack_grads` maps back to None.
    """
    with _autograd_enabled_guard(), torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if t is not None and t.is_floating_point() else t
                  for t in inputs]
        outs = fn(*leaves, **kwargs)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        diff = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        used = [(o, g) for o, g in zip(outs, grad_outputs) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in used], diff, [g for _, g in used],
                                    allow_unused=True) if used and diff else [None] * len(diff)
    it = iter(grads)
    result = []
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            g = next(it)
            result.append(t.new_zeros(t.shape) if g is None else g.contiguous())
        else:
            result.append(torch.empty(0, device=grad_outputs[0].device))
    return result


def unpack_grads(grads: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor | None]) -> list:
    """Map empty placeholder gradients back to None (for absent or integer inputs)."""
    return [g if (t is not None and t.is_floating_point()) else None for g, t in zip(grads, inputs)]


def fake_grads(inputs: Sequence[torch.Tensor | None], device) -> list[torch.Tensor]:
    """Fake-tensor gradients with the shapes (contiguous) ``reference_vjp`` would return."""
    return [t.new_empty(t.shape) if (t is not None and t.is_floating_point()) else torch.empty(0, device=device)
            for t in inputs]
