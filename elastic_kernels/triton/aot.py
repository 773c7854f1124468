r"""Ahead-of-time compilation of the Triton kernels for NVIDIA GPUs, without a GPU.

The launchers of :mod:`elastic_kernels.triton.ssd`, :mod:`~elastic_kernels.triton.moe` and
:mod:`~elastic_kernels.triton.nvfp4` are run on fake CUDA tensors
(``torch._subclasses.FakeTensorMode``: shapes, dtypes and the ``cuda`` device, no data), so every
branch a launcher takes on a GPU (block sizes, warps, stages, dot precision, constexpr flags) is
its own choice, not a copied list. Each ``kernel[grid](...)`` launch is intercepted before the
driver is touched and bound with Triton's own launch binder for the target (the signature, the
constexprs and the divisibility attributes Triton would use at run time, with pointers assumed
16-byte aligned as PyTorch allocates them). The binding is then compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` to TTGIR, PTX and a cubin,
and ``ptxas -v`` (the flags Triton uses) reports registers, spills and shared memory.

Launch sets (:mod:`elastic_kernels.triton.aot_cases`) name which launches are *defaults*: the
configurations the reference model runs at the benchmark shapes; a spill there is an error.

    resources per compiled kernel: registers/thread, spill stores/loads (bytes), static and
    dynamic shared memory, threads/block, blocks and warps per SM (occupancy bound), and each
    ``tt.dot``'s lowering: warp-group MMA (``wgmma``) on sm_90a, ``mma.sync`` on sm_80, or FMA.

``python -m elastic_kernels.triton.aot`` prints the table and writes JSON; exit status 1 when a
kernel fails to compile or a default configuration spills (the CI check), 2 on a usage error.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import logging
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ARCHS = (90, 80)  # sm_90a (H100/H200), sm_80 (A100)

# Per-SM limits (CUDA programming guide, compute capability table): registers, threads, warps,
# resident blocks, shared memory per SM and per block (bytes), the 1 KiB the driver reserves per
# block, and the register allocation unit (per warp).
SM_LIMITS = {
    90: dict(device="H100/H200", regs=65536, threads=2048, warps=64, blocks=32,
             smem_sm=228 * 1024, smem_block=227 * 1024, smem_reserved=1024, reg_unit=256),
    80: dict(device="A100", regs=65536, threads=2048, warps=64, blocks=32,
             smem_sm=164 * 1024, smem_block=163 * 1024, smem_reserved=1024, reg_unit=256),
}


@dataclasses.dataclass
class Job:
    """A launch bound for one target: what ``triton.compile`` gets (picklable)."""

    module: str
    name: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    cases: list
    default: bool
    grid: tuple

    def key(self) -> str:
        blob = repr((self.module, self.name, self.arch, sorted(self.signature.items()),
                     sorted(self.constexprs.items()), sorted(self.attrs.items()),
                     sorted((k, repr(v)) for k, v in self.options.items())))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def bind(launch, arch: int) -> Job:
    """Bind a launch (:class:`~elastic_kernels.triton.aot_cases.Launch`) exactly as
    ``JITFunction.run`` does for the target ``sm_<arch>``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = launch.kernel
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{getattr(fn, '__name__', fn)} is not a JITFunction (TRITON_INTERPRET is set?): "
                        "AOT compilation needs the GPU code path")
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(launch.kwargs, debug=False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return Job(fn.fn.__module__, fn.__name__, arch, signature, constexprs, attrs,
               dict(options.__dict__), [launch.case], launch.default, launch.grid)


def jobs_for(launches: list, archs=ARCHS) -> list[Job]:
    """Distinct compile jobs of the launches for every arch (cases of one binding merged)."""
    out: dict[str, Job] = {}
    for launch in launches:
        for arch in archs:
            job = bind(launch, arch)
            k = job.key()
            if k in out:
                if launch.case not in out[k].cases:
                    out[k].cases.append(launch.case)
                out[k].default |= launch.default
            else:
                out[k] = job
    return list(out.values())


# ---------------------------------------------------------------------------------------------
# compile (worker side)
# ---------------------------------------------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_TTIR_DOT_TYPES = re.compile(r": tensor<[\dx]+x(\w+)(?:,[^>]*)?> \* tensor<[\dx]+x(\w+)")
_TTIR_PREC = re.compile(r"inputPrecision = (\w+)")


def _ptxas_stats(ptx: str, arch: int, fp_fusion: bool) -> dict:
    """``ptxas -v`` with the flags Triton compiles with (when its own log is not at hand)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               *([] if fp_fusion else ["--fmad=false"]), f"--gpu-name={sm_arch_from_capability(arch)}",
               str(src), "-o", str(Path(d) / "k.o")]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return parse_ptxas(res.stderr + res.stdout)


def parse_ptxas(text: str) -> dict:
    """Registers, stack, spill stores/loads and static smem (bytes) from a ``ptxas -v`` log."""
    spill = _PTXAS_SPILL.search(text)
    smem = _PTXAS_SMEM.search(text)
    return dict(regs=int(_PTXAS_REGS.search(text).group(1)), stack=int(spill.group(1)),
                spill_stores=int(spill.group(2)), spill_loads=int(spill.group(3)),
                static_smem=int(smem.group(1)) if smem else 0)


def _dots(ttir: str, ttgir: str, ptx: str) -> dict:
    """Every ``tt.dot`` of the kernel (TTIR: operand types, precision) and its lowering (TTGIR:
    ``ttng.warp_group_dot`` = wgmma, ``tt.dot`` on an ``#mma`` layout = mma.sync, else FMA)."""
    ops = []
    for line in ttir.splitlines():
        if " tt.dot " in line and (m := _TTIR_DOT_TYPES.search(line)):
            prec = _TTIR_PREC.search(line)
            ops.append(dict(a=m.group(1), b=m.group(2), precision=prec.group(1) if prec else "ieee"))
    wg = len(re.findall(r"ttng\.warp_group_dot ", ttgir))
    mma_layouts = set(re.findall(r"^(#mma\d*) = #ttg\.nvidia_mma<\{versionMajor = 2", ttgir, re.M))
    mma2 = fma = 0
    for line in ttgir.splitlines():
        if re.search(r"= tt\.dot ", line):
            enc = re.search(r"-> tensor<[^,]+, (#\w+)>", line)
            if enc and enc.group(1) in mma_layouts:
                mma2 += 1
            else:
                fma += 1
    return dict(ops=ops, n=len(ops), lowered=wg + mma2 + fma, wgmma=wg, mma_v2=mma2, fma=fma,
                ptx_wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                ptx_mma_sync=len(re.findall(r"\bmma\.sync\.aligned", ptx)))


def occupancy(arch: int, regs: int, num_warps: int, smem_bytes: int) -> dict:
    """Resident blocks and warps per SM allowed by registers, threads/warps, blocks and shared
    memory (the CUDA occupancy calculator's rules, register unit 256 per warp)."""
    lim = SM_LIMITS[arch]
    per_warp = -(-max(regs, 1) * 32 // lim["reg_unit"]) * lim["reg_unit"]
    by_regs = (lim["regs"] // per_warp) // num_warps
    by_warps = lim["warps"] // num_warps
    smem = smem_bytes + lim["smem_reserved"]
    by_smem = lim["smem_sm"] // smem if smem_bytes <= lim["smem_block"] else 0
    blocks = min(by_regs, by_warps, lim["blocks"], by_smem)
    limiter = min((("regs", by_regs), ("warps", by_warps), ("blocks", lim["blocks"]), ("smem", by_smem)),
                  key=lambda kv: kv[1])[0]
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * num_warps,
                occupancy=blocks * num_warps / lim["warps"], limiter=limiter,
                fits=smem_bytes <= lim["smem_block"])


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (ptxas)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def compile_job(job: Job, cache_dir: str | None) -> dict:
    """Compile one job (worker process); returns its resource row, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = dict(kernel=job.name, module=job.module, arch=job.arch, cases=job.cases, default=job.default,
               grid=list(job.grid), num_warps=job.options["num_warps"], num_stages=job.options["num_stages"],
               constexprs={str(k[0]) if len(k) == 1 else str(k): v for k, v in job.constexprs.items()},
               signature=job.signature, key=job.key())
    fn = getattr(importlib.import_module(job.module), job.name)
    names = fn.arg_names
    row["constexprs"] = {names[k[0]]: v for k, v in job.constexprs.items() if len(k) == 1}
    t0, cpu0 = time.perf_counter(), _cpu_s()
    ptxas_log = io.StringIO()
    try:
        src = ASTSource(fn, job.signature, job.constexprs, job.attrs)
        with contextlib.redirect_stdout(ptxas_log):  # TRITON_DUMP_PTXAS_LOG: ptxas -v of the cubin stage
            k = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as exc:  # the check reports every compile error, whatever its type
        row.update(error=f"{type(exc).__name__}: {exc}"[:4000], compile_s=time.perf_counter() - t0)
        return row
    row["compile_s"] = time.perf_counter() - t0
    stats = None
    cache = Path(cache_dir) / "stats" / f"{k.metadata.hash}.json" if cache_dir else None
    if cache is not None and cache.exists():
        stats = json.loads(cache.read_text())
    if stats is None:
        text = ptxas_log.getvalue()
        stats = (parse_ptxas(text) if _PTXAS_REGS.search(text) else
                 _ptxas_stats(k.asm["ptx"], job.arch, job.options.get("enable_fp_fusion", True)))
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(stats))
    row.update(stats)
    row["dots"] = _dots(k.asm["ttir"], k.asm["ttgir"], k.asm["ptx"])
    row["cpu_s"] = _cpu_s() - cpu0
    row["dynamic_smem"] = k.metadata.shared
    row["threads"] = 32 * job.options["num_warps"]
    row.update(occupancy(job.arch, stats["regs"], job.options["num_warps"],
                         k.metadata.shared + stats["static_smem"]))
    return row


def _worker_init(cache_dir: str | None) -> None:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = str(Path(cache_dir) / "triton")


def compile_all(jobs: list[Job], workers: int = 2, cache_dir: str | None = None) -> list[dict]:
    """Compile every job in a pool of ``workers`` processes; rows in the jobs' order."""
    ctx = __import__("multiprocessing").get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                                initargs=(cache_dir,)) as pool:
        return list(pool.map(compile_job, jobs, [cache_dir] * len(jobs)))


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

SPILL_CHECKED_ARCHS = (90,)  # the target GPUs (H100/H200); sm_80 spills are reported, not failed


def problems(rows: list[dict]) -> list[str]:
    """What fails the check: compile errors; a block over the shared-memory limit; a spill in a
    default configuration on sm_90a."""
    out = []
    for r in rows:
        where = f"{r['kernel']} sm_{r['arch']} [{', '.join(r['cases'][:3])}]"
        if "error" in r:
            lines = [ln.strip() for ln in r["error"].splitlines() if ln.strip()]
            out.append(f"compile error: {where}: {' | '.join(lines[:1] + lines[-1:])}")
        elif r["default"] and r["arch"] in SPILL_CHECKED_ARCHS and (r["spill_stores"] or r["spill_loads"]):
            out.append(f"spill in a default configuration: {where}: {r['spill_stores']} B stores, "
                       f"{r['spill_loads']} B loads")
        elif not r["fits"]:
            out.append(f"shared memory over the per-block limit: {where}: "
                       f"{r['dynamic_smem'] + r['static_smem']} B")
    return out


def lowering(r: dict) -> str:
    """'wgmma 3/3', 'mma 2/3 fma 1/3', or '-' for a kernel without dots."""
    d = r.get("dots")
    if not d or not d["n"]:
        return "-"
    parts, n = [], d["lowered"]  # TTGIR dots (software pipelining may peel copies of a loop's dot)
    if d["wgmma"]:
        parts.append(f"wgmma {d['wgmma']}/{n}")
    if d["mma_v2"]:
        parts.append(f"mma {d['mma_v2']}/{n}")
    if d["fma"]:
        parts.append(f"fma {d['fma']}/{n}")
    return " ".join(parts)


def dot_types(r: dict) -> str:
    d = r.get("dots")
    if not d or not d["n"]:
        return "-"
    kinds = sorted({f"{o['a']}" + (f"/{o['precision']}" if o["a"] == "f32" else "") for o in d["ops"]})
    return ",".join(kinds)


def _cfg(r: dict) -> str:
    c = r["constexprs"]
    blocks = "x".join(str(v) for k, v in c.items() if k.startswith("B") and isinstance(v, int)
                      and not isinstance(v, bool))
    return f"{blocks} w{r['num_warps']} s{r['num_stages']}"


def table(rows: list[dict], markdown: bool = False) -> list[str]:
    """One line per distinct (kernel, arch, dtype, blocks, warps, stages) with the worst case over
    its flag combinations: max registers, max spills, max smem, min occupancy."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" in r:
            continue
        dt = dot_types(r)
        groups.setdefault((r["kernel"], r["arch"], _dtype_of(r), _cfg(r), dt, lowering(r)), []).append(r)
    head = ["kernel", "arch", "dtype", "blocks warps stages", "dots", "lowering", "configs", "default",
            "regs", "spill B (st/ld)", "smem KiB", "threads", "blocks/SM", "occupancy"]
    lines = []
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    else:
        lines.append(f"{'kernel':<27} {'sm':>3} {'dtype':<5} {'blocks w s':<18} {'dots':<9} {'lowering':<14} "
                     f"{'n':>3} {'def':>3} {'regs':>4} {'spill st/ld':>11} {'smemKiB':>7} {'thr':>4} "
                     f"{'blk/SM':>6} {'occ':>5}")
    for (kernel, arch, dtype, cfg, dt, low), rs in sorted(groups.items()):
        regs = max(r["regs"] for r in rs)
        st, ld = max(r["spill_stores"] for r in rs), max(r["spill_loads"] for r in rs)
        smem = max(r["dynamic_smem"] + r["static_smem"] for r in rs) / 1024
        blk = min(r["blocks_per_sm"] for r in rs)
        occ = min(r["occupancy"] for r in rs)
        ndef = sum(r["default"] for r in rs)
        thr = rs[0]["threads"]
        arch_s = f"{arch}a" if arch == 90 else str(arch)
        if markdown:
            lines.append(f"| {kernel} | sm_{arch_s} | {dtype} | {cfg} | {dt} | {low} | {len(rs)} | {ndef} | {regs} | "
                         f"{st}/{ld} | {smem:.1f} | {thr} | {blk} | {occ:.0%} |")
        else:
            lines.append(f"{kernel:<27} {arch:>3} {dtype:<5} {cfg:<18} {dt:<9} {low:<14} {len(rs):>3} {ndef:>3} "
                         f"{regs:>4} {f'{st}/{ld}':>11} {smem:>7.1f} {thr:>4} {blk:>6} {occ:>5.0%}")
    return lines


def _dtype_of(r: dict) -> str:
    """The launch's data dtype: the case name's dtype tag (cases are named ``<dtype>:...``)."""
    return r["cases"][0].split(":", 1)[0]


def counts(rows: list[dict]) -> dict:
    """Compiled configurations per kernel and arch."""
    out: dict[str, dict] = {}
    for r in rows:
        out.setdefault(r["kernel"], {}).setdefault(f"sm_{r['arch']}", 0)
        out[r["kernel"]][f"sm_{r['arch']}"] += 1
    return out


def run(families=None, archs=ARCHS, workers: int = 2, cache_dir: str | None = None, full: bool = False) -> dict:
    """Capture every launch set, compile every distinct binding; returns the JSON report."""
    from . import aot_cases
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: the kernels would be the interpreter's; unset it")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated (no warning)
    t0 = time.perf_counter()
    launches = aot_cases.capture_all(families, full)
    coverage = aot_cases.coverage(launches, families)
    jobs = sorted(jobs_for(launches, archs), key=lambda j: (not j.default, j.arch != 90))  # defaults first
    rows = compile_all(jobs, workers, cache_dir)
    import triton
    return dict(triton=triton.__version__, torch=torch.__version__, archs=list(archs),
                launches=len(launches), compiled=len(rows), wall_s=time.perf_counter() - t0,
                compile_cpu_s=sum(r.get("cpu_s", 0.0) for r in rows),
                counts=counts(rows), coverage=coverage, problems=problems(rows) + coverage["missing"],
                rows=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m elastic_kernels.triton.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated (default 90,80)")
    p.add_argument("--family", action="append", choices=("ssd", "moe", "nvfp4"),
                   help="only these op families (repeatable; default all)")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    p.add_argument("--cache-dir", default=os.environ.get("ELASTIC_KERNELS_AOT_CACHE",
                                                         str(Path.home() / ".cache" / "elastic_kernels" / "aot")),
                   help="Triton cache and resource stats by source hash ('' = none)")
    p.add_argument("--full", action="store_true",
                   help="also every optional argument alone (bf16) and all-off, not only base/all-on/defaults")
    p.add_argument("--json", help="write the report as JSON to this file")
    args = p.parse_args(argv)
    try:
        archs = tuple(int(a) for a in args.arch.split(","))
    except ValueError:
        p.error(f"--arch: expected comma-separated integers such as 90,80, got {args.arch!r}")
    bad = [a for a in archs if a not in SM_LIMITS]
    if bad:
        p.error(f"--arch: supported {sorted(SM_LIMITS)}, got {bad}")
    if args.jobs < 1:
        p.error(f"--jobs: expected >= 1, got {args.jobs}")
    report = run(args.family, archs, args.jobs, args.cache_dir or None, args.full)
    print("\n".join(table(report["rows"])))
    print(f"\ncompiled configurations per kernel: {json.dumps(report['counts'])}")
    print(f"{report['compiled']} compiles from {report['launches']} launches in {report['wall_s']:.0f} s "
          f"({report['compile_cpu_s']:.0f} CPU-s of compiling, {args.jobs} processes)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    for msg in report["problems"]:
        print(f"FAIL {msg}")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
