"""Evaluation: masked validation loss and exact-match accuracy by greedy generation."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from .data import ArithmeticTask, Problem
from .losses import masked_ce

__all__ = ["validation_loss", "greedy_complete", "exact_match", "evaluate_model"]


@torch.no_grad()
def validation_loss(model, task: ArithmeticTask, problems: Sequence[Problem], *, budget=None,
                    batch_size: int = 128, device=None) -> float:
    """Token-weighted mean cross-entropy over the completions of ``problems``."""
    total, count = 0.0, 0.0
    for i in range(0, len(problems), batch_size):
        b = task.collate(problems[i:i + batch_size])
        logits = model(b.input_ids.to(device), budget=budget)
        n = float(b.loss_mask.sum())
        total += float(masked_ce(logits, b.targets.to(device), b.loss_mask.to(device))) * n
        count += n
    return total / max(count, 1.0)


@torch.no_grad()
def greedy_complete(model, task: ArithmeticTask, problems: Sequence[Problem], *, budget=None,
                    batch_size: int = 256, device=None) -> list[list[int]]:
    """Greedy completions (token ids after the prompt, up to and including ``<eos>``).

    Prompts of equal length are batched together; the prompt is prefilled into the model's cache
    and the completion decoded one token at a time.
    """
    tok = task.tokenizer
    # room for the longest correct completion plus slack for a model that rambles
    max_new = task.completion_bound(max((len(p.ops) for p in problems), default=0)) + 4
    prompts = task.prompts(problems)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    out: list[list[int]] = [[] for _ in problems]
    for _, idx in sorted(groups.items()):
        for c in range(0, len(idx), batch_size):
            chunk = idx[c:c + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)
            cache = model.new_cache(len(chunk), device=device)
            logits = model(ids, budget=budget, cache=cache)
            nxt = logits[:, -1].argmax(-1)
            gen = [nxt]
            done = nxt == tok.eos_id
            for _ in range(max_new - 1):
                if bool(done.all()):
                    break
                logits = model(nxt[:, None], budget=budget, cache=cache)
                nxt = logits[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, tok.pad_id), nxt)
                gen.append(nxt)
                done = done | (nxt == tok.eos_id)
            seqs = torch.stack(gen, 1).tolist()
            for i, s in zip(chunk, seqs):
                if tok.eos_id in s:
                    s = s[:s.index(tok.eos_id) + 1]
                out[i] = [t for t in s if t != tok.pad_id]
    return out


def exact_match(task: ArithmeticTask, problems: Sequence[Problem], completions: Sequence[Sequence[int]]) -> float:
    """Fraction of completions whose stated answer equals the true value."""
    if not problems:
        return 0.0
    ok = sum(task.parse_answer(c) == p.answer for p, c in zip(problems, completions))
    return ok / len(problems)


def evaluate_model(model, task: ArithmeticTask, val: Sequence[Problem], test: Sequence[Problem] | None, *,
                   budget=None, device=None) -> dict:
    """``{"val_loss", "val_acc", "test_acc"}`` (test_acc None when ``test`` is None)."""
    was_training = model.training
    model.eval()
    try:
        res = {"val_loss": validation_loss(model, task, val, budget=budget, device=device),
               "val_acc": exact_match(task, val, greedy_complete(model, task, val, budget=budget, device=device))}
        res["test_acc"] = (exact_match(task, test, greedy_complete(model, task, test, budget=budget, device=device))
                           if test is not None else None)
    finally:
        model.train(was_training)
    return res
