"""Stage 4 ``baseline-<b>``: an independent model of each nested size, trained from scratch on
the same number of steps (and thus about the same tokens) as parent + elastic."""
from __future__ import annotations

from .parent import train_supervised
from .runner import Runner

__all__ = ["run"]


def run(runner: Runner, i: int) -> None:
    """Train the baseline of budget row ``i`` of the elastic stage's results."""
    from ..models import Budget

    cfg = runner.cfg
    row = runner.results["budgets"][i]
    stage = f"baseline-{row['target']:g}"
    bcfg = runner.new_model(shardable=True).sliced_config(Budget.from_dict(row["budget"]))
    model = runner.new_model(bcfg, seed=cfg.seed + 100 + i, shardable=True)
    steps = cfg.resolved_baseline_steps()
    tokens = train_supervised(runner, stage, model, steps, stream=2 + i)
    row["baseline"] = runner.final_eval(stage, model, steps, tokens)
    runner.save_model(stage, {"model": model}, {"stage": stage, "config": bcfg.to_dict()})
    runner.finish_stage(stage, tokens)
