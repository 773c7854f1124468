"""Shared pieces for registering ops with autograd."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

def unpack_grads(grads: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor | None]) -> list:
    """Map empty placeholder gradients back to None (for absent or integer inputs)."""
    return [g if (t is not None and t.is_floating_point()) else None for g, t in zip(grads, inputs)]


def fake_grads(inputs: Sequence[torch.Tensor | None], device) -> list[torch.Tensor]:
    """Fake-tensor gradients with the shapes (contiguous) the backward ops return."""
    return [t.new_empty(t.shape) if (t is not None and t.is_floating_point()) else torch.empty(0, device=device)
            for t in inputs]


class OpArgs:
    """The inputs of one custom op by name, read from the signature of its Python function (the
    same signature torch.library turns into the op's schema), so that autograd code saves inputs
    and returns gradients by name, never by position::

        def _my(x: Tensor, w: Optional[Tensor], backend: str) -> Tensor: ...
        _my_op = torch.library.custom_op("elastic_kernels::my", _my, mutates_args=())
        _ARGS = OpArgs(_my)
        def _setup(ctx, inputs, output): _ARGS.save(ctx, inputs)
        def _backward(ctx, grad):
            a = _ARGS.saved(ctx)                # {"x": ..., "w": ..., "backend": ...}
            return _ARGS.grads(x=..., w=...)    # every other input gets None

    Gradients may only be given for tensor inputs; an unknown name raises ``ValueError``.
    """

    def __init__(self, fn: Callable) -> None:
        self.signature = inspect.signature(fn, eval_str=True)
        params = self.signature.parameters
        self.op = fn.__name__
        self.names = tuple(params)
        self.tensors = tuple(n for n, p in params.items() if p.annotation in (Tensor, Optional[Tensor]))

    def bind(self, *args, **kwargs) -> dict[str, Any]:
        """``{name: value}`` of one call's arguments (a TypeError names a missing or extra one)."""
        bound = self.signature.bind(*args, **kwargs)
        return dict(bound.arguments)

    def save(self, ctx, inputs: Sequence) -> None:
        """Save the tensor inputs for backward and keep the others on ``ctx``."""
        named = self.bind(*inputs)
        ctx.save_for_backward(*(named[n] for n in self.tensors))
        ctx.op_scalars = {n: v for n, v in named.items() if n not in self.tensors}

    def saved(self, ctx) -> dict[str, Any]:
        """Every input by name, in schema order (tensors from ``ctx.saved_tensors``)."""
        named = {**dict(zip(self.tensors, ctx.saved_tensors)), **ctx.op_scalars}
        return {n: named[n] for n in self.names}

    def grads(self, **grads) -> tuple:
        """The backward's return value: ``grads[name]`` at each input's position, None elsewhere."""
        unknown = sorted(set(grads) - set(self.tensors))
        if unknown:
            raise ValueError(f"{self.op}: gradients given for {unknown}, which are not tensor inputs "
                             f"{self.tensors}")
        return tuple(grads.get(n) for n in self.names)
