"""Import a Hugging Face NemotronH / Mamba2 directory as an elastic parent, export any nested
budget as a standalone Hugging Face directory (docs/interop.md).

``from_hf(path)`` reads ``config.json`` and the safetensors weights (one file or an
``model.safetensors.index.json`` shard set) directly; ``transformers`` is not needed to import.
``to_hf(model, budget, out_dir)`` writes ``config.json`` (the slice's sizes), ``model.safetensors``
in the spelling ``save_pretrained`` writes, the parent's tokenizer files and, with
``quantization=``, Model-Optimizer's NVFP4 / FP8 layout (:mod:`.modelopt`); ``export_nested`` does
the same for a budget of a nested checkpoint, keeping a quantized checkpoint's codes. The directory is
written under a temporary name and renamed into place (one atomic commit).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..formats.dtypes import dtype_from_name
from ..models import (Budget, ElasticHybridConfig, ElasticHybridLM, load_nested, load_nested_state,
                      read_nested_config)
from ..models.checkpoint import FORMAT as NESTED_FORMAT
from .hf_config import choose_architecture, config_from_hf, config_to_hf
from .hf_weights import state_from_hf, state_to_hf
from .modelopt import dequantize_hf_state, hf_state_from_nested_quantized, quantize_hf_state, read_quant_config

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` dict of a Hugging Face model directory."""
    p = Path(path) / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"from_hf: {p} does not exist (expected a save_pretrained directory)")
    return json.loads(p.read_text())


def _weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (root / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"from_hf: {root} has neither model.safetensors nor model.safetensors.index.json")
    out = []
    for f in files:
        p = (root / f).resolve()
        if p.parent != root.resolve():
            raise ValueError(f"from_hf: weight file {f!r} named by the index leaves its directory")
        out.append(p)
    return out


def read_hf_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory's safetensors files (sharded or not)."""
    out: dict[str, torch.Tensor] = {}
    for p in _weight_files(Path(path)):
        with safe_open(str(p), "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def from_hf(path: str | os.PathLike, *, dtype: torch.dtype | None = None, nested_choices=None,
            device: str | torch.device = "cpu") -> tuple[ElasticHybridLM, ElasticHybridConfig]:
    """``(ElasticHybridLM, ElasticHybridConfig)`` of a NemotronH or Mamba2 ``save_pretrained``
    directory (a Model-Optimizer NVFP4 / FP8 export of ours is dequantized exactly).

    dtype: the model's dtype (default: the checkpoint's ``dtype``/``torch_dtype``, else float32);
    the MoE router stays float32 as in transformers. nested_choices: ``{axis: fractions}`` of the
    nested submodels (default: those of (1, .75, .5, .25) that give whole units in every layer).
    Raises ``ValueError`` naming any config field or tensor the elastic model cannot reproduce.
    """
    hf = read_hf_config(path)
    config, arch = config_from_hf(hf, nested_choices)
    tensors = read_hf_tensors(path)
    quant = read_quant_config(path)
    if quant is not None:
        tensors = dequantize_hf_state(tensors, quant)
    if dtype is None:
        name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        dtype = _DTYPES.get(name, torch.float32)
    state = state_from_hf(tensors, config)
    model = ElasticHybridLM(config).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True)
    log.info("imported %s from %s: pattern %s, %d parameters", arch, path, config.pattern, model.param_count())
    return model, config


def load_parent(path: str | os.PathLike, *, nested_choices=None) -> tuple[ElasticHybridLM, ElasticHybridConfig]:
    """A parent to train from: a Hugging Face NemotronH / Mamba2 directory (:func:`from_hf`) or a
    nested checkpoint directory of ours (its full budget, with the checkpoint's nested choices or
    ``nested_choices``); its config is :func:`parent_config`'s."""
    hf = read_hf_config(path)
    if hf.get("format") == NESTED_FORMAT:
        full = load_nested(path)  # the full budget's standalone model: no nested choices left
        config = parent_config(path, nested_choices=nested_choices)
        model = ElasticHybridLM(config).to(full.embed.weight.dtype)
        model.load_state_dict(full.state_dict(), strict=True)
        return model, config
    return from_hf(path, nested_choices=nested_choices)


def parent_config(path: str | os.PathLike, *, nested_choices=None) -> ElasticHybridConfig:
    """The config :func:`load_parent` gives for ``path``, read without the weights."""
    hf = read_hf_config(path)
    if hf.get("format") != NESTED_FORMAT:
        return config_from_hf(hf, nested_choices)[0]
    config = read_nested_config(path)[0]
    if nested_choices is None:
        return config
    return ElasticHybridConfig.from_dict({**config.to_dict(), "nested_choices": nested_choices})


def hf_state_of(model: ElasticHybridLM, budget: Budget | None, architecture: str | None = None,
                extra: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json dict, state dict)`` of the standalone Hugging Face model at ``budget``."""
    sub = model.slice(budget)
    arch = choose_architecture(sub.config, architecture)
    p = sub.embed.weight
    hf_config = config_to_hf(sub.config, arch, extra, p.dtype)
    hf_config["dtype"] = str(p.dtype).removeprefix("torch.")
    return hf_config, state_to_hf({k: v.detach() for k, v in sub.state_dict().items()}, sub.config, arch)


def write_hf_dir(out_dir: str | os.PathLike, hf_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                 *, extra_json: Mapping[str, Any] | None = None,
                 tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write a Hugging Face directory atomically: ``config.json``, ``model.safetensors``, the
    ``extra_json`` files ``{name: dict}`` and the tokenizer files of ``tokenizer_dir``. ``out_dir``
    must not exist or be empty."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"to_hf: out_dir {out} exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        for name, d in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copyfile(src, tmp / name)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def to_hf(model: ElasticHybridLM, budget: Budget | None, out_dir: str | os.PathLike, *,
          architecture: str | None = None, tokenizer_dir: str | os.PathLike | None = None,
          quantization: str | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Export the submodel at ``budget`` (None: the parent) as a standalone Hugging Face directory
    that ``transformers.AutoModelForCausalLM.from_pretrained`` loads with no missing or unexpected
    keys; its config carries the slice's sizes.

    architecture: "nemotron_h" | "mamba2" | None (Mamba2 for an all-Mamba model with a float32
    residual, else NemotronH). tokenizer_dir: a directory whose tokenizer files are copied along.
    quantization: None | "nvfp4" | "fp8" (Model-Optimizer's layout, :mod:`.modelopt`).
    extra: parent config fields carried over (bos/eos/pad token ids). Returns the directory.
    Raises ``ValueError`` naming a model field or budget axis the architecture cannot express.
    """
    if not isinstance(model, ElasticHybridLM):
        raise TypeError(f"to_hf: model must be an ElasticHybridLM, got {type(model).__name__}")
    hf_config, tensors = hf_state_of(model, budget, architecture, extra)
    extra_json = None
    if quantization is not None:
        tensors, qcfg, files = quantize_hf_state(tensors, hf_config, quantization)
        hf_config["quantization_config"] = qcfg
        extra_json = files
    return write_hf_dir(out_dir, hf_config, tensors, extra_json=extra_json, tokenizer_dir=tokenizer_dir)


def export_nested(path: str | os.PathLike, budget: str | Budget | None, out_dir: str | os.PathLike, *,
                  architecture: str | None = None, tokenizer_dir: str | os.PathLike | None = None,
                  quantization: str | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """:func:`to_hf` of budget ``budget`` (a table name, a Budget or None) of the nested checkpoint
    ``path``. When the checkpoint is quantized in the requested ``quantization``, its codes and
    scales are carried over without requantizing (the nested property: a budget's export holds
    exactly its slice of the parent's quantized weights); weights whose Hugging Face layout splits
    a block or fuses tensors of different scales are written decoded
    (:func:`.modelopt.hf_state_from_nested_quantized`)."""
    meta = json.loads((Path(path) / "config.json").read_text())
    saved = (meta.get("quantization") or {}).get("format")
    if quantization is None or saved != quantization:
        if isinstance(budget, str):
            budget = read_nested_config(path)[1][budget]
        return to_hf(load_nested(path), budget, out_dir, architecture=architecture, tokenizer_dir=tokenizer_dir,
                     quantization=quantization, extra=extra)
    config, state = load_nested_state(path, budget)
    arch = choose_architecture(config, architecture)
    dtype = dtype_from_name(meta.get("dtype", "float32")) or torch.float32
    hf_config = config_to_hf(config, arch, extra, dtype)
    hf_config["dtype"] = str(dtype).removeprefix("torch.")
    tensors, qcfg, files = hf_state_from_nested_quantized(state, config, arch, quantization, dtype)
    hf_config["quantization_config"] = qcfg
    return write_hf_dir(out_dir, hf_config, tensors, extra_json=files, tokenizer_dir=tokenizer_dir)
