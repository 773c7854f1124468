"""NVFP4 / FP8 exports in Model-Optimizer's Hugging Face layout (docs/interop.md): names and
quantization config checked against the nvidia-modelopt package's own export code, tensors
against its own quantizer and dequantizer, and a bit-exact round trip through our loader."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

from hf_models import our_logits, save_random  # noqa: E402

from elastic_kernels.formats import NVFP4Tensor  # noqa: E402
from elastic_kernels.formats.nvfp4 import unpack  # noqa: E402
from elastic_kernels.interop import dequantize_hf_state, from_hf, read_hf_tensors, state_from_hf, to_hf  # noqa: E402
from elastic_kernels.interop.modelopt import ALGOS  # noqa: E402
from elastic_kernels.models import Budget, ElasticHybridLM  # noqa: E402

BUDGETS = [Budget(), Budget(hidden=16, mamba_heads=4, experts=4, expert_ffn=12, ffn=24)]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    d = tmp_path_factory.mktemp("parent")
    save_random("nh_groups", d, seed=3)
    return from_hf(d)


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
@pytest.mark.parametrize("b_i", range(len(BUDGETS)))
def test_layout_and_bit_exact_round_trip(parent, tmp_path, fmt, b_i):
    model, _ = parent
    budget = BUDGETS[b_i]
    q_dir = to_hf(model, budget, tmp_path / "q", quantization=fmt)
    f_dir = to_hf(model, budget, tmp_path / "f")
    q, f = read_hf_tensors(q_dir), read_hf_tensors(f_dir)
    hq = json.loads((q_dir / "hf_quant_config.json").read_text())
    details = hq["quantization"]
    assert details["quant_algo"] == ALGOS[fmt] and details["kv_cache_quant_algo"] is None
    assert (details.get("group_size") == 16) == (fmt == "nvfp4")
    excluded = set(details["exclude_modules"])
    assert "lm_head" in excluded
    quantized = {k[:-len(".weight_scale")] for k in q if k.endswith(".weight_scale")}
    assert quantized and not quantized & excluded
    # every float tensor is there, quantized ones as weight + scales, nothing else (no input_scale)
    expect = set(f)
    for m in quantized:
        expect |= {m + ".weight_scale"} | ({m + ".weight_scale_2"} if fmt == "nvfp4" else set())
    assert set(q) == expect
    for m in quantized:
        w, s = q[m + ".weight"], q[m + ".weight_scale"]
        n, k = f[m + ".weight"].shape
        if fmt == "nvfp4":
            assert (w.dtype, tuple(w.shape)) == (torch.uint8, (n, k // 2))
            assert (s.dtype, tuple(s.shape)) == (torch.float8_e4m3fn, (n, k // 16))
            assert (q[m + ".weight_scale_2"].dtype, q[m + ".weight_scale_2"].shape) == (torch.float32, ())
        else:
            assert (w.dtype, tuple(w.shape)) == (torch.float8_e4m3fn, (n, k))
            assert (s.dtype, tuple(s.shape)) == (torch.float32, (n,))
    for name in f:
        m = name[:-len(".weight")]
        if name.endswith(".weight") and m not in quantized and ("proj" in m):
            assert m in excluded, m  # a linear kept in high precision is listed (NVFP4: K % 16 != 0)
    # round trip: our loader == the float slice with exactly these weights decoded
    back, _ = from_hf(q_dir)
    decoded = dequantize_hf_state(q, {"quant_algo": ALGOS[fmt]})
    want = ElasticHybridLM(back.config)
    want.load_state_dict(state_from_hf(decoded, back.config))
    ids = torch.randint(3, 96, (2, 19))
    assert torch.equal(our_logits(back, ids)[0], our_logits(want, ids)[0])
    for name, t in decoded.items():
        if name[:-len(".weight")] in quantized:
            step = 0.18 if fmt == "nvfp4" else 0.0625  # half a code step, relative to the largest weight
            assert (t - f[name].double()).abs().max() <= f[name].abs().max() * step
    # and exporting the imported model again writes the same bytes
    again = read_hf_tensors(to_hf(back, None, tmp_path / "again", quantization=fmt))
    assert set(again) == set(q) and all(torch.equal(_bytes(again[k]), _bytes(q[k])) for k in q)


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_matches_modelopt_export_code(parent, tmp_path, fmt):
    """Model-Optimizer's own config conversion and quantizers agree with the export."""
    pytest.importorskip("modelopt", reason="nvidia-modelopt is not installed")
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format
    from modelopt.torch.export.quant_utils import process_layer_quant_config
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    model, _ = parent
    q_dir = to_hf(model, BUDGETS[1], tmp_path / "q", quantization=fmt)
    f = read_hf_tensors(to_hf(model, BUDGETS[1], tmp_path / "f"))
    q = read_hf_tensors(q_dir)
    hq = json.loads((q_dir / "hf_quant_config.json").read_text())
    cfg = json.loads((q_dir / "config.json").read_text())
    assert cfg["quantization_config"] == convert_hf_quant_config_format(hq)
    quantized = sorted(k[:-len(".weight_scale")] for k in q if k.endswith(".weight_scale"))
    excluded = hq["quantization"]["exclude_modules"]
    layer = {}
    for m in quantized:
        layer[m + ".quantization"] = {"nvfp4": "w4a16_nvfp4", "fp8": "fp8_pc_pt"}[fmt]
        layer[m + ".awq_block_size"] = 16 if fmt == "nvfp4" else 0
    for m in excluded:
        layer[m + ".quantization"] = None
    ref = process_layer_quant_config(layer)
    assert ref["quant_algo"] == hq["quantization"]["quant_algo"]
    assert ref.get("group_size") == hq["quantization"].get("group_size")
    import fnmatch
    for m in quantized:  # modelopt's wildcard summary of the exclusions covers exactly our list
        assert not any(fnmatch.fnmatch(m, p) for p in ref["exclude_modules"]), m
    for m in excluded:
        assert any(fnmatch.fnmatch(m, p) for p in ref["exclude_modules"]), m
    for m in quantized:
        w = f[m + ".weight"].float()
        if fmt == "nvfp4":
            g = q[m + ".weight_scale_2"]
            qt, scale, _ = NVFP4QTensor.quantize(w, 16, weights_scaling_factor_2=g)
            assert torch.equal(_bytes(scale), _bytes(q[m + ".weight_scale"]))
            theirs, ours = unpack(qt._quantized_data), unpack(q[m + ".weight"])
            assert torch.equal(theirs, ours)  # bit-exact, the sign of zero (code 8) included
            deq = NVFP4QTensor(w.shape, torch.float64, q[m + ".weight"]).dequantize(
                dtype=torch.float64, scale=q[m + ".weight_scale"].double(), double_scale=g.double(),
                block_sizes={-1: 16})
            assert torch.equal(deq, NVFP4Tensor(q[m + ".weight"], q[m + ".weight_scale"], g).dequantize(torch.float64))
        else:
            s = q[m + ".weight_scale"]
            assert torch.equal(_bytes((w / s[:, None]).to(torch.float8_e4m3fn)), _bytes(q[m + ".weight"]))


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_nested_quantized_checkpoint_exports_without_requantizing(parent, tmp_path, fmt):
    """A budget of a nested quantized checkpoint exports its own codes and scales: the export
    decodes to exactly the nested slice (padding for per-layer expert counts included)."""
    from elastic_kernels.interop import export_nested
    from elastic_kernels.models import load_nested, save_nested
    model, _ = parent
    budgets = {"half": BUDGETS[1], "mixed": Budget(experts=(8, 4), expert_ffn=(24, 12))}
    save_nested(model, tmp_path / "nested", budgets, quantization=fmt)
    for name in budgets:
        out = export_nested(tmp_path / "nested", name, tmp_path / f"hf-{name}", quantization=fmt)
        q = read_hf_tensors(out)
        assert any(k.endswith(".weight_scale") for k in q)
        want = load_nested(tmp_path / "nested", name)
        back, config = from_hf(out)
        got = state_from_hf(dequantize_hf_state(q, {"quant_algo": ALGOS[fmt]}), config)
        for k, v in want.state_dict().items():
            if k in got:  # the padded export has more experts; the real ones come first in our order
                sl = tuple(slice(0, s) for s in v.shape)
                assert torch.equal(got[k][sl].to(v.dtype), v), k
        ids = torch.randint(3, 96, (2, 13))
        assert torch.equal(our_logits(back, ids)[0], our_logits(want, ids)[0])
