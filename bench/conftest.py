"""Benchmark session summary: ratios to full width per group, and JSON results on a GPU."""
from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import ceilings  # noqa: E402


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return torch.device(request.param)


def pytest_sessionfinish(session, exitstatus):
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return
    rows = [dict(name=b.name, **b.extra_info) for b in bs.benchmarks if b.extra_info.get("group")]
    full = {(r["group"], r["device"], r.get("impl")): r["median_s"] for r in rows if r.get("width") == 1.0}
    lines = ["", "width sweep (time / time at full width; ideal = width):"]
    for r in rows:
        base = full.get((r["group"], r["device"], r.get("impl")))
        if base and r.get("width") is not None:
            r["ratio_to_full"] = r["median_s"] / base
            lines.append(f"  {r['group']:<28} {r.get('impl', ''):<10} {r['device']:<5} width {r['width']:<6} "
                         f"ratio {r['ratio_to_full']:.3f}  {r['GBps']:.1f} GB/s  {r['TFLOPs']:.4f} TFLOP/s")
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line("\n".join(lines))
    if torch.cuda.is_available() or os.environ.get("ELASTIC_KERNELS_BENCH_JSON"):
        from elastic_kernels.env import collect
        out = Path(os.environ.get("ELASTIC_KERNELS_BENCH_JSON") or
                   Path(__file__).parent / "results" / f"bench_{datetime.date.today()}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        out.write_text(json.dumps({"date": str(datetime.datetime.now()), "env": collect(),
                                   "ceilings": ceilings(dev), "results": rows}, indent=1, default=str))
