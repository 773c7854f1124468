"""``ElasticHybridConfig`` (the architecture, JSON round-trip) and ``Budget`` (a nested submodel).

Elastic axes (docs/design.md §1); every submodel keeps a *prefix* of each axis:

======================  ===================================  =====================================
axis                    units                                per layer?
======================  ===================================  =====================================
``"hidden"``            embedding channels (``hidden_size``)  no: one width for the residual stream
``"mamba_heads"``       total Mamba2 heads (``k * groups``)   yes, one entry per ``M`` layer
``"experts"``           routed experts                       yes, one entry per ``E`` layer
``"expert_ffn"``        routed-expert intermediate channels  yes, one entry per ``E`` layer
``"ffn"``               dense FFN intermediate channels      yes, one entry per ``-`` layer
======================  ===================================  =====================================
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .layers import LAYER_KINDS
from .protocol import LayerAxis

#: per-layer axis name -> (its layer kind's letter, its LayerAxis), from the registered layer kinds
LAYER_AXES: dict[str, tuple[str, LayerAxis]] = {a.name: (letter, a) for letter, cls in LAYER_KINDS.items()
                                                for a in cls.axes}
AXES = ("hidden",) + tuple(LAYER_AXES)
AXIS_LETTER = {name: letter for name, (letter, _) in LAYER_AXES.items()}
ROUTER_SCORES = ("softmax", "sigmoid")
ACTIVATIONS = ("relu2", "silu", "gelu")


def _default_choices() -> dict[str, tuple[float, ...]]:
    return {axis: (1.0, 0.75, 0.5) for axis in AXES}


def _err(name: str, msg: str) -> ValueError:
    return ValueError(f"ElasticHybridConfig: {name} {msg}")


@dataclass
class ElasticHybridConfig:
    """Architecture of :class:`~elastic_kernels.models.ElasticHybridLM` (a Nemotron-H-like hybrid).

    ``pattern`` has one letter per layer: ``M`` Mamba2 mixer, ``E`` MoE, ``*`` GQA attention,
    ``-`` dense FFN; every layer is ``x + mixer(RMSNorm(x))``. ``nested_choices`` maps each axis of
    :data:`AXES` to the fractions of its full size that the nested submodels may keep.
    ``layer_sizes`` (normally None; set by :meth:`ElasticHybridLM.slice` for per-layer budgets)
    overrides a per-layer axis with one size per layer of that kind, in pattern order.

    Hugging Face compatibility fields (docs/interop.md): ``mamba_dt_limit`` clamps the processed
    dt of every prefill scan (NemotronH ``(time_step_min, inf)``, Mamba2 ``time_step_limit``;
    one-token decode steps do not clamp, as in mamba_ssm and transformers). ``moe_gated`` adds
    a gate projection ``w3`` to every routed expert (``act(x w1^T) * (x w3^T)``).
    ``moe_n_group``/``moe_topk_group``: group-limited routing, expert ``e`` belongs to group
    ``e % moe_n_group`` (interleaved, like the Mamba heads, so a prefix of experts keeps every
    group); a token chooses among the experts of its ``moe_topk_group`` groups with the highest
    sum of their two best selection scores. ``moe_norm_topk`` renormalizes the chosen weights;
    ``moe_routed_scaling`` multiplies them. ``moe_router_fp32`` keeps the router weight and its
    logits in float32 whatever the model dtype. ``residual_fp32`` keeps the residual stream in
    float32 (Mamba2's ``residual_in_fp32``).
    """

    vocab_size: int = 48
    hidden_size: int = 64
    pattern: str = "M-M*ME"
    mamba_heads: int = 8
    mamba_head_dim: int = 16
    mamba_groups: int = 2
    mamba_state: int = 16
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 32
    mamba_dt_limit: tuple[float, float] = (0.0, math.inf)
    moe_experts: int = 8
    moe_top_k: int = 2
    moe_ffn: int = 64
    moe_shared_ffn: int = 0
    moe_score: str = "softmax"
    moe_activation: str = "relu2"
    moe_gated: bool = False
    moe_n_group: int = 1
    moe_topk_group: int = 1
    moe_norm_topk: bool = True
    moe_routed_scaling: float = 1.0
    moe_router_fp32: bool = False
    attn_heads: int = 4
    attn_kv_heads: int = 2
    attn_head_dim: int | None = None
    ffn_size: int = 128
    ffn_activation: str = "relu2"
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    residual_fp32: bool = False
    init_std: float = 0.02
    nested_choices: dict[str, tuple[float, ...]] = field(default_factory=_default_choices)
    layer_sizes: dict[str, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        self.nested_choices = {k: tuple(float(f) for f in v) for k, v in dict(self.nested_choices).items()}
        if isinstance(self.mamba_dt_limit, list):
            self.mamba_dt_limit = tuple(self.mamba_dt_limit)
        if self.layer_sizes is not None:
            self.layer_sizes = {k: tuple(int(s) for s in v) for k, v in dict(self.layer_sizes).items()}
        self.validate()

    # -- derived sizes ------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def head_dim(self) -> int:
        """Attention head dim (``attn_head_dim`` or ``hidden_size // attn_heads``)."""
        return self.attn_head_dim if self.attn_head_dim is not None else self.hidden_size // self.attn_heads

    def layers_of(self, letter: str) -> list[int]:
        """Indices of the layers of one kind (``letter`` in ``"ME*-"``), in pattern order."""
        return [i for i, c in enumerate(self.pattern) if c == letter]

    def full_size(self, axis: str, occurrence: int = 0) -> int:
        """Full size of ``axis`` in its ``occurrence``-th layer of that kind (hidden: the width)."""
        if axis == "hidden":
            return self.hidden_size
        if self.layer_sizes is not None and axis in self.layer_sizes:
            return self.layer_sizes[axis][occurrence]
        return getattr(self, LAYER_AXES[axis][1].size_field)

    def num_units(self, axis: str) -> int:
        """How many layers carry ``axis`` (1 for hidden)."""
        return 1 if axis == "hidden" else len(self.layers_of(AXIS_LETTER[axis]))

    def choice_sizes(self, axis: str, occurrence: int = 0) -> tuple[int, ...]:
        """Sizes of the nested choices of ``axis`` (descending), from ``nested_choices``."""
        full = self.full_size(axis, occurrence)
        return tuple(sorted({int(round(f * full)) for f in self.nested_choices.get(axis, (1.0,))},
                            reverse=True))

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad field."""
        ints = ["vocab_size", "hidden_size", "mamba_heads", "mamba_head_dim", "mamba_groups", "mamba_state",
                "mamba_conv_kernel", "mamba_chunk_size", "moe_experts", "moe_top_k", "moe_ffn",
                "attn_heads", "attn_kv_heads", "ffn_size", "moe_n_group", "moe_topk_group"]
        for name in ints + ["moe_shared_ffn"]:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"ElasticHybridConfig: {name} must be an int, got {type(v).__name__}")
            if v < (0 if name == "moe_shared_ffn" else 1):
                raise _err(name, f"must be >= {0 if name == 'moe_shared_ffn' else 1}, got {v}")
        if not isinstance(self.pattern, str) or not self.pattern:
            raise _err("pattern", f"must be a non-empty string of {tuple(LAYER_KINDS)}, got {self.pattern!r}")
        bad = sorted({c for c in self.pattern if c not in LAYER_KINDS})
        if bad:
            allowed = ", ".join(f"{letter!r} {cls.kind_name}" for letter, cls in LAYER_KINDS.items())
            raise _err("pattern", f"has unknown layer letter(s) {bad} in {self.pattern!r}; allowed: {allowed}")
        if self.mamba_heads % self.mamba_groups:
            raise _err("mamba_heads", f"({self.mamba_heads}) must be a multiple of mamba_groups "
                                      f"({self.mamba_groups})")
        if self.moe_top_k > self.moe_experts:
            raise _err("moe_top_k", f"({self.moe_top_k}) must be <= moe_experts ({self.moe_experts})")
        for name in ("moe_gated", "moe_norm_topk", "moe_router_fp32", "residual_fp32", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ElasticHybridConfig: {name} must be a bool, got {type(getattr(self, name)).__name__}")
        lim = self.mamba_dt_limit
        if (not isinstance(lim, tuple) or len(lim) != 2 or not all(isinstance(v, (int, float)) for v in lim)
                or not 0.0 <= lim[0] <= lim[1]):
            raise _err("mamba_dt_limit", f"must be a pair (lo, hi) with 0 <= lo <= hi, got {lim!r}")
        if not (isinstance(self.moe_routed_scaling, (int, float)) and not isinstance(self.moe_routed_scaling, bool)
                and self.moe_routed_scaling > 0):
            raise _err("moe_routed_scaling", f"must be a positive float, got {self.moe_routed_scaling!r}")
        if self.moe_topk_group > self.moe_n_group:
            raise _err("moe_topk_group", f"({self.moe_topk_group}) must be <= moe_n_group ({self.moe_n_group})")
        if self.moe_score not in ROUTER_SCORES:
            raise _err("moe_score", f"must be one of {ROUTER_SCORES}, got {self.moe_score!r}")
        for name in ("moe_activation", "ffn_activation"):
            if getattr(self, name) not in ACTIVATIONS:
                raise _err(name, f"must be one of {ACTIVATIONS}, got {getattr(self, name)!r}")
        if self.attn_heads % self.attn_kv_heads:
            raise _err("attn_heads", f"({self.attn_heads}) must be a multiple of attn_kv_heads "
                                     f"({self.attn_kv_heads})")
        if self.attn_head_dim is None:
            if self.hidden_size % self.attn_heads:
                raise _err("hidden_size", f"({self.hidden_size}) must be divisible by attn_heads "
                                          f"({self.attn_heads}) when attn_head_dim is None")
        elif isinstance(self.attn_head_dim, bool) or not isinstance(self.attn_head_dim, int) \
                or self.attn_head_dim < 1:
            raise _err("attn_head_dim", f"must be None or a positive int, got {self.attn_head_dim!r}")
        for name in ("norm_eps", "init_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise _err(name, f"must be a finite positive float, got {v!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(f"ElasticHybridConfig: tie_embeddings must be a bool, got {type(self.tie_embeddings).__name__}")
        _check_axis_size(self, "experts", self.moe_experts, "moe_experts", limit=None)
        if self.layer_sizes is not None:
            for axis, sizes in self.layer_sizes.items():
                if axis not in AXES or axis == "hidden":
                    raise _err("layer_sizes", f"has unknown per-layer axis {axis!r}; allowed: {AXES[1:]}")
                if len(sizes) != self.num_units(axis):
                    raise _err("layer_sizes", f"[{axis!r}] needs {self.num_units(axis)} entries "
                                              f"(one per {AXIS_LETTER[axis]!r} layer), got {len(sizes)}")
                for s in sizes:
                    _check_axis_size(self, axis, s, f"layer_sizes[{axis!r}]", limit=None)
        for axis, fracs in self.nested_choices.items():
            if axis not in AXES:
                raise _err("nested_choices", f"has unknown axis {axis!r}; allowed: {AXES}")
            if not fracs:
                raise _err(f"nested_choices[{axis!r}]", "must not be empty")
            for f in fracs:
                if not 0.0 < f <= 1.0:
                    raise _err(f"nested_choices[{axis!r}]", f"fractions must lie in (0, 1], got {f}")
                for occ in range(self.num_units(axis)):
                    full = self.full_size(axis, occ)
                    size = f * full
                    if not math.isclose(size, round(size), abs_tol=1e-6):
                        raise _err(f"nested_choices[{axis!r}]", f"fraction {f} of {full} is not a whole "
                                                                f"number of units ({size:g})")
                    _check_axis_size(self, axis, int(round(size)), f"nested_choices[{axis!r}] ({f})",
                                     limit=None)

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["nested_choices"] = {k: list(v) for k, v in self.nested_choices.items()}
        if self.layer_sizes is not None:
            d["layer_sizes"] = {k: list(v) for k, v in self.layer_sizes.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ElasticHybridConfig":
        if not isinstance(d, Mapping):
            raise TypeError(f"ElasticHybridConfig.from_dict: expected a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ElasticHybridConfig.from_dict: unknown field(s) {unknown}")
        return cls(**dict(d))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ElasticHybridConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"ElasticHybridConfig.from_json: not valid JSON ({e})") from None
        return cls.from_dict(d)


def _check_axis_size(config: ElasticHybridConfig, axis: str, size, name: str, limit: int | None) -> int:
    """A hard size of ``axis``: an int in [min, limit], a multiple of the group count for heads."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"{name} must be an int, got {type(size).__name__}")
    spec = LAYER_AXES[axis][1] if axis != "hidden" else None
    lo, mult = spec.bounds(config) if spec is not None else (1, 1)
    if size < lo or (limit is not None and size > limit):
        hi = f", {limit}]" if limit is not None else ", ...)"
        raise ValueError(f"{name}: {axis} size must lie in [{lo}{hi}, got {size}")
    if size % mult:
        raise ValueError(f"{name}: {axis} size ({size}) must be a multiple of {spec.multiple_field} ({mult})")
    ng = config.moe_n_group
    if axis == "experts" and ng > 1:
        if size % ng or size // ng < 2 or config.moe_topk_group * (size // ng) < config.moe_top_k:
            raise ValueError(f"{name}: experts size ({size}) must be a multiple of moe_n_group ({ng}) with at "
                             f"least 2 experts per group and moe_topk_group ({config.moe_topk_group}) groups "
                             f"holding at least moe_top_k ({config.moe_top_k}) experts")
    return size


@dataclass(frozen=True)
class Budget:
    """A nested submodel: the active size of every elastic axis (``None`` = full).

    ``hidden`` is one int. The per-layer axes take an int (every layer of that kind) or a tuple
    with one int per layer of that kind in pattern order (``mamba_heads``: one per ``M`` layer;
    ``experts`` and ``expert_ffn``: one per ``E`` layer; ``ffn``: one per ``-`` layer).
    ``mamba_heads`` counts total heads (a multiple of ``mamba_groups``: the first
    ``mamba_heads / mamba_groups`` heads of every group stay); ``experts`` >= ``moe_top_k``.
    """

    hidden: int | None = None
    mamba_heads: int | tuple[int, ...] | None = None
    experts: int | tuple[int, ...] | None = None
    expert_ffn: int | tuple[int, ...] | None = None
    ffn: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for axis in AXES[1:]:
            v = getattr(self, axis)
            if isinstance(v, list):
                object.__setattr__(self, axis, tuple(v))

    @classmethod
    def full(cls) -> "Budget":
        return cls()

    @classmethod
    def from_fractions(cls, config: ElasticHybridConfig, fraction: float | None = None,
                       **per_axis: float) -> "Budget":
        """A budget keeping ``fraction`` (or ``per_axis[axis]``) of every axis, rounded to valid sizes.

        Sizes round down to a valid size of their axis (heads: a multiple of the group count, at
        least one per group; experts: at least ``moe_top_k``); every size is at least 1.
        """
        unknown = sorted(set(per_axis) - set(AXES))
        if unknown:
            raise ValueError(f"Budget.from_fractions: unknown axis {unknown}; allowed: {AXES}")
        vals: dict[str, Any] = {}
        for axis in AXES:
            f = per_axis.get(axis, fraction)
            if f is None:
                continue
            if not 0.0 < float(f) <= 1.0:
                raise ValueError(f"Budget.from_fractions: {axis} fraction must lie in (0, 1], got {f}")
            sizes = []
            for occ in range(config.num_units(axis)):
                full = config.full_size(axis, occ)
                s = max(1, int(math.floor(f * full + 1e-9)))
                if axis != "hidden":
                    lo, mult = LAYER_AXES[axis][1].bounds(config)
                    s = max(lo, s // mult * mult)
                if axis == "experts" and config.moe_n_group > 1:
                    per = max(2, s // config.moe_n_group, -(-config.moe_top_k // config.moe_topk_group))
                    s = per * config.moe_n_group
                sizes.append(s)
            if axis == "hidden":
                vals[axis] = sizes[0]
            elif sizes:
                vals[axis] = sizes[0] if len(set(sizes)) == 1 else tuple(sizes)
        return cls(**vals)

    def to_dict(self) -> dict[str, Any]:
        return {a: (list(v) if isinstance(v, tuple) else v) for a in AXES if (v := getattr(self, a)) is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Budget":
        if not isinstance(d, Mapping):
            raise TypeError(f"Budget.from_dict: expected a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(AXES))
        if unknown:
            raise ValueError(f"Budget.from_dict: unknown axis {unknown}; allowed: {AXES}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})

    def resolve(self, config: ElasticHybridConfig) -> dict[str, tuple[int, ...]]:
        """Validated per-layer sizes: ``{axis: (size per layer of that kind, ...)}``; hidden: ``(k,)``."""
        out: dict[str, tuple[int, ...]] = {}
        for axis in AXES:
            n = config.num_units(axis)
            v = getattr(self, axis)
            if axis == "hidden" and isinstance(v, tuple):
                raise TypeError("Budget.hidden must be an int or None (one width for the residual stream)")
            if isinstance(v, tuple):
                if len(v) != n:
                    raise ValueError(f"Budget.{axis} has {len(v)} per-layer entries, the pattern "
                                     f"{config.pattern!r} has {n} layer(s) of kind {AXIS_LETTER[axis]!r}")
                vals = v
            else:
                vals = (v,) * n
            sizes = []
            for occ, s in enumerate(vals):
                full = config.full_size(axis, occ)
                sizes.append(full if s is None else _check_axis_size(config, axis, s, f"Budget.{axis}", full))
            out[axis] = tuple(sizes)
        return out
