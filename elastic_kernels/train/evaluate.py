"""Evaluation during training: masked validation loss and exact-match accuracy of greedy
completions (decoded by :func:`elastic_kernels.infer.generate`, the one decode loop)."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from ..infer.generate import generate
from ..tasks import Task
from .losses import masked_ce

__all__ = ["validation_loss", "greedy_completions", "evaluate_model"]


@torch.no_grad()
def validation_loss(model, task: Task, problems: Sequence, *, budget=None, batch_size: int = 128,
                    device=None) -> float:
    """Token-weighted mean cross-entropy over the completions of ``problems``."""
    total, count = 0.0, 0.0
    for i in range(0, len(problems), batch_size):
        b = task.collate(problems[i:i + batch_size])
        logits = model(b.input_ids.to(device), budget=budget)
        n = float(b.loss_mask.sum())
        total += float(masked_ce(logits, b.targets.to(device), b.loss_mask.to(device))) * n
        count += n
    return total / max(count, 1.0)


def greedy_completions(model, task: Task, problems: Sequence, *, budget=None, batch_size: int = 256) -> list[list[int]]:
    """Greedy completions (ids after the prompt, up to and including ``<eos>``) of one model at
    ``budget`` for both phases, each at most ``task.max_new_tokens(problems)`` tokens long."""
    max_new = task.max_new_tokens(problems)
    prompts = task.prompts(problems)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    out: list[list[int]] = [[] for _ in problems]
    for length, idx in sorted(groups.items()):
        gens = generate(model, [prompts[i] for i in idx], think_budget=budget, answer_budget=budget,
                        max_answer_tokens=max_new, max_length=length + max_new, batch_size=batch_size,
                        end_think_id=task.end_think_id, eos_id=task.eos_id)
        for i, g in zip(idx, gens):
            out[i] = g.completion
    return out


def evaluate_model(model, task: Task, val: Sequence, test: Sequence | None, *, budget=None, device=None) -> dict:
    """``{"val_loss", "val_acc", "test_acc"}`` (test_acc None when ``test`` is None)."""
    was_training = model.training
    model.eval()
    try:
        res = {"val_loss": validation_loss(model, task, val, budget=budget, device=device),
               "val_acc": task.accuracy(val, greedy_completions(model, task, val, budget=budget))}
        res["test_acc"] = (task.accuracy(test, greedy_completions(model, task, test, budget=budget))
                           if test is not None else None)
    finally:
        model.train(was_training)
    return res
