"""Ahead-of-time compile check (elastic_kernels.triton.aot): launches are captured with the GPU
configuration, bound and compiled for sm_90a without a GPU, and the resource figures are parsed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# the test session runs Triton under TRITON_INTERPRET=1 (conftest.py); capture and compile need the
# GPU code path, so they run in a child process without it
CHILD = r"""
import json, torch
from elastic_kernels.triton import aot, aot_cases
out = {}
launches = []
with aot_cases.intercept("bf16:test", True, launches):
    aot_cases._nvfp4_linear_call(torch.bfloat16, 1, 256, 128, False, False)
    aot_cases._nvfp4_quant_call(torch.bfloat16, 64, 64, 1)
lin, quant = launches
out["linear"] = dict(name=lin.kernel.__name__, grid=lin.grid, DOT_F32=lin.kwargs["DOT_F32"],
                     BLOCK_M=lin.kwargs["BLOCK_M"])
(job,) = aot.jobs_for([quant], archs=(90,))
out["quant"] = aot.compile_job(job, None)
print(json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def child():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_capture_takes_the_gpu_branch(child):
    """Meta tensors take the launchers' GPU branch: native bf16 dot, 16-row decode tiles."""
    lin = child["linear"]
    assert lin["name"] == "_linear_kernel" and lin["DOT_F32"] is False and lin["BLOCK_M"] == 16
    assert tuple(lin["grid"]) == (1, 4)


def test_compile_one_kernel_for_sm90(child):
    """One small kernel through triton.compile and ptxas for sm_90a (no GPU)."""
    row = child["quant"]
    assert "error" not in row, row.get("error")
    assert row["kernel"] == "_quantize_kernel" and row["constexprs"]["MODE"] == 1
    assert 0 < row["regs"] <= 255 and row["threads"] == 128 and row["dots"]["n"] == 0
    assert row["blocks_per_sm"] >= 1


PTXAS_LOG = """ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    24 bytes stack frame, 20 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 632 bytes cmem[0]
"""


def test_moe_and_ssd_configs():
    from elastic_kernels.triton import moe, ssd
    x = torch.empty(16384, 2688, dtype=torch.bfloat16, device="meta")
    assert moe.launch_config(x, 16384 * 6, 128)["BM"] == 128
    assert moe.launch_config(x[:16], 96, 128)["BM"] == 64
    assert moe.launch_config(torch.empty(1, 8), 6, 128)["BM"] == 16
    cfg = ssd.launch_config(torch.bfloat16, 128, 64, 128)
    assert (cfg["chunk"], cfg["BLOCK_L"], cfg["BLOCK_N"], cfg["DOT_PREC"]) == (64, 64, 64, "tf32")
    assert ssd.launch_config(torch.float32, 16, 8, 8)["chunk"] == 16


def test_parse_ptxas_and_occupancy():
    from elastic_kernels.triton import aot
    st = aot.parse_ptxas(PTXAS_LOG)
    assert st == dict(regs=255, stack=24, spill_stores=20, spill_loads=16, static_smem=1024)
    # 128 regs x 4 warps: 16 warps by registers -> 4 blocks; 36 KiB + 1 KiB reserved: 6 blocks
    occ = aot.occupancy(90, 128, 4, 36 * 1024)
    assert (occ["blocks_per_sm"], occ["warps_per_sm"], occ["limiter"]) == (4, 16, "regs")
    assert aot.occupancy(80, 32, 4, 200 * 1024)["fits"] is False


def test_problems_flag_errors_and_default_spills_on_sm90():
    from elastic_kernels.triton import aot
    base = dict(kernel="_k", cases=["bf16:x"], spill_stores=0, spill_loads=0, fits=True, dynamic_smem=0,
                static_smem=0)
    rows = [dict(base, arch=90, default=True, spill_stores=8),
            dict(base, arch=80, default=True, spill_stores=8),   # sm_80 spills are reported only
            dict(base, arch=90, default=False, spill_loads=8),   # not a default configuration
            dict(base, arch=80, default=False, error="CompilationError: at 3:4: bad")]
    msgs = aot.problems(rows)
    assert len(msgs) == 2 and "spill" in msgs[0] and "sm_90" in msgs[0] and "compile error" in msgs[1]


def test_cli_usage_errors():
    from elastic_kernels.triton import aot
    for argv in (["--arch", "75"], ["--arch", "x"], ["--jobs", "0"]):
        with pytest.raises(SystemExit) as exc:
            aot.main(argv)
        assert exc.value.code == 2
