"""Stage 1 ``importance``: activation-based importance (forward passes only) and the permutation
of the parent's weights so the most important units of every elastic axis come first."""
from __future__ import annotations

import torch

from .runner import Runner

__all__ = ["run"]


def run(runner: Runner) -> None:
    from ..models import estimate_importance, permute_by_importance

    cfg, task = runner.cfg, runner.task
    model = runner.new_model()
    runner.load_model("parent", {"model": model})
    model.eval()
    batches = [task.batch("train", cfg.batch_size, index=20_000_000 + i).input_ids.to(runner.device)
               for i in range(cfg.importance_batches)]
    probe = task.collate(runner.val[:64]).input_ids.to(runner.device)
    with torch.no_grad():
        before = model(probe)
        scores = estimate_importance(model, batches)
        permute_by_importance(model, scores)
        after = model(probe)
    drift = float((after - before).abs().max())
    tokens = sum(int((b != task.pad_id).sum()) for b in batches)
    runner.metrics.log({"stage": "importance", "step": 0, "final": True, "full_width_max_abs_change": drift,
                        "tokens": tokens})
    runner.save_model("permuted", {"model": model}, {"stage": "importance", "drift": drift})
    runner.finish_stage("importance", tokens)
