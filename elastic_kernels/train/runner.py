"""The training runner: distributed setup, the run directory (progress, lock, checkpoints), the
resumable step loop, stop/resume, and the order of stages (docs/design.md §2).

Stages (:mod:`.parent`, :mod:`.importance`, :mod:`.elastic`, :mod:`.qad`, :mod:`.baselines`,
assembled by :mod:`.pipeline`) use only this module's public API: a :class:`Runner` gives them the
config, the task and its splits, fresh models, DDP or FSDP2 wrapping (:meth:`Runner.wrap`) and the
plain full copies evaluation and export need (:meth:`Runner.gathered`), sharded training batches,
:meth:`Runner.optimizer_step` (non-finite guard), :meth:`Runner.train` (the resumable loop),
model artifacts (:meth:`Runner.save_model` / :meth:`Runner.load_model`), evaluation
(:meth:`Runner.evaluate`, and :attr:`Runner.workers` for any per-problem or per-setting work) and
:meth:`Runner.finish_stage`.

Determinism: every batch, budget draw and Gumbel sample is a pure function of (seed, stage, step),
so a run stopped at any step and resumed with ``--resume`` logs exactly the metrics of an
uninterrupted run. Under ``torchrun`` or ``--procs`` (:mod:`.launch`) each rank takes its shard of
the same global batch and ``DistributedDataParallel`` averages gradients (``--parallel fsdp``: FSDP2 shards parameters,
gradients and optimizer state instead, :mod:`.sharding`); every evaluation is split too (each rank
runs its share of the problems, :class:`RankWorkers`, and the per-problem results are gathered
back in order, so the numbers are the single-process ones); rank 0 writes files.
Checkpoints always hold full (gathered) tensors, so any of the three resumes any other's run.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import json
import logging
import math
import os
import signal
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import tasks
from .._io import atomic_write_text
from ..infer.evaluate import Workers
from ..tasks import Batch
from .checkpoint import (CheckpointError, load_checkpoint, load_latest_good, optimizer_from_tensors,
                         optimizer_to_tensors, remove_checkpoint, save_checkpoint)
from .config import RESUME_FREE, TrainConfig
from .evaluate import evaluate_model
from .lock import RunLock
from .metrics import MetricsLog

log = logging.getLogger(__name__)

__all__ = ["Runner", "StopRun", "RunError", "NonFiniteError", "DistInfo", "RankWorkers", "setup_distributed",
           "end_process_group", "process_group", "STATE_NAME"]

STATE_NAME = "state.safetensors"
_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRun(Exception):
    """The run stopped early (``stop_after``, Ctrl-C or SIGTERM) after writing a resumable checkpoint.

    ``signum`` is the signal that asked for the stop (None for ``stop_after``); ``exit_code`` the
    process exit status a CLI should return (130 for SIGINT, 143 for SIGTERM, 0 otherwise).
    """

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def interrupted(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return _EXIT_CODES.get(self.signum, 128 + int(self.signum)) if self.signum is not None else 0


class RunError(RuntimeError):
    """The run directory cannot be used as asked (corrupt progress, no run to resume, ...)."""


class NonFiniteError(RunError):
    """A training step produced a non-finite loss or gradient (``on_nonfinite="stop"``)."""


@dataclass
class DistInfo:
    rank: int
    world: int
    device: torch.device
    owns_group: bool = False  # the process group was created here (and is destroyed by Runner.close)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RunError("device=cuda was requested but torch sees no CUDA device")
    if world > 1 and cfg.batch_size % world:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of ranks ({world})")
    device = torch.device(f"cuda:{local}") if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        # torch.distributed.nn.functional's collectives default to ``group=group.WORLD``, evaluated
        # when it is first imported (``fully_shard`` imports it): imported after the group exists,
        # ten function defaults hold the default group, so destroy_process_group cannot free it,
        # and its gloo threads live on into the interpreter's teardown, where the process now and
        # then died with "terminate called without an active exception" after a finished run
        # (torch 2.13, FSDP2 on 2 gloo ranks). Imported first, those defaults are None.
        try:
            importlib.import_module("torch.distributed.nn.functional")
        except ImportError:  # a build without it: then nothing imports it later either
            pass
        dist.init_process_group("nccl" if want_cuda else "gloo")
    return DistInfo(rank, world, device, owns)


@contextlib.contextmanager
def process_group(cfg: TrainConfig) -> Iterator[DistInfo]:
    """Hold the torchrun / ``--procs`` process group (:func:`setup_distributed`) for several runs
    in one process (``--seeds``): the runners inside use it instead of creating and destroying
    their own, which would race (a rank that finished first would rendezvous with the previous
    run's store). Destroyed on exit when created here."""
    info = setup_distributed(cfg)
    try:
        yield info
    finally:
        end_process_group(info)


def end_process_group(info: DistInfo | None) -> None:
    """Destroy the process group when ``info`` created it (:func:`setup_distributed`) and it is
    still up, after DTensor's caches of FSDP2's device meshes, which hold the group, are
    released (:func:`.sharding.release_meshes`): so that destroying it ends it (idempotent)."""
    if info is not None and info.owns_group and dist.is_initialized():
        from .sharding import release_meshes
        release_meshes()
        dist.destroy_process_group()


class RankWorkers(Workers):
    """:class:`~elastic_kernels.infer.evaluate.Workers` over the ranks of the process group:
    ``map(fn, items)`` applies ``fn`` to ``items[rank::world]`` on each rank and returns every
    rank's results in the order of ``items``, on every rank (``all_gather_object``); ``once(fn)``
    runs ``fn`` on rank 0 and returns its result on every rank (``broadcast_object_list``). Both
    are collectives: every rank calls them with the same ``items``."""

    def __init__(self, info: DistInfo) -> None:
        self.rank, self.world = info.rank, info.world

    def map(self, fn, items) -> list:
        items = list(items)
        if self.world == 1:
            return super().map(fn, items)
        mine = super().map(fn, items[self.rank::self.world])
        parts: list = [None] * self.world
        dist.all_gather_object(parts, mine)
        out: list = [None] * len(items)
        for r, part in enumerate(parts):
            out[r::self.world] = part
        return out

    def once(self, fn):
        if self.world == 1:
            return fn()
        box = [fn() if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _merge_missing(into: dict, part: dict) -> None:
    """Copy into ``into`` what ``part`` (a concurrent stage's copy of the results) adds: keys
    ``into`` lacks or holds as None, recursively through dicts and equal-length lists of dicts."""
    for k, v in part.items():
        cur = into.get(k)
        if cur is None:
            if v is not None:
                into[k] = v
        elif isinstance(cur, dict) and isinstance(v, dict):
            _merge_missing(cur, v)
        elif isinstance(cur, list) and isinstance(v, list) and len(cur) == len(v):
            for a, b in zip(cur, v):
                if isinstance(a, dict) and isinstance(b, dict):
                    _merge_missing(a, b)


def _state_tensors(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for prefix, m in modules.items() for k, v in m.state_dict().items()}


def _load_state_tensors(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor], path,
                        sharded: bool = False) -> None:
    for prefix, module in modules.items():
        head = prefix + "."
        sd = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
        if sharded:  # full tensors -> this rank's shards of the FSDP2 parameters
            from .sharding import like
            own = module.state_dict()
            sd = {k: like(v, own[k]) if k in own else v for k, v in sd.items()}
        try:
            module.load_state_dict(sd)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path}: {prefix} tensors do not match the model: {e}") from e


class Runner:
    """One run of the reference loop in ``cfg.run_dir``.

    Public attributes: ``cfg``, ``dist`` (:class:`DistInfo`), ``device``, ``dir`` (the run
    directory), ``task`` (:class:`elastic_kernels.tasks.Task`), ``model_config``, ``metrics``
    (:class:`~.metrics.MetricsLog`), ``val`` / ``test`` (evaluation problems), ``progress`` (the
    ``progress.json`` dict; ``results`` is its per-stage results), ``workers``
    (:class:`RankWorkers`: independent evaluation work split across the ranks).
    """

    def __init__(self, cfg: TrainConfig) -> None:
        from ..models import ElasticHybridConfig

        cfg.validate()
        self.cfg = cfg
        self.dir = Path(cfg.resolved_run_dir())
        if cfg.resume and not (self.dir / "progress.json").is_file():
            raise RunError(f"--resume: {self.dir} holds no run to resume (no progress.json); drop --resume to "
                           "start a new run there")
        self._lock: RunLock | None = None
        self.dist = setup_distributed(cfg)
        self.rank = self.dist.rank  # the process's rank (self.dist is a one-process view in a concurrent stage)
        self.workers = RankWorkers(self.dist)
        self._solo: str | None = None  # the concurrent stage this process runs alone (run_concurrent)
        self.sharded = cfg.parallel == "fsdp" and self.dist.world > 1  # FSDP2 (else DDP when world > 1)
        # sharded module or submodule -> its meta-device copy (weak: a finished stage's modules drop out)
        self._templates: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()
        try:
            self.device = self.dist.device
            if cfg.threads > 0:
                torch.set_num_threads(cfg.threads)
            self.task = tasks.get(cfg.resolved_task(), **cfg.task_kwargs())
            # --parent: the imported weights, stage 0 of the run (under FSDP2 rank 0 alone reads them:
            # {} elsewhere, whose shards come from rank 0)
            self.parent_state = None
            if cfg.parent:
                from ..interop import load_parent, parent_config
                choices = cfg.model.get("nested_choices")
                if self.sharded and not self.dist.main:
                    self.model_config, self.parent_state = parent_config(cfg.parent, nested_choices=choices), {}
                else:
                    parent, self.model_config = load_parent(cfg.parent, nested_choices=choices)
                    self.parent_state = {k: v.float() for k, v in parent.state_dict().items()}
                if self.task.vocab_size > self.model_config.vocab_size:
                    raise RunError(f"--parent: the task's tokenizer has {self.task.vocab_size} tokens, more than the "
                                   f"parent's vocab_size {self.model_config.vocab_size}")
            else:
                self.model_config = ElasticHybridConfig(**{"vocab_size": self.task.vocab_size, **cfg.model})
            self.metrics = MetricsLog(self.dir / "metrics.jsonl", enabled=self.dist.main)
            self.val = self.task.problems("val", cfg.val_size, seed=0)
            self.test = self.task.problems("test", cfg.test_size, seed=0)
            self.steps_done_here = 0
            self._stop_signal: int | None = None
            self._clock = (time.perf_counter(), 0.0, time.process_time(), 0.0)  # stage t0, prior, cpu0, cpu prior
            self._where = ("", 0, 0)  # stage, step being run, last saved step
            if self.dist.main:
                self._lock = RunLock(self.dir).acquire()
            self.progress = self._init_progress()
        except BaseException:
            self.close()
            raise

    # ---- run directory ------------------------------------------------------------------------
    @property
    def results(self) -> dict:
        return self.progress["results"]

    @property
    def is_main(self) -> bool:
        return self.dist.main

    def _init_progress(self) -> dict:
        """Rank 0 opens (``--resume``) or creates ``progress.json``; the other ranks then read it."""
        path = self.dir / "progress.json"
        prog = self._open_or_create_progress(path) if self.dist.main else None
        self.barrier()
        return prog if prog is not None else self._read_progress(path)

    def _read_progress(self, path: Path) -> dict:
        try:
            prog = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunError(f"{path} is unreadable or corrupt ({e}); the run in {self.dir} cannot be resumed: restore "
                           "the file or start a new run in another --run-dir") from None
        need = ("config", "done", "tokens", "time_s", "results")
        if not isinstance(prog, dict) or any(k not in prog for k in need):
            raise RunError(f"{path} is not a progress file of this loop (it needs the keys {list(need)}); start a "
                           "new run in another --run-dir")
        return prog

    def _open_or_create_progress(self, path: Path) -> dict:
        cfg_json = self.cfg.to_json()
        if path.exists():
            if not self.cfg.resume:
                raise FileExistsError(f"run directory {self.dir} already holds a run; pass --resume to continue "
                                      "it or choose another --run-dir")
            prog = self._read_progress(path)
            old = {k: v for k, v in prog["config"].items() if k not in RESUME_FREE}
            new = {k: v for k, v in cfg_json.items() if k not in RESUME_FREE}
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff:
                raise ValueError(f"--resume: the configuration differs from the run in {self.dir} in {diff}")
            return prog
        prog = {"config": cfg_json, "task": self.task.to_dict(), "done": [], "tokens": {}, "time_s": {},
                "results": {}}
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "model_config.json", self.model_config.to_json())
        self._write_progress(prog)
        return prog

    def _write_progress(self, prog: dict) -> None:
        atomic_write_text(self.dir / "progress.json", json.dumps(prog, indent=2, sort_keys=True))

    def close(self) -> None:
        """Release the run directory and destroy the process group this runner created (idempotent).

        Destroying it before the interpreter exits matters: a gloo group left to the interpreter's
        teardown is torn down while its worker threads are still joinable, and the process then
        dies with "terminate called without an active exception" (:func:`end_process_group`)."""
        if self._lock is not None:
            self._lock.release()
        end_process_group(getattr(self, "dist", None))

    # ---- distributed helpers ------------------------------------------------------------------
    def barrier(self) -> None:
        if self.dist.world > 1:
            dist.barrier()

    def wrap(self, module: nn.Module, *, every_parameter_used: bool = False) -> nn.Module:
        """``module`` itself, or wrapped in ``DistributedDataParallel`` under torchrun, or (``--parallel
        fsdp``) sharded in place with FSDP2 and returned. Build optimizers after this call (FSDP2
        replaces the parameters); read a sharded module's weights through :meth:`gathered`.
        ``every_parameter_used``: every step's forward uses every parameter (a whole model, not a
        budget of it), so DDP skips its search of the graph for unused ones."""
        if self.dist.world == 1:
            return module
        if self.sharded:
            from .sharding import meta_copy
            tmpl = meta_copy(module)
            for name, sub in module.named_modules():
                self._templates[sub] = tmpl.get_submodule(name)
            return self._shard(module)
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        # the models' buffers are constants every rank holds alike (no running statistics): DDP
        # need not broadcast them before every forward, a collective per step that waits for the
        # slowest rank (torch < 2.13, without forward_sync_buffers, also skips the sync at init)
        sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                else {"broadcast_buffers": False})
        return DDP(module, device_ids=ids, find_unused_parameters=not every_parameter_used, **sync)

    def shard_frozen(self, module: nn.Module) -> nn.Module:
        """A frozen module every rank runs forward only (the stage-2 teacher): sharded in place under
        ``--parallel fsdp`` (each forward all-gathers its layers), else ``module`` as it is."""
        return self._shard(module) if self.sharded else module

    def _shard(self, module: nn.Module) -> nn.Module:
        """Shard ``module``; when ranks > 0 built it on the meta device (:meth:`new_model`
        ``shardable``), each rank then receives its shards from rank 0 (:func:`.sharding.materialize`)."""
        from .sharding import has_meta, materialize, shard
        lazy = self._any_rank(has_meta(module))
        full = dict(module.state_dict()) if lazy and self.dist.main else None
        shard(module)
        if lazy:
            materialize(module, full, self.device)
            del full
        local = sum(p.to_local().numel() for p in module.parameters())
        total = sum(p.numel() for p in module.parameters())
        log.info("FSDP2: %s sharded over %d ranks; rank 0 holds %d of its %d parameters%s",
                 type(module).__name__.removeprefix("FSDP"), self.dist.world, local, total,
                 "; the other ranks built it on the meta device and received their shards from rank 0" if lazy else "")
        return module

    def gathered(self, module: nn.Module, everywhere: bool = False) -> nn.Module | None:
        """A plain module with the full weights of ``module`` (a module :meth:`wrap` sharded, or a
        submodule of one): gathered from the shards on every rank (a collective: all ranks call
        it), kept on rank 0 — on every rank when ``everywhere`` — and None on the others.
        ``module`` itself when it is not sharded."""
        if module not in self._templates:
            return module
        from .sharding import gather_state
        keep = everywhere or self.dist.main
        sd = gather_state(module, keep)
        if not keep:
            return None
        out = copy.deepcopy(self._templates[module])
        out.load_state_dict(sd, assign=True)
        return out.to(self.device)

    def _full_state(self, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of ``modules`` (gathered under FSDP2: every rank calls it; {} on
        ranks > 0 there)."""
        if not self.sharded:
            return _state_tensors(modules)
        from .sharding import gather_state
        return {f"{prefix}.{k}": v for prefix, m in modules.items()
                for k, v in gather_state(m, self.dist.main).items()}

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        if self.dist.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.dist.world for k, v in zip(keys, t.tolist())}

    def _any_rank(self, flag: bool) -> bool:
        if self.dist.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    # ---- models and data ----------------------------------------------------------------------
    def new_model(self, config=None, seed: int | None = None, *, shardable: bool = False,
                  state: dict | None = None) -> nn.Module:
        """A freshly initialized ``ElasticHybridLM`` (default: the run's model config and seed),
        with ``state`` loaded when given. ``shardable``: a model that ranks > 0 use only through
        :meth:`wrap` / :meth:`shard_frozen` (or sizes and parameter counts): under FSDP2 only rank 0
        builds it whole; the other ranks build it on the meta device (no memory; ``state`` and
        :meth:`load_model` skip it) and receive their shards from rank 0 when it is sharded."""
        from ..models import ElasticHybridLM
        torch.manual_seed(self.cfg.seed if seed is None else seed)
        if shardable and self.sharded and not self.dist.main:
            with torch.device("meta"):
                return ElasticHybridLM(config or self.model_config)
        model = ElasticHybridLM(config or self.model_config).to(self.device)
        if state is not None:
            model.load_state_dict(state, strict=True)
        return model

    def train_batch(self, step: int, *, difficulty: int | None = None, stream: int = 0) -> tuple[Batch, int, float]:
        """This rank's rows of global training batch ``step`` of ``stream``, the global count of
        real (non-pad) tokens, and the loss denominator (global masked positions / ranks: DDP's
        gradient average then equals the single-process gradient)."""
        batch = self.task.batch("train", self.cfg.batch_size, index=stream * 10_000_000 + step, difficulty=difficulty)
        tokens = int((batch.input_ids != self.task.pad_id).sum())
        denom = max(float(batch.loss_mask.sum()), 1.0) / self.dist.world
        r, w = self.dist.rank, self.dist.world
        b = Batch(batch.input_ids[r::w].to(self.device), batch.targets[r::w].to(self.device),
                  batch.loss_mask[r::w].to(self.device))
        return b, tokens, denom

    def evaluate(self, model, *, test: bool = True) -> dict:
        """``{"val_loss", "val_acc", "test_acc"}`` of ``model`` (test_acc None unless ``test``),
        the problems split across the ranks (:attr:`workers`): every rank calls it with a full
        model (under FSDP2 ``gathered(module, everywhere=True)``) and gets the same result."""
        return evaluate_model(model, self.task, self.val, self.test if test else None, device=self.device,
                              workers=self.workers)

    def final_eval(self, stage: str, model: nn.Module, steps: int, tokens: int) -> dict:
        """The finished stage's record of a trained model: its parameter counts, ``steps``,
        ``tokens`` and the validation numbers of :meth:`evaluate` of its full copy (the test
        accuracy is the evaluate stage's, :mod:`.science`), logged as the stage's final metrics
        line. Every rank must call it (gather and evaluation are collective)."""
        res = {"params_total": model.param_count(None), "params_active": model.param_count(None, active=True),
               "steps": steps, "tokens": tokens}
        res |= self.evaluate(self.gathered(model, everywhere=True), test=False)
        self.metrics.log({"stage": stage, "step": steps, "final": True, "eval": res})
        return res

    def save_model(self, name: str, modules: dict[str, nn.Module], meta: dict) -> None:
        """Write ``<run_dir>/<name>.safetensors`` with each module's tensors under its prefix (rank 0)."""
        tensors = self._full_state(modules)
        if self.dist.main:
            save_checkpoint(self.dir / f"{name}.safetensors", tensors, meta)
        self.barrier()

    def load_model(self, name: str, modules: dict[str, nn.Module]) -> dict:
        """Load :meth:`save_model`'s artifact into ``modules``; returns its metadata. Modules on the
        meta device (ranks > 0 of a :meth:`new_model` ``shardable`` model) are left to
        :meth:`wrap` / :meth:`shard_frozen`, which fill them from rank 0."""
        from .sharding import has_meta
        path = self.dir / f"{name}.safetensors"
        real = {k: m for k, m in modules.items() if not has_meta(m)}
        tensors, meta = load_checkpoint(path, with_tensors=bool(real))
        _load_state_tensors(real, tensors, path, self.sharded)
        return meta

    # ---- one optimizer step -------------------------------------------------------------------
    def optimizer_step(self, opt: torch.optim.Optimizer, loss: torch.Tensor,
                       clip: Iterable[torch.nn.Parameter] | None = None) -> float:
        """Backward ``loss``, clip the gradient norm of ``clip`` (default: every parameter of
        ``opt``) to ``cfg.grad_clip`` (0: no clipping), and step, unless the loss or a gradient is
        non-finite: then ``cfg.on_nonfinite="stop"`` raises :class:`NonFiniteError` (nothing of
        this step is saved; the last checkpoint stays), ``"skip"`` drops the step's update.
        Returns the gradient norm of ``clip`` before clipping (NaN for a skipped step)."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        every = [p for g in opt.param_groups for p in g["params"]]
        params = every if clip is None else list(clip)
        inside = {id(p) for p in params}
        # each gradient's norm is taken once: that of ``clip`` (what clip_grad_norm_ computes, in
        # its order) and, for the finiteness check, that of the optimizer's other parameters
        rest = [p for p in every if id(p) not in inside]
        norms = [self._grad_norm(params)] + ([self._grad_norm(rest)] if rest else [])
        loss_ok = math.isfinite(float(loss.detach()))
        bad = self._any_rank(not (loss_ok and all(math.isfinite(float(n)) for _, n in norms)))
        if bad:
            stage, step, saved = self._where
            if self.cfg.on_nonfinite == "stop":
                kept = (f"the last good checkpoint {self.checkpoint_path} (step {saved}) is kept" if saved
                        else "no checkpoint of this stage was written yet")
                shown = [float(n) for _, n in norms]
                raise NonFiniteError(
                    f"stage {stage} step {step + 1}: non-finite loss ({float(loss.detach())}) or gradient norm "
                    f"({shown[0] if len(shown) == 1 else shown}); the run stopped and {kept}. Lower the learning "
                    "rate, or pass --on-nonfinite skip to skip such steps")
            log.warning("stage %s step %d: non-finite loss or gradient, step skipped", stage, step + 1)
            opt.zero_grad(set_to_none=True)
            self.progress.setdefault("skipped_steps", {})[stage] = self.progress.get(
                "skipped_steps", {}).get(stage, 0) + 1
            return math.nan
        raw, norm = norms[0]
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, raw)
        gn = float(norm)
        opt.step()
        return gn

    def _grad_norm(self, params: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The 2-norm of the gradients of ``params`` (those without one skipped; 0 for none): as
        computed (a DTensor under FSDP2) and as a plain tensor."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if self.sharded:  # FSDP2: a DTensor norm over the shards
            from .sharding import plain
            return norm, plain(norm)
        return norm, norm

    # ---- the generic resumable training loop --------------------------------------------------
    def train(self, stage: str, steps: int, modules: dict[str, nn.Module], opt: torch.optim.Optimizer,
              step_fn: Callable[[int], dict], eval_fn: Callable[[int], dict] | None = None) -> int:
        """Run ``step_fn(step)`` for ``step`` in ``[start, steps)``, resuming from this stage's
        checkpoint; returns the tokens of the stage. ``step_fn`` returns the step's metrics and its
        ``"tokens"``; ``eval_fn(step)`` runs on every rank every ``cfg.eval_every`` steps (it
        evaluates with :meth:`evaluate`, which splits the work; rank 0 logs its result). ``modules``
        and ``opt`` are what a checkpoint holds. Each save keeps the one it replaces; a resume
        whose newest checkpoint is corrupt falls back to that previous one (a warning), and
        refuses with a :class:`CheckpointError` naming both when neither is good."""
        cfg = self.cfg
        if self.sharded:
            from .sharding import is_sharded
            stale = [tuple(p.shape) for g in opt.param_groups for p in g["params"] if not is_sharded(p)]
            if stale:
                raise RunError(f"stage {stage}: the optimizer holds {len(stale)} parameters FSDP2 does not shard "
                               f"(shapes {stale[:3]}...): build it after Runner.wrap, which replaces them")
        ck = self.checkpoint_path
        start, tokens, elapsed = 0, 0, 0.0
        found = load_latest_good(ck)
        if found is not None:
            tensors, meta, ck_read = found
            if meta.get("stage") == stage:
                _load_state_tensors(modules, tensors, ck_read, self.sharded)
                optimizer_from_tensors(opt, tensors, meta["opt"], "opt")
                if self.sharded:
                    from .sharding import shard_optimizer_state
                    shard_optimizer_state(opt)
                start, tokens, elapsed = meta["step"], meta["tokens"], meta["time_s"]
                t0, _, cpu0, _ = self._clock
                self._clock = (t0, meta.get("stage_time_s", elapsed), cpu0, meta.get("stage_cpu_s", 0.0))
                log.info("resumed stage %s at step %d from %s", stage, start, ck_read.name)
        self.metrics.truncate_after(lambda r: not (r.get("stage") == stage and r.get("step", 0) > start))
        t0 = time.perf_counter() - elapsed
        self._where = (stage, start, start)

        def save(step: int) -> None:
            ot, om = optimizer_to_tensors(opt, "opt") if self.dist.main or self.sharded else ({}, {})
            state = self._full_state(modules)
            if self.sharded:
                from .sharding import gather_tensors
                ot = gather_tensors(ot, self.dist.main)
            if self.dist.main:
                st0, prior, cpu0, cpu_prior = self._clock
                save_checkpoint(ck, state | ot, {
                    "stage": stage, "step": step, "tokens": tokens, "opt": om, "time_s": time.perf_counter() - t0,
                    "stage_time_s": prior + time.perf_counter() - st0,
                    "stage_cpu_s": cpu_prior + time.process_time() - cpu0}, keep_previous=True)
            self._where = (stage, step, step)

        bar = None
        if cfg.progress and self.rank == 0 and start < steps:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, initial=start, desc=stage, leave=False, dynamic_ncols=True)
        try:
            for step in range(start, steps):
                self._where = (stage, step, self._where[2])
                rec = step_fn(step)
                tokens += int(rec.pop("tokens"))
                self.steps_done_here += 1
                done = step + 1
                if done % cfg.log_every == 0 or done == steps:
                    vals = self.mean_over_ranks(rec)
                    self.metrics.log({"stage": stage, "step": done, "tokens": tokens, **vals,
                                      "time": round(time.perf_counter() - t0, 3)})
                    if bar is not None:
                        bar.set_postfix({k: f"{v:.3g}" for k, v in vals.items() if k in ("loss", "kd", "router")})
                if eval_fn is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < steps:
                    self.metrics.log({"stage": stage, "step": done, "eval": eval_fn(done)})
                if bar is not None:
                    bar.update(1)
                stop = self._should_stop()
                if stop or done % cfg.ckpt_every == 0:
                    save(done)
                if stop and done < steps:
                    self.barrier()  # rank 0 has written the checkpoint before any rank exits
                    raise StopRun(f"stopped in stage {stage} at step {done}/{steps}; continue with "
                                  f"elastic-train --resume --run-dir {self.dir}", self._stop_signal)
        finally:
            if bar is not None:
                bar.close()
        return tokens

    def _should_stop(self) -> bool:
        cfg = self.cfg
        return self._any_rank(self._stop_signal is not None
                              or (cfg.stop_after > 0 and self.steps_done_here >= cfg.stop_after))

    def finish_stage(self, stage: str, tokens: int | None = None) -> None:
        """Record the stage as done (time, CPU time of rank 0 and of every rank, tokens) and drop its
        training checkpoint. Every rank calls it."""
        st0, prior, cpu0, cpu_prior = self._clock
        self.progress["time_s"][stage] = round(prior + time.perf_counter() - st0, 2)
        cpu = round(cpu_prior + time.process_time() - cpu0, 2)
        self.progress.setdefault("cpu_s", {})[stage] = cpu  # rank 0's
        self.progress.setdefault("cpu_s_ranks", {})[stage] = self.workers.map(lambda ranks: [cpu for _ in ranks],
                                                                              range(self.dist.world))
        if tokens is not None:
            self.progress["tokens"][stage] = tokens
        self.progress["done"].append(stage)
        if self._solo == stage:  # a concurrent stage: its record waits in stages/ for run_concurrent
            rec = {"stage": stage, "time_s": self.progress["time_s"][stage], "cpu_s": self.progress["cpu_s"][stage],
                   "tokens": self.progress["tokens"].get(stage), "results": self.progress["results"],
                   "skipped_steps": self.progress.get("skipped_steps", {}).get(stage)}
            atomic_write_text(self._part(stage, ".json"), json.dumps(rec, sort_keys=True))
            remove_checkpoint(self.checkpoint_path)
        elif self.dist.main:
            self._write_progress(self.progress)
            remove_checkpoint(self.checkpoint_path)
        self.barrier()
        if self._should_stop() and stage != "report":
            raise StopRun(f"stopped after stage {stage}; continue with elastic-train --resume --run-dir {self.dir}",
                          self._stop_signal)

    @property
    def checkpoint_path(self) -> Path:
        """The resumable checkpoint of the stage being run: ``state.safetensors``, or
        ``state.<stage>.safetensors`` for a concurrent stage (two run at once)."""
        return self.dir / (STATE_NAME if self._solo is None else f"state.{self._solo}.safetensors")

    def _part(self, stage: str, suffix: str) -> Path:
        return self.dir / "stages" / f"{stage}{suffix}"

    def run_concurrent(self, group: list[tuple[str, Callable[[], object]]]) -> None:
        """Run independent stages at the same time, one process each (docs/design.md §10).

        With several DDP processes, each process takes the next unclaimed stage of ``group`` (in
        order; a claim is an exclusive file create in ``<run_dir>/stages/``) and runs it alone:
        full batches, no gradient exchange, no collectives, its own checkpoint
        (``state.<stage>.safetensors``) and metrics (``stages/<stage>.metrics.jsonl``), exactly the
        single-process computation. A finished stage leaves its record in ``stages/<stage>.json``;
        when every process is done, rank 0 merges the records (in ``group`` order) into
        ``progress.json`` and ``metrics.jsonl`` and the others reread it. A stop (signal,
        ``--stop-after``) in any process stops all of them after their current stage's checkpoint;
        a resumed run keeps the finished records and resumes the others from their checkpoints.
        Without a process group (or under FSDP2) the stages simply run in order.
        """
        todo = [(n, f) for n, f in group if n not in self.progress["done"]]
        if not todo:
            return
        if self.dist.world == 1 or self.sharded or not self.cfg.concurrent_stages:
            for name, fn in todo:
                self._run_stage(name, fn)
            return
        parts = self.dir / "stages"
        if self.dist.main:
            parts.mkdir(exist_ok=True)
            for stale in parts.glob("*.claim"):  # claims of an interrupted run
                stale.unlink()
        self.barrier()
        saved = (self.dist, self.workers, self.metrics, self.progress)
        stop: StopRun | None = None
        try:
            for name, fn in todo:
                if self._part(name, ".json").exists():
                    continue  # finished before an interruption, not merged yet
                try:
                    os.close(os.open(self._part(name, ".claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
                self.dist = DistInfo(0, 1, self.device)
                self.workers = RankWorkers(self.dist)
                self.metrics = MetricsLog(self._part(name, ".metrics.jsonl"))
                self.progress = copy.deepcopy(saved[3])  # this stage's record goes to stages/<stage>.json
                self._solo = name
                self._run_stage(name, fn)
        except StopRun as e:
            stop = e
        finally:
            self.dist, self.workers, self.metrics, self.progress = saved
            self._solo = None
        stopping = self._any_rank(stop is not None)
        if self.dist.main:
            self._merge_concurrent([n for n, _ in todo])
        self.barrier()
        if not self.dist.main:
            self.progress = self._read_progress(self.dir / "progress.json")
        if stopping:
            raise stop or StopRun(f"stopped in the concurrent stages {[n for n, _ in todo]}; continue with "
                                  f"elastic-train --resume --run-dir {self.dir}", self._stop_signal)

    def _merge_concurrent(self, names: list[str]) -> None:
        """Rank 0: fold the finished concurrent stages' records into progress and metrics."""
        for name in names:
            path = self._part(name, ".json")
            if not path.exists():
                continue
            rec = json.loads(path.read_text())
            log_path = self._part(name, ".metrics.jsonl")
            if log_path.exists():
                with open(self.metrics.path, "a") as f:
                    f.write(log_path.read_text())
            _merge_missing(self.progress["results"], rec["results"])
            for key in ("time_s", "cpu_s", "tokens", "skipped_steps"):
                if rec.get(key) is not None:
                    self.progress.setdefault(key, {})[name] = rec[key]
            self.progress["done"].append(name)
            self._write_progress(self.progress)
            path.unlink()
            log_path.unlink(missing_ok=True)
            self._part(name, ".claim").unlink(missing_ok=True)

    def _run_stage(self, name: str, fn: Callable[[], object]) -> None:
        log.info("stage %s%s", name, "" if self._solo is None else f" (concurrent, process {self.rank})")
        # a stage that died after its training loop logged its final record: drop it
        self.metrics.truncate_after(lambda r, n=name: not (r.get("stage") == n and r.get("final")))
        self._clock = (time.perf_counter(), 0.0, time.process_time(), 0.0)
        fn()

    # ---- driver -------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:
            raise KeyboardInterrupt
        self._stop_signal = signum
        log.warning("%s: finishing the current step and writing a resumable checkpoint (send it again to abort "
                    "without one)", signal.Signals(signum).name)

    def run(self, stages: list[tuple[str, Callable[[], object]]], concurrent: frozenset[str] = frozenset()) -> dict:
        """Run every stage not yet done, in order; returns ``report.json`` (rank 0; {} elsewhere).
        Consecutive stages named in ``concurrent`` (independent of each other) form a group that
        :meth:`run_concurrent` runs one stage per process.

        SIGINT (when Python's default handler is installed) and SIGTERM (when at its default)
        finish the current step, write a resumable checkpoint and raise :class:`StopRun`.
        """
        installed = {}
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            try:
                if signal.getsignal(sig) is default:
                    installed[sig] = default
                    signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread
                pass
        try:
            i = 0
            while i < len(stages):
                j = i
                while j < len(stages) and stages[j][0] in concurrent:
                    j += 1
                if j > i:
                    self.run_concurrent(stages[i:j])
                    i = j
                    continue
                name, fn = stages[i]
                i += 1
                if name not in self.progress["done"]:
                    self._run_stage(name, fn)
            self.barrier()
            return json.loads((self.dir / "report.json").read_text()) if self.dist.main else {}
        finally:
            for sig, default in installed.items():
                signal.signal(sig, default)
