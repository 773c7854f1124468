"""Atomic safetensors checkpoints (no pickle) holding tensors plus JSON metadata.

A training checkpoint stores the model, router and optimizer tensors under prefixes
(``model.``, ``router.``, ``opt.<name>.<param index>.<state key>``) and a JSON ``meta`` entry with
the stage, the step, the optimizer's param groups and anything else the loop needs to resume.
Files are written through :func:`elastic_kernels._io.atomic_path` (a temporary file beside the
target, renamed into place), so an interrupted write never leaves a truncated checkpoint behind.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .._io import atomic_path

__all__ = ["save_checkpoint", "load_checkpoint", "optimizer_to_tensors", "optimizer_from_tensors",
           "CheckpointError"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match what the loop expects."""


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` and ``meta`` to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata={"meta": json.dumps(meta)})


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`; clear error when corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file: {e}") from e
    if "meta" not in md:
        raise CheckpointError(f"checkpoint {path} has no 'meta' entry; it was not written by this loop")
    try:
        meta = json.loads(md["meta"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata: {e}") from e
    return tensors, meta


def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer's state into named tensors plus JSON-able metadata."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                           prefix: str) -> None:
    """Inverse of :func:`optimizer_to_tensors`."""
    state: dict[int, dict] = {}
    head = prefix + "."
    for name, v in tensors.items():
        if not name.startswith(head):
            continue
        pid, key = name[len(head):].split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    if len(groups) != len(opt.param_groups) or any(
            len(g["params"]) != len(og["params"]) for g, og in zip(groups, opt.param_groups)):
        raise CheckpointError(f"optimizer state {prefix!r} does not match the optimizer's parameter groups")
    opt.load_state_dict({"state": state, "param_groups": groups})
