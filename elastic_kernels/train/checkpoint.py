"""Training checkpoints: checked safetensors files (no pickle) holding tensors plus JSON metadata.

A training checkpoint stores the model, router and optimizer tensors under prefixes
(``model.``, ``router.``, ``opt.<name>.<param index>.<state key>``) and a JSON ``meta`` entry with
the stage, the step, the optimizer's param groups and anything else the loop needs to resume.

The file is a checked safetensors file (:mod:`elastic_kernels.models.storage`: canonical header,
strict validation, one checksum per tensor and one of the header), written to a temporary file,
fsynced and renamed into place: after a crash at any point the old or the new file is there,
whole. ``save_checkpoint(..., keep_previous=True)`` also keeps the checkpoint it replaces as
``<stem>.prev<suffix>`` (hard link, so the current name never disappears), and
:func:`load_latest_good` falls back to it when the newest is corrupt. Each save first removes the
temporary files of killed saves of the same file. :func:`load_checkpoint` refuses a corrupt,
truncated or foreign file with a :class:`CheckpointError` naming it (``verify=False`` skips the
checksums, not the structural checks).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .._io import CheckpointError, atomic_write_bytes, remove_stale_temps, temp_path
from ..models.storage import TensorFile, encode

__all__ = ["save_checkpoint", "load_checkpoint", "load_latest_good", "previous_path", "remove_checkpoint",
           "optimizer_to_tensors", "optimizer_from_tensors", "CheckpointError"]

log = logging.getLogger(__name__)


def previous_path(path: str | os.PathLike) -> Path:
    """Where ``save_checkpoint(path, ..., keep_previous=True)`` keeps the checkpoint it replaced."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict, *,
                    keep_previous: bool = False) -> None:
    """Write ``tensors`` and ``meta`` (JSON-able) to ``path`` atomically; ``keep_previous``: keep
    the checkpoint it replaces at :func:`previous_path` (``path`` itself never goes missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    prev = previous_path(path)
    remove_stale_temps(path.parent, prev.name)
    data, _ = encode({k: v.detach().to("cpu") for k, v in tensors.items()}, {"meta": json.dumps(meta, sort_keys=True)})
    if keep_previous and path.is_file() and not (prev.is_file() and os.path.samefile(path, prev)):
        link = temp_path(prev)
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, prev)
    atomic_write_bytes(path, data)


def load_checkpoint(path: str | os.PathLike, *, verify: bool = True,
                    with_tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(tensors, meta)``; every tensor and
    the header verified unless ``verify=False``; ``with_tensors=False`` reads the header alone
    (``tensors`` empty). CheckpointError when missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with TensorFile(path, verify=verify, what="checkpoint") as f:
        if "meta" not in f.metadata:
            raise f.error("has no 'meta' entry; it was not written by this loop")
        try:
            meta = json.loads(f.metadata["meta"])
        except json.JSONDecodeError as e:
            raise f.error(f"has unreadable metadata ({e})") from None
        if not isinstance(meta, dict):
            raise f.error("has metadata that is not a JSON object")
        tensors = {name: f.read(name) for name in sorted(f.entries)} if with_tensors else {}
    return tensors, meta


def load_latest_good(path: str | os.PathLike, *, verify: bool = True
                     ) -> tuple[dict[str, torch.Tensor], dict, Path] | None:
    """The newest good checkpoint of ``path``: ``(tensors, meta, the file read)`` from ``path``,
    or from :func:`previous_path` when ``path`` is missing or corrupt (logged as a warning).
    None when neither exists; CheckpointError naming both files when neither is good."""
    errors = []
    for p in (Path(path), previous_path(path)):
        if not p.is_file():
            continue
        try:
            tensors, meta = load_checkpoint(p, verify=verify)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            log.warning("%s; falling back to the previous checkpoint %s", errors[0], p)
        return tensors, meta, p
    if errors:
        raise CheckpointError("no good checkpoint: " + "; ".join(errors))
    return None


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Remove the checkpoint ``path``, its previous one and the temporary files of killed saves."""
    path = Path(path)
    for p in (path, previous_path(path)):
        p.unlink(missing_ok=True)
        remove_stale_temps(p.parent, p.name)


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
