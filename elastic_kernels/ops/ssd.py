"""``ssd_scan`` and ``ssd_state_update``: the width-masked Mamba2 SSD ops.

Validation, dispatch, torch.library registration (fake kernels, autograd). The math lives in
:mod:`elastic_kernels.reference.ssd` (reference backend), :mod:`elastic_kernels.triton.ssd`
(Triton) and ``csrc/ssd_state_update.cu`` (CUDA decode step, launched by
:mod:`elastic_kernels.cuda.ssd`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._dispatch import Backends, lazy
from .._validation import (FLOAT_DTYPES, Dims, check_choice, check_int, check_nondecreasing, check_scale,
                           check_tensor, check_width)
from ..cuda import ssd as cuda_ssd
from ..reference.ssd import saved_heads, ssd_scan_reference_bwd, ssd_scan_reference_fwd, ssd_state_update_reference
from ._autograd import OpArgs, custom_op, fake_grads, unpack_grads

HEAD_LAYOUTS = ("blocked", "interleaved")


def _validate_common(op, x, dt, A, B, C, D, z, dt_bias, head_layout, active_heads, dims: Dims, lead: tuple):
    dev = x.device if isinstance(x, torch.Tensor) else None
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    for name, t in (("dt", dt), ("A", A), ("B", B), ("C", C)):
        check_tensor(op, name, t, dtypes=FLOAT_DTYPES, device=dev)
    for name, t in (("D", D), ("z", z), ("dt_bias", dt_bias)):
        check_tensor(op, name, t, dtypes=FLOAT_DTYPES, device=dev, optional=True)
    dims.check("x", x, (*lead, "nheads", "headdim"))
    dims.check("dt", dt, (*lead, "nheads"))
    dims.check("A", A, ("nheads",))
    dims.check("B", B, (*lead, "ngroups", "dstate"))
    dims.check("C", C, (*lead, "ngroups", "dstate"))
    h, g = dims["nheads"], dims["ngroups"]
    if g == 0 or h % g:
        raise ValueError(f"{op}: nheads ({h}) must be a multiple of ngroups ({g}) (from B's shape)")
    if D is not None:
        dims.check("D", D, ("nheads",) if D.dim() == 1 else ("nheads", "headdim"))
    if z is not None:
        dims.check("z", z, (*lead, "nheads", "headdim"))
    if dt_bias is not None:
        dims.check("dt_bias", dt_bias, ("nheads",))
    check_choice(op, "head_layout", head_layout, HEAD_LAYOUTS)
    return check_width(op, "active_heads", active_heads, full=h, batch=dims["batch"], device=dev,
                       multiple_of=g, multiple_name="ngroups")


# ---------------------------------------------------------------------------------------------
# ssd_scan
# ---------------------------------------------------------------------------------------------

_GRAD_INPUTS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states", "head_scale")  # backward's outputs
_triton_fwd, _triton_bwd = lazy("triton.ssd:ssd_scan_fwd"), lazy("triton.ssd:ssd_scan_bwd")


def _scan_fwd_triton(x, dt, A, B, C, **kw):
    """Triton forward with the reference's outputs: (y, final_states, u, chunk_states); the
    Triton backward recomputes what it needs, so the last two are empty."""
    y, fs = _triton_fwd(x, dt, A, B, C, **kw)
    return y, fs, fs.new_empty(0), fs.new_empty(0)


def _scan_bwd_triton(grad_y, grad_states, x, dt, A, B, C, *, u, chunk_states, **kw):
    return _triton_bwd(grad_y, grad_states, x, dt, A, B, C, **kw)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SCAN = Backends("ssd_scan", dtypes={"triton": KERNEL_DTYPES}, reference=ssd_scan_reference_fwd,
                 triton=_scan_fwd_triton)
_SCAN_VJP = Backends("ssd_scan", reference=ssd_scan_reference_bwd, triton=_scan_bwd_triton)


def _run(table: Backends, args: dict, *lead: Tensor):
    """Call ``table``'s backend ``args["backend"]`` on the op's named arguments."""
    kw = {n: v for n, v in args.items() if n not in ("x", "dt", "A", "B", "C", "backend")}
    return table[args["backend"]](*lead, args["x"], args["dt"], args["A"], args["B"], args["C"], **kw)


def _ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], dt_bias: Optional[Tensor], initial_states: Optional[Tensor],
              seq_idx: Optional[Tensor], head_scale: Optional[Tensor], active_t: Optional[Tensor],
              chunk_size: int, dt_softplus: bool, dt_lo: float, dt_hi: float, interleaved: bool,
              active_int: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, final_states, u, chunk_states): the last two are what the reference backward needs
    (see :func:`~elastic_kernels.reference.ssd.ssd_scan_reference_fwd`), empty for Triton."""
    y, fs, u, cs = _run(_SCAN, dict(locals()))  # the op's inputs by name
    return y, fs, u, cs


def _ssd_scan_backward(grad_y: Tensor, grad_states: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor,
                       C: Tensor, D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                       initial_states: Optional[Tensor], seq_idx: Optional[Tensor],
                       head_scale: Optional[Tensor], active_t: Optional[Tensor], u: Tensor,
                       chunk_states: Tensor, chunk_size: int, dt_softplus: bool, dt_lo: float, dt_hi: float,
                       interleaved: bool, active_int: int, backend: str) -> list[Tensor]:
    """Gradients of :data:`_GRAD_INPUTS` (empty for absent inputs); ``u`` and ``chunk_states``
    are the forward's saved outputs."""
    args = dict(locals())  # the op's inputs by name
    grads = _run(_SCAN_VJP, args, args.pop("grad_y"), args.pop("grad_states"))
    return [g.contiguous() if g is not None else torch.empty(0, device=x.device) for g in grads]


_ssd_scan_op = custom_op("elastic_kernels::ssd_scan", _ssd_scan, mutates_args=())
_ssd_scan_bwd_op = custom_op("elastic_kernels::ssd_scan_backward", _ssd_scan_backward,
                                           mutates_args=())
_ARGS, _BWD_ARGS = OpArgs(_ssd_scan), OpArgs(_ssd_scan_backward)


def _state_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@_ssd_scan_op.register_fake
def _(*args, **kwargs):
    a = _ARGS.bind(*args, **kwargs)
    x, B = a["x"], a["B"]
    b, l, h, p = x.shape
    n, sd = B.shape[-1], _state_dtype(x)
    fs = x.new_empty((b, h, p, n), dtype=sd)
    if a["backend"] == "triton":
        return x.new_empty(x.shape), fs, x.new_empty(0, dtype=sd), x.new_empty(0, dtype=sd)
    keep_u = a["z"] is not None or a["head_scale"] is not None
    nc = max(1, -(-l // a["chunk_size"]))
    hs = saved_heads(h, a["active_int"], a["active_t"] is not None)
    return (x.new_empty(x.shape), fs, x.new_empty((b, l, hs, p) if keep_u else (0,), dtype=sd),
            x.new_empty((b, nc, hs, p, n), dtype=sd))


@_ssd_scan_bwd_op.register_fake
def _(*args, **kwargs):
    a = _BWD_ARGS.bind(*args, **kwargs)
    return fake_grads([a[n] for n in _GRAD_INPUTS], a["x"].device)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[2], output[3])
    named = _ARGS.bind(*inputs)
    ctx.save_for_backward(*(named[n] for n in _ARGS.tensors), output[2], output[3])
    ctx.op_scalars = {n: v for n, v in named.items() if n not in _ARGS.tensors}


def _backward(ctx, grad_y, grad_states, _grad_u, _grad_chunk_states):
    *inputs, u, chunk_states = ctx.saved_tensors
    named = {**dict(zip(_ARGS.tensors, inputs)), **ctx.op_scalars}
    args = {n: named[n] for n in _ARGS.names}
    grads = _ssd_scan_bwd_op(grad_y, grad_states, u=u, chunk_states=chunk_states, **args)
    return _ARGS.grads(**dict(zip(_GRAD_INPUTS, unpack_grads(grads, [args[n] for n in _GRAD_INPUTS]))))


_ssd_scan_op.register_autograd(_backward, setup_context=_setup_context)


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, chunk_size: int = 64,
             D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
             dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, float("inf")),
             initial_states: Tensor | None = None, seq_idx: Tensor | None = None,
             head_layout: str = "blocked", active_heads: int | Tensor | None = None,
             head_scale: Tensor | None = None, return_final_states: bool = False,
             backend: str = "auto"):
    r"""Width-masked Mamba2 SSD scan (``mamba_chunk_scan_combined`` semantics + elastic heads).

    Args:
        x: (batch, seqlen, nheads, headdim) fp32/fp16/bf16 (fp64 on the reference backend).
        dt: (batch, seqlen, nheads). A: (nheads,) (negative for a decaying state).
        B, C: (batch, seqlen, ngroups, dstate); nheads must be a multiple of ngroups.
        chunk_size: chunk length of the chunked algorithm (> 0); results do not depend on it.
        D: (nheads,) or (nheads, headdim) skip connection. z: like x, gate: y *= silu(z).
        dt_bias: (nheads,). dt_softplus: apply softplus after the bias.
        dt_limit: (lo, hi) clamp of the processed dt (skipped for the default (0, inf)).
        initial_states: (batch, nheads, headdim, dstate), the state before step 0 (it belongs to
            sequence index 0 when ``seq_idx`` is given).
        seq_idx: (batch, seqlen) int32, non-decreasing (checked: ValueError, skipped while
            tracing or capturing a CUDA graph); the state resets where it changes.
        head_layout: "blocked" (head h in group h // (nheads/ngroups), as mamba_ssm) or
            "interleaved" (head h in group h % ngroups; active heads are the prefix [0, k)).
        active_heads: None (all), an int, or an int64 tensor (batch,): total active heads, a
            multiple of ngroups; the first active_heads/ngroups heads of every group are active.
            Inactive heads: no work, y = 0, final state = 0, gradients 0.
        head_scale: (batch, nheads) float soft scale multiplied into each head's output after
            the gate; differentiable.
        return_final_states: also return the final states.
        backend: "auto" | "triton" | "reference" (see docs/design.md §4).

    Returns:
        y: like x; and final_states (batch, nheads, headdim, dstate) fp32 when asked.

    Math: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T;  y_t = C_t h_t + D x_t;  y *= silu(z).

    NaN/Inf inputs are not checked; every backend propagates them identically (docs/design.md §5)
    at chunk granularity: a non-finite value at step t reaches the outputs it feeds from the first
    step of t's chunk on (the chunked products multiply the masked future by 0), never earlier
    chunks, other samples, or heads that do not read it.
    """
    op = "ssd_scan"
    dims = Dims(op)
    active_int, active_t = _validate_common(op, x, dt, A, B, C, D, z, dt_bias, head_layout,
                                            active_heads, dims, ("batch", "seqlen"))
    dev = x.device
    check_int(op, "chunk_size", chunk_size, min_value=1)
    check_tensor(op, "initial_states", initial_states, dtypes=FLOAT_DTYPES, device=dev, optional=True)
    if initial_states is not None:
        dims.check("initial_states", initial_states, ("batch", "nheads", "headdim", "dstate"))
    check_tensor(op, "seq_idx", seq_idx, dtypes=(torch.int32,), device=dev, optional=True)
    if seq_idx is not None:
        dims.check("seq_idx", seq_idx, ("batch", "seqlen"))
        check_nondecreasing(op, "seq_idx", seq_idx, "seqlen")
    check_scale(op, "head_scale", head_scale, (dims["batch"], dims["nheads"]), dev)
    if (not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2
            or not all(isinstance(v, (int, float)) for v in dt_limit)):
        raise TypeError(f"{op}: dt_limit must be a (lo, hi) pair of floats, got {dt_limit!r}")
    dt_lo, dt_hi = float(dt_limit[0]), float(dt_limit[1])
    if not dt_lo <= dt_hi:
        raise ValueError(f"{op}: dt_limit must satisfy lo <= hi, got {dt_limit!r}")
    be = _SCAN.resolve(backend, dev, dtype=x.dtype)
    y, fs, _, _ = _ssd_scan_op(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, head_scale,
                               active_t, chunk_size, bool(dt_softplus), dt_lo, dt_hi,
                               head_layout == "interleaved", active_int, be)
    return (y, fs) if return_final_states else y


# ---------------------------------------------------------------------------------------------
# ssd_state_update (decode step)
# ---------------------------------------------------------------------------------------------

_STATE_UPDATE = Backends("ssd_state_update", cuda_preference=("cuda",), dtypes={"cuda": KERNEL_DTYPES},
                         reference=ssd_state_update_reference, cuda=cuda_ssd.ssd_state_update)


@custom_op("elastic_kernels::ssd_state_update", mutates_args=("state",))
def _ssd_state_update_op(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                         active_t: Optional[Tensor], dt_softplus: bool, interleaved: bool,
                         active_int: int, backend: str) -> Tensor:
    return _STATE_UPDATE[backend](state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                  interleaved=interleaved, active_int=active_int, active_t=active_t)


@_ssd_state_update_op.register_fake
def _(state, x, *args):
    return x.new_empty(x.shape)


def ssd_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *,
                     D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                     dt_softplus: bool = False, head_layout: str = "blocked",
                     active_heads: int | Tensor | None = None, backend: str = "auto") -> Tensor:
    """One SSD decode step; ``state`` is updated in place. Equal to one step of :func:`ssd_scan`.

    Args:
        state: (batch, nheads, headdim, dstate) float32 (float64 on the reference backend).
        x: (batch, nheads, headdim); dt: (batch, nheads); A: (nheads,);
        B, C: (batch, ngroups, dstate); D: (nheads,) | (nheads, headdim); z: like x;
        dt_bias: (nheads,); head_layout / active_heads as in :func:`ssd_scan`.
        backend: "auto" | "cuda" | "reference" (CUDA tensors default to the CUDA kernel).
    Returns:
        y: (batch, nheads, headdim). Inactive heads: y = 0 and their state is left untouched.
    """
    op = "ssd_state_update"
    dims = Dims(op)
    active_int, active_t = _validate_common(op, x, dt, A, B, C, D, z, dt_bias, head_layout,
                                            active_heads, dims, ("batch",))
    check_tensor(op, "state", state, dtypes=(torch.float32, torch.float64), device=x.device)
    dims.check("state", state, ("batch", "nheads", "headdim", "dstate"))
    be = _STATE_UPDATE.resolve(backend, x.device, dtype=x.dtype)
    if be == "cuda" and state.dtype != torch.float32:
        raise TypeError(f"{op}: backend 'cuda' needs a float32 state, got {state.dtype}")
    return _ssd_state_update_op(state, x, dt, A, B, C, D, z, dt_bias, active_t, bool(dt_softplus),
                                head_layout == "interleaved", active_int, be)
