r"""The launch sets that :mod:`elastic_kernels.triton.aot` compiles: every Triton launcher called
with fake CUDA inputs, so that the launcher itself picks each kernel's GPU configuration.

Inputs follow each op's documented argument space (``elastic_kernels.ops``). The check's set,
per dtype (fp32, bf16, fp16): a *base* variant (the reference model's call), every optional
argument at its last listed value at once ("all-on"), and in bf16 the model's other calls (the
defaults). ``full=True`` (``--full``) adds, in bf16, every other value of every optional argument
applied to the base alone (one factor at a time) and all at their first value ("all-off"). The
full product of the optional arguments is far larger (thousands of flag combinations per kernel);
the flags gate elementwise prologue/epilogue work inside one tile shape, while the tile shapes,
warps, stages and dot precisions (what registers, shared memory and the MMA lowering follow) come
from the launchers' GPU configuration functions and are all covered.

Shapes are the benchmark shapes of bench/ on a GPU (the Nemotron Nano v3 sizes: hidden 2688,
64 Mamba heads of 64 channels, state 128, chunk 128, 128 experts of FFN 1856, top-6). A variant is
a *default* when it is the reference model's own call at those shapes in bf16 (the check requires
0 spills there).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from . import moe as tmoe
from . import nvfp4 as tnv
from . import ssd as tssd

@dataclasses.dataclass
class Launch:
    """One intercepted ``kernel[grid](*args, **kwargs)`` call (tensors replaced by MockTensors)."""

    case: str
    default: bool
    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple


def _mock(a):
    from triton.runtime.jit import MockTensor
    if isinstance(a, torch.Tensor):
        return MockTensor(a.dtype)
    if isinstance(a, tuple):
        return tuple(_mock(v) for v in a)
    return a


def _grid(grid, kwargs) -> tuple:
    g = grid(kwargs) if callable(grid) else grid
    return tuple(int(v) for v in g)


@contextlib.contextmanager
def intercept(case: str, default: bool, sink: list):
    """Within the block, Triton kernel launches append a :class:`Launch` to ``sink`` instead of
    running, and new tensors are fake (create them on ``device="cuda"``; no GPU is needed)."""
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        sink.append(Launch(case, default, self, tuple(_mock(a) for a in args), dict(kwargs),
                           _grid(grid, kwargs)))

    saved = JITFunction.run
    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = saved



DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEV = "meta"

# bench/bench_ssd.py SHAPES["cuda"], bench/bench_moe.py SHAPES["train"/"decode"],
# bench/bench_nvfp4.py GPU_SHAPES (the benchmarks are not imported: bench/ sits above the package)
SSD_SHAPE = dict(batch=8, seqlen=4096, nheads=64, headdim=64, ngroups=8, dstate=128, chunk=128)
MOE_SHAPES = {"train": dict(tokens=16384, hidden=2688, ffn=1856, experts=128, top_k=6),
              "decode": dict(tokens=16, hidden=2688, ffn=1856, experts=128, top_k=6)}
NVFP4_MS = (1, 4, 16, 4096)
NVFP4_NK = ((2688, 1856), (1856, 2688), (8192, 8192))


def variants(base: dict, factors: dict, full: bool = True, keep=()) -> list[tuple[str, dict]]:
    """(name, variant): the base, all factors at their last value ("all-on") and the one-factor
    variants named in ``keep``; with ``full`` also every other value of each factor alone and all
    factors at their first value ("all-off"); duplicates dropped."""
    out = [("base", dict(base))]
    for name, values in factors.items():
        for v in values:
            if v != base[name] and (full or f"{name}={v}" in keep):
                out.append((f"{name}={v}", dict(base, **{name: v})))
    out.append(("all-on", dict(base, **{k: vs[-1] for k, vs in factors.items()})))
    if full:
        out.append(("all-off", dict(base, **{k: vs[0] for k, vs in factors.items()})))
    seen, uniq = set(), []
    for name, v in out:
        key = tuple(sorted(v.items()))
        if key not in seen:
            seen.add(key)
            uniq.append((name, v))
    return uniq


def _empty(*shape, dtype):
    return torch.empty(*shape, device=DEV, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# ssd_scan (forward and backward launchers)
# ---------------------------------------------------------------------------------------------

SSD_BASE = dict(D="h", z=False, dt_bias=True, softplus=True, clamp=False, init=False, seq_idx=False,
                width="none", head_scale=False, layout="interleaved")
SSD_FACTORS = dict(D=["none", "h", "hp"], z=[False, True], dt_bias=[False, True], softplus=[False, True],
                   clamp=[False, True], init=[False, True], seq_idx=[False, True],
                   width=["none", "int", "tensor"], head_scale=[False, True], layout=["blocked", "interleaved"])
# the reference model (models/layers.py ElasticMamba2Mixer): D, dt_bias, softplus, interleaved; per-sample
# widths and head_scale while training the router
SSD_DEFAULTS = ("base", "width=tensor", "head_scale=True", "width=int")


def _ssd_call(v: dict, dtype, chunk: int):
    s = dict(SSD_SHAPE, chunk=chunk)
    b, l, h, p, g, n = (s[k] for k in ("batch", "seqlen", "nheads", "headdim", "ngroups", "dstate"))
    f32 = torch.float32
    x, z = _empty(b, l, h, p, dtype=dtype), _empty(b, l, h, p, dtype=dtype) if v["z"] else None
    dt, A = _empty(b, l, h, dtype=dtype), _empty(h, dtype=f32)
    B, C = _empty(b, l, g, n, dtype=dtype), _empty(b, l, g, n, dtype=dtype)
    D = {"none": None, "h": _empty(h, dtype=dtype), "hp": _empty(h, p, dtype=dtype)}[v["D"]]
    active_int, active_t = {"none": (-1, None), "int": (h // 2, None),
                            "tensor": (-1, _empty(b, dtype=torch.int64))}[v["width"]]
    kw = dict(chunk_size=s["chunk"], D=D, z=z, dt_bias=_empty(h, dtype=dtype) if v["dt_bias"] else None,
              dt_softplus=v["softplus"], dt_lo=0.0, dt_hi=0.1 if v["clamp"] else float("inf"),
              initial_states=_empty(b, h, p, n, dtype=f32) if v["init"] else None,
              seq_idx=_empty(b, l, dtype=torch.int32) if v["seq_idx"] else None,
              interleaved=v["layout"] == "interleaved", active_int=active_int, active_t=active_t,
              head_scale=_empty(b, h, dtype=dtype) if v["head_scale"] else None)
    tssd.ssd_scan_fwd(x, dt, A, B, C, **kw)
    kw.pop("dt_lo"), kw.pop("dt_hi")
    tssd.ssd_scan_bwd(_empty(b, l, h, p, dtype=dtype), _empty(b, h, p, n, dtype=f32), x, dt, A, B, C,
                      dt_lo=0.0, dt_hi=0.1 if v["clamp"] else float("inf"), **kw)


def ssd_cases(full: bool = False):
    """(case name, default, thunk) for every ssd_scan variant, dtype and chunk length."""
    for dname, dtype in DTYPES.items():
        for chunk in (SSD_SHAPE["chunk"],):
            for name, v in variants(SSD_BASE, SSD_FACTORS, full and dname == "bf16",
                                    SSD_DEFAULTS if dname == "bf16" else ()):
                default = dname == "bf16" and name in SSD_DEFAULTS
                yield f"{dname}:ssd:chunk{chunk}:{name}", default, lambda v=v, d=dtype, c=chunk: _ssd_call(v, d, c)


# ---------------------------------------------------------------------------------------------
# moe_experts (forward and backward launchers)
# ---------------------------------------------------------------------------------------------

MOE_BASE = dict(act="relu2", gated=False, width="none", cs="none", quant=False)
MOE_FACTORS = dict(act=["relu2", "silu", "gelu"], gated=[False, True], width=["none", "int", "tensor"],
                   cs=["none", "f", "tf"], quant=[False, True])
# the reference model (models/layers.py ElasticMoE): relu2 experts, nested int widths, per-token widths
# and channel scales while training the router, NVFP4 experts when serving a quantized checkpoint
# (forward only: NVFP4 weights are frozen)
MOE_DEFAULTS = ("base", "width=int", "width=tensor", "cs=f", "cs=tf", "quant=True")


def _nvfp4_weight(e, n, k):
    from ..formats.nvfp4 import NVFP4Tensor
    return NVFP4Tensor(_empty(e, n, k // 2, dtype=torch.uint8), _empty(e, n, k // 16, dtype=torch.float8_e4m3fn),
                       _empty(e, dtype=torch.float32))


def _moe_call(v: dict, dtype, shape: str, passes=("fwd", "bwd")):
    s = MOE_SHAPES[shape]
    t, hd, f, e, k = (s[n] for n in ("tokens", "hidden", "ffn", "experts", "top_k"))
    x = _empty(t, hd, dtype=dtype)
    tw, ids = _empty(t, k, dtype=dtype), _empty(t, k, dtype=torch.int64)
    if v["quant"]:
        w1, w2 = _nvfp4_weight(e, f, hd), _nvfp4_weight(e, hd, f)
        w3 = _nvfp4_weight(e, f, hd) if v["gated"] else None
    else:
        w1, w2 = _empty(e, f, hd, dtype=dtype), _empty(e, hd, f, dtype=dtype)
        w3 = _empty(e, f, hd, dtype=dtype) if v["gated"] else None
    width_int, width_t = {"none": (-1, None), "int": (f // 2 // 16 * 16, None),
                          "tensor": (-1, _empty(t, dtype=torch.int64))}[v["width"]]
    cs = {"none": None, "f": _empty(f, dtype=dtype), "tf": _empty(t, f, dtype=dtype)}[v["cs"]]
    kw = dict(activation=v["act"], num_active=e, width_int=width_int, width_t=width_t, channel_scale=cs)
    if "fwd" in passes:
        tmoe.moe_experts_fwd(x, tw, ids, w1, w2, w3, **kw)
    if "bwd" in passes:
        tmoe.moe_experts_bwd(_empty(t, hd, dtype=dtype), x, tw, ids, w1, w2, w3, **kw)


def moe_cases(full: bool = False):
    for dname, dtype in DTYPES.items():
        for shape in MOE_SHAPES:
            if shape == "decode" and dname != "bf16":
                continue  # the decode tiles differ from the training ones by rows per expert only
            vs = variants(MOE_BASE, MOE_FACTORS, full and dname == "bf16" and shape == "train",
                          MOE_DEFAULTS if dname == "bf16" and shape == "train" else ())
            if shape == "decode":
                vs.append(("quant=True", dict(MOE_BASE, quant=True)))
            for name, v in vs:
                for p in ("fwd", "bwd"):
                    default = dname == "bf16" and name in MOE_DEFAULTS and (p, name) != ("bwd", "quant=True")
                    yield (f"{dname}:moe:{shape}:{p}:{name}", default,
                           lambda v=v, d=dtype, sh=shape, p=p: _moe_call(v, d, sh, (p,)))


# ---------------------------------------------------------------------------------------------
# NVFP4: quantize / fake quant / scaled activation, W4A16 and W4A4 linear
# ---------------------------------------------------------------------------------------------

def _nvfp4_quant_call(dtype, n, k, mode):
    x, g = _empty(n, k, dtype=dtype), _empty(1, dtype=torch.float32)
    {0: lambda: tnv.quantize(x, _empty(n, dtype=torch.float32), 1), 1: lambda: tnv.fake_quant(x, g),
     2: lambda: tnv.scaled_activation(x, g)}[mode]()


def _nvfp4_linear_call(dtype, m, n, k, bias, gx):
    x = _empty(m, k, dtype=dtype)
    tnv.linear(x, _empty(n, k // 2, dtype=torch.uint8), _empty(n, k // 16, dtype=torch.float8_e4m3fn),
               _empty(1, dtype=torch.float32), _empty(n, dtype=dtype) if bias else None,
               _empty(1, dtype=torch.float32) if gx else None)


def nvfp4_cases(full: bool = False):
    """Quantize in every mode (bf16: at each of its K block widths); the linear at every benchmark shape
    with the model's flags (no bias, W4A16) and every bias / W4A4 flag pair at a decode and a
    prefill M (bf16; fp32 and fp16 at one N x K)."""
    for dname, dtype in DTYPES.items():
        for n, k in ((8192, 8192), (64, 16), (64, 32)) if dname == "bf16" else ((8192, 8192),):
            for mode in (0, 1, 2):  # K = 16 and 32 take the narrow quantize blocks
                yield (f"{dname}:nvfp4:quantize:mode{mode}:{n}x{k}", dname == "bf16" and k > 32,
                       lambda d=dtype, n=n, k=k, mode=mode: _nvfp4_quant_call(d, n, k, mode))
        shapes = NVFP4_NK if dname == "bf16" and full else NVFP4_NK[:1]
        for m in NVFP4_MS:
            for n, k in shapes:
                flags = ((False, False), (True, False), (False, True), (True, True)) \
                    if (m in (16, 4096) and (n, k) == NVFP4_NK[0]) else ((False, False),)
                for bias, gx in flags:
                    yield (f"{dname}:nvfp4:linear:M{m}:{n}x{k}:bias={bias}:gx={gx}",
                           dname == "bf16" and not bias and not gx,
                           lambda d=dtype, m=m, n=n, k=k, b=bias, g=gx: _nvfp4_linear_call(d, m, n, k, b, g))


FAMILIES = {"ssd": ssd_cases, "moe": moe_cases, "nvfp4": nvfp4_cases}


def capture_all(families=None, full: bool = False) -> list:
    """Every launch of every case of the chosen families (all by default); ``full`` adds the
    one-factor-at-a-time variants (bf16) to the check's set (base, all-on, defaults)."""
    launches: list = []
    for fam in families or FAMILIES:
        for case, default, thunk in FAMILIES[fam](full):
            with intercept(case, default, launches):
                thunk()
    return launches


MODULES = {"ssd": tssd, "moe": tmoe, "nvfp4": tnv}


def coverage(launches: list, families=None) -> dict:
    """Which kernels of the families' Triton modules were launched; every ``@triton.jit`` kernel
    (named ``*_kernel``) must be, or ``missing`` names it."""
    from triton.runtime.jit import JITFunction
    launched = {ln.kernel.__name__ for ln in launches}
    kernels = {name for fam in families or FAMILIES for name, obj in vars(MODULES[fam]).items()
               if isinstance(obj, JITFunction) and name.endswith("_kernel")}
    return dict(launched=sorted(launched), missing=[f"kernel never launched by any case: {k}"
                                                    for k in sorted(kernels - launched)])
