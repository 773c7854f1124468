"""NVFP4 / FP8 Hugging Face exports in NVIDIA Model-Optimizer's layout (docs/interop.md).

Model-Optimizer's ``export_hf_checkpoint`` writes, for every quantized ``nn.Linear`` ``<m>``:

- NVFP4: ``<m>.weight`` uint8 ``(N, K/2)`` (two E2M1 codes per byte, element ``2i`` in the low
  nibble), ``<m>.weight_scale`` float8_e4m3fn ``(N, K/16)`` block scales, ``<m>.weight_scale_2``
  float32 ``()`` per-tensor scale; ``value = e2m1(code) * weight_scale * weight_scale_2``.
- FP8 per channel: ``<m>.weight`` float8_e4m3fn ``(N, K)``, ``<m>.weight_scale`` float32 ``(N,)``;
  ``value = weight * weight_scale[:, None]``.

plus ``hf_quant_config.json`` (``{"producer", "quantization": {"quant_algo", "kv_cache_quant_algo",
"group_size", "exclude_modules"}}``) and the same information as ``config.json``'s
``quantization_config`` (``quant_method: "modelopt"``, ``ignore``, ``config_groups``), which
serving engines read. The elastic models serve weight-only (W4A16 / dynamic activations), so the
algorithms written are ``W4A16_NVFP4`` (no activation scale) and ``FP8_PER_CHANNEL_PER_TOKEN``
(activations quantized per token at run time): no ``input_scale`` is needed or written.

Every linear weight of the Mamba mixers, attention, MLPs and experts is quantized (NVFP4 needs
K % 16 == 0; others stay in high precision and are listed in ``exclude_modules``, as are
``lm_head``, the routers, convolutions, norms and embeddings, which are not quantized). The
per-tensor scales are those of the exported slice (NVFP4: ``amax / (6 * 448)``, the recipe of
docs/interop.md). :func:`dequantize_hf_state` is the exact inverse used by ``from_hf``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from .._version import __version__ as _version
from ..formats import FP8Tensor, NVFP4Tensor, to_state_dict
from ..formats.fp8 import SCALE_MIN as FP8_SCALE_MIN
from ..formats.nvfp4 import E4M3_MAX, pack, unpack
from ..ops.nvfp4 import quantize

ALGOS = {"nvfp4": "W4A16_NVFP4", "fp8": "FP8_PER_CHANNEL_PER_TOKEN"}
GROUP_SIZE = 16
QUANT_CONFIG = "hf_quant_config.json"
_LINEAR = re.compile(r".*\.mixer\.(in_proj|out_proj|[qkvo]_proj|up_proj|down_proj|experts\.\d+\.(up|down)_proj|"
                     r"shared_experts\.(up|down)_proj)\.weight")


def quantized_module_names(tensors: Mapping[str, torch.Tensor], fmt: str) -> tuple[list[str], list[str]]:
    """``(quantized, excluded)`` module names (without ``.weight``) of a Hugging Face state dict."""
    quant, excl = [], ["lm_head"]
    for name, t in tensors.items():
        if _LINEAR.fullmatch(name):
            (quant if fmt == "fp8" or t.shape[-1] % GROUP_SIZE == 0 else excl).append(name[:-len(".weight")])
    return sorted(quant), sorted(excl)


def quant_configs(fmt: str, excluded: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(hf_quant_config.json dict, config.json quantization_config dict)`` for ``fmt``."""
    algo = ALGOS[fmt]
    details: dict[str, Any] = {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": excluded}
    if fmt == "nvfp4":
        details["group_size"] = GROUP_SIZE
    producer = {"name": "elastic_kernels", "version": _version}
    hf_quant = {"producer": producer, "quantization": details}
    cfg: dict[str, Any] = {}
    if fmt == "nvfp4":
        cfg["config_groups"] = {"group_0": {
            "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": GROUP_SIZE},
            "targets": ["Linear"]}}
    cfg.update(ignore=excluded, quant_algo=algo, producer=producer, quant_method="modelopt")
    return hf_quant, cfg


def _fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    wf = w.float()
    amax = wf.abs().amax(-1)
    scale = torch.where(amax > 0, torch.clamp(amax / E4M3_MAX, min=FP8_SCALE_MIN), torch.ones_like(amax))
    codes = torch.clamp(wf / scale[:, None], -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def quantize_hf_state(tensors: Mapping[str, torch.Tensor], hf_config: Mapping[str, Any], fmt: str
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, dict]]:
    """Quantize a Hugging Face state dict: ``(tensors, config.json quantization_config,
    {"hf_quant_config.json": dict})``. ``fmt``: "nvfp4" | "fp8"."""
    if fmt not in ALGOS:
        raise ValueError(f"quantization must be one of {tuple(ALGOS)}, got {fmt!r}")
    quant, excluded = quantized_module_names(tensors, fmt)
    out = dict(tensors)
    for m in quant:
        w = out.pop(m + ".weight")
        if fmt == "nvfp4":
            out.update(to_state_dict(quantize(w.float()), m + ".weight"))
        else:
            codes, scale = _fp8_per_channel(w)
            out.update({m + ".weight": codes, m + ".weight_scale": scale})
    hf_quant, cfg = quant_configs(fmt, excluded)
    return out, cfg, {QUANT_CONFIG: hf_quant}


def read_quant_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``quantization`` section of a directory's ``hf_quant_config.json`` (None if absent).
    Raises ``ValueError`` for an algorithm this package does not read."""
    p = Path(path) / QUANT_CONFIG
    if not p.is_file():
        return None
    q = json.loads(p.read_text()).get("quantization", {})
    if q.get("quant_algo") not in ALGOS.values():
        raise ValueError(f"{p}: quant_algo {q.get('quant_algo')!r} is not supported "
                         f"(readable: {tuple(ALGOS.values())})")
    if q.get("kv_cache_quant_algo") is not None:
        raise ValueError(f"{p}: kv_cache_quant_algo {q['kv_cache_quant_algo']!r} is not supported")
    return q


def dequantize_hf_state(tensors: Mapping[str, torch.Tensor], quant: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Exact decode of every quantized weight (``<m>.weight`` + ``<m>.weight_scale``
    [+ ``<m>.weight_scale_2``]) into float64 (code times scales is exact there; a cast to the
    model dtype then rounds once, like Model-Optimizer's float32 decode)."""
    out = {}
    for name, t in tensors.items():
        if name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
            continue
        scale = tensors.get(name + "_scale") if name.endswith(".weight") else None
        if scale is None:
            out[name] = t
        elif quant["quant_algo"] == ALGOS["nvfp4"]:
            out[name] = NVFP4Tensor(t, scale, tensors[name + "_scale_2"].float()).dequantize(torch.float64)
        else:
            out[name] = t.double() * scale.double()[:, None]
    return out


# ---- exports that keep a nested quantized checkpoint's codes ---------------------------------

def _planes(state: Mapping[str, Any], shapes: Mapping[str, torch.Size]) -> tuple[dict, dict, dict, dict, dict]:
    """Per tensor of a nested quantized state: float planes of the codes, the per-element decode
    scale, the per-element global scale, a 0/1 "from a float tensor" mark, and the values (decoded
    to float64 for quantized tensors),
    each in the parameter's shape (a ``"flat"`` Mamba head projection back to (H, 2P+1, K))."""
    codes, scale, glob, plain, value = {}, {}, {}, {}, {}
    for name, t in state.items():
        shape = shapes[name]
        if isinstance(t, NVFP4Tensor):
            c = unpack(t.data).float()
            s = t.scales.float().repeat_interleave(GROUP_SIZE, -1)
            g = t.global_scale.float().reshape(*t.global_scale.shape, 1, 1).expand_as(c)
            v = t.dequantize(torch.float64)
        elif isinstance(t, FP8Tensor):
            c = t.codes.float()
            s = t.scale.float().expand_as(c)
            g = torch.ones_like(c)
            v = t.dequantize(torch.float64)
        else:
            codes[name] = scale[name] = glob[name] = value[name] = t
            plain[name] = torch.ones(t.shape)
            continue
        codes[name], scale[name], glob[name], value[name] = (x.reshape(shape) for x in (c, s, g, v))
        plain[name] = torch.zeros(shape)
    return codes, scale, glob, plain, value


def hf_state_from_nested_quantized(state: Mapping[str, Any], config, architecture: str, fmt: str,
                                   dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """Model-Optimizer tensors of a nested quantized slice (:func:`elastic_kernels.models.load_nested_state`)
    without requantizing: every Hugging Face linear weight that is a re-arrangement of whole blocks of
    one quantized tensor (rows, whole 16-column blocks, one per-tensor scale) keeps its codes and
    scales; the others (the fused Mamba ``in_proj``, whose parts carry different scales; head
    permutations that split blocks; ``lm_head``) are written decoded, in ``dtype``, and listed in
    ``exclude_modules``. Returns like :func:`quantize_hf_state`."""
    from ..models import ElasticHybridLM
    from .hf_weights import state_to_hf
    if fmt not in ALGOS:
        raise ValueError(f"quantization must be one of {tuple(ALGOS)}, got {fmt!r}")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ElasticHybridLM(config).state_dict().items()}
    # padding (experts, FFN channels) enters every plane as 0: code 0, scale 0, "quantized"
    codes, scale, glob, plain, value = (state_to_hf(p, config, architecture) for p in _planes(state, shapes))
    out: dict[str, torch.Tensor] = {}
    quantized, excluded = [], ["lm_head"]
    for name, v in value.items():
        m = name[:-len(".weight")]
        linear = _LINEAR.fullmatch(name) is not None
        ok = linear and not bool(plain[name].any())
        if ok:
            g = glob[name].flatten()
            nz = g[g > 0]  # padded elements carry 0
            n, k = v.shape
            if fmt == "nvfp4":  # one per-tensor scale, block scales constant over whole 16-blocks
                ok = bool((nz == nz[0]).all()) if nz.numel() else True
                blocks = scale[name].reshape(n, k // GROUP_SIZE, GROUP_SIZE) if k % GROUP_SIZE == 0 else None
                ok = ok and blocks is not None and bool((blocks == blocks[..., :1]).all())
            else:  # one scale per output row
                ok = bool((scale[name] == scale[name][:, :1]).all())
        if not ok:
            if linear:
                excluded.append(m)
            out[name] = v.to(dtype) if v.is_floating_point() and v.dtype == torch.float64 else v
            continue
        quantized.append(m)
        g0 = nz[0] if nz.numel() else torch.tensor(1.0)
        if fmt == "nvfp4":
            out[name] = pack(codes[name].to(torch.uint8))
            out[m + ".weight_scale"] = blocks[..., 0].to(torch.float8_e4m3fn)
            out[m + ".weight_scale_2"] = g0.reshape(()).float()
        else:
            out[name] = codes[name].to(torch.float8_e4m3fn)
            out[m + ".weight_scale"] = scale[name][:, 0].float().clone()
    hf_quant, cfg = quant_configs(fmt, sorted(excluded))
    return out, cfg, {QUANT_CONFIG: hf_quant}
