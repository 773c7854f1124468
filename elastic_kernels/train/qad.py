"""Stage 3: quantization-aware distillation (QAD) and the nested quantized export.

The student is the stage-2 elastic model with its linear weights fake-quantized in the forward
pass (NVFP4 or FP8, straight-through gradients to the high-precision weights); the teacher is the
frozen, unquantized stage-2 model. Each sample is drawn at one of the router's chosen budgets
(curriculum stage B probabilities) and distilled from the teacher *at the same budget* with the
forward KL, so every nested submodel is trained under quantization.

Which weights are quantized: every parameter with two or more dimensions whose last (input)
dimension is a multiple of 16, except the embedding, the LM head, the MoE router, convolutions and
norms. NVFP4 uses one decode scale per tensor (per expert for stacked ``(E, N, K)`` expert
weights; other 3-D weights quantize as ``(prod(leading), K)``); FP8 uses one scale per tensor.
Because every nested budget slices input features at multiples of 16 and the per-tensor scales
are shared, every submodel is a slice of the one quantized checkpoint, with no requantization.

Export (directory ``qad/`` in the run directory):
``model.safetensors`` — NVFP4 weights as Model-Optimizer triples (``p.weight`` uint8 codes,
``p.weight_scale`` e4m3 block scales, ``p.weight_scale_2`` fp32 decode scale) or FP8 weights
(``p`` as float8_e4m3fn plus ``p.fp8_scale``), everything else as stored;
``config.json`` — model config, the budget table, the quantized names and their shapes.
:func:`load_quantized_nested` rebuilds the model at any budget of the table.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
from torch.func import functional_call

from .checkpoint import CheckpointError
from .losses import forward_kl
from .router import curriculum_probs, sample_budget_indices

__all__ = ["quantizable_names", "fake_quantize_weight", "QuantStudent", "export_quantized_nested",
           "load_quantized_nested", "run_qad"]

_SKIP = ("embed", "lm_head", "router", "conv", "norm")
FORMAT = "elastic_kernels.qad_nested"


def quantizable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that QAD quantizes (see the module docstring)."""
    out = []
    for name, p in model.named_parameters():
        leaf = name.split(".")
        if p.dim() >= 2 and p.shape[-1] % 16 == 0 and not any(s in part for part in leaf for s in _SKIP):
            out.append(name)
    return out


def _is_expert_stack(name: str) -> bool:
    return name.endswith(".w1") or name.endswith(".w2")


def fake_quantize_weight(name: str, w: torch.Tensor, fmt: str) -> torch.Tensor:
    """The weight as the export will store it, differentiable by straight-through estimation."""
    from .. import fake_quant_fp8, fake_quant_nvfp4
    if fmt == "fp8":
        return fake_quant_fp8(w)
    if w.dim() == 3 and _is_expert_stack(name):
        return torch.stack([fake_quant_nvfp4(w[e]) for e in range(w.shape[0])])
    return fake_quant_nvfp4(w.reshape(-1, w.shape[-1])).reshape(w.shape)


class QuantStudent(nn.Module):
    """Wraps a model so its forward uses fake-quantized weights (one DDP unit for QAD)."""

    def __init__(self, model: nn.Module, fmt: str) -> None:
        super().__init__()
        self.model = model
        self.fmt = fmt
        self.names = quantizable_names(model)

    def forward(self, input_ids: torch.Tensor, budget=None) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        q = {n: fake_quantize_weight(n, params[n], self.fmt) for n in self.names}
        return functional_call(self.model, q, (input_ids,), {"budget": budget})


def export_quantized_nested(model: nn.Module, path: str | os.PathLike, budgets: dict, fmt: str) -> None:
    """Write the quantized nested checkpoint of ``model`` with the budget table ``{name: Budget}``."""
    from .. import nvfp4
    from ..reference.nvfp4 import fp8_scale_of
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = quantizable_names(model)
    shapes = {}
    tensors: dict = {}
    for name, t in model.state_dict().items():
        t = t.detach().float().cpu() if t.is_floating_point() else t.detach().cpu()
        if name not in names:
            tensors[name] = t
            continue
        shapes[name] = list(t.shape)
        if fmt == "fp8":
            s = fp8_scale_of(t)
            tensors[name] = (t / s).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[name + ".fp8_scale"] = s.reshape(())
        else:
            w = t if (t.dim() == 3 and _is_expert_stack(name)) else t.reshape(-1, t.shape[-1])
            tensors[name + ".weight"] = nvfp4.quantize(w)
    nvfp4.save_file(tensors, path / "model.safetensors", metadata={"format": FORMAT, "qformat": fmt})
    meta = {"format": FORMAT, "qformat": fmt, "config": model.config.to_dict(), "quantized": shapes,
            "budgets": {k: b.to_dict() for k, b in budgets.items()}}
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, path / "config.json")


def load_quantized_nested(path: str | os.PathLike, budget: str | None = None, *, device=None) -> nn.Module:
    """The submodel at table entry ``budget`` (None = full) of a quantized nested checkpoint.

    Weights are decoded from the stored codes (NVFP4: ``e2m1(code) * block_scale * g``; FP8:
    ``e4m3 * scale``), then sliced to the budget's prefixes.
    """
    from .. import nvfp4
    from ..models import Budget, ElasticHybridConfig, ElasticHybridLM
    path = Path(path)
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"quantized checkpoint {path}: unreadable config.json: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"quantized checkpoint {path}: not a {FORMAT} checkpoint")
    if budget is not None and budget not in meta["budgets"]:
        raise CheckpointError(f"quantized checkpoint {path}: no budget {budget!r}; "
                              f"table has {sorted(meta['budgets'])}")
    try:
        sd = nvfp4.load_file(path / "model.safetensors")
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    state = {}
    for name, t in sd.items():
        if name.endswith(".fp8_scale"):
            continue
        if isinstance(t, nvfp4.NVFP4Tensor):
            base = name[:-len(".weight")]
            state[base] = t.dequantize(torch.float32).reshape(meta["quantized"][base])
        elif name in meta["quantized"]:
            state[name] = t.float() * sd[name + ".fp8_scale"]
        else:
            state[name] = t
    model = ElasticHybridLM(ElasticHybridConfig.from_dict(meta["config"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"quantized checkpoint {path}: tensors do not match its config: {e}") from e
    if device is not None:
        model = model.to(device)
    return model if budget is None else model.slice(Budget.from_dict(meta["budgets"][budget]))


def run_qad(pipe) -> tuple[dict, int]:
    """Stage 3 of :class:`~elastic_kernels.train.loop.Pipeline`; returns (results, tokens)."""
    from ..models import Budget
    from .loop import _prefixed, lr_at

    cfg = pipe.cfg
    teacher = pipe.new_model()
    meta = pipe._load_model("elastic", {"student": teacher})
    teacher.eval().requires_grad_(False)
    budgets = [Budget.from_dict(b) for b in meta["budgets"]]
    model = copy.deepcopy(teacher).train().requires_grad_(True)
    student = QuantStudent(model, cfg.qad_format)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.qad_lr, weight_decay=0.0)
    net = pipe._wrap(student)
    steps = cfg.qad_steps
    probs = curriculum_probs(len(budgets), "B", cfg.stage_b_skew)

    def step_fn(step: int) -> dict:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, cfg.qad_lr, cfg.warmup_steps)
        b, tokens = pipe._train_batch(step, stream=1_000)
        gen = torch.Generator().manual_seed(cfg.seed * 3_000_017 + step)
        idx = sample_budget_indices(cfg.batch_size, probs, gen)[pipe.dist.rank::pipe.dist.world].tolist()
        per_sample = [budgets[i] for i in idx]
        with torch.no_grad():
            t_logits = teacher(b.input_ids, budget=per_sample)
        logits = net(b.input_ids, budget=per_sample)
        loss = forward_kl(logits, t_logits, b.loss_mask, temperature=cfg.kd_temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        return {"loss": float(loss.detach()), "tokens": tokens}

    tokens = pipe._train("qad", steps, {"model": model}, opt, step_fn)
    pipe._save_model("qad_student", _prefixed("model", model), {"format": cfg.qad_format})
    table = {f"{t:g}": bud for t, bud in zip(cfg.budgets, budgets)}
    out_dir = pipe.dir / "qad"
    rows = []
    if pipe.dist.main:
        export_quantized_nested(model, out_dir, table, cfg.qad_format)
        ref_rows = {r["target"]: r for r in pipe.progress["results"]["budgets"]}
        for t in cfg.budgets:
            sub = load_quantized_nested(out_dir, f"{t:g}", device=pipe.device)
            res = pipe._eval(sub)
            rows.append({"target": t, "ref_test_acc": ref_rows[t].get("test_acc"), "test_acc": res["test_acc"],
                         "val_loss": res["val_loss"], "val_acc": res["val_acc"],
                         "params_total": sub.param_count(None)})
    pipe._barrier()
    res = {"format": cfg.qad_format, "checkpoint": str(out_dir), "budgets": rows,
           "quantized_tensors": len(quantizable_names(model)),
           "quantized_params": int(sum(math.prod(p.shape) for n, p in model.named_parameters()
                                       if n in set(quantizable_names(model))))}
    return res, tokens
