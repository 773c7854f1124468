"""Translation between Hugging Face ``config.json`` (NemotronH, Mamba2) and
:class:`~elastic_kernels.models.ElasticHybridConfig` (docs/interop.md).

Only plain dicts are read and written here (no ``transformers`` import): a parent imports without
the optional extra installed. Fields that change the computation and have no counterpart in the
elastic model raise ``ValueError`` naming the field; fields transformers itself ignores (for
example NemotronH's ``residual_in_fp32`` and ``attention_bias``) are ignored too.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..models import AXES, ElasticHybridConfig

ARCHITECTURES = ("nemotron_h", "mamba2")
HF_CLASS = {"nemotron_h": "NemotronHForCausalLM", "mamba2": "Mamba2ForCausalLM"}
_NH_LAYER = {"mamba": "M", "linear_attention": "M", "moe": "E", "attention": "*", "full_attention": "*",
             "mlp": "-"}
_NH_NAME = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
_ACTIVATIONS = ("relu2", "silu", "gelu")
_FRACTIONS = (1.0, 0.75, 0.5, 0.25)


def _unsupported(arch: str, field: str, value, why: str) -> ValueError:
    return ValueError(f"{arch} config field {field}={value!r} is not supported: {why}")


def architecture_of(hf: Mapping[str, Any]) -> str:
    """``"nemotron_h"`` or ``"mamba2"`` from a config dict's ``model_type``."""
    mt = hf.get("model_type")
    if mt not in ARCHITECTURES:
        raise ValueError(f"config.json model_type must be one of {ARCHITECTURES}, got {mt!r}")
    return mt


def _limit(value) -> tuple[float, float]:
    """A ``time_step_limit`` as saved by transformers (``{"__float__": "Infinity"}`` for inf)."""
    out = []
    for v in value:
        if isinstance(v, Mapping) and "__float__" in v:
            v = float(v["__float__"])
        out.append(float(v))
    return out[0], out[1]


def _nested_choices(kwargs: dict[str, Any], requested) -> dict[str, tuple[float, ...]]:
    """``requested`` validated, or per axis the fractions of ``(1, .75, .5, .25)`` that give whole,
    valid sizes in every layer."""
    if requested is not None:
        ElasticHybridConfig(**kwargs, nested_choices=requested)
        return dict(requested)
    out = {}
    for axis in AXES:
        keep = [1.0]
        for f in _FRACTIONS[1:]:
            try:
                ElasticHybridConfig(**kwargs, nested_choices={axis: (1.0, f)})
            except ValueError:
                continue
            keep.append(f)
        out[axis] = tuple(keep)
    return out


def _pattern(hf: Mapping[str, Any]) -> str:
    types = hf.get("layers_block_type") or hf.get("layer_types")
    if types is None and "hybrid_override_pattern" in hf:
        return str(hf["hybrid_override_pattern"])
    if not isinstance(types, list) or any(t not in _NH_LAYER for t in types):
        raise ValueError(f"nemotron_h config field layers_block_type must list layer types of "
                         f"{sorted(_NH_LAYER)}, got {types!r}")
    return "".join(_NH_LAYER[t] for t in types)


def config_from_hf(hf: Mapping[str, Any], nested_choices=None) -> tuple[ElasticHybridConfig, str]:
    """``(ElasticHybridConfig, architecture)`` of a NemotronH or Mamba2 ``config.json`` dict.

    ``nested_choices`` (``{axis: fractions}``) defaults to the fractions of (1, 0.75, 0.5, 0.25)
    that divide every layer's size into whole, valid units. Raises ``ValueError`` naming a field
    the elastic model cannot reproduce exactly.
    """
    arch = architecture_of(hf)
    g = hf.get
    if arch == "mamba2":
        return _mamba2(hf, nested_choices), arch
    pattern = _pattern(hf)
    checks = [("use_bias", bool(g("use_bias", False)), "the Mamba in/out projections have no bias"),
              ("mlp_bias", bool(g("mlp_bias", False)), "the MLP and shared-expert projections have no bias"),
              ("sliding_window", g("sliding_window") is not None, "attention is full causal"),
              ("moe_latent_size", g("moe_latent_size") is not None, "MoE latent projections are not modelled"),
              ("mamba_hidden_act", g("mamba_hidden_act", "silu") != "silu", "the Mamba conv activation is SiLU")]
    for field, bad, why in checks:
        if bad:
            raise _unsupported(arch, field, g(field), why)
    act = g("mlp_hidden_act", "relu2")
    if act not in _ACTIVATIONS:
        raise _unsupported(arch, "mlp_hidden_act", act, f"activations are {_ACTIVATIONS}")
    kwargs = dict(
        vocab_size=int(g("vocab_size")), hidden_size=int(g("hidden_size")), pattern=pattern,
        mamba_heads=int(g("mamba_num_heads", 128)), mamba_head_dim=int(g("mamba_head_dim", 64)),
        mamba_groups=int(g("n_groups", 8)), mamba_state=int(g("ssm_state_size", 128)),
        mamba_conv_kernel=int(g("conv_kernel", 4)), mamba_chunk_size=int(g("chunk_size", 128)),
        mamba_dt_limit=(float(g("time_step_min", 0.001)), math.inf),
        moe_experts=int(g("n_routed_experts", 8)), moe_top_k=int(g("num_experts_per_tok", 2)),
        moe_ffn=int(g("moe_intermediate_size", 7688)),
        moe_shared_ffn=int(g("moe_shared_expert_intermediate_size", 7688)), moe_score="sigmoid",
        moe_activation=act, moe_n_group=int(g("n_group", 1)), moe_topk_group=int(g("topk_group", 1)),
        moe_norm_topk=bool(g("norm_topk_prob", True)), moe_routed_scaling=float(g("routed_scaling_factor", 1.0)),
        moe_router_fp32=True, attn_heads=int(g("num_attention_heads", 32)),
        attn_kv_heads=int(g("num_key_value_heads", 8)), attn_head_dim=int(g("head_dim", 128)),
        ffn_size=int(g("intermediate_size", 21504)), ffn_activation=act,
        norm_eps=float(g("layer_norm_epsilon", 1e-5)), tie_embeddings=False)
    return ElasticHybridConfig(**kwargs, nested_choices=_nested_choices(kwargs, nested_choices)), arch


def _mamba2(hf: Mapping[str, Any], nested_choices) -> ElasticHybridConfig:
    g = hf.get
    if g("use_bias", False):
        raise _unsupported("mamba2", "use_bias", True, "the Mamba in/out projections have no bias")
    if g("hidden_act", "silu") != "silu":
        raise _unsupported("mamba2", "hidden_act", g("hidden_act"), "the Mamba conv activation is SiLU")
    hidden, heads, head_dim = int(g("hidden_size")), int(g("num_heads")), int(g("head_dim"))
    if int(g("expand", 2)) * hidden != heads * head_dim:
        raise _unsupported("mamba2", "expand", g("expand"), "expand * hidden_size must equal num_heads * head_dim")
    kwargs = dict(
        vocab_size=int(g("vocab_size")), hidden_size=hidden, pattern="M" * int(g("num_hidden_layers")),
        mamba_heads=heads, mamba_head_dim=head_dim, mamba_groups=int(g("n_groups", 8)),
        mamba_state=int(g("state_size", 128)), mamba_conv_kernel=int(g("conv_kernel", 4)),
        mamba_chunk_size=int(g("chunk_size", 256)),
        mamba_dt_limit=_limit(g("time_step_limit", (0.0, math.inf))),
        attn_heads=1, attn_kv_heads=1, attn_head_dim=hidden,
        norm_eps=float(g("layer_norm_epsilon", 1e-5)), tie_embeddings=bool(g("tie_word_embeddings", False)),
        residual_fp32=bool(g("residual_in_fp32", True)))
    return ElasticHybridConfig(**kwargs, nested_choices=_nested_choices(kwargs, nested_choices))


def _uniform(config: ElasticHybridConfig, axis: str, letter: str) -> int:
    sizes = {config.full_size(axis, o) for o in range(len(config.layers_of(letter)))}
    if len(sizes) > 1:
        raise ValueError(f"to_hf: the {axis} sizes differ between layers ({sorted(sizes)}); Hugging Face "
                         f"configs hold one {axis} size for every layer, so this budget cannot be exported exactly")
    return sizes.pop() if sizes else config.full_size(axis)


def export_sizes(config: ElasticHybridConfig) -> dict[str, int]:
    """One size per axis for a Hugging Face config: Mamba heads must agree across layers;
    experts, expert FFN and dense FFN take the largest layer (smaller layers are padded with
    units that contribute exactly zero, see :mod:`.hf_weights`)."""
    mx = {axis: max([config.full_size(axis, o) for o in range(config.num_units(axis))] or [config.full_size(axis)])
          for axis in ("experts", "expert_ffn", "ffn")}
    return {"mamba_heads": _uniform(config, "mamba_heads", "M"), **mx}


def choose_architecture(config: ElasticHybridConfig, architecture: str | None) -> str:
    """The Hugging Face architecture an export writes: ``architecture`` if given, else
    ``"mamba2"`` for an all-Mamba model with a float32 residual stream whose sizes Mamba2Config
    can hold (``num_heads * head_dim == expand * hidden_size``), ``"nemotron_h"`` otherwise."""
    if architecture is None:
        heads = export_sizes(config)["mamba_heads"]
        fits = (heads * config.mamba_head_dim) % config.hidden_size == 0
        return "mamba2" if set(config.pattern) == {"M"} and config.residual_fp32 and fits else "nemotron_h"
    if architecture not in ARCHITECTURES:
        raise ValueError(f"to_hf: architecture must be one of {ARCHITECTURES} or None, got {architecture!r}")
    return architecture


def config_to_hf(config: ElasticHybridConfig, architecture: str, extra: Mapping[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32) -> dict:
    """A transformers ``config.json`` dict reproducing ``config`` exactly for weights of
    ``dtype`` (``extra``: token ids and other passthrough fields of the parent). Raises
    ``ValueError`` naming a field of ``config`` the architecture cannot express."""
    c, sizes = config, export_sizes(config)
    lo, hi = c.mamba_dt_limit
    out: dict[str, Any] = {k: v for k, v in (extra or {}).items()
                           if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if architecture == "mamba2":
        if set(c.pattern) != {"M"}:
            raise ValueError(f"to_hf: architecture 'mamba2' needs an all-Mamba pattern, got {c.pattern!r}")
        heads = sizes["mamba_heads"]
        if (heads * c.mamba_head_dim) % c.hidden_size:
            raise ValueError(f"to_hf: mamba2 needs mamba_heads * mamba_head_dim ({heads * c.mamba_head_dim}) to be a "
                             f"multiple of hidden_size ({c.hidden_size}) (its expand); export as 'nemotron_h'")
        out.update(model_type="mamba2", architectures=[HF_CLASS["mamba2"]], vocab_size=c.vocab_size,
                   hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_heads=heads,
                   head_dim=c.mamba_head_dim, expand=heads * c.mamba_head_dim // c.hidden_size,
                   n_groups=c.mamba_groups, state_size=c.mamba_state, conv_kernel=c.mamba_conv_kernel,
                   chunk_size=c.mamba_chunk_size, time_step_limit=[lo, hi], use_bias=False, use_conv_bias=True,
                   hidden_act="silu", layer_norm_epsilon=c.norm_eps, residual_in_fp32=c.residual_fp32,
                   tie_word_embeddings=c.tie_embeddings)
        return out
    if c.residual_fp32 and dtype not in (torch.float32, torch.float64):
        raise ValueError(f"to_hf: residual_fp32=True has no NemotronH counterpart for {dtype} weights (its blocks "
                         f"keep the residual in the model dtype); export float32 weights or an all-Mamba model as "
                         f"'mamba2'")
    if hi != math.inf:
        raise ValueError(f"to_hf: NemotronH clamps dt to (time_step_min, inf); mamba_dt_limit={c.mamba_dt_limit} "
                         f"has a finite upper limit")
    if "E" in c.pattern and (c.moe_score != "sigmoid" or c.moe_gated):
        field = "moe_score" if c.moe_score != "sigmoid" else "moe_gated"
        raise ValueError(f"to_hf: NemotronH routes with sigmoid scores to non-gated experts; {field}="
                         f"{getattr(c, field)!r} has no counterpart")
    acts = {c.moe_activation if "E" in c.pattern else None, c.ffn_activation if "-" in c.pattern else None} - {None}
    if len(acts) > 1:
        raise ValueError(f"to_hf: NemotronH uses one mlp_hidden_act for experts and dense FFNs, got moe_activation="
                         f"{c.moe_activation!r} and ffn_activation={c.ffn_activation!r}")
    out.update(model_type="nemotron_h", architectures=[HF_CLASS["nemotron_h"]], vocab_size=c.vocab_size,
               hidden_size=c.hidden_size, layers_block_type=[_NH_NAME[x] for x in c.pattern],
               mamba_num_heads=sizes["mamba_heads"], mamba_head_dim=c.mamba_head_dim, n_groups=c.mamba_groups,
               ssm_state_size=c.mamba_state, conv_kernel=c.mamba_conv_kernel, chunk_size=c.mamba_chunk_size,
               time_step_min=lo, use_conv_bias=True, use_bias=False, mlp_bias=False, mamba_hidden_act="silu",
               n_routed_experts=sizes["experts"], num_experts_per_tok=c.moe_top_k,
               moe_intermediate_size=sizes["expert_ffn"], moe_shared_expert_intermediate_size=max(1, c.moe_shared_ffn),
               n_group=c.moe_n_group, topk_group=c.moe_topk_group, norm_topk_prob=c.moe_norm_topk,
               routed_scaling_factor=c.moe_routed_scaling, num_attention_heads=c.attn_heads,
               num_key_value_heads=c.attn_kv_heads, head_dim=c.head_dim, intermediate_size=sizes["ffn"],
               mlp_hidden_act=acts.pop() if acts else "relu2", layer_norm_epsilon=c.norm_eps,
               tie_word_embeddings=c.tie_embeddings, residual_in_fp32=False, sliding_window=None,
               moe_latent_size=None, num_nextn_predict_layers=0)
    return out
