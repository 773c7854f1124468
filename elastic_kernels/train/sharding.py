"""FSDP2 (``torch.distributed.fsdp.fully_shard``) sharding of the training state under torchrun
(``--parallel fsdp``, docs/design.md §10).

Each rank holds one shard (dim 0) of every parameter, gradient and AdamW moment; a layer's
parameters are all-gathered only for its forward and backward. What leaves the sharded world is
always gathered to plain full tensors — checkpoints, evaluation copies, nested exports — so a
checkpoint written by an FSDP2 run is the same file a single-process or DDP run writes and
resumes under any of them.

Meta-device init: a model the runner builds ``shardable`` exists whole on rank 0 only; the other
ranks build it on the meta device and, once :func:`shard` has laid out the shards, receive theirs
from rank 0 (:func:`materialize`), one tensor at a time. The values are rank 0's, so the sharded
run starts from exactly the single-process model.

Sharding units: the mixer of every layer of each :class:`~elastic_kernels.models.ElasticHybridLM`
inside the wrapped module (the model calls ``block.norm`` and ``block.mixer`` itself, so a mixer
is the smallest unit whose ``__call__`` runs), then the wrapped module as the root (embedding,
norms, LM head, routers).
"""
from __future__ import annotations

import copy
import itertools
import sys

import torch
from torch import nn

__all__ = ["gather_state", "gather_tensors", "has_meta", "is_sharded", "like", "materialize", "meta_copy", "plain",
           "release_meshes", "shard", "shard_optimizer_state"]


def _is_dtensor(t) -> bool:
    """``isinstance(t, DTensor)`` without importing ``torch.distributed.tensor`` (about 1.3 s:
    sympy, torch.fx's symbolic shapes) in runs that shard nothing: no DTensor exists before that
    module is imported (``fully_shard`` imports it)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def release_meshes() -> None:
    """Drop what torch's DTensor layer keeps of the device meshes of a sharded run, so that
    ``destroy_process_group`` afterwards really frees the process group; call it just before.
    A no-op in runs that never imported ``torch.distributed.tensor``.

    DTensor memoizes sharding propagations and redistribution plans (``functools`` caches, its
    C++ fast path's cache and the redistribute planners), keyed by and holding ``DeviceMesh``
    objects, and a mesh holds its process groups (measured, torch 2.13, FSDP2 on 2 gloo ranks:
    4 meshes alive after the run, each holding the default group). A group still held when the
    interpreter tears down takes its gloo threads into that teardown (see
    :func:`elastic_kernels.train.runner.setup_distributed` for the other holder). The caches
    only memoize: clearing them changes no result.
    """
    if "torch.distributed.tensor" not in sys.modules:
        return
    import functools
    import gc
    import importlib

    cached = type(functools.lru_cache(maxsize=None)(len))  # functools' cache wrapper type
    for obj in gc.get_objects():  # module-level, class-level and nested caches alike
        if isinstance(obj, cached) and str(getattr(obj, "__module__", "")).startswith("torch.distributed"):
            obj.cache_clear()
    for module, fn in (("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),
                       ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache")):
        try:
            clear = getattr(importlib.import_module(module), fn, None)
        except ImportError:  # another torch version: the functools caches are cleared still
            continue
        if callable(clear):
            clear()
    gc.collect()


def shard(module: nn.Module) -> nn.Module:
    """Shard ``module`` in place with ``fully_shard`` over the default process group (all ranks);
    returns it. Build its optimizer after this call: sharding replaces the parameters."""
    from torch.distributed.fsdp import fully_shard

    from ..models import ElasticHybridLM
    for m in list(module.modules()):
        if isinstance(m, ElasticHybridLM):
            for block in m.layers:
                fully_shard(block.mixer)
    fully_shard(module)
    return module


def has_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` lives on the meta device."""
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def materialize(module: nn.Module, full: dict[str, torch.Tensor] | None, device: torch.device, src: int = 0) -> None:
    """Fill a module :func:`shard` just sharded whose tensors live on the meta device on every rank
    but ``src`` (meta-device init: only ``src`` ever held the whole model). ``full``: on rank
    ``src`` the module's state dict taken before sharding, None elsewhere. Each rank allocates its
    shards, then receives them tensor by tensor (``distribute_tensor`` from ``src``: one full
    tensor at a time in flight, never the whole model); unsharded tensors (buffers) are
    broadcast. A collective: every rank calls it."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    if has_meta(module):
        module.to_empty(device=device)
    own = module.state_dict()
    for k in sorted(own):  # the same order on every rank
        ref = own[k]
        shape = ref.shape  # a DTensor's global shape
        t = full[k].to(device=device, dtype=ref.dtype) if full is not None else torch.empty(
            shape, dtype=ref.dtype, device=device)
        if _is_dtensor(ref):
            ref.to_local().copy_(distribute_tensor(t, ref.device_mesh, ref.placements, src_data_rank=src).to_local())
        else:
            dist.broadcast(t, src)
            ref.copy_(t)


def meta_copy(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose parameters live on the meta device (no memory);
    buffers are real copies. Fill it with ``load_state_dict(full, assign=True)``."""
    memo = {id(p): nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad) for p in module.parameters()}
    return copy.deepcopy(module, memo)


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, gradient or optimizer state shard)."""
    return _is_dtensor(t)


def plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a plain full tensor (all-gathers a DTensor: every rank must call it)."""
    return t.full_tensor() if _is_dtensor(t) else t


def gather_tensors(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Full CPU copies of ``tensors`` (DTensors all-gathered, in sorted name order so every rank
    issues the same collectives); ``keep=False`` (a rank that does not need them) returns {}."""
    out = {}
    for k in sorted(tensors):
        v = plain(tensors[k]).detach()
        if keep:
            out[k] = v.cpu()
    return out


def gather_state(module: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every sharded tensor gathered (collective), on CPU; {} when
    not ``keep``."""
    return gather_tensors(module.state_dict(), keep)


def like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``full`` (a full tensor, identical on every rank) laid out as ``ref``: this rank's shard
    when ``ref`` is a DTensor (no communication), else ``full`` itself."""
    if not _is_dtensor(ref):
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(device=ref.device, dtype=ref.dtype), ref.device_mesh, ref.placements,
                             src_data_rank=None)


def shard_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """After ``opt.load_state_dict`` of full (gathered) state: lay every per-parameter state
    tensor of a sharded parameter out as that parameter (scalars such as AdamW's ``step`` stay)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if not _is_dtensor(p):
                continue
            st = opt.state.get(p, {})
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and not _is_dtensor(v) and v.shape == p.shape and v.dim():
                    st[k] = like(v, p)
