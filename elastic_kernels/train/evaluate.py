"""Evaluation during training: masked validation loss and exact-match accuracy of greedy
completions (decoded by :func:`elastic_kernels.infer.generate`, the one decode loop).

Every quantity is assembled from per-problem results (a problem's summed loss and token count,
its 0/1 outcome) so the problems can be split over data-parallel ranks
(:class:`elastic_kernels.infer.evaluate.Workers`) and still give the single-process numbers:
sums are taken in problem order, and the generation length comes from the whole problem list.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import torch
import torch.nn.functional as F

from ..infer.evaluate import Workers
from ..infer.generate import generate
from ..tasks import Task

__all__ = ["problem_losses", "greedy_completions", "greedy_outcomes", "evaluate_model"]


@torch.no_grad()
def problem_losses(model, task: Task, problems: Sequence, *, budget=None, batch_size: int = 128,
                   device=None) -> list[tuple[float, float]]:
    """``(summed cross-entropy, token count)`` over the completion of every problem."""
    out: list[tuple[float, float]] = []
    for i in range(0, len(problems), batch_size):
        b = task.collate(problems[i:i + batch_size])
        logits = model(b.input_ids.to(device), budget=budget)  # (batch, seqlen, vocab)
        targets = b.targets.to(device)
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        m = b.loss_mask.to(device=device, dtype=ce.dtype)
        out += zip((ce * m).sum(1).tolist(), m.sum(1).tolist())
    return out


def greedy_completions(model, task: Task, problems: Sequence, *, budget=None, batch_size: int = 256,
                       max_new: int | None = None) -> list[list[int]]:
    """Greedy completions (ids after the prompt, up to and including ``<eos>``) of one model at
    ``budget`` for both phases, each at most ``max_new`` tokens long (default
    ``task.max_new_tokens(problems)``)."""
    if max_new is None:
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


@torch.no_grad()
def greedy_outcomes(model, task: Task, problems: Sequence, *, budget=None, batch_size: int = 256,
                    max_new: int | None = None) -> list[int]:
    """1 where the greedy completion (:func:`greedy_completions`) of a problem scores, else 0."""
    comps = greedy_completions(model, task, problems, budget=budget, batch_size=batch_size, max_new=max_new)
    return [int(task.score(p, c)) for p, c in zip(problems, comps)]


def evaluate_model(model, task: Task, val: Sequence, test: Sequence | None, *, budget=None, device=None,
                   workers: Workers | None = None) -> dict:
    """``{"val_loss", "val_acc", "test_acc"}`` (test_acc None when ``test`` is None): the
    token-weighted mean validation loss and the exact-match accuracies, the problems of each split
    spread over ``workers`` (default: this process)."""
    workers = workers or Workers()
    was_training = model.training
    model.eval()
    try:
        val_new = task.max_new_tokens(val)
        rows = workers.map(lambda ps: [(*lc, ok) for lc, ok in zip(
            problem_losses(model, task, ps, budget=budget, device=device),
            greedy_outcomes(model, task, ps, budget=budget, max_new=val_new))], val)
        res = {"val_loss": math.fsum(r[0] for r in rows) / max(math.fsum(r[1] for r in rows), 1.0),
               "val_acc": sum(r[2] for r in rows) / len(rows) if rows else 0.0, "test_acc": None}
        if test is not None:
            test_new = task.max_new_tokens(test)
            ok = workers.map(lambda ps: greedy_outcomes(model, task, ps, budget=budget, max_new=test_new), test)
            res["test_acc"] = sum(ok) / len(ok) if ok else 0.0
    finally:
        model.train(was_training)
    return res
