"""Registering the ops with torch.library (:func:`custom_op`), and the pieces their autograd shares."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["custom_op", "CustomOp", "unpack_grads", "fake_grads", "OpArgs"]


def _storages(values) -> set[int]:
    """Data pointers of the non-empty storages behind the tensors in ``values``."""
    return {v.untyped_storage().data_ptr() for v in values
            if isinstance(v, Tensor) and v.untyped_storage().nbytes()}


class CustomOp:
    """The operator ``qualname`` (``"elastic_kernels::name"``) with the kernel ``fn``: what
    ``torch.library.custom_op`` gives, through the public ``torch.library`` registration calls.

    ``fn``'s annotated signature is the schema (``torch.library.infer_schema``); ``fn`` runs on
    every device (``CompositeExplicitAutograd``). ``op(...)`` calls the ``torch.ops`` overload
    (:attr:`default`); :meth:`register_fake` and :meth:`register_autograd` work as on a
    ``custom_op``. As there:

    - a returned tensor may not share storage with an input or another output (RuntimeError);
    - a functional op without :meth:`register_autograd` runs in grad mode, and a backward through
      it is a RuntimeError naming it;
    - an op that mutates inputs (``mutates_args``, names of ``fn``'s parameters) bumps their
      version counters and has no derivative: called through ``op(...)`` in grad mode with an input
      that requires grad, its outputs require grad and a backward through them is a RuntimeError
      naming it (through ``torch.ops`` directly, autograd passes it by: outputs without grad).
    """

    def __init__(self, qualname: str, fn: Callable, *, mutates_args: Sequence[str] = ()) -> None:
        self.qualname, self.fn, self.mutates_args = qualname, fn, tuple(mutates_args)
        params = tuple(inspect.signature(fn).parameters)
        unknown = sorted(set(self.mutates_args) - set(params))
        if unknown:
            raise ValueError(f"CustomOp({qualname!r}): mutates_args {unknown} are not parameters of "
                             f"{fn.__name__}{params}")
        self._mutated_at = tuple(params.index(n) for n in self.mutates_args)
        self._backward: Callable | None = None
        self._setup_context: Callable | None = None
        ns, name = qualname.split("::")
        torch.library.define(qualname, torch.library.infer_schema(fn, mutates_args=self.mutates_args),
                             tags=(torch.Tag.pt2_compliant_tag,))
        torch.library.impl(qualname, "CompositeExplicitAutograd", self._kernel)
        self.default = getattr(getattr(torch.ops, ns), name).default
        if self._mutated_at:
            torch.library.impl(qualname, "Autograd", torch.library.fallthrough_kernel)
        else:  # one autograd kernel, reading what register_autograd gives when it runs
            torch.library.register_autograd(self.default, self._run_backward, setup_context=self._run_setup)

    def __call__(self, *args, **kwargs):
        out = self.default(*args, **kwargs)
        if self._mutated_at and torch.is_grad_enabled():
            needs = [v for v in (*args, *kwargs.values()) if isinstance(v, Tensor) and v.requires_grad]
            if needs:
                return _NoDerivative.apply(self.qualname, out, *needs)
        return out

    def register_fake(self, fake: Callable) -> Callable:
        """Register ``fake`` (same signature as the kernel) for fake tensors; usable as a decorator."""
        torch.library.register_fake(self.default, fake)
        return fake

    def register_autograd(self, backward: Callable, *, setup_context: Callable | None = None) -> None:
        """``backward(ctx, *grads)`` and ``setup_context(ctx, inputs, output)``, as for a
        ``torch.library.custom_op``."""
        if self._mutated_at:
            raise ValueError(f"{self.qualname}: an op that mutates {self.mutates_args} cannot have autograd")
        self._backward, self._setup_context = backward, setup_context

    def _kernel(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        inputs, seen = _storages((*args, *kwargs.values())), set()
        for t in out if isinstance(out, (tuple, list)) else (out,):
            ptrs = _storages((t,))
            if ptrs & (inputs | seen):
                raise RuntimeError(f"{self.qualname} (kernel {self.fn.__module__}.{self.fn.__qualname__}): an "
                                   f"output shares storage with an input or another output; return a new tensor")
            seen |= ptrs
        if self._mutated_at:
            torch.autograd.graph.increment_version([args[i] for i in self._mutated_at if i < len(args)]
                                                   + [kwargs[n] for n in self.mutates_args if n in kwargs])
        return out

    def _run_setup(self, ctx, inputs, output) -> None:
        if self._setup_context is not None:
            self._setup_context(ctx, inputs, output)

    def _run_backward(self, ctx, *grads):
        if self._backward is None:
            raise RuntimeError(f"{self.qualname} has no derivative (no autograd was registered for it)")
        return self._backward(ctx, *grads)


class _NoDerivative(torch.autograd.Function):
    """``apply(qualname, out, *inputs)``: ``out`` (a tensor computed outside autograd), now
    depending on ``inputs``; a backward through it is a RuntimeError naming ``qualname``."""

    @staticmethod
    def forward(ctx, qualname: str, out: Tensor, *inputs: Tensor) -> Tensor:
        ctx.qualname = qualname
        return out.view_as(out)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.qualname} has no derivative (it mutates its inputs)")


def custom_op(qualname: str, fn: Callable | None = None, *, mutates_args: Sequence[str] = ()):
    """``CustomOp(qualname, fn)``, or the decorator ``@custom_op(qualname)`` on the kernel.

    Replaces ``torch.library.custom_op``, which wraps each kernel in ``torch._dynamo.disable``: its
    first call imported ``torch._dynamo`` (about 1.5 s of CPU) even when nothing is compiled.
    Under ``torch.compile`` the ops are opaque graph nodes (fake kernels) either way, so their
    kernels are not traced.
    """
    if fn is None:
        return lambda f: CustomOp(qualname, f, mutates_args=mutates_args)
    return CustomOp(qualname, fn, mutates_args=mutates_args)


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
        _my_op = custom_op("elastic_kernels::my", _my)
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
