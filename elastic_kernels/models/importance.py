"""Activation-based importance (Nemotron Elastic / Minitron; forward passes only) and the
permutation that puts the most important units first.

Scores, summed over every token of the calibration batches at full width:

- ``hidden``: ``sum |RMSNorm(X)|`` per channel over every RMSNorm output (each layer's input norm
  and the final norm);
- ``mamba_heads`` (per ``M`` layer): ``sum |X W_x,h^T|`` over the x-projection channels of head
  ``h`` (ranked within each group, so the permutation keeps heads in their group);
- ``experts`` (per ``E`` layer): ``sum ||w_t,e expert_e(x_t)||_2`` over the tokens routed to ``e``;
- ``expert_ffn`` (per ``E`` layer, ``(E, F)``): ``sum |x_t W1[e, i]^T|`` over tokens routed to ``e``;
- ``ffn`` (per ``-`` layer): ``sum |X W1_i^T|`` per intermediate neuron.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from .config import AXIS_LETTER
from .layers import ElasticFFN, ElasticMoE, ElasticRMSNorm, _activation
from .model import ElasticHybridLM


@torch.no_grad()
def estimate_importance(model: ElasticHybridLM, batches: Iterable[Tensor]) -> dict:
    """Importance scores from forward passes over ``batches`` (input_ids tensors (batch, seqlen)).

    Returns ``{"hidden": (hidden,), "mamba_heads": [(H,)], "experts": [(E,)], "expert_ffn": [(E, F)],
    "ffn": [(F,)]}`` float64 (one list entry per layer of that kind, in pattern order).
    """
    if not isinstance(model, ElasticHybridLM):
        raise TypeError(f"estimate_importance: model must be an ElasticHybridLM, got {type(model).__name__}")
    model.require_float_weights("estimate_importance")
    c = model.config
    dev = model.embed.weight.device
    f64 = dict(dtype=torch.float64, device=dev)
    def per_layer(axis: str) -> list[Tensor]:
        return [torch.zeros(c.full_size(axis, o), **f64) for o in range(c.num_units(axis))]

    scores = {"hidden": torch.zeros(c.hidden_size, **f64), "mamba_heads": per_layer("mamba_heads"),
              "experts": per_layer("experts"), "ffn": per_layer("ffn"),
              "expert_ffn": [torch.zeros(c.full_size("experts", o), c.full_size("expert_ffn", o), **f64)
                             for o in range(c.num_units("expert_ffn"))]}

    def norm_hook(_m, _inp, out):
        scores["hidden"] += out.detach().abs().double().reshape(-1, out.shape[-1]).sum(0)

    def mamba_hook(block):
        def hook(m, inp):
            x = inp[0]
            P = m.head_dim
            xs = torch.einsum("blk,hpk->blhp", x, m.in_heads[:, P:2 * P, :x.shape[-1]])
            scores["mamba_heads"][block.occurrence] += xs.abs().double().sum(dim=(0, 1, 3))
        return hook

    def ffn_hook(block):
        def hook(m, inp):
            x = inp[0]
            scores["ffn"][block.occurrence] += (x @ m.up[:, :x.shape[-1]].T).abs().double().reshape(-1, m.ffn).sum(0)
        return hook

    def moe_hook(block):
        def hook(m: ElasticMoE, inp):
            x = inp[0]
            xt = x.reshape(-1, x.shape[-1])
            w, ids, _ = m.route(xt)
            o = block.occurrence
            for e in range(m.num_experts):
                tok, slot = (ids == e).nonzero(as_tuple=True)
                if tok.numel() == 0:
                    continue
                pre = xt[tok] @ m.w1[e].T  # (n, F)
                out = (_activation(pre, m.activation) @ m.w2[e].T) * w[tok, slot, None].to(xt.dtype)
                scores["experts"][o][e] += out.double().norm(dim=-1).sum()
                scores["expert_ffn"][o][e] += pre.abs().double().sum(0)
        return hook

    handles = []
    try:
        for mod in model.modules():
            if isinstance(mod, ElasticRMSNorm):
                handles.append(mod.register_forward_hook(norm_hook))
        for block in model.layers:
            if block.kind == "M":
                handles.append(block.mixer.register_forward_pre_hook(mamba_hook(block)))
            elif block.kind == "-":
                handles.append(block.mixer.register_forward_pre_hook(ffn_hook(block)))
            elif block.kind == "E":
                handles.append(block.mixer.register_forward_pre_hook(moe_hook(block)))
        n = 0
        for ids in batches:
            model(ids)
            n += 1
        if n == 0:
            raise ValueError("estimate_importance: batches is empty")
    finally:
        for h in handles:
            h.remove()
    return scores


def _order(score: Tensor) -> Tensor:
    """Indices by descending score (stable: ties keep their order)."""
    return torch.sort(score, descending=True, stable=True).indices


def _check(name: str, t, shape: tuple) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"permute_by_importance: scores[{name}] must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"permute_by_importance: scores[{name}] must have shape {shape}, got {tuple(t.shape)}")
    return t


@torch.no_grad()
def permute_by_importance(model: ElasticHybridLM, scores: dict) -> dict:
    """Reorder ``model``'s weights in place so the most important units come first (Mamba heads
    within their group; every expert's channels independently). Full-width outputs do not change.

    ``scores`` is the dict of :func:`estimate_importance` (any subset of its axes). Returns the
    permutations applied (``perm[new] = old``), keyed like ``scores``.
    """
    if not isinstance(model, ElasticHybridLM):
        raise TypeError(f"permute_by_importance: model must be an ElasticHybridLM, got {type(model).__name__}")
    model.require_float_weights("permute_by_importance")
    c = model.config
    unknown = sorted(set(scores) - {"hidden", "mamba_heads", "experts", "expert_ffn", "ffn"})
    if unknown:
        raise ValueError(f"permute_by_importance: unknown score axis {unknown}")
    for axis in ("mamba_heads", "experts", "expert_ffn", "ffn"):
        if axis in scores and (not isinstance(scores[axis], (list, tuple)) or len(scores[axis]) != c.num_units(axis)):
            raise ValueError(f"permute_by_importance: scores[{axis!r}] must be a list with one tensor per "
                             f"{AXIS_LETTER[axis]!r} layer ({c.num_units(axis)})")
    perms: dict = {}
    if "hidden" in scores:
        p = _order(_check("'hidden'", scores["hidden"], (c.hidden_size,))).to(model.embed.weight.device)
        perms["hidden"] = p
        for mod in [model.embed, model.norm_f, model.lm_head] + [m for b in model.layers for m in (b.norm, b.mixer)]:
            if mod is not None:
                mod.permute_hidden_(p)
    blocks = {letter: [b for b in model.layers if b.kind == letter] for letter in "ME-"}
    if "mamba_heads" in scores:
        perms["mamba_heads"] = []
        for o, block in enumerate(blocks["M"]):
            m = block.mixer
            s = _check(f"'mamba_heads'][{o}", scores["mamba_heads"][o], (m.nheads,))
            G = m.ngroups
            perm = torch.empty(m.nheads, dtype=torch.int64)
            for g in range(G):
                heads = torch.arange(g, m.nheads, G)
                perm[heads] = heads[_order(s[heads].cpu())]
            perm = perm.to(m.A_log.device)
            m.permute_heads_(perm)
            perms["mamba_heads"].append(perm)
    if "expert_ffn" in scores:  # before experts: these scores are indexed by the current expert order
        perms["expert_ffn"] = []
        for o, block in enumerate(blocks["E"]):
            m = block.mixer
            s = _check(f"'expert_ffn'][{o}", scores["expert_ffn"][o], (m.num_experts, m.ffn))
            perm = torch.sort(s, dim=1, descending=True, stable=True).indices.to(m.w1.device)
            m.permute_expert_channels_(perm)
            perms["expert_ffn"].append(perm)
    if "experts" in scores:
        perms["experts"] = []
        for o, block in enumerate(blocks["E"]):
            m = block.mixer
            perm = _order(_check(f"'experts'][{o}", scores["experts"][o], (m.num_experts,))).to(m.w1.device)
            m.permute_experts_(perm)
            perms["experts"].append(perm)
    if "ffn" in scores:
        perms["ffn"] = []
        for o, block in enumerate(blocks["-"]):
            m: ElasticFFN = block.mixer
            perm = _order(_check(f"'ffn'][{o}", scores["ffn"][o], (m.ffn,))).to(m.up.device)
            m.permute_channels_(perm)
            perms["ffn"].append(perm)
    return perms
