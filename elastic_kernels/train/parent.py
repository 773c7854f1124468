"""Stage 0 ``parent``: the full model trained from scratch on the task, or the ``--parent`` given
(it becomes the frozen teacher), and :func:`train_supervised`, the supervised loop the baselines share."""
from __future__ import annotations

import torch.nn as nn

from .losses import masked_ce
from .optim import AdamW, lr_at, set_lr
from .runner import Runner

__all__ = ["train_supervised", "run"]


def train_supervised(runner: Runner, stage: str, model: nn.Module, steps: int, stream: int) -> int:
    """Next-token cross-entropy on the completions, AdamW with warmup + cosine; returns the tokens."""
    cfg = runner.cfg
    net = runner.wrap(model, every_parameter_used=True)  # before the optimizer: FSDP2 replaces the parameters
    opt = AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step_fn(step: int) -> dict:
        lr = lr_at(step, steps, cfg.lr, cfg.warmup_steps)
        set_lr(opt, lr)
        b, tokens, denom = runner.train_batch(step, stream=stream)
        loss = masked_ce(net(b.input_ids), b.targets, b.loss_mask, denom=denom)
        gn = runner.optimizer_step(opt, loss)
        return {"loss": float(loss.detach()), "grad_norm": gn, "lr": lr, "tokens": tokens}

    def eval_fn(step: int) -> dict:
        return runner.evaluate(runner.gathered(model, everywhere=True), test=False)

    return runner.train(stage, steps, {"model": model}, opt, step_fn, eval_fn)


def run(runner: Runner) -> None:
    model = runner.new_model(shardable=True, state=runner.parent_state)
    if runner.parent_state is not None:  # --parent: the imported model is stage 0 (no training)
        runner.shard_frozen(model)  # FSDP2: ranks > 0 built it on the meta device; all evaluate it
        tokens = 0
    else:
        tokens = train_supervised(runner, "parent", model, runner.cfg.parent_steps, stream=0)
    res = runner.evaluate(runner.gathered(model, everywhere=True), test=False)  # test: the evaluate stage
    res |= {"params_total": model.param_count(None), "params_active": model.param_count(None, active=True)}
    runner.results["parent"] = res
    runner.metrics.log({"stage": "parent", "step": runner.cfg.parent_steps, "final": True, "eval": res})
    runner.save_model("parent", {"model": model}, {"stage": "parent"})
    runner.finish_stage("parent", tokens)
