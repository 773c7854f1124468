"""Baseline ``prune-<b>``: prune, then distill (the compression baseline the nested family is
compared with).

For one budget: take the importance-permuted parent (stage 1's ``permuted.safetensors``), slice it
physically to the shape the router chose for that budget (the same submodel the nested family
serves), and distill it alone from the frozen parent with the forward KL — on the elastic stage's
own batches (same stream, same curriculum difficulty) for as many steps as the elastic stage ran,
so each pruned model sees the tokens the whole nested family saw. The model is saved as
``prune-<budget>.safetensors`` for the per-problem evaluation.
"""
from __future__ import annotations

import torch

from .losses import forward_kl
from .optim import AdamW, lr_at, set_lr
from .runner import Runner

__all__ = ["run"]


def run(runner: Runner, i: int) -> None:
    """Train the prune+distill model of budget row ``i`` of the elastic stage's results."""
    from ..models import Budget

    cfg = runner.cfg
    row = runner.results["budgets"][i]
    stage = f"prune-{row['target']:g}"
    teacher = runner.new_model(shardable=True)  # FSDP2: ranks > 0 receive their shards in wrap / shard_frozen
    runner.load_model("permuted", {"model": teacher})
    teacher.eval().requires_grad_(False)
    student = teacher.slice(Budget.from_dict(row["budget"])).train().requires_grad_(True)
    net = runner.wrap(student, every_parameter_used=True)  # before the optimizer: FSDP2 replaces the parameters
    runner.shard_frozen(teacher)
    opt = AdamW(student.parameters(), lr=cfg.elastic_lr, weight_decay=cfg.weight_decay)
    steps = cfg.elastic_steps
    n_a = int(round(cfg.stage_a_fraction * steps))

    def step_fn(step: int) -> dict:
        set_lr(opt, lr_at(step, steps, cfg.elastic_lr, cfg.warmup_steps))
        diff = cfg.stage_b_difficulty if (step >= n_a and cfg.stage_b_difficulty) else None
        b, tokens, denom = runner.train_batch(step, difficulty=diff, stream=1)
        with torch.no_grad():
            t_logits = teacher(b.input_ids)
        loss = forward_kl(net(b.input_ids), t_logits, b.loss_mask, temperature=cfg.kd_temperature, denom=denom)
        gn = runner.optimizer_step(opt, loss)
        return {"loss": float(loss.detach()), "grad_norm": gn, "tokens": tokens}

    tokens = runner.train(stage, steps, {"model": student}, opt, step_fn)
    runner.save_model(stage, {"model": student}, {"stage": stage, "budget": row["budget"]})
    row["prune_distill"] = runner.final_eval(stage, student, steps, tokens)
    runner.finish_stage(stage, tokens)
