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

from .. import __version__ as _version
from ..formats import NVFP4Tensor, to_state_dict
from ..formats.nvfp4 import E4M3_MAX, G_MIN
from ..nvfp4 import quantize

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
    scale = torch.where(amax > 0, torch.clamp(amax / E4M3_MAX, min=G_MIN), torch.ones_like(amax))
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
