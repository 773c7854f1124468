"""Activation-based importance (Nemotron Elastic / Minitron; forward passes only) and the
permutation that puts the most important units first (docs/design.md §1).

Scores are summed over every token of the calibration batches at full width:

- ``hidden``: ``sum |RMSNorm(X)|`` per channel over every RMSNorm output (each layer's input norm
  and the final norm);
- every per-layer axis: the score its layer kind defines in ``importance(x)`` from the layer's own
  projections (see :mod:`elastic_kernels.models.layers`): Mamba heads ``sum |X W_x,h^T|``
  (ranked within each group), experts ``sum ||w_t,e expert_e(x_t)||_2``, expert channels
  ``sum |x_t W1[e, i]^T|`` over the tokens routed to ``e``, dense FFN neurons ``sum |X W1_i^T|``.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from .config import AXES, AXIS_LETTER
from .layers import ElasticRMSNorm
from .model import ElasticHybridLM
from .protocol import check_score, descending


@torch.no_grad()
def estimate_importance(model: ElasticHybridLM, batches: Iterable[Tensor]) -> dict:
    """Importance scores from forward passes over ``batches`` (input_ids tensors (batch, seqlen)).

    Returns ``{"hidden": (hidden,), axis: [score per layer of that kind]}`` float64 for every axis
    of :data:`~elastic_kernels.models.AXES` (``mamba_heads`` (H,), ``experts`` (E,),
    ``expert_ffn`` (E, F), ``ffn`` (F,)), list entries in pattern order.
    """
    if not isinstance(model, ElasticHybridLM):
        raise TypeError(f"estimate_importance: model must be an ElasticHybridLM, got {type(model).__name__}")
    model.require_float_weights("estimate_importance")
    c = model.config
    hidden = torch.zeros(c.hidden_size, dtype=torch.float64, device=model.embed.weight.device)
    per_layer: dict[tuple[str, int], Tensor] = {}

    def norm_hook(_m, _inp, out):
        hidden.add_(out.detach().abs().double().reshape(-1, out.shape[-1]).sum(0))

    def layer_hook(block):
        def hook(mixer, inp):
            for axis, s in mixer.importance(inp[0]).items():
                key = (axis, block.occurrence)
                per_layer[key] = s if key not in per_layer else per_layer[key] + s
        return hook

    handles = [mod.register_forward_hook(norm_hook) for mod in model.modules() if isinstance(mod, ElasticRMSNorm)]
    handles += [b.mixer.register_forward_pre_hook(layer_hook(b)) for b in model.layers]
    try:
        n = 0
        for ids in batches:
            model(ids)
            n += 1
        if n == 0:
            raise ValueError("estimate_importance: batches is empty")
    finally:
        for h in handles:
            h.remove()
    return {"hidden": hidden, **{axis: [per_layer[(axis, o)] for o in range(c.num_units(axis))] for axis in AXES[1:]}}


@torch.no_grad()
def permute_by_importance(model: ElasticHybridLM, scores: dict) -> dict:
    """Reorder ``model``'s weights in place so the most important units come first (each layer
    kind's rule: Mamba heads within their group, every expert's channels independently). Full-width
    outputs do not change.

    ``scores`` is the dict of :func:`estimate_importance` (any subset of its axes). Returns the
    permutations applied (``perm[new] = old``), keyed like ``scores``.
    """
    if not isinstance(model, ElasticHybridLM):
        raise TypeError(f"permute_by_importance: model must be an ElasticHybridLM, got {type(model).__name__}")
    model.require_float_weights("permute_by_importance")
    c = model.config
    unknown = sorted(set(scores) - set(AXES))
    if unknown:
        raise ValueError(f"permute_by_importance: unknown score axis {unknown}")
    for axis in AXES[1:]:
        if axis in scores and (not isinstance(scores[axis], (list, tuple)) or len(scores[axis]) != c.num_units(axis)):
            raise ValueError(f"permute_by_importance: scores[{axis!r}] must be a list with one tensor per "
                             f"{AXIS_LETTER[axis]!r} layer ({c.num_units(axis)})")
    perms: dict = {}
    if "hidden" in scores:
        p = descending(check_score("scores['hidden']", scores["hidden"], (c.hidden_size,))).to(model.embed.weight.device)
        perms["hidden"] = p
        for mod in [model.embed, model.norm_f, model.lm_head] + [m for b in model.layers for m in (b.norm, b.mixer)]:
            if mod is not None:
                mod.permute_("hidden", p)
    per_layer: dict[str, list] = {axis: [] for axis in AXES[1:] if axis in scores}
    for block in model.layers:
        o = block.occurrence
        own = {a.name: scores[a.name][o] for a in block.mixer.axes if a.name in scores}
        for axis, perm in block.mixer.permute_by_importance_(own, f"[{o}]").items():
            per_layer[axis].append(perm)
    perms.update(per_layer)
    return perms
