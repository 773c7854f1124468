"""``python -m elastic_kernels.env``: versions, usable backends, the GPU and the _C build (for bug reports)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

import torch

from . import _cpu as _cpu_facts
from . import _dispatch, _ext


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# CPU features that change which CPU path is fast (bf16 GEMMs run on AMX / AVX512-BF16)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def _cpu() -> dict:
    """The CPU's model name, vendor, logical CPU count and the :data:`CPU_FLAGS` it has (Linux
    ``/proc/cpuinfo``; the model only elsewhere) and torch's CPU capability."""
    info = {"model": platform.processor() or platform.machine(), "vendor": _cpu_facts.vendor(),
            "cpus": os.cpu_count(), "torch_capability": torch.backends.cpu.get_cpu_capability()}
    fields = _cpu_facts.cpuinfo()
    if not fields:
        return info
    info["model"] = fields.get("model name", info["model"])
    have = set(fields.get("flags", "").split())
    info["flags"] = [f for f in CPU_FLAGS if f in have]
    return info


def collect() -> dict:
    """Environment facts as a dict (also used by bench/ to stamp results)."""
    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
               "sms": p.multi_processor_count, "count": torch.cuda.device_count()}
    dev = torch.device("cuda" if gpu else "cpu")
    backends = {}
    for be in ("reference", "triton", "cuda"):
        why = _dispatch.unavailable("env", be, dev)
        backends[be] = "usable" if why is None else f"unavailable: {why}"
    return {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "elastic_kernels": _version("elastic_kernels"), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "triton": _version("triton"), "numpy": _version("numpy"),
        "safetensors": _version("safetensors"), "cpu": _cpu(), "gpu": gpu,
        "_C": {"built": _ext.c_built(), "with_cuda": _ext.c_has_cuda()},
        "backends_on_" + dev.type: backends,
        "env": {k: os.environ[k] for k in (_dispatch.ENV_VAR, "TRITON_INTERPRET", "ELASTIC_KERNELS_SKIP_CUDA")
                if k in os.environ},
    }


def main() -> None:
    info = collect()
    for key, val in info.items():
        if isinstance(val, dict):
            print(f"{key}:")
            for k, v in val.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {val}")


if __name__ == "__main__":
    main()
