"""Stage 3: quantization-aware distillation (QAD) and the nested quantized export.

The student is the stage-2 elastic model with its linear weights fake-quantized in the forward
pass (NVFP4 or FP8, straight-through gradients to the high-precision weights); the teacher is the
frozen, unquantized stage-2 model. Each sample is drawn at one of the router's chosen budgets
(curriculum stage B probabilities) and distilled from the teacher *at the same budget* with the
forward KL, so every nested submodel is trained under quantization.

The fake quantization is exactly what the export stores: the weights of
:func:`elastic_kernels.models.quantizable_weights` (for NVFP4, those whose input features are a
multiple of 16 in the parent and at every budget), NVFP4 with one decode scale per tensor (per
expert for stacked expert weights; ``"flat"`` layouts quantize as ``(prod(leading), K)``), FP8 with
one scale per tensor. Because the scales are shared and nested slices keep whole 16-blocks, every
submodel is a slice of the one quantized checkpoint, with no requantization. The export is
``models.save_nested(..., quantization=fmt)`` (directory ``qad/`` in the run directory); every
budget is reloaded from it with ``models.load_nested`` and evaluated.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
from torch.func import functional_call

from .losses import forward_kl
from .optim import AdamW, lr_at, set_lr
from .router import curriculum_probs, sample_budget_indices
from .runner import Runner

__all__ = ["quantized_layouts", "fake_quantize_weight", "QuantStudent", "run"]


def quantized_layouts(model: nn.Module, budgets, fmt: str) -> dict[str, str]:
    """``{parameter name: layout}`` of the weights the ``fmt`` export of ``model`` quantizes."""
    from ..models import quantizable_weights
    layouts = quantizable_weights(model)
    if fmt == "fp8":
        return layouts
    shapes = [model.sliced_shapes(model.resolve_budget(b)) for b in budgets]
    params = dict(model.named_parameters())
    return {n: lay for n, lay in layouts.items()
            if all(k % 16 == 0 for k in [params[n].shape[-1]] + [sh[n][-1] for sh in shapes])}


def fake_quantize_weight(w: torch.Tensor, layout: str, fmt: str) -> torch.Tensor:
    """The weight as the export stores it (decoded), with a straight-through gradient."""
    from ..ops.nvfp4 import fake_quant_fp8, fake_quant_nvfp4
    if fmt == "fp8":
        return fake_quant_fp8(w)
    if layout == "stacked":
        return torch.stack([fake_quant_nvfp4(w[e]) for e in range(w.shape[0])])
    return fake_quant_nvfp4(w.reshape(-1, w.shape[-1])).reshape(w.shape)


class QuantStudent(nn.Module):
    """Wraps a model so its forward uses fake-quantized weights (one DDP unit for QAD)."""

    def __init__(self, model: nn.Module, layouts: dict[str, str], fmt: str) -> None:
        super().__init__()
        self.model = model
        self.layouts = dict(layouts)
        self.fmt = fmt

    def forward(self, input_ids: torch.Tensor, budget=None) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        q = {n: fake_quantize_weight(params[n], lay, self.fmt) for n, lay in self.layouts.items()}
        return functional_call(self.model, q, (input_ids,), {"budget": budget})


def run(runner: Runner) -> None:
    """Stage 3: distill the fake-quantized student, export, reload and evaluate every budget."""
    from ..models import Budget, load_nested, save_nested

    cfg = runner.cfg
    teacher = runner.new_model()
    meta = runner.load_model("elastic", {"student": teacher})
    teacher.eval().requires_grad_(False)
    budgets = [Budget.from_dict(b) for b in meta["budgets"]]
    model = copy.deepcopy(teacher).train().requires_grad_(True)
    layouts = quantized_layouts(model, budgets, cfg.qad_format)
    student = QuantStudent(model, layouts, cfg.qad_format)
    opt = AdamW(model.parameters(), lr=cfg.qad_lr, weight_decay=0.0)
    net = runner.wrap(student)
    steps = cfg.qad_steps
    probs = curriculum_probs(len(budgets), "B", cfg.stage_b_skew)

    def step_fn(step: int) -> dict:
        set_lr(opt, lr_at(step, steps, cfg.qad_lr, cfg.warmup_steps))
        b, tokens, denom = runner.train_batch(step, stream=1_000)
        gen = torch.Generator().manual_seed(cfg.seed * 3_000_017 + step)
        idx = sample_budget_indices(cfg.batch_size, probs, gen)[runner.dist.rank::runner.dist.world].tolist()
        per_sample = [budgets[i] for i in idx]
        with torch.no_grad():
            t_logits = teacher(b.input_ids, budget=per_sample)
        logits = net(b.input_ids, budget=per_sample)
        loss = forward_kl(logits, t_logits, b.loss_mask, temperature=cfg.kd_temperature, denom=denom)
        runner.optimizer_step(opt, loss)
        return {"loss": float(loss.detach()), "tokens": tokens}

    tokens = runner.train("qad", steps, {"model": model}, opt, step_fn)
    runner.save_model("qad_student", {"model": model}, {"format": cfg.qad_format})
    table = {f"{t:g}": bud for t, bud in zip(cfg.budgets, budgets)}
    out_dir = runner.dir / "qad"
    ptq_dir = runner.dir / "ptq"  # post-training quantization of the unquantized stage-2 model, for comparison
    if runner.is_main:
        save_nested(teacher, ptq_dir, table, quantization=cfg.qad_format)
        save_nested(model, out_dir, table, quantization=cfg.qad_format)
    runner.barrier()
    rows = []
    for t in cfg.budgets:  # every rank evaluates its share of the problems (Runner.evaluate)
        sub = load_nested(out_dir, f"{t:g}", device=runner.device)
        res = runner.evaluate(sub, test=False)  # the test accuracies are the evaluate stage's (science.py)
        ptq = runner.evaluate(load_nested(ptq_dir, f"{t:g}", device=runner.device), test=False)
        rows.append({"target": t, "ref_test_acc": None, "test_acc": None, "ptq_test_acc": None,
                     "val_loss": res["val_loss"], "val_acc": res["val_acc"], "ptq_val_loss": ptq["val_loss"],
                     "params_total": sub.param_count(None)})
    runner.results["qad"] = {
        "format": cfg.qad_format, "checkpoint": str(out_dir), "budgets": rows, "quantized_tensors": len(layouts),
        "quantized_params": int(sum(math.prod(p.shape) for n, p in model.named_parameters() if n in layouts))}
    runner.finish_stage("qad", tokens)
