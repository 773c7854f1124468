"""elastic_kernels.env: the environment facts that stamp every benchmark result."""
import sys

from elastic_kernels import env


def test_collect_names_the_cpu_and_its_bf16_features():
    info = env.collect()
    cpu = info["cpu"]
    assert cpu["model"] and cpu["cpus"] >= 1 and cpu["torch_capability"]
    if sys.platform.startswith("linux"):
        assert set(cpu["flags"]) <= set(env.CPU_FLAGS)
        with open("/proc/cpuinfo") as f:
            have = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
        assert cpu["flags"] == [f for f in env.CPU_FLAGS if f in have]


def test_collect_names_the_cpu_vendor():
    vendor = env.collect()["cpu"]["vendor"]
    assert vendor in ("intel", "amd", "other")
    if sys.platform.startswith("linux"):
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("vendor_id")), "vendor_id: none")
        want = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(line.split(":", 1)[1].strip(), "other")
        assert vendor == want
