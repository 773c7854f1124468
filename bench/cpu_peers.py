"""CPU path against the best plain-PyTorch peers, every ratio from one interleaved run.

The reference backend (the CPU path, docs/design.md §4) beside the peers docs/design.md §7 names:
Hugging Face transformers' Mamba2 torch path (``mamba2_chunk_scan``), a ``torch._grouped_mm``
MoE formulation (sort by expert, two grouped GEMMs, autograd), bf16 ``F.linear`` on the dense
weight, torchao's ``nvfp4_quantize``. transformers and torchao are bench-only: a row whose peer is
missing is skipped with the reason. One intra-op thread, thread CPU time (``time.thread_time``,
which other load on a shared machine disturbs far less than wall time), the candidates of a row
run interleaved (a, b, a, b, ...) and each figure is a median of ``--reps`` (>= 7) runs, so a
ratio compares timings taken side by side. Absolute times on a shared machine are noise: read
the ratios.

Rows (the ours / peer ratios, then ours-only ratios):

- ``ssd``: ssd_scan fwd and fwd+bwd vs mamba2_chunk_scan, b4 l512 h16 p64 n64 chunk 64, g=1 and
  g=8 (D, dt_bias, softplus; no gate, which the HF function does not take);
- ``ssd_seqlen``: fwd+bwd cost per token at seqlen 8192 over seqlen 512 (b1), and peak memory
  (a fresh process per seqlen: the peak resident memory one fwd+bwd adds, read from the kernel's
  resettable peak-RSS mark): the bytes each added token costs from 8192 to 16384 over those
  from 4096 to 8192 (1 = linear), and the peaks themselves;
- ``moe``: moe_experts fwd and fwd+bwd vs the grouped-GEMM formulation, T 512/2048 x E 16/64 x
  k 2/6, hidden 512, FFN 1024 (relu2);
- ``moe_widths``: per-token widths cycling 25/50/75/100 % (mean 0.625) over full width, and
  d' = F/2 over full (T512 E16 k2), fwd and fwd+bwd (the fwd+bwd rows with the ``floor`` of
  the fresh gradient pages, as the ``widths`` MoE rows below, w the mean width);
- ``nvfp4``: nvfp4_linear (reference, W4A16) over bf16 F.linear on the dense weight, M=1 and
  M=512, N=K=4096; nvfp4.quantize 4096x4096 over torchao nvfp4_quantize;
- ``pair_major``: the MoE reference's two forms of an expert's down projection on this CPU,
  row form ``a_e @ w2[e].T`` over pair-major ``(w2[e] @ a_e.T).T`` (fwd, T512 E64 k2 and k6:
  16 and 48 rows an expert): the reference takes the pair-major form on Intel CPUs only
  (reference/moe.py ``_PAIR_MAJOR_ROWS``); a ratio above 1 on an AMD CPU, or below 1 on an Intel
  one, says that choice is wrong for this machine;
- ``widths``: ssd_scan and moe_experts fwd+bwd at 25/50/75 % width over full (ideal = width).
  The MoE rows also time, interleaved with them, the full-size w1 and w2 gradient buffers
  the op must hand back at any width (the memory :func:`elastic_kernels._memory.zeros` gives:
  a kept mapping cleared, or fresh pages each touched once), and report ``floor`` = w + (1 - w) * that / full:
  the ratio at width w if everything but those pages scaled with the width. Both sweeps report
  ``fixed``: the intercept of the line through their ratios (the share of the full-width time
  that does not scale with the width: the MoE's weight-gradient pages, the SSD's per-group B/C
  work, which every head of a group shares).

Every ratio is printed with ``[low, high]``: a distribution-free interval (>= 95 %) of the median
of the per-round ratios of the interleaved runs, so a ratio at its target shows as "within the
noise" rather than as a pass or a miss.

Usage: ``python bench/cpu_peers.py [--rows ssd,moe,...] [--reps 7] [--json PATH]``; the JSON
(default ``bench/results/cpu_peers.json``) holds every median, ratio, shape and the environment.
Fresh buffers of 32 MB and more (glibc maps them anew on every allocation) cost page faults;
the MoE reference takes its large gradients and saved buffers from mappings it keeps for reuse
once their tensors are gone (huge pages when fresh) and its temporaries from memory each thread
reuses call after call (elastic_kernels/_memory.py), while the peers' buffers come from torch's
allocator. PyTorch's
``THP_MEM_ALLOC_ENABLE=1`` (set before start: transparent huge pages for every large CPU
allocation) changes that for all candidates; the JSON records whether it was set, and the load
average before and after the run (the machine may be shared).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

import elastic_kernels as ek  # noqa: E402
from common import interleaved_medians, median_interval  # noqa: E402

ROWS = ("ssd", "ssd_seqlen", "moe", "moe_widths", "pair_major", "nvfp4", "widths")
WIDTHS = (0.25, 0.5, 0.75)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- SSD -----------------------------------------------------------------------------------

def _ssd_inputs(b, l, h, p, g, n, z=False, seed=0):
    gen = _gen(seed)
    mk = lambda *s, sc=1.0: (torch.randn(*s, generator=gen) * sc).requires_grad_()  # noqa: E731
    inp = dict(x=mk(b, l, h, p), dt=mk(b, l, h, sc=0.5), A=(-torch.rand(h, generator=gen) - 0.1).requires_grad_(),
               B=mk(b, l, g, n, sc=0.3), C=mk(b, l, g, n, sc=0.3), D=mk(h), dt_bias=mk(h, sc=0.1))
    if z:
        inp["z"] = mk(b, l, h, p)
    return inp


def _ssd_ours(inp, bwd, active=None, chunk=64):
    def run():
        y = ek.ssd_scan(**inp, chunk_size=chunk, dt_softplus=True, head_layout="interleaved",
                        active_heads=active, backend="reference")
        if bwd:
            torch.autograd.grad(y, list(inp.values()), torch.ones_like(y))
    return run


def _ssd_hf(inp, bwd, chunk=64):
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    def run():
        y = mamba2_chunk_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk, D=inp["D"],
                              dt_bias=inp["dt_bias"], dt_softplus=True)
        if bwd:
            torch.autograd.grad(y, list(inp.values()), torch.ones_like(y))
    return run


def row_ssd(reps, out):
    if importlib.util.find_spec("transformers") is None:
        return _skip(out, "ssd", "transformers is not installed (pip install transformers)")
    for g in (1, 8):
        inp = _ssd_inputs(4, 512, 16, 64, g, 64)
        with torch.no_grad():  # same inputs, same outputs
            diff = (ek.ssd_scan(**inp, chunk_size=64, dt_softplus=True, backend="reference")
                    - _hf_forward(inp)).abs().max().item()
        for mode, bwd in (("fwd", False), ("fwd+bwd", True)):
            m = interleaved_medians({"ours": _ssd_ours(inp, bwd), "hf": _ssd_hf(inp, bwd)}, reps)
            _add(out, f"ssd_scan {mode} b4 l512 h16 p64 n64 g={g}", m, "ours", "hf",
                 target=0.8, max_abs_diff=diff)


def _hf_forward(inp):
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan
    return mamba2_chunk_scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 64, D=inp["D"],
                             dt_bias=inp["dt_bias"], dt_softplus=True)


def _proc_bytes(key: str) -> int:
    """A ``/proc/self/status`` figure (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _peak_child(seqlen: int) -> None:
    """(child process) print the peak resident memory (bytes) one ssd_scan fwd+bwd at ``seqlen``
    adds to the process: a first call at seqlen 128 loads what every call shares, freed heap
    memory goes back to the system (glibc ``malloc_trim``), the kernel's peak-RSS mark is reset
    (``/proc/self/clear_refs``) and the figure is the new peak minus the resident size before."""
    torch.set_num_threads(1)
    _ssd_ours(_ssd_inputs(1, 128, 16, 64, 8, 64, z=True), True)()
    inp = _ssd_inputs(1, seqlen, 16, 64, 8, 64, z=True)
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _proc_bytes("VmRSS")
    _ssd_ours(inp, True)()
    print(_proc_bytes("VmHWM") - base)


def _peak(seqlen: int) -> int:
    res = subprocess.run([sys.executable, __file__, "--peak-child", str(seqlen)], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(res.stdout.strip().splitlines()[-1])


def row_ssd_seqlen(reps, out):
    short, long_ = (_ssd_inputs(1, n, 16, 64, 8, 64, z=True) for n in (512, 8192))
    m = interleaved_medians({"l8192": _ssd_ours(long_, True), "l512": _ssd_ours(short, True)}, reps)
    per = m.scaled({"l8192": 1 / 8192, "l512": 1 / 512})
    _add(out, "ssd_scan fwd+bwd per token, seqlen 8192 / 512 (b1 h16 p64 n64 g8)", per, "l8192", "l512",
         target=1.25, total_s=dict(m))
    name = "ssd_scan fwd+bwd peak memory: bytes per added token, 8192->16384 / 4096->8192"
    if not (sys.platform.startswith("linux") and os.access("/proc/self/clear_refs", os.W_OK)):
        return _skip(out, name, "needs Linux /proc/self/clear_refs (resettable peak RSS)")
    p = {n: _peak(n) for n in (4096, 8192, 16384)}
    low, high = (p[8192] - p[4096]) / 4096, (p[16384] - p[8192]) / 8192
    out.append(dict(name=name, ratio=high / low, target=1.1, peak_bytes=p,
                    bytes_per_token={"4096->8192": low, "8192->16384": high}))
    _print(out[-1])
    print("  peak MB at seqlen 4096 / 8192 / 16384: " + " / ".join(f"{p[n] / 2**20:.0f}" for n in sorted(p)))


# ---- MoE -----------------------------------------------------------------------------------

def _moe_inputs(t, h, f, e, k, seed=0):
    gen = _gen(seed)
    x = torch.randn(t, h, generator=gen).requires_grad_()
    w1 = (torch.randn(e, f, h, generator=gen) * h ** -0.5).requires_grad_()
    w2 = (torch.randn(e, h, f, generator=gen) * f ** -0.5).requires_grad_()
    tw, ids = ek.moe_route(torch.randn(t, e, generator=gen), k)
    return dict(x=x, topk_weights=tw.detach().requires_grad_(), topk_ids=ids, w1=w1, w2=w2)


def _moe_ours(inp, bwd, width=None):
    def run():
        y = ek.moe_experts(inp["x"], inp["topk_weights"], inp["topk_ids"], inp["w1"], inp["w2"],
                           ffn_width=width, backend="reference")
        if bwd:
            torch.autograd.grad(y, [inp["x"], inp["topk_weights"], inp["w1"], inp["w2"]], torch.ones_like(y))
    return run


def _moe_grouped_mm(inp, bwd):
    """The peer: sort (token, slot) pairs by expert, two torch._grouped_mm calls, autograd."""
    x, tw, ids, w1, w2 = (inp[n] for n in ("x", "topk_weights", "topk_ids", "w1", "w2"))
    t, k = ids.shape

    def run():
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // k
        offs = torch.cumsum(torch.bincount(flat, minlength=w1.shape[0]), 0).to(torch.int32)
        h = torch._grouped_mm(x[tok], w1.transpose(1, 2), offs=offs)
        o = torch._grouped_mm(torch.relu(h).square(), w2.transpose(1, 2), offs=offs)
        y = x.new_zeros(t, x.shape[1]).index_add(0, tok, o * tw.reshape(-1)[order][:, None])
        if bwd:
            torch.autograd.grad(y, [x, tw, w1, w2], torch.ones_like(y))
    return run


def row_moe(reps, out):
    for t in (512, 2048):
        for e in (16, 64):
            for k in (2, 6):
                inp = _moe_inputs(t, 512, 1024, e, k)
                for mode, bwd, target in (("fwd", False, 1.0), ("fwd+bwd", True, 1.2)):
                    m = interleaved_medians({"ours": _moe_ours(inp, bwd), "grouped_mm": _moe_grouped_mm(inp, bwd)},
                                            reps)
                    _add(out, f"moe_experts {mode} T{t} H512 F1024 E{e} k{k}", m, "ours", "grouped_mm",
                         target=target)


def row_moe_widths(reps, out):
    t, f = 512, 1024
    inp = _moe_inputs(t, 512, f, 16, 2)
    mixed = torch.tensor([int(f * (0.25, 0.5, 0.75, 1.0)[i % 4]) for i in range(t)])
    for mode, bwd in (("fwd", False), ("fwd+bwd", True)):
        fns = {"full": _moe_ours(inp, bwd), "mixed": _moe_ours(inp, bwd, mixed), "half": _moe_ours(inp, bwd, f // 2)}
        if bwd:
            fns["grad_pages"] = _grad_pages(inp["w1"], inp["w2"])
        m = interleaved_medians(fns, reps)
        floor = {w: w + (1 - w) * m["grad_pages"] / m["full"] for w in (0.625, 0.5)} if bwd else {}
        _add(out, f"moe_experts {mode} mixed per-token widths (mean 0.625) / full, T512 E16 k2", m, "mixed", "full",
             target=0.75, floor=floor.get(0.625))
        _add(out, f"moe_experts {mode} d'=F/2 / full, T512 E16 k2", m, "half", "full", target=0.6,
             floor=floor.get(0.5))


def row_pair_major(reps, out):
    import elastic_kernels.reference.moe as ref

    chosen = ref.PAIR_MAJOR
    try:
        for k in (2, 6):
            run = _moe_ours(_moe_inputs(512, 512, 1024, 64, k), False)

            def form(pair_major, run=run):
                def timed():
                    ref.PAIR_MAJOR = pair_major
                    run()
                return timed
            m = interleaved_medians({"row": form(False), "pair_major": form(True)}, reps)
            _add(out, f"moe_experts fwd T512 H512 F1024 E64 k{k}, down projection row form / pair-major", m,
                 "row", "pair_major", reference_uses="pair_major" if chosen else "row")
    finally:
        ref.PAIR_MAJOR = chosen
    from elastic_kernels.env import collect
    print(f"  the reference takes the {'pair-major' if chosen else 'row'} form on this CPU "
          f"(vendor {collect()['cpu']['vendor']})")


# ---- NVFP4 ---------------------------------------------------------------------------------

def row_nvfp4(reps, out):
    n = k = 4096
    w = torch.randn(n, k, generator=_gen())
    q = ek.nvfp4.quantize(w)
    wd = q.dequantize(torch.bfloat16)
    for m_rows, target in ((1, 4.0), (512, 1.5)):
        x = torch.randn(m_rows, k, generator=_gen(1)).bfloat16()
        m = interleaved_medians({"ours": lambda: ek.nvfp4_linear(x, q, backend="reference"),
                                 "bf16_linear": lambda: F.linear(x, wd)}, reps)
        _add(out, f"nvfp4_linear W4A16 reference M={m_rows} N={n} K={k}", m, "ours", "bf16_linear", target=target)
    if importlib.util.find_spec("torchao") is None:
        return _skip(out, "nvfp4.quantize vs torchao", "torchao is not installed (pip install torchao)")
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize
    wb = w.bfloat16()
    per_tensor = ek.nvfp4.quantize(wb).global_scale  # torchao's per-tensor scale is the same decode scale g
    m = interleaved_medians({"ours": lambda: ek.nvfp4.quantize(wb, backend="reference"),
                             "torchao": lambda: nvfp4_quantize(wb, 16, per_tensor)}, reps)
    _add(out, "nvfp4.quantize 4096x4096 bf16 (reference) vs torchao nvfp4_quantize", m, "ours", "torchao")


# ---- width sweeps --------------------------------------------------------------------------

def row_widths(reps, out):
    inp = _ssd_inputs(4, 512, 16, 64, 4, 64, z=True)
    fns = {"1.0": _ssd_ours(inp, True)}
    fns.update({str(w): _ssd_ours(inp, True, active=int(16 * w)) for w in WIDTHS})
    m = interleaved_medians(fns, reps)
    fixed = _fixed_fraction(m)
    for w in WIDTHS:
        _add(out, f"ssd_scan fwd+bwd width {w} / full (b4 l512 h16 g4)", m, str(w), "1.0", target=w + 0.1,
             fixed=fixed)
    moe = _moe_inputs(512, 512, 1024, 16, 2)
    fns = {"1.0": _moe_ours(moe, True)}
    fns.update({str(w): _moe_ours(moe, True, int(1024 * w)) for w in WIDTHS})
    fns["grad_pages"] = _grad_pages(moe["w1"], moe["w2"])
    m = interleaved_medians(fns, reps)
    fixed = _fixed_fraction(m)
    for w in WIDTHS:
        _add(out, f"moe_experts fwd+bwd d' {w} / full (T512 E16 k2)", m, str(w), "1.0", target=w + 0.1,
             floor=w + (1 - w) * m["grad_pages"] / m["1.0"], fixed=fixed)


def _fixed_fraction(m) -> float:
    """The part of the full-width time that does not scale with the width: the intercept of the
    least-squares line through (w, time at w / full time) for w in WIDTHS and 1.0 (a width sweep
    whose every cost scaled with the width would give 0; the ratio at w is then about
    fixed + (1 - fixed) * w)."""
    ws = [*WIDTHS, 1.0]
    ys = [m[str(w)] / m["1.0"] for w in ws]
    mw, my = sum(ws) / len(ws), sum(ys) / len(ys)
    slope = sum((w - mw) * (y - my) for w, y in zip(ws, ys)) / sum((w - mw) ** 2 for w in ws)
    return my - slope * mw


def _grad_pages(*weights):
    """Zero memory of every weight's shape from :func:`elastic_kernels._memory.zeros`, each 4 KB
    page touched once: what handing back full-size gradients costs at any width, beside the
    writes of the active prefix."""
    from elastic_kernels._memory import zeros

    def run():
        for w in weights:
            zeros(w.shape, w.dtype, w.device).view(-1)[::1024].zero_()
    return run


# ---- report --------------------------------------------------------------------------------

def _add(out, name, medians, num, den, target=None, **extra):
    """A row: ``ratio`` = median of ``num`` / median of ``den`` (the figure the targets are about)
    and, from the interleaved rounds, ``ratio_interval``: a distribution-free interval (coverage
    ``interval_coverage``, >= 95 % from 7 rounds) of the median of the per-round ratios, each
    taken side by side, so that a ratio near its target reads as inside or outside the noise."""
    row = dict(name=name, ratio=medians[num] / medians[den], ratio_of=f"{num} / {den}", target=target,
               medians_s=dict(medians), **extra)
    rounds = getattr(medians, "rounds", None)
    if rounds is not None:
        lo, hi, cov = median_interval([a / b for a, b in zip(rounds[num], rounds[den])])
        row.update(ratio_interval=[lo, hi], interval_coverage=cov, rounds_s=rounds)
    out.append(row)
    _print(row)


def _skip(out, name, reason):
    out.append(dict(name=name, skipped=reason))
    _print(out[-1])


def _print(row):
    if "skipped" in row:
        print(f"{row['name']:<78} skipped: {row['skipped']}", flush=True)
        return
    iv = row.get("ratio_interval")
    span = "" if iv is None else f" [{iv[0]:.2f}, {iv[1]:.2f}]"
    tgt = ""
    if row.get("target") is not None:
        t = row["target"]
        verdict = "" if row["ratio"] <= t else ", MISSED"
        if iv is not None and iv[0] <= t <= iv[1]:
            verdict += ", within the noise"
        tgt = f"(target <= {t:.2f}{verdict})"
    floor = "" if row.get("floor") is None else f" floor {row['floor']:.2f}"
    fixed = "" if row.get("fixed") is None else f" fixed {row['fixed']:.2f}"
    print(f"{row['name']:<78} {row['ratio']:6.2f}{span}  {row.get('ratio_of', '')} {tgt}{floor}{fixed}", flush=True)


def _verdict(row) -> str:
    """``holds`` / ``misses`` against the row's target, ``(within the noise)`` when the
    interval holds the target; empty without a target."""
    t, iv = row.get("target"), row.get("ratio_interval")
    if t is None:
        return ""
    noise = " (within the noise)" if iv is not None and iv[0] <= t <= iv[1] else ""
    return ("holds" if row["ratio"] <= t else "misses") + noise


def table(results: dict) -> str:
    """The markdown table of a results JSON (``--table``): a header line naming the run, then one
    row per result with its ratio, interval, target, verdict and floor / fixed share."""
    cpu = results["env"].get("cpu", {})
    load = results.get("loadavg_1min", {})
    lines = [f"Run: {results['date'][:16]}, {cpu.get('model', '?')}, {cpu.get('cpus', '?')} CPUs, "
             f"flags {', '.join(cpu.get('flags', [])) or 'none recorded'}; {results['reps']} interleaved rounds, "
             f"1 thread, thread CPU time; load average {load.get('start', 0):.2f} -> {load.get('end', 0):.2f}.", "",
             "| row | ratio | interval (coverage) | target | verdict | floor / fixed |",
             "|---|---|---|---|---|---|"]
    for r in results["results"]:
        if "skipped" in r:
            lines.append(f"| {r['name']} | | | | skipped: {r['skipped']} | |")
            continue
        iv = r.get("ratio_interval")
        span = "" if iv is None else f"[{iv[0]:.2f}, {iv[1]:.2f}] ({r['interval_coverage']:.0%})"
        target = "" if r.get("target") is None else f"<= {r['target']:.2f}"
        extra = " / ".join(f"{k} {r[k]:.2f}" for k in ("floor", "fixed") if r.get(k) is not None)
        lines.append(f"| {r['name']} | {r['ratio']:.2f} | {span} | {target} | {_verdict(r)} | {extra} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--reps", type=int, default=7, help="timed runs per candidate (>= 7)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "cpu_peers.json"))
    ap.add_argument("--table", metavar="JSON", help="print the markdown table of a results JSON and exit")
    ap.add_argument("--peak-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    if args.peak_child:
        _peak_child(args.peak_child)
        return 0
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad or args.reps < 7:
        ap.error(f"--rows must name {ROWS}, got {bad}" if bad else f"--reps must be >= 7, got {args.reps}")
    torch.set_num_threads(1)
    load0 = os.getloadavg()[0]
    out: list = []
    for r in rows:
        globals()[f"row_{r}"](args.reps, out)
    from elastic_kernels.env import collect
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    allocator = {k: os.environ.get(k) for k in ("THP_MEM_ALLOC_ENABLE", "MALLOC_MMAP_THRESHOLD_")}
    path.write_text(json.dumps({"date": str(datetime.datetime.now()), "env": collect(), "threads": 1,
                                "allocator_env": allocator, "loadavg_1min": {"start": load0, "end": os.getloadavg()[0]},
                                "timer": "time.thread_time, interleaved, median", "reps": args.reps,
                                "results": out}, indent=1, default=str))
    print(f"results: {path} (load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
