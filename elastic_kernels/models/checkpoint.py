"""Nested checkpoints: one safetensors file holding the parent, plus a JSON manifest with the
budget table; every nested submodel loads by reading (and verifying) only the prefix bytes of its
slices (docs/design.md §1, §6).

Layout of a checkpoint directory::

    model-<digest>.safetensors   every parameter and buffer of the parent (a checked safetensors
                                 file, :mod:`elastic_kernels.models.storage`; block boundaries at
                                 the sizes of every budget of the table)
    config.json                  the manifest: {"format", "version", "config": ElasticHybridConfig,
                                 "budgets": {name: Budget}, "weights": "model-<digest>.safetensors",
                                 "weights_header": digest of its header, "config_sha256", "dtype",
                                 "quantization": null | {"format": "nvfp4" | "fp8",
                                 "tensors": {name: layout}}, "checksum": digest of the rest}

**One atomic commit per save.** The weights go to a new file named by its content digest; the
manifest, written last by an atomic rename, is the commit: until it is replaced the old manifest
names the old weights file, which is removed only after the commit. After a crash at any point
the old or the new checkpoint loads. The next save removes the temporary and unreferenced files
of killed saves. One writer per directory at a time.

**Verified loads.** The manifest must be in canonical form and match its checksum; its weights
name must be a plain file name inside the directory; the weights file must be the one the
manifest names (header digest), with a strictly valid header; every block a read covers is
checked against its digest. ``verify=False`` skips the digests (structure and names are still
checked). Any failure is a :class:`CheckpointError` naming the file.

Quantized checkpoints (``save_nested(..., quantization="nvfp4" | "fp8")``) store the linear
weights with Model-Optimizer-style names: NVFP4 ``name`` (packed uint8 ``(..., N, K/2)``),
``name_scale`` (float8_e4m3fn ``(..., N, K/16)``), ``name_scale_2`` (float32 ``()`` or ``(E,)``
per expert); FP8 ``name`` (float8_e4m3fn) and ``name_scale`` (float32 ``()``, ``amax / 448``).
Layouts: ``"2d"`` (N, K) weights, ``"flat"`` (the Mamba head projection (H, 2P+1, K) stored as
(H*(2P+1), K)), ``"stacked"`` expert weights (E, N, K). A nested slice is a prefix of the
packed codes and block scales (input features at multiples of 16 for NVFP4) with the shared
global scale: nothing is requantized. Embeddings, norms, routers, convolutions and the SSM
scalars stay in the model's dtype. Loading dequantizes into a regular model
(:func:`load_nested`), keeps NVFP4 weights packed in a W4A16 serving model
(``load_nested(..., weights="nvfp4")``), or returns the raw NVFP4/FP8 slices
(:func:`load_nested_state`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Mapping

import torch

from .._io import CheckpointError, atomic_write_bytes, fsync_dir, remove_stale_temps
from ..formats import FORMATS, QuantizedTensor, to_state_dict
from ..formats.dtypes import dtype_from_name, dtype_name
from ..ops.weights import quantize_weight
from .config import Budget, ElasticHybridConfig
from .model import ElasticHybridLM
from .storage import TensorFile, digest, encode

__all__ = ["CheckpointError", "save_nested", "load_nested", "load_nested_state", "read_nested_config",
           "quantizable_weights", "QUANTIZATIONS", "LOAD_WEIGHTS"]

QUANTIZATIONS = ("nvfp4", "fp8")
FORMAT = "elastic_kernels.nested"
VERSION = 2
CONFIG = "config.json"
WEIGHTS_GLOB = "model-*.safetensors"


def _config_sha(config: ElasticHybridConfig) -> str:
    return hashlib.sha256(config.to_json().encode()).hexdigest()


def quantizable_weights(model: ElasticHybridLM) -> dict[str, str]:
    """The linear weights a quantized checkpoint stores in NVFP4/FP8: ``{name: layout}``
    (:meth:`ElasticHybridLM.quantizable_weights`)."""
    return model.quantizable_weights()


def _qshape(shape: tuple, layout: str) -> tuple:
    """Shape of the quantized view (..., N, K) of a parameter (prefix) of ``shape``."""
    return (math.prod(shape[:-1]), shape[-1]) if layout == "flat" else tuple(shape)


def _stored(full_shapes: Mapping[str, tuple], prefixes: Mapping[str, tuple], quant: dict | None
            ) -> dict[str, tuple[tuple, tuple, torch.dtype | None]]:
    """``{stored tensor: (full shape, prefix, dtype or None)}`` of the state-dict prefixes
    ``prefixes`` (a quantized weight is stored as its codes and scales)."""
    cls, table = FORMATS.get((quant or {}).get("format")), (quant or {}).get("tensors", {})
    out: dict[str, tuple] = {}
    for n, pre in prefixes.items():
        layout = table.get(n)
        if layout is None:
            out[n] = (tuple(full_shapes[n]), tuple(pre), None)
            continue
        fq, pq = _qshape(tuple(full_shapes[n]), layout), _qshape(tuple(pre), layout)
        if pq[-1] % cls.BLOCK:
            raise CheckpointError(f"load_nested: {cls.format} weight {n!r} can only be sliced at multiples of "
                                  f"{cls.BLOCK} input features, the budget asks for {pq[-1]}")
        full, part = cls.part_shapes(fq), cls.part_shapes(pq)
        out.update({n + sfx: (shape, part[sfx][0], dtype) for sfx, (shape, dtype) in full.items()})
    return out


def _manifest_bytes(meta: dict) -> bytes:
    return json.dumps(meta, indent=2, sort_keys=True).encode()


def _referenced(path: Path) -> str | None:
    """The weights file the current manifest names (None when there is none or it is unreadable)."""
    try:
        name = json.loads((path / CONFIG).read_bytes().decode()).get("weights")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def _remove_unreferenced(path: Path, keep: str | None) -> None:
    """Remove weights files of this format that ``keep`` (the committed manifest's) is not."""
    for p in path.glob(WEIGHTS_GLOB):
        if p.name != keep and p.is_file():
            p.unlink(missing_ok=True)


def save_nested(model: ElasticHybridLM, path: str | os.PathLike, budgets: Mapping[str, Budget], *,
                quantization: str | None = None) -> None:
    """Write ``model`` (the parent) and the budget table ``{name: Budget}`` to directory ``path``
    as one atomic commit (see the module docstring); an existing checkpoint there is replaced.

    ``quantization``: None (weights as they are), ``"nvfp4"`` or ``"fp8"`` (the linear weights of
    :func:`quantizable_weights`; for NVFP4 only those whose input features are a multiple of 16 in
    the parent and in every budget of the table, the others stay in the model's dtype).
    """
    if not isinstance(model, ElasticHybridLM):
        raise TypeError(f"save_nested: model must be an ElasticHybridLM, got {type(model).__name__}")
    model.require_float_weights("save_nested")
    if not isinstance(budgets, Mapping):
        raise TypeError(f"save_nested: budgets must be a mapping {{name: Budget}}, got {type(budgets).__name__}")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"save_nested: quantization must be None or one of {QUANTIZATIONS}, got {quantization!r}")
    shapes = []
    for name, b in budgets.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"save_nested: budget names must be non-empty strings, got {name!r}")
        if not isinstance(b, Budget):
            raise TypeError(f"save_nested: budgets[{name!r}] must be a Budget, got {type(b).__name__}")
        shapes.append(model.sliced_shapes(model.resolve_budget(b)))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    committed = _referenced(path)
    if committed is not None:
        _remove_unreferenced(path, committed)
    sha = _config_sha(model.config)
    state = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items()}
    layouts = quantizable_weights(model) if quantization else {}
    tensors: dict[str, torch.Tensor] = {}
    qtable: dict[str, str] = {}
    for name, t in state.items():
        layout = layouts.get(name)
        if layout is not None:
            ks = [t.shape[-1]] + [sh[name][-1] for sh in shapes]
            if any(k % FORMATS[quantization].BLOCK for k in ks):
                layout = None
        if layout is None:
            tensors[name] = t
        else:
            tensors.update(to_state_dict(quantize_weight(t.reshape(_qshape(tuple(t.shape), layout)), quantization),
                                         name))
            qtable[name] = layout
    quant = {"format": quantization, "tensors": qtable} if quantization else None
    full_shapes = {n: tuple(t.shape) for n, t in state.items()}
    bounds: dict[str, list[set]] = {}
    for sh in shapes:  # block boundaries at every budget's prefix of every stored tensor
        for n, (_, pre, _) in _stored(full_shapes, {k: tuple(int(v) for v in s) for k, s in sh.items()}, quant).items():
            for d, v in enumerate(pre):
                bounds.setdefault(n, [set() for _ in pre])[d].add(v)
    data, header = encode(tensors, {"format": FORMAT, "config_sha256": sha},
                          {n: [sorted(b) for b in bs] for n, bs in bounds.items()})
    weights = f"model-{digest(data)[:16]}.safetensors"
    atomic_write_bytes(path / weights, data)
    meta = {"format": FORMAT, "version": VERSION, "weights": weights, "weights_header": header, "config_sha256": sha,
            "dtype": dtype_name(model.embed.weight.dtype), "quantization": quant,
            "config": model.config.to_dict(), "budgets": {n: b.to_dict() for n, b in budgets.items()}}
    meta["checksum"] = digest(_manifest_bytes(meta))
    atomic_write_bytes(path / CONFIG, _manifest_bytes(meta))  # the commit
    _remove_unreferenced(path, weights)
    fsync_dir(path)


def read_nested_config(path: str | os.PathLike, *, verify: bool = True) -> tuple[ElasticHybridConfig, dict[str, Budget]]:
    """The parent config and the budget table of a nested checkpoint directory."""
    meta = _read_meta(os.fspath(path), verify)
    return meta["config"], meta["budgets"]


def _confined(folder: str, name, cfg_path: str) -> str:
    """``folder/name`` for a plain file name that stays inside ``folder``."""
    bad = not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name \
        or os.path.isabs(name)
    if not bad:
        full = os.path.join(folder, name)
        root = os.path.realpath(folder)
        bad = os.path.commonpath([root, os.path.realpath(full)]) != root
    if bad:
        raise CheckpointError(f"load_nested: {cfg_path}: weights {name!r} must name a file inside the checkpoint "
                              f"directory (a plain file name)")
    return full


def _read_meta(path: str, verify: bool) -> dict:
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"load_nested: {cfg_path} does not exist (not a nested checkpoint directory)")
    try:
        with open(cfg_path, "rb") as f:
            raw = f.read()
        meta = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"load_nested: {cfg_path} is not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"load_nested: {cfg_path} cannot be read ({e.strerror or e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"load_nested: {cfg_path} is not a {FORMAT} config")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"load_nested: {cfg_path} has version {meta.get('version')!r}, expected {VERSION}")
    claimed = meta.pop("checksum", None)
    if verify and (claimed != digest(_manifest_bytes(meta)) or raw != _manifest_bytes({**meta, "checksum": claimed})):
        raise CheckpointError(f"load_nested: {cfg_path} is corrupt or was edited: it fails its checksum "
                              f"(load with verify=False to skip verification)")
    try:
        config = ElasticHybridConfig.from_dict(meta["config"])
        budgets = {n: Budget.from_dict(b) for n, b in meta["budgets"].items()}
        for b in budgets.values():
            b.resolve(config)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"load_nested: {cfg_path} has a bad config or budget table ({e})") from None
    if meta.get("config_sha256") != _config_sha(config):
        raise CheckpointError(f"load_nested: {cfg_path}: config_sha256 does not match its config")
    dtype = dtype_from_name(meta.get("dtype", "float32"))
    if dtype is None or not dtype.is_floating_point:
        raise CheckpointError(f"load_nested: {cfg_path} has a bad dtype {meta.get('dtype')!r}")
    quant = meta.get("quantization")
    if quant is not None:
        if not isinstance(quant, dict) or quant.get("format") not in QUANTIZATIONS \
                or not isinstance(quant.get("tensors"), dict) \
                or not set(quant["tensors"].values()) <= {"2d", "flat", "stacked"}:
            raise CheckpointError(f"load_nested: {cfg_path} has a bad quantization table")
    return {"config": config, "budgets": budgets, "sha": meta["config_sha256"], "dtype": dtype, "quant": quant,
            "header": meta.get("weights_header"), "weights": _confined(path, meta.get("weights"), cfg_path)}


def _resolve_request(path: str, budget, verify: bool) -> tuple[dict, ElasticHybridLM, dict, dict]:
    meta = _read_meta(path, verify)
    config, table = meta["config"], meta["budgets"]
    if isinstance(budget, str):
        if budget not in table:
            raise CheckpointError(f"load_nested: budget {budget!r} is not in the checkpoint's table "
                                  f"{sorted(table)}")
        budget = table[budget]
    elif budget is not None and not isinstance(budget, Budget):
        raise TypeError(f"load_nested: budget must be a table name, a Budget or None, got {type(budget).__name__}")
    with torch.device("meta"):
        parent = ElasticHybridLM(config)
    full_shapes = {n: tuple(t.shape) for n, t in parent.state_dict().items()}
    prefixes = {n: tuple(int(v) for v in s) for n, s in parent.sliced_shapes(parent.resolve_budget(budget)).items()}
    meta["budget"] = budget
    return meta, parent, full_shapes, prefixes


def _read_state(meta: dict, full_shapes: dict, prefixes: dict, stats: dict | None, verify: bool) -> dict:
    """``{name: Tensor | QuantizedTensor}`` of the requested prefixes."""
    quant = meta["quant"] or {"format": None, "tensors": {}}
    qtensors = quant["tensors"]
    unknown = sorted(set(qtensors) - set(full_shapes))
    if unknown:
        raise CheckpointError(f"load_nested: quantization table names unknown tensors {unknown[:5]}")
    expected = set(_stored(full_shapes, full_shapes, quant))
    wanted = _stored(full_shapes, prefixes, quant)
    with TensorFile(meta["weights"], verify=verify, what="load_nested") as reader:
        if reader.metadata.get("config_sha256") != meta["sha"] or (verify and reader.header_digest != meta["header"]):
            raise CheckpointError(f"load_nested: {meta['weights']} does not belong to {CONFIG} "
                                  f"(config hash or header digest mismatch)")
        extra = sorted(set(reader.entries) - expected)
        if extra:
            raise CheckpointError(f"load_nested: {meta['weights']} has unexpected tensors {extra[:5]}")
        raw = {n: reader.read_prefix(n, pre, shape=full, want=want) for n, (full, pre, want) in wanted.items()}
    state: dict = {}
    cls = FORMATS.get(quant["format"])
    for n in prefixes:
        if n not in qtensors:
            state[n] = raw[n]
            continue
        try:
            state[n] = cls.from_parts({sfx: raw[n + sfx] for sfx in cls.PARTS})
        except ValueError as e:
            raise CheckpointError(f"load_nested: {meta['weights']}: {cls.format} weight {n!r} is inconsistent "
                                  f"({e})") from None
    if stats is not None:
        stats.update(bytes_read=reader.bytes_read, header_bytes=reader.header_bytes, file_bytes=reader.size)
    return state


def load_nested_state(path: str | os.PathLike, budget: str | Budget | None = None, *,
                      stats: dict | None = None, verify: bool = True) -> tuple[ElasticHybridConfig, dict]:
    """The submodel's config and raw tensors, reading only the prefix bytes: ``{name: Tensor}``,
    with quantized weights as containers of :mod:`elastic_kernels.formats` (shaped ``(..., N, K)``;
    ``"flat"`` layouts as (H*(2P+1), K)): :class:`~elastic_kernels.formats.NVFP4Tensor` or
    :class:`~elastic_kernels.formats.FP8Tensor`, ready for :func:`elastic_kernels.ops.linear` /
    serving without requantization."""
    meta, parent, full_shapes, prefixes = _resolve_request(os.fspath(path), budget, verify)
    state = _read_state(meta, full_shapes, prefixes, stats, verify)
    return parent.sliced_config(meta["budget"]), state


LOAD_WEIGHTS = ("dequantize", "nvfp4")


def load_nested(path: str | os.PathLike, budget: str | Budget | None = None, *,
                device: str | torch.device = "cpu", stats: dict | None = None,
                weights: str = "dequantize", verify: bool = True) -> ElasticHybridLM:
    """Build the nested submodel ``budget`` (a budget-table name, a Budget, or None = the parent)
    from the checkpoint directory ``path``, reading only the header and the prefix bytes of every
    slice (for a budget outside the checkpoint's table, with verification: up to the next block
    boundary, see :mod:`elastic_kernels.models.storage`). ``stats``, when given, receives ``bytes_read``, ``header_bytes`` and ``file_bytes``.

    ``weights``: ``"dequantize"`` (NVFP4/FP8 weights decoded into the saved dtype: a regular,
    trainable model) or ``"nvfp4"`` (NVFP4 weights stay packed, as nested slices, and the layers
    run W4A16 through :func:`elastic_kernels.nvfp4_linear` / NVFP4 ``moe_experts``; for serving:
    no gradients to them, no slice/save/importance; FP8 weights are dequantized either way).
    ``verify=False`` skips the checksums (see the module docstring).
    Raises :class:`CheckpointError` for missing, corrupt or mismatched files."""
    if weights not in LOAD_WEIGHTS:
        raise ValueError(f"load_nested: weights must be one of {LOAD_WEIGHTS}, got {weights!r}")
    meta, parent, full_shapes, prefixes = _resolve_request(os.fspath(path), budget, verify)
    raw = _read_state(meta, full_shapes, prefixes, stats, verify)
    dtype = meta["dtype"]
    state, packed = {}, {}
    for n, v in raw.items():
        v = v.reshape(prefixes[n])  # "flat" layouts back to the parameter's shape (a view)
        if isinstance(v, QuantizedTensor):
            if v.format == weights:  # kept packed: the layers run it through the ops as it is
                packed[n] = v.to(device)
                continue
            v = v.dequantize(dtype)
        state[n] = v.to(device)
    with torch.device("meta"):
        sub = ElasticHybridLM(parent.sliced_config(meta["budget"]))
    for n, q in packed.items():
        mod_name, _, attr = n.rpartition(".")
        mod = sub.get_submodule(mod_name)
        del mod._parameters[attr]
        setattr(mod, attr, q)
    sub.load_state_dict(state, strict=True, assign=True)
    return sub
