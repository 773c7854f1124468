"""Shared test helpers: the numerics policy of docs/design.md §5 in one place."""
from __future__ import annotations

import torch

# (dtype, floor relative to the output's scale) — docs/design.md §5
FLOORS = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item() if a.numel() else 0.0


def assert_close_to_truth(out: torch.Tensor, truth: torch.Tensor, same_precision_ref: torch.Tensor,
                          dtype: torch.dtype, name: str = "output") -> None:
    """Pass when ``|out - truth| <= 2 * |ref - truth| + floor * scale`` (max norms).

    ``truth`` is the float64 reference; ``same_precision_ref`` is the PyTorch reference run in the
    kernel's precision (its error is the yardstick); ``scale`` is max |truth| (at least 1e-6).
    """
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if truth.numel() == 0:
        return
    scale = max(truth.detach().abs().max().item(), 1e-6)
    err, ref_err = max_err(out, truth), max_err(same_precision_ref, truth)
    bound = 2.0 * ref_err + FLOORS[dtype] * scale
    assert err <= bound, (f"{name}: max error {err:.3e} > bound {bound:.3e} "
                          f"(2 x reference error {ref_err:.3e} + floor {FLOORS[dtype]:.0e} x scale {scale:.3e})")


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor full of NaN (floats) or a sentinel (ints), to catch outputs that are never written."""
    return torch.full_like(t, float("nan")) if t.is_floating_point() else torch.full_like(t, -7)


def cast(tensors, dtype):
    """Cast floating tensors of a dict/list to dtype (others unchanged); None stays None."""
    conv = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    if isinstance(tensors, dict):
        return {k: conv(v) for k, v in tensors.items()}
    return [conv(t) for t in tensors]


def grads_of(fn, inputs: dict, names, grad_out):
    """Run ``fn(**inputs)`` and return {name: grad} for ``names`` (fresh leaves, no side effects)."""
    leaves = {k: (v.detach().clone().requires_grad_(k in names) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items()}
    out = fn(**leaves)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    gos = grad_out if isinstance(grad_out, (tuple, list)) else (grad_out,)
    torch.autograd.backward([o for o in outs], [g.to(o.dtype) for o, g in zip(outs, gos)])
    return {k: leaves[k].grad for k in names}


def assert_compile_matches_eager(f, args, *extra):
    """``torch.compile(f, fullgraph=True)`` equals eager ``f``: output and gradients of ``args``
    (floating tensors made leaves requiring grad); ``extra`` are passed through unchanged."""
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = [a.detach().clone().requires_grad_(True) for a in args]
    eager = [a.detach().clone().requires_grad_(True) for a in args]
    out = compiled(*args, *extra)
    out.backward()
    ref = f(*eager, *extra)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for a, e in zip(args, eager):
        torch.testing.assert_close(a.grad, e.grad)
