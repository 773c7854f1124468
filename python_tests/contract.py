"""The stride and NaN/Inf contract of every public op, as one data-driven driver (docs/design.md §5).

Every op is described by an :class:`OpCase`: how to draw sizes (hypothesis), build contiguous
inputs, call the op on a backend, which inputs take gradients and how to get the float64 truth.
The driver then

- replaces each tensor argument in turn by a strided view of the same values (:data:`VIEW_KINDS`:
  every other element of a wider tensor, a transposed layout, a stride-0 expansion of a size-1
  dimension, a storage offset) and compares the outputs and gradients of the backend with the
  reference on contiguous inputs (:func:`check_view`, the 2x policy of
  :func:`helpers.assert_close_to_truth`, bit-exact for the quantization ops);
- puts a NaN or an Inf into one element of each float argument and checks that the non-finite
  outputs are exactly those of the reference (:func:`check_nonfinite`).

Running this file (``TRITON_INTERPRET=1 python python_tests/contract.py``) prints the tally of
every case: ok / clear error / unclear error / crash / silent wrong.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

if __name__ == "__main__":  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from hypothesis import strategies as st

import elastic_kernels as ek
from elastic_kernels import nvfp4
from elastic_kernels.nvfp4 import NVFP4Tensor
from elastic_kernels.formats import nvfp4 as fmt_nvfp4
from elastic_kernels.reference import nvfp4 as ref_nvfp4
from helpers import assert_close_to_truth

VIEW_KINDS = ("strided", "transposed", "expanded", "offset")
DTYPE = torch.float32          # the precision every backend is run in (all support it)


@dataclass
class OpCase:
    """One public op (or one configuration of it) as the driver sees it.

    Attributes:
        name: id in test names. backends: the backends the op implements.
        draw: hypothesis ``data`` -> params (sizes and flags, plain Python values).
        make: (params, generator) -> dict of contiguous CPU tensors (float32 floats).
        call: (params, inputs, backend) -> tuple of output tensors.
        grads: float inputs whose gradients are checked (empty: not differentiable).
        unit_last: inputs whose last dimension must stay unit-strided (NVFP4 codes and scales):
            their "strided" view steps over rows instead, and they are never transposed.
        inplace: inputs the op writes (never expanded: a stride-0 output is not writable).
        keep_dtype: float inputs that stay float32 in the float64 truth run.
        rejects_nonfinite: inputs whose docstring promises a ValueError for NaN/Inf values.
        finite_only: inputs never given NaN/Inf: an NVFP4Tensor's global scale (positive and
            finite by contract, as quantize and from_state_dict check), and moe_experts' w2 under
            per-token widths (documented: a channel past a token's width may reach it through the
            product shared by the tokens of one expert; tested with an int width instead).
        truth: (params, inputs in float64) -> outputs in float64; None: the reference backend on
            float64 inputs. exact: compare with the reference in float32, bit for bit, instead.
    """
    name: str
    backends: tuple
    draw: Callable
    make: Callable
    call: Callable
    grads: tuple = ()
    unit_last: tuple = ()
    inplace: tuple = ()
    keep_dtype: tuple = ()
    truth: Callable | None = None
    exact: bool = False
    rejects_nonfinite: tuple = ()
    finite_only: tuple = ()


# ---------------------------------------------------------------------------------------------
# views
# ---------------------------------------------------------------------------------------------

def _filler(t: torch.Tensor):
    """Value written into the gaps of a strided or offset view: NaN for floats (a kernel that
    reads a gap shows it), an out-of-pattern value for integers."""
    if t.is_floating_point():
        return float("nan")
    return 0x5A if t.dtype == torch.uint8 else 3


def make_view(kind: str, t: torch.Tensor, unit_last: bool = False):
    """``(leaf, fn)`` with ``fn(leaf)`` a ``kind`` view holding ``t``'s values (``expanded``:
    ``t``'s first non-trivial dimension narrowed to size 1, then expanded back), or None when the
    kind does not apply to ``t``'s shape."""
    shape = tuple(t.shape)
    if kind == "strided":
        d = t.dim() - (2 if unit_last else 1)
        if d < 0:
            return None
        wide = list(shape)
        wide[d] *= 2
        index = (slice(None),) * d + (slice(None, None, 2),)
        leaf = torch.full(wide, _filler(t), dtype=t.dtype, device=t.device)
        leaf[index] = t
        return leaf, lambda leaf: leaf[index]
    if kind == "transposed":
        if t.dim() < 2 or unit_last:
            return None
        return t.transpose(-1, -2).contiguous(), lambda leaf: leaf.transpose(-1, -2)
    if kind == "expanded":
        dims = [i for i, s in enumerate(shape) if s > 1]
        if not dims:
            return None
        d = dims[0]
        return t.narrow(d, 0, 1).clone(), lambda leaf: leaf.expand(shape)
    if kind == "offset":
        flat = torch.full((t.numel() + 1,), _filler(t), dtype=t.dtype, device=t.device)
        flat[1:] = t.reshape(-1)
        return flat, lambda leaf: leaf[1:].view(shape)
    raise ValueError(f"unknown view kind {kind!r}")


def view_args(case: OpCase, params: dict, tensors: dict, kind: str) -> list[str]:
    """The inputs ``kind`` applies to."""
    out = []
    for name, t in tensors.items():
        if kind == "expanded" and name in case.inplace:
            continue
        if make_view(kind, t, name in case.unit_last) is not None:
            out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# running one configuration
# ---------------------------------------------------------------------------------------------

def run(case: OpCase, params: dict, tensors: dict, backend: str, device, dtype, *, target=None,
        kind=None, contiguous=False, grad_out=None, call=None):
    """Call the op once. Returns ``(outputs, {name: grad})``; gradients are taken with respect to
    the leaves, so a view's gradient is that of its base tensor."""
    leaves, inputs = {}, {}
    for name, t in tensors.items():
        t = t.to(device).clone()
        if t.is_floating_point() and name not in case.keep_dtype:
            t = t.to(dtype)
        leaf, fn = make_view(kind, t, name in case.unit_last) if name == target else (t, None)
        if name in case.grads and grad_out is not None:
            leaf = leaf.detach().requires_grad_(True)
        leaves[name] = leaf
        v = fn(leaf) if fn is not None else leaf
        inputs[name] = v.contiguous() if contiguous else v
    outs = tuple((call or case.call)(params, inputs, backend))
    grads = {}
    if grad_out is not None and case.grads:
        pairs = [(o, g) for o, g in zip(outs, grad_out) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g.to(o.device, o.dtype) for o, g in pairs])
        grads = {n: leaves[n].grad for n in case.grads if n in leaves}
        outs = tuple(o.detach() for o in outs)
    return outs, grads


def _grad_outputs(outs, gen):
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64) if o.is_floating_point() else None
            for o in outs]


def _compare(got, truth, same, name):
    if not got.is_floating_point() or same is None:
        assert torch.equal(got.cpu(), truth.cpu()), f"{name}: differs from the reference"
    else:
        assert_close_to_truth(got.float(), truth, same.float(), DTYPE, name)


def _exact(got, want, name):
    got, want = got.cpu(), want.cpu()
    if got.dtype == torch.float8_e4m3fn:
        got, want = got.view(torch.uint8), want.view(torch.uint8)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.is_floating_point():
        same = (got == want) | (got.isnan() & want.isnan())
        assert bool(same.all()) and torch.equal(got.signbit() & ~got.isnan(), want.signbit() & ~want.isnan()), \
            f"{name}: not bit-exact with the reference ({int((~same).sum())} values differ)"
    else:
        assert torch.equal(got, want), f"{name}: not bit-exact with the reference ({int((got != want).sum())} differ)"


def check_view(case: OpCase, params: dict, tensors: dict, target: str, kind: str, backend: str,
               device, seed: int = 0) -> None:
    """Backend on a ``kind`` view of ``target`` vs the reference on contiguous inputs."""
    gen = torch.Generator().manual_seed(seed)
    probe, _ = run(case, params, tensors, "reference", "cpu", DTYPE, target=target, kind=kind, contiguous=True)
    grad_out = _grad_outputs(probe, gen) if case.grads else None
    got, g_got = run(case, params, tensors, backend, device, DTYPE, target=target, kind=kind, grad_out=grad_out)
    same, g_same = run(case, params, tensors, "reference", "cpu", DTYPE, target=target, kind=kind,
                       contiguous=True, grad_out=grad_out)
    where = f"{case.name}[{backend}] {target} as {kind} view"
    if case.exact:
        for i, (a, b) in enumerate(zip(got, same)):
            _exact(a, b, f"{where}: output {i}")
        for n in g_got:
            _exact(g_got[n], g_same[n], f"{where}: grad of {n}")
        return
    truth, g_truth = run(case, params, tensors, "reference", "cpu", torch.float64, target=target, kind=kind,
                         contiguous=True, grad_out=grad_out) if case.truth is None else \
        _custom_truth(case, params, tensors, target, kind, grad_out)
    assert len(got) == len(truth)
    for i, (a, t, s) in enumerate(zip(got, truth, same)):
        _compare(a, t, s if a.is_floating_point() else None, f"{where}: output {i}")
    for n in g_got:
        _compare(g_got[n], g_truth[n], g_same[n], f"{where}: grad of {n}")


def _custom_truth(case, params, tensors, target, kind, grad_out):
    """Run ``case.truth`` as :func:`run` runs the op (float64, contiguous, the same views)."""
    return run(case, params, tensors, "reference", "cpu", torch.float64, target=target, kind=kind,
               contiguous=True, grad_out=grad_out, call=lambda p, inputs, backend: case.truth(p, inputs))


def nonfinite_args(case: OpCase, tensors: dict) -> list[str]:
    return [n for n, t in tensors.items()
            if t.is_floating_point() and t.numel() and n not in case.inplace and n not in case.finite_only]


def check_nonfinite(case: OpCase, params: dict, tensors: dict, target: str, value: float, backend: str,
                    device, seed: int = 0) -> None:
    """One element of ``target`` set to ``value`` (NaN or Inf): the backend's non-finite outputs
    (NaN and +-Inf positions) are exactly the reference's, and its finite outputs match."""
    gen = torch.Generator().manual_seed(seed)
    t = tensors[target].clone()
    flat = t.view(-1)
    flat[int(torch.randint(0, flat.numel(), (1,), generator=gen))] = value
    bad = dict(tensors, **{target: t})
    if target in case.rejects_nonfinite:
        try:
            run(case, params, bad, backend, device, DTYPE)
        except ValueError as exc:
            assert target.split(".")[0] in str(exc), f"{case.name}: the error does not name {target}: {exc}"
            return
        raise AssertionError(f"{case.name}[{backend}]: {value} in {target} was accepted")
    got, _ = run(case, params, bad, backend, device, DTYPE)
    want, _ = run(case, params, bad, "reference", "cpu", DTYPE)
    where = f"{case.name}[{backend}] {value} in {target}"
    for i, (a, b) in enumerate(zip(got, want)):
        if not a.is_floating_point():
            continue
        a, b = a.cpu(), b.cpu()
        for label, fa, fb in (("NaN", a.isnan(), b.isnan()), ("+Inf", a == float("inf"), b == float("inf")),
                              ("-Inf", a == float("-inf"), b == float("-inf"))):
            assert torch.equal(fa, fb), (f"{where}: output {i} has {int(fa.sum())} {label} values, the reference "
                                         f"{int(fb.sum())} ({int((fa != fb).sum())} positions differ)")


# ---------------------------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------------------------

def _rand(gen, *shape, lo=-1.0, hi=1.0):
    return torch.rand(shape, generator=gen) * (hi - lo) + lo


def _randn(gen, *shape):
    return torch.randn(shape, generator=gen)


# ---- ssd_scan --------------------------------------------------------------------------------

def _ssd_draw(data):
    h, g = data.draw(st.sampled_from([(2, 1), (4, 2), (3, 3)]), label="nheads, ngroups")
    return dict(batch=data.draw(st.sampled_from([1, 2]), label="batch"),
                seqlen=data.draw(st.sampled_from([1, 6]), label="seqlen"),
                chunk=data.draw(st.sampled_from([4, 8]), label="chunk_size"),
                nheads=h, ngroups=g, headdim=data.draw(st.sampled_from([3, 4]), label="headdim"),
                dstate=data.draw(st.sampled_from([4, 5]), label="dstate"),
                layout=data.draw(st.sampled_from(["blocked", "interleaved"]), label="head_layout"),
                dt_limit=data.draw(st.sampled_from([(0.0, float("inf")), (0.05, 0.8)]), label="dt_limit"))


def _ssd_make(p, gen):
    b, l, h, hp, g, n = p["batch"], p["seqlen"], p["nheads"], p["headdim"], p["ngroups"], p["dstate"]
    seq = torch.sort(torch.randint(0, 2, (b, l), generator=gen), dim=1).values.to(torch.int32)
    active = torch.tensor([h, g] * b, dtype=torch.int64)[:b]
    return dict(x=_randn(gen, b, l, h, hp), dt=_rand(gen, b, l, h, lo=-1.0, hi=0.5), A=-_rand(gen, h, lo=0.2, hi=1.0),
                B=_randn(gen, b, l, g, n), C=_randn(gen, b, l, g, n), D=_randn(gen, h, hp), z=_randn(gen, b, l, h, hp),
                dt_bias=_rand(gen, h, lo=-0.5, hi=0.5), initial_states=_randn(gen, b, h, hp, n), seq_idx=seq,
                head_scale=_rand(gen, b, h, lo=0.5, hi=1.5), active_heads=active)


def _ssd_call(p, t, backend):
    return ek.ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=p["chunk"], D=t["D"], z=t["z"],
                       dt_bias=t["dt_bias"], dt_softplus=True, dt_limit=p["dt_limit"],
                       initial_states=t["initial_states"],
                       seq_idx=t["seq_idx"], head_layout=p["layout"], active_heads=t["active_heads"],
                       head_scale=t["head_scale"], return_final_states=True, backend=backend)


SSD_SCAN = OpCase("ssd_scan", ("reference", "triton"), _ssd_draw, _ssd_make, _ssd_call,
                  grads=("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states", "head_scale"))


# ---- ssd_state_update ------------------------------------------------------------------------

def _ssu_make(p, gen):
    t = _ssd_make(p, gen)
    b, h, hp, n = p["batch"], p["nheads"], p["headdim"], p["dstate"]
    return dict(state=_randn(gen, b, h, hp, n), x=t["x"][:, 0].contiguous(), dt=t["dt"][:, 0].contiguous(),
                A=t["A"], B=t["B"][:, 0].contiguous(), C=t["C"][:, 0].contiguous(), D=t["D"][:, 0].contiguous(),
                z=t["z"][:, 0].contiguous(), dt_bias=t["dt_bias"], active_heads=t["active_heads"])


def _ssu_call(p, t, backend):
    y = ek.ssd_state_update(t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                            dt_bias=t["dt_bias"], dt_softplus=True, head_layout=p["layout"],
                            active_heads=t["active_heads"], backend=backend)
    return y, t["state"]


SSD_STATE_UPDATE = OpCase("ssd_state_update", ("reference", "cuda"), _ssd_draw, _ssu_make, _ssu_call,
                          inplace=("state",))


# ---- moe_route -------------------------------------------------------------------------------

def _route_draw(data):
    e = data.draw(st.sampled_from([3, 5]), label="E")
    return dict(tokens=data.draw(st.sampled_from([1, 4, 7]), label="tokens"), E=e,
                top_k=data.draw(st.integers(1, e - 1), label="top_k"),
                score=data.draw(st.sampled_from(["softmax", "sigmoid"]), label="score"))


def _route_make(p, gen):
    return dict(router_logits=_randn(gen, p["tokens"], p["E"]), correction_bias=_rand(gen, p["E"], lo=0.0, hi=0.1))


def _route_call(p, t, backend):
    return ek.moe_route(t["router_logits"], p["top_k"], num_experts_active=p["E"] - 1, score=p["score"],
                        correction_bias=t["correction_bias"])


MOE_ROUTE = OpCase("moe_route", ("reference",), _route_draw, _route_make, _route_call, grads=("router_logits",))


# ---- moe_experts -----------------------------------------------------------------------------

def _moe_draw(data):
    return dict(tokens=data.draw(st.sampled_from([1, 5, 9]), label="tokens"),
                hidden=data.draw(st.sampled_from([8, 13]), label="hidden"),
                ffn=data.draw(st.sampled_from([6, 16]), label="ffn"),
                E=data.draw(st.sampled_from([2, 3]), label="E"),
                top_k=data.draw(st.sampled_from([1, 2]), label="top_k"),
                gated=data.draw(st.booleans(), label="gated"))


def _moe_make(p, gen):
    t, h, f, e, k = p["tokens"], p["hidden"], p["ffn"], p["E"], p["top_k"]
    ids = torch.stack([torch.randperm(e - 1, generator=gen)[:k] for _ in range(t)]) if k <= e - 1 else \
        torch.randint(0, e - 1, (t, k), generator=gen)
    out = dict(x=_randn(gen, t, h), topk_weights=_rand(gen, t, k, lo=0.1, hi=1.0), topk_ids=ids,
               w1=_randn(gen, e, f, h) / h ** 0.5, w2=_randn(gen, e, h, f) / f ** 0.5)
    if p["gated"]:
        out["w3"] = _randn(gen, e, f, h) / h ** 0.5
        out["channel_scale"] = _rand(gen, f, lo=0.5, hi=1.5)
    else:
        out["channel_scale"] = _rand(gen, t, f, lo=0.5, hi=1.5)
    out["ffn_width"] = torch.randint(0, f + 1, (t,), generator=gen)
    return out


def _moe_call(p, t, backend):
    return (ek.moe_experts(t["x"], t["topk_weights"], t["topk_ids"], t["w1"], t["w2"], w3=t.get("w3"),
                           activation="silu" if p["gated"] else "relu2", num_experts_active=p["E"] - 1,
                           ffn_width=t["ffn_width"], channel_scale=t["channel_scale"], backend=backend),)


MOE_EXPERTS = OpCase("moe_experts", ("reference", "triton"), _moe_draw, _moe_make, _moe_call,
                     grads=("x", "topk_weights", "w1", "w2", "w3", "channel_scale"), finite_only=("w2",))


def _moe_q_draw(data):
    return dict(tokens=data.draw(st.sampled_from([1, 6]), label="tokens"), hidden=16, ffn=32, E=2,
                top_k=data.draw(st.sampled_from([1, 2]), label="top_k"), width=data.draw(st.sampled_from([16, 32])))


def _nvfp4_parts(w, prefix):
    q = nvfp4.quantize(w, backend="reference")
    return {f"{prefix}.data": q.data, f"{prefix}.scales": q.scales.view(torch.uint8), f"{prefix}.g": q.global_scale}


def _q(t, prefix):
    return NVFP4Tensor(t[f"{prefix}.data"], t[f"{prefix}.scales"].view(torch.float8_e4m3fn), t[f"{prefix}.g"])


def _moe_q_make(p, gen):
    t, h, f, e, k = p["tokens"], p["hidden"], p["ffn"], p["E"], p["top_k"]
    out = dict(x=_randn(gen, t, h), topk_weights=_rand(gen, t, k, lo=0.1, hi=1.0),
               topk_ids=torch.randint(0, e, (t, k), generator=gen))
    out.update(_nvfp4_parts(_randn(gen, e, f, h) / h ** 0.5, "w1"))
    out.update(_nvfp4_parts(_randn(gen, e, h, f) / f ** 0.5, "w2"))
    return out


def _moe_q_call(p, t, backend):
    return (ek.moe_experts(t["x"], t["topk_weights"], t["topk_ids"], _q(t, "w1"), _q(t, "w2"),
                           ffn_width=p["width"], backend=backend),)


_Q_PARTS = tuple(f"{w}.{s}" for w in ("w1", "w2") for s in ("data", "scales"))
MOE_EXPERTS_NVFP4 = OpCase("moe_experts_nvfp4", ("reference", "triton"), _moe_q_draw, _moe_q_make, _moe_q_call,
                           grads=("x", "topk_weights"), unit_last=_Q_PARTS, keep_dtype=("w1.g", "w2.g"),
                           finite_only=("w1.g", "w2.g"))


# ---- nvfp4_linear ----------------------------------------------------------------------------

def _lin_draw(data):
    return dict(m=data.draw(st.sampled_from([1, 3, 17]), label="M"), n=data.draw(st.sampled_from([5, 16]), label="N"),
                k=data.draw(st.sampled_from([16, 48]), label="K"),
                act_quant=data.draw(st.booleans(), label="act_quant"))


def _lin_make(p, gen):
    out = dict(x=_randn(gen, p["m"], p["k"]))
    out.update(_nvfp4_parts(_randn(gen, p["n"], p["k"]), "q"))
    out["bias"] = _randn(gen, p["n"])
    return out


def _lin_call(p, t, backend):
    return (ek.nvfp4_linear(t["x"], _q(t, "q"), t["bias"], act_quant=p["act_quant"], backend=backend),)


def _lin_truth(p, t):
    """float64: ``x @ (e2m1 * s).T * g + bias`` (W4A4: x replaced by its exact quantized value,
    whose straight-through gradient is the identity)."""
    x = t["x"]
    w = fmt_nvfp4.scaled_values(t["q.data"], t["q.scales"].view(torch.float8_e4m3fn)).double()
    y_scale = t["q.g"].double()
    if p["act_quant"]:
        xs, gx = ref_nvfp4.activation_scaled_reference(x.detach().float())
        x = x + (xs.double() * gx.double() - x).detach()
    return ((x @ w.T) * y_scale + t["bias"],)


NVFP4_LINEAR = OpCase("nvfp4_linear", ("reference", "triton", "cuda"), _lin_draw, _lin_make, _lin_call,
                      grads=("x", "bias"), unit_last=("q.data", "q.scales"), keep_dtype=("q.g",), truth=_lin_truth,
                      finite_only=("q.g",))


# ---- fake quantization and quantize ------------------------------------------------------------

def _fq_draw(data):
    return dict(rows=data.draw(st.sampled_from([1, 3, 18]), label="rows"),
                k=data.draw(st.sampled_from([16, 64]), label="K"))


def _fq_make(p, gen):
    return dict(x=_randn(gen, p["rows"], p["k"]) * 3, global_scale=torch.tensor(4.0 / 2688))


def _fq_call(p, t, backend):
    return (ek.fake_quant_nvfp4(t["x"], global_scale=t["global_scale"], backend=backend),)


FAKE_QUANT_NVFP4 = OpCase("fake_quant_nvfp4", ("reference", "triton", "cuda"), _fq_draw, _fq_make, _fq_call,
                          grads=("x",), exact=True, rejects_nonfinite=("global_scale",))


def _fq_auto_call(p, t, backend):
    return (ek.fake_quant_nvfp4(t["x"], backend=backend),)


FAKE_QUANT_NVFP4_AUTO = OpCase("fake_quant_nvfp4_auto_scale", ("reference", "triton", "cuda"), _fq_draw,
                               lambda p, gen: dict(x=_randn(gen, p["rows"], p["k"])), _fq_auto_call,
                               grads=("x",), exact=True)


def _fp8_call(p, t, backend):
    return (ek.fake_quant_fp8(t["x"], scale=t["global_scale"]),)


FAKE_QUANT_FP8 = OpCase("fake_quant_fp8", ("reference",), _fq_draw, _fq_make, _fp8_call, grads=("x",), exact=True,
                        rejects_nonfinite=("global_scale",))


def _quant_draw(data):
    return dict(E=data.draw(st.sampled_from([0, 2]), label="E (0: a 2-d weight)"),
                rows=data.draw(st.sampled_from([1, 5]), label="N"), k=data.draw(st.sampled_from([16, 32]), label="K"))


def _quant_make(p, gen):
    lead = (p["E"],) if p["E"] else ()
    return dict(w=_randn(gen, *lead, p["rows"], p["k"]), global_scale=torch.full(lead, 2.0 / 2688))


def _quant_call(p, t, backend):
    q = nvfp4.quantize(t["w"], global_scale=t["global_scale"], backend=backend)
    return q.data, q.scales


QUANTIZE = OpCase("quantize", ("reference", "triton", "cuda"), _quant_draw, _quant_make, _quant_call, exact=True,
                  rejects_nonfinite=("w", "global_scale"))

CASES = (SSD_SCAN, SSD_STATE_UPDATE, MOE_ROUTE, MOE_EXPERTS, MOE_EXPERTS_NVFP4, NVFP4_LINEAR, FAKE_QUANT_NVFP4,
         FAKE_QUANT_NVFP4_AUTO, FAKE_QUANT_FP8, QUANTIZE)


# ---------------------------------------------------------------------------------------------
# tally (run as a script)
# ---------------------------------------------------------------------------------------------

def classify(fn, arg_name: str) -> str:
    """'ok', 'clear error' (ValueError/TypeError naming the argument), 'unclear error' (any other
    ValueError/TypeError), 'crash' (any other exception) or 'silent wrong' (a failed comparison)."""
    try:
        fn()
    except AssertionError:
        return "silent wrong"
    except (ValueError, TypeError) as exc:
        return "clear error" if arg_name.split(".")[0] in str(exc) else "unclear error"
    except Exception:  # noqa: BLE001 - the tally counts every other failure as a crash
        return "crash"
    return "ok"


def _examples(case, n):
    """``n`` deterministic hypothesis draws of the case's params."""
    from hypothesis import HealthCheck, given, settings
    found = []

    @settings(max_examples=n, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def collect(data):
        found.append(case.draw(data))
    collect()
    return found[:n]


def tally(examples: int = 2, verbose: bool = False) -> dict:
    from collections import Counter
    from elastic_kernels import _dispatch
    counts: Counter = Counter()
    for case in CASES:
        for backend in case.backends:
            if backend == "cuda" and not torch.cuda.is_available():
                continue
            if backend == "triton" and not (_dispatch.triton_available() and _dispatch.triton_interpret()):
                continue
            for i, params in enumerate(_examples(case, examples)):
                tensors = case.make(params, torch.Generator().manual_seed(i))
                for kind in VIEW_KINDS:
                    for arg in view_args(case, params, tensors, kind):
                        r = classify(lambda: check_view(case, params, tensors, arg, kind, backend, "cpu", i), arg)
                        counts[("views", r)] += 1
                        if verbose and r != "ok":
                            print(f"{r:14s} {case.name}[{backend}] {arg} {kind} {params}")
                if backend == "reference":
                    continue
                for value in (float("nan"), float("inf")):
                    for arg in nonfinite_args(case, tensors):
                        r = classify(lambda: check_nonfinite(case, params, tensors, arg, value, backend, "cpu", i),
                                     arg)
                        counts[("nonfinite", r)] += 1
                        if verbose and r != "ok":
                            print(f"{r:14s} {case.name}[{backend}] {value} in {arg} {params}")
    return counts


if __name__ == "__main__":
    import sys
    counts = tally(verbose="-v" in sys.argv)
    kinds = ("ok", "clear error", "unclear error", "crash", "silent wrong")
    print(f"{'family':10s} {'tried':>6s} " + " ".join(f"{k:>14s}" for k in kinds))
    for fam in ("views", "nonfinite"):
        row = [counts[(fam, k)] for k in kinds]
        print(f"{fam:10s} {sum(row):6d} " + " ".join(f"{v:14d}" for v in row))
