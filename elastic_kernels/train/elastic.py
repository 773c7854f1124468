"""Stage 2 ``elastic``: one router per elastic axis and curriculum knowledge distillation of every
nested budget from the frozen parent (forward KL), Gumbel-softmax soft masks and the router size
loss; at the end each budget's argmax choices define its nested submodel, and a nested
checkpoint is written (``nested/``)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .losses import forward_kl
from .optim import AdamW, lr_at, set_lr
from .router import (AxisSpec, BudgetRouters, curriculum_probs, decay_temperature, full_choice_loss, prefix_mask,
                     ramp_scale, router_size_loss, sample_budget_indices)
from .runner import Runner

__all__ = ["StudentWithRouters", "axis_specs", "make_routers", "chosen_budgets", "run"]


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


def axis_specs(model_config, shared=()) -> list[AxisSpec]:
    """The router axes: every axis with more than one nested choice and at least one layer; the
    axes named in ``shared`` make one choice for all their layers."""
    from ..models import AXES
    specs = []
    for axis in AXES:
        n = model_config.num_units(axis)
        if n == 0:
            continue
        choices = tuple(sorted(model_config.choice_sizes(axis)))
        if len(choices) < 2:
            continue
        if choices[-1] != model_config.full_size(axis):
            raise ValueError(f"nested choices of axis {axis} must include the full size 1.0")
        specs.append(AxisSpec(axis, n, choices, shared=axis in shared))
    return specs


def make_routers(runner: Runner) -> tuple[BudgetRouters, list[AxisSpec]]:
    """The run's routers (seeded ``seed + 1``) and their axes."""
    specs = axis_specs(runner.model_config, runner.cfg.router_shared_axes)
    torch.manual_seed(runner.cfg.seed + 1)
    return BudgetRouters(specs, runner.cfg.budgets, hidden=runner.cfg.router_hidden).to(runner.device), specs


def _budget(specs: list[AxisSpec], widths: dict[str, torch.Tensor]):
    from ..models import Budget
    kw = {}
    for spec in specs:
        w = [int(x) for x in widths[spec.name].tolist()]
        kw[spec.name] = w[0] if spec.name == "hidden" else tuple(w)
    return Budget(**kw)


def chosen_budgets(routers: BudgetRouters, specs: list[AxisSpec], targets, *, model: nn.Module | None = None,
                   metric: str = "total", tolerance: float | None = None) -> list:
    """The nested submodel of every target as ``models.Budget``; a target between two trained
    budgets uses the blended router input. Without ``tolerance``: the routers' argmax choice.
    With it (and ``model``, whose ``param_count`` in ``metric`` measures the sizes): the most
    probable choice within ``tolerance`` of the target (:meth:`BudgetRouters.choose_within`)."""
    targets = list(targets)
    if tolerance is None:
        widths = routers.widths(routers.choose(torch.tensor(targets, dtype=torch.float32)))
        return [_budget(specs, {k: v[i] for k, v in widths.items()}) for i in range(len(targets))]
    active = metric == "active"
    full = float(model.param_count(None, active=active))
    picks = routers.choose_within(
        targets, lambda w: model.param_count(_budget(specs, w), active=active) / full, tolerance)
    return [_budget(specs, routers.widths(p)) for p in picks]


def run(runner: Runner) -> None:
    cfg = runner.cfg
    teacher = runner.new_model(shardable=True)  # FSDP2: ranks > 0 receive their shards in wrap / shard_frozen
    runner.load_model("permuted", {"model": teacher})
    teacher.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    routers, specs = make_routers(runner)
    both = StudentWithRouters(student, routers, specs, cfg.budget_metric)
    full_params = float(student.param_count(None, active=cfg.budget_metric == "active"))
    net = runner.wrap(both)  # before the optimizer: FSDP2 replaces the parameters
    runner.shard_frozen(teacher)  # after the student's copy
    opt = AdamW([
        {"params": list(student.parameters()), "lr": cfg.elastic_lr, "weight_decay": cfg.weight_decay},
        {"params": list(routers.parameters()), "lr": cfg.router_lr, "weight_decay": 0.0},
    ])
    steps = cfg.elastic_steps
    n_a = int(round(cfg.stage_a_fraction * steps))
    budgets = torch.tensor(cfg.budgets)
    nb = len(cfg.budgets)

    def step_fn(step: int) -> dict:
        phase = "A" if step < n_a else "B"
        set_lr(opt, lr_at(step, steps, cfg.elastic_lr, cfg.warmup_steps), lr_at(step, steps, cfg.router_lr,
                                                                               cfg.warmup_steps))
        diff = cfg.stage_b_difficulty if (phase == "B" and cfg.stage_b_difficulty) else None
        b, tokens, denom = runner.train_batch(step, difficulty=diff, stream=1)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        probs = curriculum_probs(nb, phase, cfg.stage_b_skew, full_prob=cfg.full_prob)
        idx = sample_budget_indices(cfg.batch_size, probs, gen)[runner.dist.rank::runner.dist.world]
        progress = step / max(1, steps - 1)
        tau = decay_temperature(step, cfg.tau_start, cfg.tau_decay, cfg.tau_min)
        scale = ramp_scale(progress, cfg.scale_start, cfg.scale_end)
        hard = bool(torch.rand((), generator=gen) < cfg.hard_sample_prob)
        with torch.no_grad():
            t_logits = teacher(b.input_ids)
        # in-between targets train the routers' blended inputs on the size loss alone
        extra = budgets.min() + (1.0 - budgets.min()) * torch.rand(cfg.router_interp_targets, generator=gen)
        targets = torch.cat([budgets, extra]).to(runner.device)
        logits, params = net(b.input_ids, idx.to(runner.device), targets, tau, scale, cfg.seed * 7_000_003 + step,
                             hard)
        kd = forward_kl(logits, t_logits, b.loss_mask, temperature=cfg.kd_temperature, denom=denom)
        # the size loss covers every budget each step (its routers train even when not drawn); the
        # in-between targets are a separate term so they do not dilute the trained budgets' term
        want = targets.to(params) * full_params
        rl = router_size_loss(params[:nb], want[:nb], cfg.router_tolerance)
        if cfg.router_interp_targets:
            rl = rl + router_size_loss(params[nb:], want[nb:], cfg.router_tolerance)
        pin = full_choice_loss(routers)
        loss = kd + cfg.router_loss_weight * rl + cfg.full_pin_weight * pin
        runner.optimizer_step(opt, loss, clip=student.parameters())
        ratio = (params.detach()[:nb] / (budgets.to(params) * full_params)).tolist()
        rec = {"loss": float(loss.detach()), "kd": float(kd.detach()), "router": float(rl.detach()),
               "full_pin": float(pin.detach()), "tau": tau, "scale": scale, "hard": float(hard), "tokens": tokens}
        rec |= {f"size_ratio@{t:g}": r for t, r in zip(cfg.budgets, ratio)}
        return rec

    def eval_fn(step: int) -> dict:
        full, plain_routers = runner.gathered(student, everywhere=True), runner.gathered(routers, everywhere=True)
        return {f"{t:g}": runner.evaluate(full.slice(bud), test=False)
                for t, bud in zip(cfg.budgets, chosen_budgets(plain_routers, specs, cfg.budgets))}

    tokens = runner.train("elastic", steps, {"student": student, "router": routers}, opt, step_fn, eval_fn)
    plain_routers = runner.gathered(routers, everywhere=True)
    full = runner.gathered(student, everywhere=True)  # the plain student (FSDP2 gathers it on every rank)
    decode = dict(model=student, metric=cfg.budget_metric,
                  tolerance=cfg.router_decode_tolerance if cfg.router_decode == "feasible" else None)
    argmax = chosen_budgets(plain_routers, specs, cfg.budgets)
    chosen = chosen_budgets(plain_routers, specs, cfg.budgets, **decode)
    runner.save_model("elastic", {"student": student, "router": routers},
                      {"budgets": [c.to_dict() for c in chosen]})
    rows = []
    for t, bud, am in zip(cfg.budgets, chosen, argmax):
        total = student.param_count(bud)
        active = student.param_count(bud, active=True)
        got = (active if cfg.budget_metric == "active" else total) / full_params
        row = {"target": t, "budget": bud.to_dict(), "params_total": total, "params_active": active,
               "achieved": got, "baseline": None, "argmax_budget": am.to_dict(),
               "argmax_achieved": student.param_count(am, active=cfg.budget_metric == "active") / full_params}
        row |= runner.evaluate(full.slice(bud), test=False)  # test accuracy: the evaluate stage
        rows.append(row)
    runner.results["budgets"] = rows
    # in-between targets: the router's blended input picks sizes no trained budget asked for
    sb = sorted(cfg.budgets)
    mids = [(a + b) / 2 for a, b in zip(sb, sb[1:])]
    runner.results["interpolated"] = [
        {"target": t, "budget": bud.to_dict(),
         "achieved": student.param_count(bud, active=cfg.budget_metric == "active") / full_params}
        for t, bud in zip(mids, chosen_budgets(plain_routers, specs, mids, **decode))]
    runner.metrics.log({"stage": "elastic", "step": steps, "final": True,
                        "eval": {f"{r['target']:g}": r for r in rows}})
    if runner.is_main:
        from ..models import save_nested
        save_nested(full, runner.dir / "nested", {f"{t:g}": bud for t, bud in zip(cfg.budgets, chosen)})
    runner.finish_stage("elastic", tokens)
