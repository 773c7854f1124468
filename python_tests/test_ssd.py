"""ssd_scan / ssd_state_update on the reference backend against a sequential float64 recurrence."""
import pytest
import torch

import elastic_kernels as ek
from elastic_kernels.reference.ssd import active_heads_index
from helpers import DTYPES, assert_close_to_truth, assert_compile_matches_eager, cast, grads_of
from ssd_truth import make_inputs, sequential_ssd

GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states", "head_scale")


def _run(kind, inp, opts, compute_dtype=torch.float64):
    """``kind`` 'op' runs ek.ssd_scan; 'seq' the sequential recurrence. Returns (y, final_states)."""
    if kind == "op":
        return ek.ssd_scan(**inp, **opts, return_final_states=True)
    return sequential_ssd(**inp, **opts, compute_dtype=compute_dtype)


def _check_fwd_bwd(inp, opts, dtype):
    """Forward and every gradient of the op in ``dtype`` vs float64 truth (policy of docs/design.md §5);
    the yardstick is the sequential recurrence on the same low-precision inputs in fp32."""
    low = cast(inp, dtype)
    names = [k for k in GRAD_NAMES if k in inp]
    gy = torch.randn_like(inp["x"], dtype=torch.float64)
    b, _, h, p = inp["x"].shape
    gs = torch.randn(b, h, p, inp["B"].shape[-1], dtype=torch.float64)
    outs = {}
    for key, kind, src, cd in (("op", "op", low, None), ("truth", "seq", cast(low, torch.float64), torch.float64),
                               ("ref", "seq", low, torch.float32)):
        fn = (lambda **kw: _run(kind, kw, opts, cd))  # noqa: E731
        y, fs = fn(**src)
        grads = grads_of(fn, src, names, (gy, gs))
        outs[key] = (y, fs, grads)
    (y, fs, g), (yt, fst, gt), (yr, fsr, gr) = outs["op"], outs["truth"], outs["ref"]
    assert fs.dtype == torch.float32
    assert_close_to_truth(y, yt, yr, dtype, "y")
    assert_close_to_truth(fs, fst, fsr, dtype, "final_states")
    for k in names:
        assert g[k].dtype == low[k].dtype, k
        assert_close_to_truth(g[k], gt[k], gr[k], dtype, f"grad {k}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlen,chunk", [(1, 16), (17, 8), (40, 16), (129, 64)])
def test_full_width_blocked_matches_sequential(dtype, seqlen, chunk):
    inp = make_inputs(seqlen=seqlen, nheads=6, ngroups=3, dstate=8, initial_states=True, head_scale=True)
    _check_fwd_bwd(inp, dict(chunk_size=chunk, dt_softplus=True), dtype)


@pytest.mark.parametrize("feature", [
    dict(D="channel"), dict(D=None, z=False, dt_bias=False), dict(seq_idx=True, initial_states=True),
    dict(dt_limit=(0.05, 0.4)), dict(layout="interleaved", active=4), dict(active="mixed"),
])
def test_features_match_sequential(feature):
    feature = dict(feature)
    layout = feature.pop("layout", "blocked")
    active = feature.pop("active", None)
    dt_limit = feature.pop("dt_limit", (0.0, float("inf")))
    inp = make_inputs(seqlen=23, nheads=6, ngroups=2, **feature)
    if active == "mixed":
        active = torch.tensor([2, 6])
    opts = dict(chunk_size=8, dt_softplus=True, dt_limit=dt_limit, head_layout=layout, active_heads=active)
    for dtype in (torch.float32, torch.bfloat16):
        _check_fwd_bwd(inp, opts, dtype)


@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
@pytest.mark.parametrize("active", [0, 2, 4, "mixed"])
def test_partial_widths_write_every_output(layout, active, poison_empty):
    """Partial widths allocate outputs, saved states and gradients uninitialized and zero only the
    inactive heads: with uninitialized memory poisoned (NaN), every output and gradient still
    matches the float64 truth (inactive heads exactly 0)."""
    inp = make_inputs(seqlen=23, nheads=6, ngroups=2, initial_states=True, head_scale=True)
    widths = torch.tensor([2, 6]) if active == "mixed" else active
    _check_fwd_bwd(inp, dict(chunk_size=8, dt_softplus=True, head_layout=layout, active_heads=widths), torch.float32)


@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
def test_blocks_of_chunks_match_sequential(monkeypatch, layout):
    """Every chunk its own block, as a long sequence runs (dL/dP carried across blocks, the
    results of several blocks joined): forward and every gradient match the float64 truth, with
    seq_idx resets, initial states, gate, per-channel D, head scale and int / mixed widths."""
    import elastic_kernels.reference.ssd as ref
    inp = make_inputs(seqlen=29, nheads=6, ngroups=2, initial_states=True, seq_idx=True, head_scale=True,
                      D="channel")
    one_block = ek.ssd_scan(**cast(inp, torch.float64), chunk_size=8, dt_softplus=True, head_layout=layout,
                            return_final_states=True)
    monkeypatch.setattr(ref, "_BLOCK_BYTES", 1)
    blocks = ek.ssd_scan(**cast(inp, torch.float64), chunk_size=8, dt_softplus=True, head_layout=layout,
                         return_final_states=True)
    for a, b in zip(blocks, one_block):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    for active in (None, 4, torch.tensor([2, 6])):
        _check_fwd_bwd(inp, dict(chunk_size=8, dt_softplus=True, head_layout=layout, active_heads=active),
                       torch.float32)


def test_float64_exact_and_chunk_independent():
    inp = make_inputs(seqlen=37, nheads=4, ngroups=2, initial_states=True, seq_idx=True, dtype=torch.float64)
    truth = sequential_ssd(**inp, dt_softplus=True)
    for chunk in (1, 5, 16, 64):
        y, fs = ek.ssd_scan(**inp, chunk_size=chunk, dt_softplus=True, return_final_states=True)
        torch.testing.assert_close(y, truth[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(fs, truth[1], atol=1e-10, rtol=1e-10)


def test_gradcheck_float64():
    inp = make_inputs(batch=1, seqlen=6, nheads=4, headdim=3, ngroups=2, dstate=3, dtype=torch.float64,
                      initial_states=True, head_scale=True, D="channel")
    names = [k for k in GRAD_NAMES if k in inp]

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        y, fs = ek.ssd_scan(**kw, chunk_size=4, dt_softplus=True, return_final_states=True)
        return y, fs
    args = [inp[k].detach().requires_grad_(True) for k in names]
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
def test_active_heads_equal_sliced_full_width_op(layout):
    """Per-sample widths (mixed in one batch): active heads equal the full-width op on the sliced
    tensors; inactive outputs, final states and all gradients from them are exactly 0."""
    h, g = 6, 3
    inp = make_inputs(batch=3, seqlen=19, nheads=h, ngroups=g, initial_states=True, head_scale=True)
    widths = torch.tensor([3, 6, 0])
    opts = dict(chunk_size=8, dt_softplus=True, head_layout=layout)
    names = [k for k in GRAD_NAMES if k in inp]
    gy = torch.randn_like(inp["x"])
    y, fs = ek.ssd_scan(**inp, **opts, active_heads=widths, return_final_states=True)
    grads = grads_of(lambda **kw: ek.ssd_scan(**kw, **opts, active_heads=widths), inp, names, gy)
    per_head = {"x": 2, "dt": 2, "z": 2, "initial_states": 1, "head_scale": 1}
    for bi, k in enumerate(widths.tolist()):
        idx = active_heads_index(h, g, layout == "interleaved", k)
        inactive = torch.ones(h, dtype=torch.bool)
        inactive[idx] = False
        assert (y[bi][:, inactive] == 0).all() and (fs[bi][inactive] == 0).all()
        for name, dim in per_head.items():
            assert (grads[name][bi].index_select(dim - 1, inactive.nonzero().flatten()) == 0).all(), name
        if k == 0:
            continue
        sub = {name: t[bi:bi + 1] for name, t in inp.items() if name in ("x", "dt", "B", "C", "z", "initial_states",
                                                                         "head_scale")}
        for name, dim in (("x", 2), ("dt", 2), ("z", 2), ("initial_states", 1), ("head_scale", 1)):
            sub[name] = sub[name].index_select(dim, idx)
        for name in ("A", "D", "dt_bias"):
            sub[name] = inp[name].index_select(0, idx)
        # the sliced op keeps the layout, so each group still owns its own B/C slice
        ys, fss = ek.ssd_scan(**sub, **opts, return_final_states=True)
        torch.testing.assert_close(y[bi:bi + 1][:, :, idx], ys, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(fs[bi:bi + 1][:, idx], fss, atol=1e-6, rtol=1e-5)
    ranks = torch.arange(h) // g if layout == "interleaved" else torch.arange(h) % (h // g)
    never = ranks >= int(widths.max()) // g
    for name in ("A", "D", "dt_bias"):
        assert (grads[name][never] == 0).all(), name


def test_int_width_equals_per_sample_and_skips_work():
    inp = make_inputs(batch=2, seqlen=20, nheads=8, ngroups=2, initial_states=True)
    opts = dict(chunk_size=8, head_layout="interleaved")
    y_int = ek.ssd_scan(**inp, **opts, active_heads=4)
    y_vec = ek.ssd_scan(**inp, **opts, active_heads=torch.tensor([4, 4]))
    torch.testing.assert_close(y_int, y_vec)
    assert (y_int[:, :, 4:] == 0).all()
    y_full = ek.ssd_scan(**inp, **opts, active_heads=8)
    torch.testing.assert_close(y_full, ek.ssd_scan(**inp, **opts))


def test_empty_inputs():
    for b, l in ((0, 5), (2, 0)):
        inp = make_inputs(batch=max(b, 1), seqlen=max(l, 1))
        inp = {k: (v[:b] if k in ("x", "dt", "B", "C", "z") and b == 0 else v) for k, v in inp.items()}
        if l == 0:
            inp = {k: (v[:, :0] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inp.items()}
        y, fs = ek.ssd_scan(**inp, return_final_states=True)
        assert y.shape == inp["x"].shape and fs.shape[0] == inp["x"].shape[0]
        if l == 0:
            assert (fs == 0).all()


@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_update_equals_one_scan_step(layout, dtype):
    inp = cast(make_inputs(batch=3, seqlen=1, nheads=6, ngroups=3, initial_states=True, D="channel"), dtype)
    widths = torch.tensor([3, 6, 0])
    opts = dict(dt_softplus=True, head_layout=layout)
    y_scan, fs = ek.ssd_scan(**inp, **opts, active_heads=widths, return_final_states=True)
    state = inp["initial_states"].float().clone()
    before = state.clone()
    y = ek.ssd_state_update(state, inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0],
                            D=inp["D"], z=inp["z"][:, 0], dt_bias=inp["dt_bias"], active_heads=widths, **opts)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y, y_scan[:, 0], **tol)
    mask = fs.abs().sum((-1, -2)) != 0  # active heads
    torch.testing.assert_close(state[mask], fs[mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(state[~mask], before[~mask])  # inactive heads keep their state


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_update_cuda_matches_reference(cuda_device, dtype):
    inp = cast(make_inputs(batch=3, seqlen=1, nheads=6, headdim=40, ngroups=3, dstate=48,
                           initial_states=True, D="channel", device=cuda_device), dtype)
    args = (inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0])
    kw = dict(D=inp["D"], z=inp["z"][:, 0], dt_bias=inp["dt_bias"], dt_softplus=True, head_layout="interleaved",
              active_heads=torch.tensor([3, 6, 0], device=cuda_device))
    s_ref, s_cuda = inp["initial_states"].float().clone(), inp["initial_states"].float().clone()
    y_ref = ek.ssd_state_update(s_ref, *args, **kw, backend="reference")
    y_cuda = ek.ssd_state_update(s_cuda, *args, **kw, backend="cuda")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y_cuda, y_ref, **tol)
    torch.testing.assert_close(s_cuda, s_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("active_t,active_int", [(torch.tensor([2, 4]), -1), (None, 2)])
def test_opcheck(active_t, active_int):
    """Per-sample widths save every head, an int width below full only the active ones."""
    inp = make_inputs(batch=2, seqlen=9, nheads=4, ngroups=2, initial_states=True, head_scale=True)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], inp["dt_bias"],
            inp["initial_states"], None, inp["head_scale"], active_t, 4, True, 0.0,
            float("inf"), True, active_int, "reference")
    args = tuple(a.requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)
    torch.library.opcheck(torch.ops.elastic_kernels.ssd_scan.default, args)
    saved = torch.ops.elastic_kernels.ssd_scan.default(*args)[3]
    assert saved.shape[2] == (4 if active_t is not None else active_int)
    inp = {k: v.detach() for k, v in inp.items()}  # the decode step is inference-only
    state = inp["initial_states"].float().clone()
    torch.library.opcheck(torch.ops.elastic_kernels.ssd_state_update.default,
                          (state, inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0],
                           inp["D"], None, None, None, True, False, 2, "reference"))


def test_torch_compile_fullgraph():
    inp = make_inputs(batch=2, seqlen=9, nheads=4, ngroups=2)

    def f(x, dt, A, B, C, D, z, dt_bias):
        y = ek.ssd_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, chunk_size=4, dt_softplus=True,
                        head_layout="interleaved", active_heads=2)
        return (y * y).sum()
    assert_compile_matches_eager(f, [inp[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")])


def _bad(**over):
    inp = make_inputs(batch=2, seqlen=5, nheads=4, ngroups=2, initial_states=True)
    inp.update(over)
    return inp


BAD_CALLS = [
    ("x", dict(x=torch.randn(2, 5, 4)), {}),
    ("x", dict(x=torch.randint(0, 3, (2, 5, 4, 8))), {}),
    ("dt", dict(dt=torch.randn(2, 5, 3)), {}),
    ("A", dict(A=torch.randn(3)), {}),
    ("B", dict(B=torch.randn(3, 5, 2, 8)), {}),
    ("C", dict(C=torch.randn(2, 4, 2, 8)), {}),
    ("nheads", dict(B=torch.randn(2, 5, 3, 8), C=torch.randn(2, 5, 3, 8)), {}),
    ("D", dict(D=torch.randn(4, 3)), {}),
    ("z", dict(z=torch.randn(2, 5, 4, 7)), {}),
    ("dt_bias", dict(dt_bias=torch.randn(5)), {}),
    ("initial_states", dict(initial_states=torch.randn(2, 4, 8, 9)), {}),
    ("seq_idx", dict(seq_idx=torch.zeros(2, 5, dtype=torch.int64)), {}),
    ("seq_idx", dict(seq_idx=torch.zeros(2, 6, dtype=torch.int32)), {}),
    ("active_heads", {}, dict(active_heads=3)),
    ("active_heads", {}, dict(active_heads=6)),
    ("active_heads", {}, dict(active_heads=torch.tensor([2, 3]))),
    ("active_heads", {}, dict(active_heads=torch.tensor([2, 2, 2]))),
    ("active_heads", {}, dict(active_heads=torch.tensor([2.0, 2.0]))),
    ("head_scale", {}, dict(head_scale=torch.ones(2, 5))),
    ("chunk_size", {}, dict(chunk_size=0)),
    ("chunk_size", {}, dict(chunk_size=2.5)),
    ("head_layout", {}, dict(head_layout="strided")),
    ("dt_limit", {}, dict(dt_limit=(1.0, 0.5))),
    ("dt_limit", {}, dict(dt_limit=0.5)),
    ("backend", {}, dict(backend="cudnn")),
    ("backend 'cuda'", {}, dict(backend="cuda")),
    ("B is on meta", dict(B=torch.randn(2, 5, 2, 8, device="meta")), {}),
    ("x", dict(x=[1.0]), {}),
]


@pytest.mark.parametrize("needle,over,opts", BAD_CALLS)
def test_bad_calls_name_the_argument(needle, over, opts):
    with pytest.raises((ValueError, TypeError)) as info:
        ek.ssd_scan(**_bad(**over), **opts)
    assert needle in str(info.value)


def test_bad_state_update_calls():
    inp = make_inputs(batch=2, seqlen=1, nheads=4, ngroups=2)
    args = (inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0])
    with pytest.raises(ValueError, match="state"):
        ek.ssd_state_update(torch.zeros(2, 4, 8, 9), *args)
    with pytest.raises(TypeError, match="state"):
        ek.ssd_state_update(torch.zeros(2, 4, 8, 8, dtype=torch.float16), *args)
    with pytest.raises(ValueError, match="active_heads"):
        ek.ssd_state_update(torch.zeros(2, 4, 8, 8), *args, active_heads=1)
