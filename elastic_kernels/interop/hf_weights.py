"""Weight layout translation between Hugging Face NemotronH / Mamba2 state dicts and
:class:`~elastic_kernels.models.ElasticHybridLM` (docs/interop.md).

Hugging Face keeps Mamba heads *blocked* (head ``h`` in group ``h // (H/G)``) and experts in
contiguous groups; the elastic model keeps both *interleaved* (group ``h % G``), so that the first
``k`` units of every group are a plain prefix. The fixed permutation :func:`blocked_index` maps
one to the other exactly: our unit ``i`` is Hugging Face unit ``blocked_index(n, g)[i]``. It
applies to the Mamba ``in_proj`` rows (z, x, dt per head), the conv channels of x, ``dt_bias``,
``A_log``, ``D``, the gated norm weight and the ``out_proj`` columns; and to the expert rows of
the router, the correction bias and the expert weights.

Hugging Face state dicts come in two spellings, both read: the one ``save_pretrained`` writes
(``backbone.`` prefix, one ``experts.{j}.up_proj.weight`` per expert) and the in-memory one
(``model.`` prefix, fused ``experts.up_proj`` of shape (E, F, hidden)). Writing uses the
``save_pretrained`` spelling, which every transformers version loads.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

from ..models import ElasticHybridConfig
from .hf_config import export_sizes


def blocked_index(n: int, groups: int, device=None) -> Tensor:
    """``(n,)`` int64: the blocked (Hugging Face) index of every interleaved unit,
    ``(i % groups) * (n // groups) + i // groups``."""
    i = torch.arange(n, device=device)
    return (i % groups) * (n // groups) + i // groups


def _canonical(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Names without the ``backbone.``/``model.`` prefix, per-expert weights fused to (E, ., .)."""
    out: dict[str, Tensor] = {}
    experts: dict[tuple[str, str], dict[int, Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("mtp."):
            continue  # multi-token-prediction heads: transformers ignores them too
        for pre in ("backbone.", "model."):
            if name.startswith(pre):
                name = name[len(pre):]
                break
        m = re.fullmatch(r"(layers\.\d+\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight", name)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
        else:
            out[name] = t
    for (pre, proj), per in experts.items():
        if sorted(per) != list(range(len(per))):
            raise ValueError(f"{pre}.*.{proj}.weight: expert indices {sorted(per)} are not 0..{len(per) - 1}")
        out[f"{pre}.{proj}"] = torch.stack([per[j] for j in range(len(per))])
    return out


def _take(hf: dict[str, Tensor], name: str) -> Tensor:
    if name not in hf:
        raise ValueError(f"Hugging Face checkpoint has no tensor {name!r} (the config expects one)")
    return hf.pop(name)


def state_from_hf(tensors: Mapping[str, Tensor], config: ElasticHybridConfig) -> dict[str, Tensor]:
    """Our state dict (names of ``ElasticHybridLM(config).state_dict()``) from a Hugging Face one.
    Raises ``ValueError`` naming a missing, unexpected or misshapen tensor."""
    c = config
    hf = _canonical(tensors)
    sd: dict[str, Tensor] = {"embed.weight": _take(hf, "embeddings.weight"),
                             "norm_f.weight": _take(hf, "norm_f.weight")}
    if c.tie_embeddings:
        hf.pop("lm_head.weight", None)
    else:
        sd["lm_head.weight"] = _take(hf, "lm_head.weight")
    P, G, N = c.mamba_head_dim, c.mamba_groups, c.mamba_state
    for i, kind in enumerate(c.pattern):
        src, dst = f"layers.{i}.mixer.", f"layers.{i}.mixer."
        sd[f"layers.{i}.norm.weight"] = _take(hf, f"layers.{i}.norm.weight")
        if kind == "M":
            H = c.full_size("mamba_heads", c.layers_of("M").index(i))
            perm = blocked_index(H, G)
            w = _take(hf, src + "in_proj.weight")
            z, x, bc, dt = torch.split(w, [H * P, H * P, 2 * G * N, H])
            sd[dst + "in_heads"] = torch.cat([z.view(H, P, -1), x.view(H, P, -1), dt.view(H, 1, -1)], 1)[perm]
            sd[dst + "in_bc"] = bc
            cw = _take(hf, src + "conv1d.weight").squeeze(1)
            cb = hf.pop(src + "conv1d.bias", None)
            cb = torch.zeros(cw.shape[0], dtype=cw.dtype) if cb is None else cb
            sd[dst + "conv_x_weight"] = cw[:H * P].view(H, P, -1)[perm]
            sd[dst + "conv_bc_weight"] = cw[H * P:]
            sd[dst + "conv_x_bias"] = cb[:H * P].view(H, P)[perm]
            sd[dst + "conv_bc_bias"] = cb[H * P:]
            for name in ("dt_bias", "A_log", "D"):
                sd[dst + name] = _take(hf, src + name)[perm]
            sd[dst + "norm.weight"] = _take(hf, src + "norm.weight").view(H, P)[perm]
            out = _take(hf, src + "out_proj.weight")
            sd[dst + "out_proj"] = out.view(out.shape[0], H, P)[:, perm].reshape(out.shape[0], H * P)
        elif kind == "E":
            E = c.full_size("experts", c.layers_of("E").index(i))
            perm = blocked_index(E, c.moe_n_group)
            sd[dst + "router"] = _take(hf, src + "gate.weight")[perm]
            sd[dst + "correction_bias"] = _take(hf, src + "gate.e_score_correction_bias")[perm]
            sd[dst + "w1"] = _take(hf, src + "experts.up_proj")[perm]
            sd[dst + "w2"] = _take(hf, src + "experts.down_proj")[perm]
            if c.moe_shared_ffn:
                sd[dst + "shared.up"] = _take(hf, src + "shared_experts.up_proj.weight")
                sd[dst + "shared.down"] = _take(hf, src + "shared_experts.down_proj.weight")
        elif kind == "-":
            sd[dst + "up"] = _take(hf, src + "up_proj.weight")
            sd[dst + "down"] = _take(hf, src + "down_proj.weight")
        else:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                sd[dst + name] = _take(hf, src + name + ".weight")
    if hf:
        raise ValueError(f"Hugging Face checkpoint has tensors the config does not use: {sorted(hf)[:8]}")
    return {k: v.contiguous() for k, v in sd.items()}


def _pad(t: Tensor, dim: int, size: int, value: float = 0.0) -> Tensor:
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_full(shape, value)], dim)


def state_to_hf(state: Mapping[str, Tensor], config: ElasticHybridConfig, architecture: str) -> dict[str, Tensor]:
    """A Hugging Face state dict (``save_pretrained`` spelling) of our ``state`` for ``config``
    (a standalone, possibly per-layer sized config). Layers narrower than the exported config
    (see :func:`.hf_config.export_sizes`) are padded with units that contribute exactly zero:
    zero FFN channels, and experts with zero weights and a ``-inf`` correction bias (never
    chosen)."""
    c, sizes = config, export_sizes(config)
    pre = "backbone."
    out: dict[str, Tensor] = {pre + "embeddings.weight": state["embed.weight"],
                              pre + "norm_f.weight": state["norm_f.weight"]}
    if not c.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    elif architecture == "nemotron_h":  # NemotronHForCausalLM does not tie: it reads its own copy
        out["lm_head.weight"] = state["embed.weight"].clone()
    P, G = c.mamba_head_dim, c.mamba_groups
    for i, kind in enumerate(c.pattern):
        src, dst = f"layers.{i}.mixer.", f"{pre}layers.{i}.mixer."
        out[f"{pre}layers.{i}.norm.weight"] = state[f"layers.{i}.norm.weight"]
        if kind == "M":
            H = c.full_size("mamba_heads", c.layers_of("M").index(i))
            inv = torch.argsort(blocked_index(H, G))
            heads = state[src + "in_heads"][inv]
            d = heads.shape[-1]
            out[dst + "in_proj.weight"] = torch.cat([heads[:, :P].reshape(H * P, d),
                                                     heads[:, P:2 * P].reshape(H * P, d),
                                                     state[src + "in_bc"], heads[:, 2 * P]], 0)
            K = state[src + "conv_bc_weight"].shape[-1]
            out[dst + "conv1d.weight"] = torch.cat([state[src + "conv_x_weight"][inv].reshape(H * P, K),
                                                    state[src + "conv_bc_weight"]], 0)[:, None, :]
            out[dst + "conv1d.bias"] = torch.cat([state[src + "conv_x_bias"][inv].reshape(H * P),
                                                  state[src + "conv_bc_bias"]], 0)
            for name in ("dt_bias", "A_log", "D"):
                out[dst + name] = state[src + name][inv]
            out[dst + "norm.weight"] = state[src + "norm.weight"][inv].reshape(H * P)
            w = state[src + "out_proj"]
            out[dst + "out_proj.weight"] = w.view(w.shape[0], H, P)[:, inv].reshape(w.shape[0], H * P)
        elif kind == "E":
            E, F = sizes["experts"], sizes["expert_ffn"]
            w1 = _pad(_pad(state[src + "w1"], 1, F), 0, E)
            w2 = _pad(_pad(state[src + "w2"], 2, F), 0, E)
            router = _pad(state[src + "router"], 0, E)
            bias = _pad(state[src + "correction_bias"].float(), 0, E, float("-inf"))
            inv = torch.argsort(blocked_index(E, c.moe_n_group))
            out[dst + "gate.weight"] = router[inv].float()
            out[dst + "gate.e_score_correction_bias"] = bias[inv]
            w1, w2 = w1[inv], w2[inv]
            for j in range(E):
                out[f"{dst}experts.{j}.up_proj.weight"] = w1[j]
                out[f"{dst}experts.{j}.down_proj.weight"] = w2[j]
            if c.moe_shared_ffn:
                out[dst + "shared_experts.up_proj.weight"] = state[src + "shared.up"]
                out[dst + "shared_experts.down_proj.weight"] = state[src + "shared.down"]
            else:  # NemotronH always has a shared expert: one zero channel adds exactly 0
                d = w1.shape[-1]
                out[dst + "shared_experts.up_proj.weight"] = w1.new_zeros(1, d)
                out[dst + "shared_experts.down_proj.weight"] = w1.new_zeros(d, 1)
        elif kind == "-":
            out[dst + "up_proj.weight"] = _pad(state[src + "up"], 0, sizes["ffn"])
            out[dst + "down_proj.weight"] = _pad(state[src + "down"], 1, sizes["ffn"])
        else:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[dst + name + ".weight"] = state[src + name]
    return {k: v.contiguous() for k, v in out.items()}
