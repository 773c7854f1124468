"""Triton backend of ``ssd_scan``: forward and every gradient against the float64 reference.

Runs on CPU tensors under TRITON_INTERPRET=1 (the ``triton_device`` fixture), so shapes are
small. Truth is the reference backend in float64 on the very same (rounded) inputs; the
yardstick is the reference backend in the kernel's precision (docs/design.md §5).
"""
from __future__ import annotations

from contextlib import nullcontext
from unittest import mock

import pytest
import torch

from elastic_kernels.ops.ssd import ssd_scan
from elastic_kernels.reference.ssd import active_heads_mask, head_rank
from helpers import DTYPES, assert_close_to_truth, cast, grads_of, poison_like
from ssd_truth import make_inputs as truth_inputs

GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states", "head_scale")


def make_inputs(dtype, *, batch=2, seqlen=40, nheads=4, ngroups=2, headdim=8, dstate=8, initial_states=True,
                seq_idx=False, **kw):
    """Random inputs in float64, rounded to ``dtype`` (so truth and kernel see the same values)."""
    inp = truth_inputs(batch=batch, seqlen=seqlen, nheads=nheads, headdim=headdim, ngroups=ngroups,
                       dstate=dstate, dtype=torch.float64, initial_states=initial_states, **kw)
    inp = {k: v.to(dtype).to(torch.float64) for k, v in inp.items()}
    if seq_idx:
        # sample 0: three packed sequences; sample 1 starts at index 1 (no initial state flows)
        pos = torch.arange(seqlen)
        s0 = (pos >= seqlen // 3).int() + (pos >= (2 * seqlen) // 3 + 1).int()
        rows = [s0, torch.ones_like(s0)] + [s0] * max(batch - 2, 0)
        inp["seq_idx"] = torch.stack(rows[:batch]).to(torch.int32)
    return inp


def inactive_mask(nheads, ngroups, interleaved, active, batch):
    """(batch, nheads) bool: True where the (sample, head) pair is inactive."""
    if active is None:
        return torch.zeros(batch, nheads, dtype=torch.bool)
    if isinstance(active, int):
        keep = head_rank(nheads, ngroups, interleaved) < active // ngroups
        return ~keep[None].expand(batch, nheads)
    return ~active_heads_mask(nheads, ngroups, interleaved, active)


_EMPTY = torch.empty


def _poisoned_empty(*args, **kwargs):
    """torch.empty whose memory is poisoned (NaN / sentinel): catches elements never written."""
    return poison_like(_EMPTY(*args, **kwargs))


def run(inp, device, dtype, backend, gy, gs, **kw):
    """Outputs and gradients of ssd_scan(**inp, **kw) for (y, final_states) cotangents (gy, gs).

    For the Triton backend every buffer the launchers allocate starts poisoned."""
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in cast(inp, dtype).items()}
    if isinstance(kw.get("active_heads"), torch.Tensor):
        kw = dict(kw, active_heads=kw["active_heads"].to(device))
    names = [n for n in GRAD_NAMES if n in moved]
    outs = {}

    def fn(**a):
        y, fs = ssd_scan(**a, **kw, return_final_states=True, backend=backend)
        outs["y"], outs["fs"] = y.detach(), fs.detach()
        return y, fs

    with mock.patch.object(torch, "empty", _poisoned_empty) if backend == "triton" else nullcontext():
        grads = grads_of(fn, moved, names, (gy.to(device), gs.to(device)))
    return outs, grads


def check(device, dtype, inp, **kw):
    b, l, h, p = inp["x"].shape
    g, n = inp["B"].shape[2:]
    gy = torch.randn(b, l, h, p, dtype=torch.float64).to(dtype).to(torch.float64)
    gs = torch.randn(b, h, p, n, dtype=torch.float64)
    truth, tgrads = run(inp, "cpu", torch.float64, "reference", gy, gs, **kw)
    ref, rgrads = run(inp, "cpu", dtype, "reference", gy, gs, **kw)
    out, ograds = run(inp, device, dtype, "triton", gy, gs, **kw)
    assert out["y"].dtype == dtype and out["fs"].dtype == torch.float32
    assert_close_to_truth(out["y"], truth["y"], ref["y"], dtype, "y")
    assert_close_to_truth(out["fs"], truth["fs"], ref["fs"], dtype, "final_states")
    for name in ograds:
        assert ograds[name].dtype == dtype, name
        assert_close_to_truth(ograds[name], tgrads[name], rgrads[name], dtype, f"d{name}")
    # inactive (sample, head) pairs: outputs and per-pair gradients exactly 0
    off = inactive_mask(h, g, kw.get("head_layout") == "interleaved", kw.get("active_heads"), b)
    per_pair = {"y": out["y"].permute(0, 2, 1, 3), "fs": out["fs"], "dx": ograds["x"].permute(0, 2, 1, 3),
                "ddt": ograds["dt"].permute(0, 2, 1)}
    for name in ("z", "initial_states", "head_scale"):
        if name in ograds:
            t = ograds[name]
            per_pair["d" + name] = t.permute(0, 2, 1, 3) if name == "z" else t
    for name, t in per_pair.items():
        assert (t.cpu()[off] == 0).all(), f"{name} is not 0 for inactive heads"
    never = off.all(0)  # heads inactive in every sample: their parameters get no gradient
    for name in ("A", "D", "dt_bias"):
        if name in ograds:
            assert (ograds[name].cpu()[never] == 0).all(), f"d{name} is not 0 for inactive heads"


CASES = {
    # full width, blocked, D per head, z, softplus + bias, initial/final states, seqlen % chunk != 0
    "full_blocked": (dict(seqlen=24), dict(dt_softplus=True)),
    # interleaved, int width, D per channel, seq_idx, dt_limit, head_scale, odd dstate
    "int_interleaved": (dict(seqlen=24, nheads=6, dstate=12, D="channel", seq_idx=True, head_scale=True),
                        dict(head_layout="interleaved", active_heads=4, dt_softplus=True,
                             dt_limit=(0.05, 0.5))),
    # blocked, int width, nothing optional, raw dt clamped on both sides
    "int_blocked": (dict(seqlen=17, nheads=6, D=None, z=False, dt_bias=False, initial_states=False,
                         dt_mean=0.5), dict(active_heads=4, dt_limit=(0.2, 0.8))),
    # per-sample mixed widths (one sample at 0), blocked, seq_idx, head_scale
    "mixed_blocked": (dict(seqlen=20, nheads=6, seq_idx=True, head_scale=True, D="channel"),
                      dict(active_heads=torch.tensor([4, 0]), dt_softplus=True)),
    # per-sample widths, interleaved, seqlen 1, odd headdim
    "mixed_seqlen1": (dict(seqlen=1, headdim=6, head_scale=True),
                      dict(head_layout="interleaved", active_heads=torch.tensor([2, 4]), dt_softplus=True)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", list(CASES))
def test_ssd_scan_triton_matches_reference(triton_device, dtype, case):
    shape_kw, op_kw = CASES[case]
    check(triton_device, dtype, make_inputs(dtype, **shape_kw), chunk_size=16, **op_kw)


def test_ssd_scan_triton_dstate_blocks(triton_device):
    """dstate above one block (64): dot products accumulate over dstate blocks, the last partial."""
    inp = make_inputs(torch.float32, batch=1, seqlen=20, nheads=2, ngroups=1, headdim=4, dstate=72,
                      seq_idx=True, head_scale=True)
    check(triton_device, torch.float32, inp, chunk_size=16, dt_softplus=True)


def test_ssd_scan_triton_long_chunk(triton_device):
    """chunk_size above the kernels' chunk (64): the launcher runs 64-position chunks."""
    inp = make_inputs(torch.float32, batch=1, seqlen=150, nheads=2, ngroups=1, headdim=4, dstate=8)
    check(triton_device, torch.float32, inp, chunk_size=128, dt_softplus=True)


def test_ssd_scan_triton_strided_inputs(triton_device):
    """Non-contiguous views (as split from an in_proj output) are read through their strides."""
    b, l, h, g, p, n = 2, 20, 4, 2, 8, 8
    base = make_inputs(torch.float32, batch=b, seqlen=l, nheads=h, ngroups=g, headdim=p, dstate=n)
    packed = {"xz": torch.randn(b, l, h, 2 * p, dtype=torch.float64),
              "bc": torch.randn(b, l, 2, g, n, dtype=torch.float64) * 0.5,
              "dt_t": torch.randn(b, h, l, dtype=torch.float64) * 0.5 - 1.0}
    gy = torch.randn(b, l, h, 2 * p, dtype=torch.float64)[..., ::2]  # a strided cotangent too
    gs = torch.randn(b, h, p, n, dtype=torch.float64)

    def run_packed(dtype, device, backend):
        leaves = {k: v.to(dtype).to(device).clone().requires_grad_(True) for k, v in packed.items()}
        xz, bc = leaves["xz"], leaves["bc"]
        y, fs = ssd_scan(xz[..., :p], leaves["dt_t"].transpose(1, 2), base["A"].to(dtype).to(device),
                         bc[:, :, 0], bc[:, :, 1], chunk_size=16, D=base["D"].to(dtype).to(device),
                         z=xz[..., p:], dt_bias=base["dt_bias"].to(dtype).to(device), dt_softplus=True,
                         return_final_states=True, backend=backend)
        torch.autograd.backward([y, fs], [gy.to(dtype).to(device), gs.to(device)])
        return [y, fs] + [leaves[k].grad for k in packed]

    truth = run_packed(torch.float64, "cpu", "reference")
    ref = run_packed(torch.float32, "cpu", "reference")
    out = run_packed(torch.float32, triton_device, "triton")
    for name, o, t, r in zip(["y", "final_states", "dxz", "dbc", "ddt"], out, truth, ref):
        assert_close_to_truth(o, t, r, torch.float32, name)


@pytest.mark.parametrize("batch,seqlen", [(2, 0), (0, 5)])
def test_ssd_scan_triton_empty(triton_device, batch, seqlen):
    """Empty inputs: correctly shaped results; with seqlen 0 the final state is the initial one."""
    inp = make_inputs(torch.float32, batch=batch, seqlen=seqlen)
    inp = {k: v.float().to(triton_device).requires_grad_(k in GRAD_NAMES) for k, v in inp.items()}
    y, fs = ssd_scan(**inp, chunk_size=16, return_final_states=True, backend="triton")
    assert y.shape == inp["x"].shape and fs.shape == inp["initial_states"].shape
    torch.testing.assert_close(fs, inp["initial_states"].detach())
    (y.sum() + fs.sum()).backward()
    torch.testing.assert_close(inp["initial_states"].grad, torch.ones_like(fs))
    assert inp["A"].grad.abs().sum() == 0


def test_ssd_scan_triton_launches_only_active_heads():
    """With an int width the grid covers the active heads only (cost falls with width)."""
    from elastic_kernels.triton.ssd import _launch_plan
    x, B = torch.empty(2, 40, 12, 8), torch.empty(2, 40, 3, 16)
    for interleaved in (False, True):
        assert _launch_plan(x, B, 16, interleaved, 6, None)["nlaunch"] == 6
        assert _launch_plan(x, B, 16, interleaved, -1, None)["nlaunch"] == 12
        assert _launch_plan(x, B, 16, interleaved, -1, torch.tensor([3, 6]))["nlaunch"] == 12


def test_ssd_scan_triton_chunk_independent(triton_device):
    """Chunk sizes that are not powers of two (padded blocks) give the same result."""
    inp = {k: v.float().to(triton_device) if v.is_floating_point() else v.to(triton_device)
           for k, v in make_inputs(torch.float32, seqlen=23, seq_idx=True).items()}
    kw = dict(return_final_states=True, dt_softplus=True, backend="triton")
    y16, fs16 = ssd_scan(**inp, chunk_size=16, **kw)
    y5, fs5 = ssd_scan(**inp, chunk_size=5, **kw)
    torch.testing.assert_close(y5, y16, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fs5, fs16, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("active", [None, 1, "mixed"])
def test_ssd_scan_triton_opcheck(triton_device, active):
    inp = make_inputs(torch.float32, batch=2, seqlen=5, nheads=2, ngroups=1, headdim=4, dstate=4,
                      head_scale=True, seq_idx=True)
    inp = {k: v.float().to(triton_device) if v.is_floating_point() else v.to(triton_device)
           for k, v in inp.items()}
    for k in GRAD_NAMES:
        if k in inp:
            inp[k].requires_grad_(True)
    width = torch.tensor([2, 1], device=triton_device) if active == "mixed" else active
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], inp["dt_bias"],
            inp["initial_states"], inp["seq_idx"], inp["head_scale"],
            width if isinstance(width, torch.Tensor) else None,
            16, True, 0.0, float("inf"), False, width if isinstance(width, int) else -1, "triton")
    torch.library.opcheck(torch.ops.elastic_kernels.ssd_scan.default, args)
