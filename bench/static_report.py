"""The static GPU report (no GPU needed): ``python bench/static_report.py``.

1. Every Triton launch configuration compiled for sm_90a and sm_80
   (:mod:`elastic_kernels.triton.aot`): registers, spills, shared memory, occupancy, MMA lowering.
2. The CUDA C++ kernels of csrc/ compiled with ``nvcc -Xptxas -v`` for the same two targets.
3. Per benchmark shape of bench/ (the ``cost`` functions the benchmarks record), the bytes and
   FLOPs each op must move and do and its lower-bound time at the H200 ceilings: GPU timings are
   read against that bound.

Writes ``bench/results/aot_<date>.json`` and regenerates the generated part of
``bench/RESULTS.md`` (between its ``aot:begin`` / ``aot:end`` markers). Exit status 1 when the
compile check fails (as ``python -m elastic_kernels.triton.aot``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench_moe  # noqa: E402
import bench_nvfp4  # noqa: E402
import bench_ssd  # noqa: E402

from elastic_kernels.triton import aot, aot_cases  # noqa: E402

# H200 ceilings the GPU timings are read against (HBM3e bandwidth, dense bf16 tensor-core rate)
HBM_BPS = 4.8e12
BF16_FLOPS = 790e12
BEGIN, END = "<!-- aot:begin -->", "<!-- aot:end -->"


def check_shapes() -> None:
    """The AOT launch sets compile the benchmarks' GPU shapes: fail loudly if they drift."""
    pairs = [("bench_ssd.SHAPES['cuda']", bench_ssd.SHAPES["cuda"], aot_cases.SSD_SHAPE),
             ("bench_moe.SHAPES['train']", bench_moe.SHAPES["train"], aot_cases.MOE_SHAPES["train"]),
             ("bench_moe.SHAPES['decode']", bench_moe.SHAPES["decode"], aot_cases.MOE_SHAPES["decode"]),
             ("bench_nvfp4.GPU_SHAPES", tuple(bench_nvfp4.GPU_SHAPES), aot_cases.NVFP4_NK)]
    for name, bench, compiled in pairs:
        if bench != compiled:
            raise SystemExit(f"{name} = {bench} but elastic_kernels.triton.aot_cases compiles {compiled}: "
                             "update aot_cases so the report describes the benchmarked configurations")


# ---------------------------------------------------------------------------------------------
# CUDA C++ (csrc/)
# ---------------------------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")


def csrc_rows() -> list[dict]:
    """ptxas -v of every csrc/*.cu kernel for sm_90a and sm_80, the flags CMakeLists.txt builds with."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    rows = []
    for cu in sorted((ROOT / "csrc").glob("*.cu")):
        for arch in ("90a", "80"):
            with tempfile.TemporaryDirectory() as d:
                res = subprocess.run([nvcc, "-c", "-std=c++17", "-DEK_WITH_CUDA=1", "--expt-relaxed-constexpr",
                                      "-lineinfo", f"-I{ROOT / 'csrc'}",
                                      f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
                                      str(cu), "-o", str(Path(d) / "k.o")], capture_output=True, text=True)
            if res.returncode:
                rows.append(dict(file=cu.name, arch=f"sm_{arch}", error=res.stderr[-2000:]))
                continue
            for block in re.split(r"(?=ptxas info\s+: Compiling entry function)", res.stderr):
                m = _ENTRY.search(block)
                if not m or "Used" not in block:
                    continue
                st = aot.parse_ptxas(block)
                name = subprocess.run(["c++filt", m.group(1)], capture_output=True, text=True).stdout.strip() \
                    if shutil.which("c++filt") else m.group(1)
                rows.append(dict(file=cu.name, arch=m.group(2), kernel=_short(name), **st))
    return rows


def _short(name: str) -> str:
    """'void ek::(anonymous namespace)::k<__nv_bfloat16, 2>(ek::Args, long)' -> 'k<__nv_bfloat16, 2>'."""
    name = re.sub(r"^void ", "", name).replace("(anonymous namespace)::", "").replace("ek::", "")
    return re.sub(r"\([^()]*\)$", "", name)


# ---------------------------------------------------------------------------------------------
# roofline of every benchmark shape
# ---------------------------------------------------------------------------------------------

def roofline_rows() -> list[dict]:
    """(benchmark, shape, point, bytes, FLOPs, lower bound) from each benchmark's cost function."""
    rows = []

    def add(bench, shape, point, nbytes, flops):
        t_mem, t_flop = nbytes / HBM_BPS, flops / BF16_FLOPS
        rows.append(dict(bench=bench, shape=shape, point=point, bytes=nbytes, flops=flops,
                         intensity=flops / nbytes if nbytes else float("inf"), t_mem_us=t_mem * 1e6,
                         t_flop_us=t_flop * 1e6, bound_us=max(t_mem, t_flop) * 1e6,
                         limit="HBM" if t_mem >= t_flop else "MMA"))

    s = bench_ssd.SHAPES["cuda"]
    shape = ",".join(f"{k}={v}" for k, v in s.items())
    for mode, mult in (("fwd", 1), ("fwd+bwd", 3)):
        for w in bench_ssd.WIDTHS:
            by, fl = bench_ssd.cost(s, w, 2)
            add(f"bench_ssd_scan {mode}", shape, f"width {w:.0%}", by * mult, fl * mult)
    for sname in ("train", "decode"):
        s = bench_moe.SHAPES[sname]
        shape = ",".join(f"{k}={v}" for k, v in s.items())
        modes = (("fwd", 1), ("fwd+bwd", 3)) if sname == "train" else (("fwd", 1),)
        for mode, mult in modes:
            for w in bench_moe.WIDTHS:
                by, fl = bench_moe.cost(s, w * s["ffn"], s["experts"], 2)
                add(f"bench_moe d' {mode} ({sname})", shape, f"d' {w:.0%}", by * mult, fl * mult)
            if sname == "train":
                for w in bench_moe.WIDTHS:
                    n_act = max(s["top_k"], int(s["experts"] * w))
                    by, fl = bench_moe.cost(s, s["ffn"], n_act, 2)
                    add(f"bench_moe E' {mode}", shape, f"E' {n_act}", by * mult, fl * mult)
        for w in (0.5, 1.0):
            d = int(s["ffn"] * w) // 16 * 16
            by, fl = bench_moe.cost(s, d, s["experts"], 2, w_elem=bench_moe.NVFP4_BYTES)
            add(f"bench_moe_nvfp4 fwd ({sname})", shape, f"d' {w:.0%}", by, fl)
    for m in (1, 4, 16, 4096):
        for n, k in bench_nvfp4.GPU_SHAPES:
            by, by_bf16, fl = bench_nvfp4.linear_cost(m, n, k)
            add("bench_nvfp4_linear W4A16", f"M={m},N={n},K={k}", "", by, fl)
            add("bf16 x @ w.T baseline", f"M={m},N={n},K={k}", "", by_bf16, fl)
    add("bench_nvfp4_quantize", "8192x8192", "scale=given", bench_nvfp4.quantize_bytes(8192, 8192), 0)
    return rows


# ---------------------------------------------------------------------------------------------
# RESULTS.md
# ---------------------------------------------------------------------------------------------

def _si(v: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}"


def markdown(report: dict, csrc: list[dict], roof: list[dict]) -> str:
    out = [BEGIN, "", f"Generated by `python bench/static_report.py` on {report['date']} "
           f"(triton {report['triton']}, torch {report['torch']}, ptxas of Triton's wheel; no GPU).", ""]
    out += ["### Triton kernels: compiled configurations", "",
            "Each row: one kernel, target, dtype and tile configuration (block sizes, warps, stages); "
            "`configs` counts the flag combinations compiled with it (`default`: how many of them the "
            "reference model runs at the benchmark shapes); registers, spills and shared memory are "
            "the worst case over those combinations, occupancy the lowest (resident blocks and the "
            "fraction of the SM's 64 warps; H100/H200 limits for sm_90a, A100 for sm_80). `dots`: "
            "operand types of the kernel's `tl.dot`s (f32/tf32, f32/ieee: fp32 operands); "
            "`lowering`: how many became warp-group MMA (`wgmma`), `mma.sync` or FMA loops.", ""]
    out += aot.table(report["rows"], markdown=True)
    out += ["", "Compiled configurations per kernel and target:", "", "| kernel | sm_90a | sm_80 |", "|---|---|---|"]
    for k, c in sorted(report["counts"].items()):
        out.append(f"| {k} | {c.get('sm_90', 0)} | {c.get('sm_80', 0)} |")
    out += ["", f"{report['compiled']} compiles from {report['launches']} captured launches in "
            f"{report['wall_s']:.0f} s ({report['workers']} processes).", ""]
    if report["problems"]:
        out += ["Problems:", ""] + [f"- {p}" for p in report["problems"]] + [""]
    out += ["### CUDA C++ kernels (csrc/, nvcc -Xptxas -v)", "",
            "| file | kernel | arch | regs | spill B (st/ld) | stack B | static smem B |",
            "|---|---|---|---|---|---|---|"]
    for r in csrc:
        if "error" in r:
            out.append(f"| {r['file']} | compile error | {r['arch']} | | | | |")
        else:
            out.append(f"| {r['file']} | `{r['kernel']}` | {r['arch']} | {r['regs']} | "
                       f"{r['spill_stores']}/{r['spill_loads']} | {r['stack']} | {r['static_smem']} |")
    out += ["", f"### Roofline lower bounds at H200 ceilings (HBM {HBM_BPS / 1e12:.1f} TB/s, "
            f"{BF16_FLOPS / 1e12:.0f} TFLOP/s dense bf16)", "",
            "Bytes and FLOPs are the benchmarks' own `cost` formulas (bench/bench_*.py docstrings); "
            "bound = max(bytes / HBM, FLOPs / MMA rate).", "",
            "| benchmark | shape | point | bytes | FLOPs | FLOP/B | HBM µs | MMA µs | bound µs | limit |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in roof:
        out.append(f"| {r['bench']} | {r['shape']} | {r['point']} | {_si(r['bytes'], 'B')} | "
                   f"{_si(r['flops'], 'FLOP')} | {r['intensity']:.1f} | {r['t_mem_us']:.1f} | {r['t_flop_us']:.1f} | {r['bound_us']:.1f} | "
                   f"{r['limit']} |")
    out += ["", END]
    return "\n".join(out)


def write_results_md(text: str, path: Path) -> None:
    """Replace the generated block of RESULTS.md (append it when the markers are absent)."""
    old = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/static_report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    p.add_argument("--cache-dir", default=os.environ.get("ELASTIC_KERNELS_AOT_CACHE",
                                                         str(Path.home() / ".cache" / "elastic_kernels" / "aot")))
    p.add_argument("--full", action="store_true", help="the larger variant set (see elastic_kernels.triton.aot)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder of the JSON report")
    p.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs: expected >= 1, got {args.jobs}")
    check_shapes()
    report = aot.run(None, aot.ARCHS, args.jobs, args.cache_dir or None, args.full)
    report.update(date=str(datetime.date.today()), workers=args.jobs, full=args.full)
    csrc, roof = csrc_rows(), roofline_rows()
    print("\n".join(aot.table(report["rows"])))
    out = Path(args.out) / f"aot_{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(report, csrc=csrc, roofline=roof, ceilings=dict(hbm_Bps=HBM_BPS,
                                                                                  bf16_flops=BF16_FLOPS)),
                              indent=1, default=str))
    write_results_md(markdown(report, csrc, roof), Path(args.results_md))
    print(f"wrote {out} and {args.results_md}")
    for msg in report["problems"]:
        print(f"FAIL {msg}")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
