"""Nested checkpoints: one safetensors file holding the parent, plus a JSON budget table; every
nested submodel loads by reading only the prefix bytes of its slices (DESIGN §1, §6).

Layout of a checkpoint directory::

    model.safetensors   every parameter and buffer of the parent (safetensors format)
    config.json         {"format", "version", "config": ElasticHybridConfig, "budgets": {name: Budget},
                         "weights": "model.safetensors", "config_sha256", "dtype",
                         "quantization": null | {"format": "nvfp4" | "fp8", "tensors": {name: layout}}}

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

Both files are written atomically (temp file in the same directory, fsync, rename). The
safetensors metadata repeats the config hash, so a weights file that does not belong to its
config is rejected. :func:`load_nested` parses the safetensors header itself and reads each
tensor's prefix with one positioned read per contiguous run (no read-ahead), so a small budget
costs little I/O.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from typing import Mapping

import torch
from safetensors.torch import save as _st_save

from .._io import atomic_write_bytes
from ..formats import FORMATS, QuantizedTensor, to_state_dict
from ..formats.dtypes import SAFETENSORS_DTYPES, dtype_from_name, dtype_name
from ..ops.weights import quantize_weight
from .config import Budget, ElasticHybridConfig
from .model import ElasticHybridLM

QUANTIZATIONS = ("nvfp4", "fp8")
FORMAT = "elastic_kernels.nested"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A nested checkpoint is missing, corrupt, or does not match its config or the request."""


def _config_sha(config: ElasticHybridConfig) -> str:
    return hashlib.sha256(config.to_json().encode()).hexdigest()


def quantizable_weights(model: ElasticHybridLM) -> dict[str, str]:
    """The linear weights a quantized checkpoint stores in NVFP4/FP8: ``{name: layout}``
    (:meth:`ElasticHybridLM.quantizable_weights`)."""
    return model.quantizable_weights()


def _qshape(shape: tuple, layout: str) -> tuple:
    """Shape of the quantized view (..., N, K) of a parameter (prefix) of ``shape``."""
    return (math.prod(shape[:-1]), shape[-1]) if layout == "flat" else tuple(shape)


def save_nested(model: ElasticHybridLM, path: str | os.PathLike, budgets: Mapping[str, Budget], *,
                quantization: str | None = None) -> None:
    """Write ``model`` (the parent) and the budget table ``{name: Budget}`` to directory ``path``.

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
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    sha = _config_sha(model.config)
    state = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    qtable: dict[str, str] = {}
    for name, t in state.items():
        layout = quantizable_weights(model).get(name) if quantization else None
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
    tensors = {n: t.contiguous() for n, t in tensors.items()}
    atomic_write_bytes(os.path.join(path, WEIGHTS), _st_save(tensors, metadata={"format": FORMAT, "config_sha256": sha}))
    meta = {"format": FORMAT, "version": VERSION, "weights": WEIGHTS, "config_sha256": sha,
            "dtype": dtype_name(model.embed.weight.dtype),
            "quantization": {"format": quantization, "tensors": qtable} if quantization else None,
            "config": model.config.to_dict(), "budgets": {n: b.to_dict() for n, b in budgets.items()}}
    atomic_write_bytes(os.path.join(path, CONFIG), json.dumps(meta, indent=2, sort_keys=True).encode())


def read_nested_config(path: str | os.PathLike) -> tuple[ElasticHybridConfig, dict[str, Budget]]:
    """The parent config and the budget table of a nested checkpoint directory."""
    meta = _read_meta(os.fspath(path))
    return meta["config"], meta["budgets"]


def _read_meta(path: str) -> dict:
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"load_nested: {cfg_path} does not exist (not a nested checkpoint directory)")
    try:
        with open(cfg_path, "rb") as f:
            meta = json.loads(f.read().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"load_nested: {cfg_path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"load_nested: {cfg_path} is not a {FORMAT} config")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"load_nested: {cfg_path} has version {meta.get('version')!r}, expected {VERSION}")
    try:
        config = ElasticHybridConfig.from_dict(meta["config"])
        budgets = {n: Budget.from_dict(b) for n, b in meta["budgets"].items()}
        for b in budgets.values():
            b.resolve(config)
    except (KeyError, TypeError, ValueError) as e:
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
            "weights": os.path.join(path, str(meta.get("weights", WEIGHTS)))}


class _PrefixReader:
    """Reads prefix slices of tensors from a safetensors file with exact positioned reads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.bytes_read = 0
        try:
            self.f = open(path, "rb", buffering=0)
        except OSError as e:
            raise CheckpointError(f"load_nested: cannot open {path} ({e})") from None
        try:
            self.size = os.fstat(self.f.fileno()).st_size
            raw = self._read_exact(8, 0)
            (n,) = struct.unpack("<Q", raw)
            if n > self.size - 8:
                raise CheckpointError(f"load_nested: {path} is corrupt: header length {n} exceeds the file "
                                      f"({self.size} bytes)")
            try:
                self.header = json.loads(self._read_exact(n, 8).decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"load_nested: {path} is corrupt: bad safetensors header ({e})") from None
            if not isinstance(self.header, dict):
                raise CheckpointError(f"load_nested: {path} is corrupt: safetensors header is not an object")
            self.data_start = 8 + n
            self.header_bytes = self.bytes_read
        except BaseException:
            self.f.close()
            raise

    def close(self) -> None:
        self.f.close()

    def _read_exact(self, n: int, offset: int) -> bytes:
        buf = os.pread(self.f.fileno(), n, offset)
        self.bytes_read += len(buf)
        if len(buf) != n:
            raise CheckpointError(f"load_nested: {self.path} is truncated (wanted {n} bytes at {offset}, "
                                  f"got {len(buf)})")
        return buf

    @property
    def metadata(self) -> dict:
        return self.header.get("__metadata__", {}) or {}

    def entry(self, name: str, shape: tuple, want: torch.dtype | None = None) -> tuple[torch.dtype, int]:
        """Validate tensor ``name`` (full shape ``shape``, dtype ``want`` when given); return its
        dtype and data offset."""
        info = self.header.get(name)
        if not isinstance(info, dict):
            raise CheckpointError(f"load_nested: {self.path} lacks tensor {name!r}")
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None or (want is not None and dtype != want):
            raise CheckpointError(f"load_nested: {self.path}: tensor {name!r} has dtype {info.get('dtype')!r}"
                                  + (f", expected {want}" if want is not None else " (unsupported)"))
        if list(info.get("shape", [])) != list(shape):
            raise CheckpointError(f"load_nested: {self.path}: tensor {name!r} has shape {info.get('shape')}, "
                                  f"the config expects {list(shape)}")
        begin, end = info.get("data_offsets", (None, None))
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != nbytes or begin < 0 \
                or self.data_start + end > self.size:
            raise CheckpointError(f"load_nested: {self.path} is corrupt: tensor {name!r} has bad data offsets "
                                  f"{info.get('data_offsets')} for {nbytes} bytes in a {self.size}-byte file")
        return dtype, self.data_start + begin

    def read_prefix(self, name: str, shape: tuple, prefix: tuple, want: torch.dtype | None = None) -> torch.Tensor:
        """The prefix ``[:prefix[0], :prefix[1], ...]`` of tensor ``name`` (full ``shape``)."""
        dtype, offset = self.entry(name, shape, want)
        item = torch.empty(0, dtype=dtype).element_size()
        out = torch.empty(prefix, dtype=dtype)
        if out.numel() == 0:
            return out
        # dims after `j` are whole: each outer index of the prefix is one contiguous run
        j = max((d for d in range(len(shape)) if prefix[d] != shape[d]), default=-1)
        if j < 0:
            return torch.frombuffer(bytearray(self._read_exact(out.numel() * item, offset)),
                                    dtype=dtype).reshape(prefix)
        strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
        run = prefix[j] * strides[j]
        flat = out.view(-1, run)
        outer = torch.cartesian_prod(*[torch.arange(p) for p in prefix[:j]]).reshape(-1, j) if j else \
            torch.zeros(1, 0, dtype=torch.int64)
        starts = (outer * torch.tensor(strides[:j], dtype=torch.int64)).sum(1).tolist()
        for r, s in enumerate(starts):
            flat[r] = torch.frombuffer(bytearray(self._read_exact(run * item, offset + s * item)), dtype=dtype)
        return out


def _resolve_request(path: str, budget) -> tuple[dict, ElasticHybridLM, dict, dict]:
    meta = _read_meta(path)
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


def _read_state(meta: dict, full_shapes: dict, prefixes: dict, stats: dict | None) -> dict:
    """``{name: Tensor | QuantizedTensor}`` of the requested prefixes."""
    quant = meta["quant"] or {"format": None, "tensors": {}}
    qtensors = quant["tensors"]
    unknown = sorted(set(qtensors) - set(full_shapes))
    if unknown:
        raise CheckpointError(f"load_nested: quantization table names unknown tensors {unknown[:5]}")
    expected = set(full_shapes)
    cls = FORMATS.get(quant["format"])
    for n in qtensors:
        expected |= {n + sfx for sfx in cls.PARTS}
    reader = _PrefixReader(meta["weights"])
    try:
        if reader.metadata.get("config_sha256") != meta["sha"]:
            raise CheckpointError(f"load_nested: {meta['weights']} does not belong to {CONFIG} "
                                  f"(config hash mismatch)")
        extra = sorted(set(reader.header) - expected - {"__metadata__"})
        if extra:
            raise CheckpointError(f"load_nested: {meta['weights']} has unexpected tensors {extra[:5]}")
        state: dict = {}
        for n, pre in prefixes.items():
            layout = qtensors.get(n)
            if layout is None:
                state[n] = reader.read_prefix(n, full_shapes[n], pre)
                continue
            fq, pq = _qshape(full_shapes[n], layout), _qshape(pre, layout)
            if pq[-1] % cls.BLOCK:
                raise CheckpointError(f"load_nested: {cls.format} weight {n!r} can only be sliced at multiples of "
                                      f"{cls.BLOCK} input features, the budget asks for {pq[-1]}")
            full, part = cls.part_shapes(fq), cls.part_shapes(pq)
            parts = {sfx: reader.read_prefix(n + sfx, shape, part[sfx][0], dtype) for sfx, (shape, dtype) in full.items()}
            try:
                state[n] = cls.from_parts(parts)
            except ValueError as e:
                raise CheckpointError(f"load_nested: {cls.format} weight {n!r} is inconsistent ({e})") from None
    finally:
        reader.close()
    if stats is not None:
        stats.update(bytes_read=reader.bytes_read, header_bytes=reader.header_bytes, file_bytes=reader.size)
    return state


def load_nested_state(path: str | os.PathLike, budget: str | Budget | None = None, *,
                      stats: dict | None = None) -> tuple[ElasticHybridConfig, dict]:
    """The submodel's config and raw tensors, reading only the prefix bytes: ``{name: Tensor}``,
    with quantized weights as containers of :mod:`elastic_kernels.formats` (shaped ``(..., N, K)``;
    ``"flat"`` layouts as (H*(2P+1), K)): :class:`~elastic_kernels.formats.NVFP4Tensor` or
    :class:`~elastic_kernels.formats.FP8Tensor`, ready for :func:`elastic_kernels.ops.linear` /
    serving without requantization."""
    meta, parent, full_shapes, prefixes = _resolve_request(os.fspath(path), budget)
    state = _read_state(meta, full_shapes, prefixes, stats)
    return parent.sliced_config(meta["budget"]), state


LOAD_WEIGHTS = ("dequantize", "nvfp4")


def load_nested(path: str | os.PathLike, budget: str | Budget | None = None, *,
                device: str | torch.device = "cpu", stats: dict | None = None,
                weights: str = "dequantize") -> ElasticHybridLM:
    """Build the nested submodel ``budget`` (a budget-table name, a Budget, or None = the parent)
    from the checkpoint directory ``path``, reading only the header and the prefix bytes of every
    slice. ``stats``, when given, receives ``bytes_read``, ``header_bytes`` and ``file_bytes``.

    ``weights``: ``"dequantize"`` (NVFP4/FP8 weights decoded into the saved dtype: a regular,
    trainable model) or ``"nvfp4"`` (NVFP4 weights stay packed, as nested slices, and the layers
    run W4A16 through :func:`elastic_kernels.nvfp4_linear` / NVFP4 ``moe_experts``; for serving:
    no gradients to them, no slice/save/importance; FP8 weights are dequantized either way).
    Raises :class:`CheckpointError` for missing, corrupt or mismatched files."""
    if weights not in LOAD_WEIGHTS:
        raise ValueError(f"load_nested: weights must be one of {LOAD_WEIGHTS}, got {weights!r}")
    meta, parent, full_shapes, prefixes = _resolve_request(os.fspath(path), budget)
    raw = _read_state(meta, full_shapes, prefixes, stats)
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
