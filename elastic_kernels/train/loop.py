"""The Star Elastic reference pipeline.

Stages (each resumable; finished stages leave an artifact in the run directory):

0. ``parent``     train the full model from scratch on the task (it becomes the frozen teacher).
1. ``importance`` activation-based importance (forward passes only) and permutation of the
   parent's weights so the most important units of every axis come first.
2. ``elastic``    one router per axis + curriculum knowledge distillation of every nested budget from
   the frozen parent (forward KL), Gumbel-softmax soft masks, router size loss; at the end each
   budget's argmax choices define its nested submodel; a nested checkpoint is written.
3. ``qad``        (``--qad``) NVFP4/FP8 fake-quantized student distilled from the BF16 elastic model at
   every budget; a nested quantized checkpoint is exported and every budget is reloaded from it and
   evaluated.
4. ``baseline-<b>`` an independent model of each nested size, trained from scratch on the same
   number of steps (and thus about the same tokens) as parent + elastic.
5. ``report``     report.md / report.json / report.png.

Determinism: every batch, budget draw and Gumbel sample is a pure function of (seed, stage, step),
so a run stopped at any step and resumed with ``--resume`` logs exactly the metrics of an
uninterrupted run. Under ``torchrun`` each rank takes its shard of the same global batch and
``DistributedDataParallel`` averages gradients; rank 0 evaluates and writes files.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from .._io import atomic_write_text
from .checkpoint import (CheckpointError, load_checkpoint, optimizer_from_tensors, optimizer_to_tensors,
                         save_checkpoint)
from .config import TrainConfig
from ..tasks import Batch, get as get_task
from .evaluate import evaluate_model
from .losses import forward_kl, masked_ce
from .metrics import MetricsLog
from .report import write_report
from .router import (AxisSpec, BudgetRouters, curriculum_probs, decay_temperature, full_choice_loss, prefix_mask,
                     ramp_scale, router_size_loss, sample_budget_indices)

log = logging.getLogger(__name__)

__all__ = ["run", "StopRun", "Pipeline"]

# config fields that may differ between a run and its resumption
_RESUME_FREE = {"resume", "stop_after", "progress", "threads", "device", "run_dir"}


class StopRun(Exception):
    """The run stopped early (``stop_after`` or Ctrl-C) after writing a resumable checkpoint.

    ``interrupted`` is True when the stop came from Ctrl-C (SIGINT).
    """

    def __init__(self, message: str, interrupted: bool = False) -> None:
        super().__init__(message)
        self.interrupted = interrupted


@dataclass
class DistInfo:
    rank: int
    world: int
    device: torch.device

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
        raise RuntimeError("device=cuda was requested but torch sees no CUDA device")
    device = torch.device(f"cuda:{local}") if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    if world > 1 and cfg.batch_size % world:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of ranks ({world})")
    return DistInfo(rank, world, device)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of ``peak``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def _atomic_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def _prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _load_prefixed(prefix: str, module: nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    head = prefix + "."
    sd = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
    try:
        module.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: {prefix} tensors do not match the model: {e}") from e


class StudentWithRouters(nn.Module):
    """Stage 2 trainable: the elastic student and its budget routers in one module (one DDP unit)."""

    def __init__(self, student: nn.Module, routers: BudgetRouters, specs: list[AxisSpec], metric: str) -> None:
        super().__init__()
        self.student = student
        self.routers = routers
        self.specs = specs
        self.active = metric == "active"

    def forward(self, input_ids: torch.Tensor, budget_idx: torch.Tensor, budgets: torch.Tensor, tau: float,
                scale: float, noise_seed: int, hard: bool = False):
        """Soft-masked student logits and the expected parameters of every target.

        input_ids: (batch, seqlen); budget_idx: (batch,) index of each sample's budget in ``budgets``
        budgets: (nt,) target fractions (rows no sample indexes — in-between targets — only get
        sizes). One Gumbel draw per target per step, shared by its samples (``hard``: straight-through
        one-hot samples); the target 1.0 is the unrouted full model.
        Returns ``(logits (batch, seqlen, vocab), expected_params (nt,))``.
        """
        gen = torch.Generator().manual_seed(noise_seed)
        probs = self.routers.sample(budgets, tau=tau, scale=scale, hard=hard, generator=gen)
        masks: dict = {}
        params = []
        per_budget: list[dict] = [{} for _ in range(budgets.shape[0])]
        for spec in self.specs:
            p = probs[spec.name]  # (nb, slots, choices)
            ch = torch.tensor(spec.choices, dtype=p.dtype, device=p.device)
            m = prefix_mask(p, spec.choices)[budget_idx]  # (batch, slots, full)
            w = (p * ch).sum(-1)  # (nb, slots) expected sizes
            if spec.name == "hidden":
                masks["hidden"] = m[:, 0]
            else:
                masks[spec.name] = [m[:, s] for s in range(spec.slots)]
            for j in range(budgets.shape[0]):
                per_budget[j][spec.name] = w[j, 0] if spec.name == "hidden" else list(w[j].unbind(0))
        logits = self.student(input_ids, soft_masks=masks)
        params = torch.stack([self.student.expected_param_count(sz, active=self.active) for sz in per_budget])
        return logits, params


class Pipeline:
    """One run of the reference loop in ``cfg.run_dir`` (see the module docstring)."""

    def __init__(self, cfg: TrainConfig) -> None:
        from ..models import ElasticHybridConfig

        self.cfg = cfg
        self.dist = setup_distributed(cfg)
        self.device = self.dist.device
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.dir = Path(cfg.resolved_run_dir())
        self.task = get_task(cfg.task, modulus=cfg.modulus, difficulty=cfg.difficulty, seed=cfg.seed, **cfg.task_args)
        self.tok = self.task.tokenizer
        mkw = {"vocab_size": self.tok.vocab_size, **cfg.model}
        self.model_config = ElasticHybridConfig(**mkw)
        self.metrics = MetricsLog(self.dir / "metrics.jsonl", enabled=self.dist.main)
        self.val = self.task.problems("val", cfg.val_size, seed=0)
        self.test = self.task.problems("test", cfg.test_size, seed=0)
        self.steps_done_here = 0
        self._stop_requested = False
        self._stage_t0 = time.perf_counter()
        self._stage_prior = 0.0
        self._stage_cpu0 = time.process_time()
        self._stage_cpu_prior = 0.0
        self.progress = self._init_progress()

    # ---- bookkeeping ------------------------------------------------------------------------
    def _init_progress(self) -> dict:
        """Rank 0 opens (``--resume``) or creates ``progress.json``; the other ranks then read it."""
        path = self.dir / "progress.json"
        if self.dist.main:
            prog = self._open_or_create_progress(path)
        self._barrier()
        if not self.dist.main:
            prog = json.loads(path.read_text())
        return prog

    def _open_or_create_progress(self, path: Path) -> dict:
        cfg_json = self.cfg.to_json()
        if path.exists():
            if not self.cfg.resume:
                raise FileExistsError(f"run directory {self.dir} already holds a run; pass --resume to continue "
                                      "it or choose another --run-dir")
            prog = json.loads(path.read_text())
            old = {k: v for k, v in prog["config"].items() if k not in _RESUME_FREE}
            new = {k: v for k, v in cfg_json.items() if k not in _RESUME_FREE}
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff:
                raise ValueError(f"--resume: the configuration differs from the run in {self.dir} in {diff}")
            return prog
        prog = {"config": cfg_json, "task": self.task.to_dict(), "done": [], "tokens": {}, "time_s": {},
                "results": {}}
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "model_config.json").write_text(self.model_config.to_json())
        _atomic_json(path, prog)
        return prog

    def _save_progress(self) -> None:
        if self.dist.main:
            _atomic_json(self.dir / "progress.json", self.progress)

    def _barrier(self) -> None:
        if self.dist.world > 1:
            dist.barrier()

    def _should_stop(self) -> bool:
        stop = self._stop_requested or (self.cfg.stop_after > 0 and self.steps_done_here >= self.cfg.stop_after)
        if self.dist.world > 1:
            t = torch.tensor([1.0 if stop else 0.0], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            stop = bool(t.item() > 0)
        return stop

    def _on_sigint(self, signum, frame) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        log.warning("Ctrl-C: finishing the current step and writing a resumable checkpoint "
                    "(press again to abort without one)")

    def _wrap(self, module: nn.Module) -> nn.Module:
        if self.dist.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=True)

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        if self.dist.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.dist.world for k, v in zip(keys, t.tolist())}

    def _shard(self, batch: Batch) -> tuple[Batch, int, float]:
        """This rank's rows of a global batch, the global count of real (non-pad) tokens, and the
        loss denominator (global masked positions / ranks: DDP's gradient average then equals the
        single-process gradient)."""
        tokens = int((batch.input_ids != self.tok.pad_id).sum())
        denom = max(float(batch.loss_mask.sum()), 1.0) / self.dist.world
        r, w = self.dist.rank, self.dist.world
        b = Batch(batch.input_ids[r::w].to(self.device), batch.targets[r::w].to(self.device),
                  batch.loss_mask[r::w].to(self.device))
        return b, tokens, denom

    def new_model(self, config=None, seed: int | None = None) -> nn.Module:
        from ..models import ElasticHybridLM
        torch.manual_seed(self.cfg.seed if seed is None else seed)
        return ElasticHybridLM(config or self.model_config).to(self.device)

    # ---- the generic resumable training loop ------------------------------------------------
    def _train(self, stage: str, steps: int, modules: dict[str, nn.Module], opt: torch.optim.Optimizer,
               step_fn: Callable[[int], dict], eval_fn: Callable[[int], dict] | None = None) -> int:
        """Run ``step_fn(step)`` for ``step`` in ``[start, steps)``; returns the tokens of the stage."""
        ck = self.dir / "state.safetensors"
        start, tokens, elapsed = 0, 0, 0.0
        if ck.exists():
            tensors, meta = load_checkpoint(ck)
            if meta.get("stage") == stage:
                for name, m in modules.items():
                    _load_prefixed(name, m, tensors, ck)
                optimizer_from_tensors(opt, tensors, meta["opt"], "opt")
                start, tokens, elapsed = meta["step"], meta["tokens"], meta["time_s"]
                self._stage_prior = meta.get("stage_time_s", elapsed)
                self._stage_cpu_prior = meta.get("stage_cpu_s", 0.0)
                log.info("resumed stage %s at step %d", stage, start)
        self.metrics.truncate_after(lambda r: not (r.get("stage") == stage and r.get("step", 0) > start))
        t0 = time.perf_counter() - elapsed

        def save(step: int) -> None:
            if not self.dist.main:
                return
            ot, om = optimizer_to_tensors(opt, "opt")
            tensors = {k: v for name, m in modules.items() for k, v in _prefixed(name, m).items()} | ot
            save_checkpoint(ck, tensors, {"stage": stage, "step": step, "tokens": tokens, "opt": om,
                                          "time_s": time.perf_counter() - t0,
                                          "stage_time_s": self._stage_prior + time.perf_counter() - self._stage_t0,
                                          "stage_cpu_s": self._stage_cpu_prior + time.process_time() - self._stage_cpu0})

        bar = None
        if self.cfg.progress and self.dist.main and start < steps:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, initial=start, desc=stage, leave=False, dynamic_ncols=True)
        try:
            for step in range(start, steps):
                rec = step_fn(step)
                tokens += int(rec.pop("tokens"))
                self.steps_done_here += 1
                done = step + 1
                if done % self.cfg.log_every == 0 or done == steps:
                    vals = self._mean_over_ranks(rec)
                    self.metrics.log({"stage": stage, "step": done, "tokens": tokens, **vals,
                                      "time": round(time.perf_counter() - t0, 3)})
                    if bar is not None:
                        bar.set_postfix({k: f"{v:.3g}" for k, v in vals.items() if k in ("loss", "kd", "router")})
                if eval_fn is not None and self.cfg.eval_every and done % self.cfg.eval_every == 0 and done < steps:
                    if self.dist.main:
                        self.metrics.log({"stage": stage, "step": done, "eval": eval_fn(done)})
                    self._barrier()
                if bar is not None:
                    bar.update(1)
                stop = self._should_stop()
                if stop or done % self.cfg.ckpt_every == 0:
                    save(done)
                if stop and done < steps:
                    raise StopRun(f"stopped in stage {stage} at step {done}/{steps}; "
                                  f"continue with --resume --run-dir {self.dir}", self._stop_requested)
        finally:
            if bar is not None:
                bar.close()
        return tokens

    def _finish_stage(self, stage: str, tokens: int | None = None) -> None:
        self.progress["time_s"][stage] = round(self._stage_prior + time.perf_counter() - self._stage_t0, 2)
        self.progress.setdefault("cpu_s", {})[stage] = round(
            self._stage_cpu_prior + time.process_time() - self._stage_cpu0, 2)
        if tokens is not None:
            self.progress["tokens"][stage] = tokens
        self.progress["done"].append(stage)
        self._save_progress()
        if self.dist.main:
            ck = self.dir / "state.safetensors"
            if ck.exists():
                ck.unlink()
        self._barrier()
        if self._should_stop() and stage != "report":
            raise StopRun(f"stopped after stage {stage}; continue with --resume --run-dir {self.dir}",
                          self._stop_requested)

    def _train_batch(self, step: int, *, difficulty: int | None = None,
                     stream: int = 0) -> tuple[Batch, int, float]:
        batch = self.task.batch("train", self.cfg.batch_size, index=stream * 10_000_000 + step,
                                difficulty=difficulty)
        return self._shard(batch)

    def _save_model(self, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if self.dist.main:
            save_checkpoint(self.dir / f"{name}.safetensors", tensors, meta)
        self._barrier()

    def _load_model(self, name: str, modules: dict[str, nn.Module]) -> dict:
        path = self.dir / f"{name}.safetensors"
        tensors, meta = load_checkpoint(path)
        for prefix, m in modules.items():
            _load_prefixed(prefix, m, tensors, path)
        return meta

    def _eval(self, model, *, test: bool = True) -> dict:
        return evaluate_model(model, self.task, self.val, self.test if test else None, device=self.device)

    # ---- supervised training (parent, baselines) --------------------------------------------
    def _supervised(self, stage: str, model: nn.Module, steps: int, stream: int) -> int:
        cfg = self.cfg
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        net = self._wrap(model)

        def step_fn(step: int) -> dict:
            lr = lr_at(step, steps, cfg.lr, cfg.warmup_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            b, tokens, denom = self._train_batch(step, stream=stream)
            loss = masked_ce(net(b.input_ids), b.targets, b.loss_mask, denom=denom)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0
                  else torch.tensor(0.0))
            opt.step()
            return {"loss": float(loss.detach()), "grad_norm": float(gn), "lr": lr, "tokens": tokens}

        def eval_fn(step: int) -> dict:
            return self._eval(model, test=False)

        return self._train(stage, steps, {"model": model}, opt, step_fn, eval_fn)

    # ---- stages -----------------------------------------------------------------------------
    def stage_parent(self) -> None:
        model = self.new_model()
        tokens = self._supervised("parent", model, self.cfg.parent_steps, stream=0)
        res = self._eval(model) if self.dist.main else {}
        res |= {"params_total": model.param_count(None), "params_active": model.param_count(None, active=True)}
        self.progress["results"]["parent"] = res
        self.metrics.log({"stage": "parent", "step": self.cfg.parent_steps, "final": True, "eval": res})
        self._save_model("parent", _prefixed("model", model), {"stage": "parent"})
        self._finish_stage("parent", tokens)

    def stage_importance(self) -> None:
        from ..models import estimate_importance, permute_by_importance
        model = self.new_model()
        self._load_model("parent", {"model": model})
        model.eval()
        batches = [self.task.batch("train", self.cfg.batch_size, index=20_000_000 + i).input_ids.to(self.device)
                   for i in range(self.cfg.importance_batches)]
        probe = self.task.collate(self.val[:64]).input_ids.to(self.device)
        with torch.no_grad():
            before = model(probe)
            scores = estimate_importance(model, batches)
            permute_by_importance(model, scores)
            after = model(probe)
        drift = float((after - before).abs().max())
        self.metrics.log({"stage": "importance", "step": 0, "final": True, "full_width_max_abs_change": drift,
                          "tokens": sum(int((b != self.tok.pad_id).sum()) for b in batches)})
        self._save_model("permuted", _prefixed("model", model), {"stage": "importance", "drift": drift})
        self._finish_stage("importance", sum(int((b != self.tok.pad_id).sum()) for b in batches))

    def axis_specs(self) -> list[AxisSpec]:
        """The router axes: every axis with more than one nested choice and at least one layer."""
        from ..models import AXES
        mc = self.model_config
        specs = []
        for axis in AXES:
            n = mc.num_units(axis)
            if n == 0:
                continue
            choices = tuple(sorted(mc.choice_sizes(axis)))
            if len(choices) < 2:
                continue
            if choices[-1] != mc.full_size(axis):
                raise ValueError(f"nested choices of axis {axis} must include the full size 1.0")
            specs.append(AxisSpec(axis, n, choices))
        return specs

    def _routers(self) -> tuple[BudgetRouters, list[AxisSpec]]:
        specs = self.axis_specs()
        torch.manual_seed(self.cfg.seed + 1)
        return BudgetRouters(specs, self.cfg.budgets, hidden=self.cfg.router_hidden).to(self.device), specs

    def chosen_budgets(self, routers: BudgetRouters, specs: list[AxisSpec], targets=None) -> list:
        """The argmax nested submodel of every target (default: the trained budgets) as
        ``models.Budget``; a target between two trained budgets uses the blended router input."""
        from ..models import Budget
        targets = list(self.cfg.budgets if targets is None else targets)
        widths = routers.widths(routers.choose(torch.tensor(targets, dtype=torch.float32)))
        out = []
        for i in range(len(targets)):
            kw = {}
            for spec in specs:
                w = [int(x) for x in widths[spec.name][i].tolist()]
                kw[spec.name] = w[0] if spec.name == "hidden" else tuple(w)
            out.append(Budget(**kw))
        return out

    def stage_elastic(self) -> None:
        cfg = self.cfg
        teacher = self.new_model()
        self._load_model("permuted", {"model": teacher})
        teacher.eval().requires_grad_(False)
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        routers, specs = self._routers()
        both = StudentWithRouters(student, routers, specs, cfg.budget_metric)
        full_params = float(student.param_count(None, active=cfg.budget_metric == "active"))
        opt = torch.optim.AdamW([
            {"params": list(student.parameters()), "lr": cfg.elastic_lr, "weight_decay": cfg.weight_decay},
            {"params": list(routers.parameters()), "lr": cfg.router_lr, "weight_decay": 0.0},
        ])
        net = self._wrap(both)
        steps = cfg.elastic_steps
        n_a = int(round(cfg.stage_a_fraction * steps))
        budgets = torch.tensor(cfg.budgets)

        def step_fn(step: int) -> dict:
            phase = "A" if step < n_a else "B"
            opt.param_groups[0]["lr"] = lr_at(step, steps, cfg.elastic_lr, cfg.warmup_steps)
            opt.param_groups[1]["lr"] = lr_at(step, steps, cfg.router_lr, cfg.warmup_steps)
            diff = cfg.stage_b_difficulty if (phase == "B" and cfg.stage_b_difficulty) else None
            b, tokens, denom = self._train_batch(step, difficulty=diff, stream=1)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            probs = curriculum_probs(len(cfg.budgets), phase, cfg.stage_b_skew, full_prob=cfg.full_prob)
            idx = sample_budget_indices(cfg.batch_size, probs, gen)[self.dist.rank::self.dist.world]
            progress = step / max(1, steps - 1)
            tau = decay_temperature(step, cfg.tau_start, cfg.tau_decay, cfg.tau_min)
            scale = ramp_scale(progress, cfg.scale_start, cfg.scale_end)
            hard = bool(torch.rand((), generator=gen) < cfg.hard_sample_prob)
            with torch.no_grad():
                t_logits = teacher(b.input_ids)
            # in-between targets train the routers' blended inputs on the size loss alone
            extra = budgets.min() + (1.0 - budgets.min()) * torch.rand(cfg.router_interp_targets, generator=gen)
            targets = torch.cat([budgets, extra]).to(self.device)
            logits, params = net(b.input_ids, idx.to(self.device), targets, tau, scale, cfg.seed * 7_000_003 + step,
                                 hard)
            kd = forward_kl(logits, t_logits, b.loss_mask, temperature=cfg.kd_temperature, denom=denom)
            # the size loss covers every budget each step (its routers train even when not drawn); the
            # in-between targets are a separate term so they do not dilute the trained budgets' term
            nb = len(cfg.budgets)
            want = targets.to(params) * full_params
            rl = router_size_loss(params[:nb], want[:nb], cfg.router_tolerance)
            if cfg.router_interp_targets:
                rl = rl + router_size_loss(params[nb:], want[nb:], cfg.router_tolerance)
            pin = full_choice_loss(routers)
            loss = kd + cfg.router_loss_weight * rl + cfg.full_pin_weight * pin
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
            opt.step()
            ratio = (params.detach()[:len(cfg.budgets)] / (budgets.to(params) * full_params)).tolist()
            rec = {"loss": float(loss.detach()), "kd": float(kd.detach()), "router": float(rl.detach()),
                   "full_pin": float(pin.detach()), "tau": tau, "scale": scale, "hard": float(hard), "tokens": tokens}
            rec |= {f"size_ratio@{t:g}": r for t, r in zip(cfg.budgets, ratio)}
            return rec

        def eval_fn(step: int) -> dict:
            out = {}
            for t, bud in zip(cfg.budgets, self.chosen_budgets(routers, specs)):
                sub = student.slice(bud)
                out[f"{t:g}"] = self._eval(sub, test=False)
            return out

        tokens = self._train("elastic", steps, {"student": student, "router": routers}, opt, step_fn, eval_fn)
        chosen = self.chosen_budgets(routers, specs)
        self._save_model("elastic", _prefixed("student", student) | _prefixed("router", routers),
                         {"budgets": [c.to_dict() for c in chosen]})
        rows = []
        for t, bud in zip(cfg.budgets, chosen):
            total = student.param_count(bud)
            active = student.param_count(bud, active=True)
            got = (active if cfg.budget_metric == "active" else total) / full_params
            row = {"target": t, "budget": bud.to_dict(), "params_total": total, "params_active": active,
                   "achieved": got, "baseline": None}
            if self.dist.main:
                row |= self._eval(student.slice(bud))
            rows.append(row)
        self.progress["results"]["budgets"] = rows
        # in-between targets: the router's blended input picks sizes no trained budget asked for
        sb = sorted(cfg.budgets)
        mids = [(a + b) / 2 for a, b in zip(sb, sb[1:])]
        self.progress["results"]["interpolated"] = [
            {"target": t, "budget": bud.to_dict(),
             "achieved": student.param_count(bud, active=cfg.budget_metric == "active") / full_params}
            for t, bud in zip(mids, self.chosen_budgets(routers, specs, mids))]
        self.metrics.log({"stage": "elastic", "step": steps, "final": True,
                          "eval": {f"{r['target']:g}": r for r in rows}})
        if self.dist.main:
            from ..models import save_nested
            save_nested(student, self.dir / "nested", {f"{t:g}": bud for t, bud in zip(cfg.budgets, chosen)})
        self._finish_stage("elastic", tokens)

    def stage_baseline(self, i: int) -> None:
        from ..models import Budget
        cfg = self.cfg
        row = self.progress["results"]["budgets"][i]
        stage = f"baseline-{row['target']:g}"
        bcfg = self.new_model().sliced_config(Budget.from_dict(row["budget"]))
        model = self.new_model(bcfg, seed=cfg.seed + 100 + i)
        steps = cfg.resolved_baseline_steps()
        tokens = self._supervised(stage, model, steps, stream=2 + i)
        res = {"params_total": model.param_count(None), "params_active": model.param_count(None, active=True),
               "steps": steps, "tokens": tokens}
        if self.dist.main:
            res |= self._eval(model)
        row["baseline"] = res
        self.metrics.log({"stage": stage, "step": steps, "final": True, "eval": res})
        self._finish_stage(stage, tokens)

    def stage_qad(self) -> None:
        from .qad import run_qad
        res, tokens = run_qad(self)
        self.progress["results"]["qad"] = res
        self._finish_stage("qad", tokens)

    def stage_report(self) -> dict:
        res = self.progress["results"]
        rep = {
            "config": self.cfg.to_json(),
            "model_config": self.model_config.to_dict(),
            "task": {**self.task.to_dict(), "description": self.task.describe(),
                     "val_size": len(self.val), "test_size": len(self.test)},
            "parent": res["parent"],
            "budgets": res["budgets"],
            "interpolated": res.get("interpolated", []),
            "stages": [name for name, _ in self.stages() if name != "report"],
            "tokens": self.progress["tokens"],
            "time_s": self.progress["time_s"],
            "cpu_s": self.progress.get("cpu_s", {}),
            "qad": res.get("qad"),
        }
        if self.dist.main:
            write_report(rep, self.dir)
        self._finish_stage("report")
        return rep

    # ---- driver -----------------------------------------------------------------------------
    def stages(self) -> list[tuple[str, Callable[[], object]]]:
        out: list[tuple[str, Callable[[], object]]] = [
            ("parent", self.stage_parent), ("importance", self.stage_importance), ("elastic", self.stage_elastic)]
        if self.cfg.qad:
            out.append(("qad", self.stage_qad))
        if self.cfg.baselines:
            for i, t in enumerate(self.cfg.budgets):
                if t < 1.0:
                    out.append((f"baseline-{t:g}", lambda i=i: self.stage_baseline(i)))
        out.append(("report", self.stage_report))
        return out

    def run(self) -> dict:
        handler_installed = False
        try:
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                signal.signal(signal.SIGINT, self._on_sigint)
                handler_installed = True
        except ValueError:  # not the main thread
            pass
        try:
            for name, fn in self.stages():
                if name in self.progress["done"]:
                    continue
                log.info("stage %s", name)
                # a stage that died after its training loop logged its final record: drop it
                self.metrics.truncate_after(lambda r, n=name: not (r.get("stage") == n and r.get("final")))
                self._stage_t0, self._stage_prior = time.perf_counter(), 0.0
                self._stage_cpu0, self._stage_cpu_prior = time.process_time(), 0.0
                fn()
            return json.loads((self.dir / "report.json").read_text()) if self.dist.main else {}
        finally:
            if handler_installed:
                signal.signal(signal.SIGINT, signal.default_int_handler)


def run(cfg: TrainConfig) -> dict:
    """Run (or resume) the whole pipeline; returns the report dict (rank 0)."""
    return Pipeline(cfg).run()
