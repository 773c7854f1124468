"""``ElasticHybridLM``: the Nemotron-H-like hybrid assembled from the public elastic layers.

Budgets (:class:`~elastic_kernels.models.Budget`) cut hard widths: weights are used as prefix
views and the ops get int widths, or per-sample LongTensors for a sequence of budgets (each sample
then equals running it alone at its budget). Soft masks (router training, docs/design.md §3) are a
dict ``{axis: value}`` over :data:`~elastic_kernels.models.AXES`; ``value`` is a float tensor over
the axis's units in nesting order, ``(units,)`` or ``(batch, units)`` with ``units`` the layer's
full size, or for a per-layer axis a sequence with one entry (tensor or None) per layer of that
kind. Masks multiply in (differentiable) after the hard widths cut; a 0/1 prefix mask gives the
hard-width result. Per axis: ``hidden`` scales the embedding output and every layer's output and
weighs every RMSNorm's mean square (``sum(m x^2) / sum(m)``); ``mamba_heads`` is the scan's
``head_scale`` and the gated norm's head weights; ``experts`` adds ``log(m)`` to the router logits
(m = 0 removes an expert); ``expert_ffn`` is the expert op's ``channel_scale``; ``ffn`` scales the
dense FFN's intermediate activation. Logits are float32 (float64 for a float64 model).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..formats import QuantizedTensor
from .cache import HybridCache
from .config import AXES, AXIS_LETTER, LAYER_AXES, Budget, ElasticHybridConfig
from .layers import LAYER_KINDS, ElasticEmbedding, ElasticLMHead, ElasticRMSNorm
from .protocol import unit_weights


class HybridBlock(nn.Module):
    """One layer: ``x + mixer(RMSNorm(x))``; ``kind`` is the pattern letter."""

    def __init__(self, kind: str, norm: ElasticRMSNorm, mixer: nn.Module, occurrence: int) -> None:
        super().__init__()
        self.kind, self.occurrence = kind, occurrence
        self.norm, self.mixer = norm, mixer


@dataclass
class _Plan:
    hidden: int                      # channels computed (the host maximum for per-sample budgets)
    hidden_t: Tensor | None          # per-sample hidden widths (batch,) or None
    layer_kwargs: list[dict[str, Any]]


def _is_budget_list(budget) -> bool:
    return isinstance(budget, (list, tuple)) and all(isinstance(b, Budget) for b in budget)


class ElasticHybridLM(nn.Module):
    """The elastic hybrid reference LM (docs/design.md §1-§3): ``forward(input_ids, budget=None,
    soft_masks=None, cache=None)``, budgets, sizes, slicing and decode caches."""

    def __init__(self, config: ElasticHybridConfig) -> None:
        super().__init__()
        if not isinstance(config, ElasticHybridConfig):
            raise TypeError(f"ElasticHybridLM: config must be an ElasticHybridConfig, got {type(config).__name__}")
        c = self.config = config
        d, std = c.hidden_size, c.init_std
        self.embed = ElasticEmbedding(c.vocab_size, d, std)
        blocks, seen = [], {letter: 0 for letter in LAYER_KINDS}
        for letter in c.pattern:
            occ = seen[letter]
            seen[letter] += 1
            blocks.append(HybridBlock(letter, ElasticRMSNorm(d, c.norm_eps), LAYER_KINDS[letter].from_config(c, occ), occ))
        self.layers = nn.ModuleList(blocks)
        self.norm_f = ElasticRMSNorm(d, c.norm_eps)
        self.lm_head = None if c.tie_embeddings else ElasticLMHead(c.vocab_size, d, std)

    # -- budgets ------------------------------------------------------------------------------
    def resolve_budget(self, budget: Budget | None) -> dict[str, tuple[int, ...]]:
        """Validated per-layer sizes ``{axis: (size per layer of that kind, ...)}`` of one budget."""
        if budget is None:
            budget = Budget()
        if not isinstance(budget, Budget):
            raise TypeError(f"budget must be None, a Budget or a sequence of Budgets (one per sample), "
                            f"got {type(budget).__name__}")
        return budget.resolve(self.config)

    def _plan(self, budget, batch: int, device) -> _Plan:
        if _is_budget_list(budget):
            if len(budget) != batch:
                raise ValueError(f"budget: per-sample budgets need one Budget per sample "
                                 f"(batch={batch}), got {len(budget)}")
            per = [self.resolve_budget(b) for b in budget] or [self.resolve_budget(None)]
        else:
            per = [self.resolve_budget(budget)]

        def width(axis: str, occ: int):
            vals = [p[axis][occ] for p in per]
            if len(set(vals)) == 1:
                return vals[0], None
            return max(vals), torch.tensor(vals, dtype=torch.int64, device=device)

        hidden, hidden_t = width("hidden", 0)
        kwargs = []
        for block in self.layers:
            kw: dict[str, Any] = {}
            for a in block.mixer.axes:
                hi, t = width(a.name, block.occurrence)
                kw[a.width_kw] = hi if t is None else t
                if t is not None and a.max_kw is not None:
                    kw[a.max_kw] = hi
            kwargs.append(kw)
        return _Plan(hidden, hidden_t, kwargs)

    def _mask_for(self, soft_masks: Mapping[str, Any], axis: str, occ: int, batch: int):
        value = soft_masks.get(axis)
        if value is None:
            return None
        if isinstance(value, Tensor):
            m = value
        else:
            n = self.config.num_units(axis)
            if not isinstance(value, (list, tuple)) or len(value) != n:
                raise ValueError(f"soft_masks[{axis!r}] must be a tensor or a sequence with one entry per "
                                 f"{AXIS_LETTER.get(axis, '')!r} layer ({n}), got {type(value).__name__}"
                                 + (f" of length {len(value)}" if isinstance(value, (list, tuple)) else ""))
            m = value[occ]
            if m is None:
                return None
        units = self.config.full_size(axis, occ)
        if not isinstance(m, Tensor) or not m.is_floating_point():
            raise TypeError(f"soft_masks[{axis!r}] must hold float tensors, got {type(m).__name__}"
                            + (f" of dtype {m.dtype}" if isinstance(m, Tensor) else ""))
        if tuple(m.shape) not in ((units,), (batch, units)):
            raise ValueError(f"soft_masks[{axis!r}] (layer {occ} of its kind) must have shape ({units},) or "
                             f"(batch={batch}, {units}), got {tuple(m.shape)}")
        return m

    # -- forward ------------------------------------------------------------------------------
    def new_cache(self, batch: int, device=None, dtype: torch.dtype | None = None) -> HybridCache:
        """Empty decode caches for ``batch`` sequences (full-size; narrower budgets use prefixes)."""
        p = self.embed.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        layers = [block.mixer.new_cache(batch, device, dtype) for block in self.layers]
        units = [None if b.mixer.cache_axis is None else (b.mixer.cache_axis, b.occurrence) for b in self.layers]
        return HybridCache(layers=layers, batch=batch, units=units)

    def forward(self, input_ids: Tensor, budget=None, soft_masks: Mapping[str, Any] | None = None,
                cache: HybridCache | None = None, seq_lens: Sequence[int] | None = None) -> Tensor:
        """``input_ids: (batch, seqlen)`` -> logits ``(batch, seqlen, vocab_size)`` float32 (float64
        for a float64 model).

        ``seq_lens`` (packed prefill of sequences of different lengths, no padding): ``input_ids``
        is ``(1, sum(seq_lens))`` holding ``len(seq_lens)`` sequences back to back; a budget list
        has one Budget per sequence; ``cache`` (optional) is a fresh ``new_cache(len(seq_lens))``
        whose row ``i`` then holds sequence ``i`` (per-row lengths). Every sequence's logits equal
        those of it run alone. Soft masks are not taken."""
        if seq_lens is not None:
            return self._forward_packed(input_ids, budget, soft_masks, cache, seq_lens)
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an int64/int32 tensor, got "
                            f"{input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seqlen), got {tuple(input_ids.shape)}")
        if input_ids.numel() and not torch.compiler.is_compiling():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids values must lie in [0, {self.config.vocab_size}), got [{lo}, {hi}]")
        b, l = input_ids.shape
        if soft_masks is not None:
            if not isinstance(soft_masks, Mapping):
                raise TypeError(f"soft_masks must be a dict {{axis: tensor}}, got {type(soft_masks).__name__}")
            unknown = sorted(set(soft_masks) - set(AXES))
            if unknown:
                raise ValueError(f"soft_masks has unknown axis {unknown}; allowed: {AXES}")
        soft_masks = soft_masks or {}
        if cache is not None:
            if not isinstance(cache, HybridCache) or len(cache.layers) != len(self.layers):
                raise TypeError("cache must be a HybridCache from this model's new_cache()")
            if cache.batch != b:
                raise ValueError(f"cache was made for batch {cache.batch}, input_ids has batch {b}")
        plan = self._plan(budget, b, input_ids.device)
        k = plan.hidden
        hmask = self._mask_for(soft_masks, "hidden", 0, b)
        h = self.embed(input_ids, k)
        hw = unit_weights(plan.hidden_t, hmask, k, h, "soft_masks['hidden']")
        if hw is not None:
            hw = (hw[:, None, :] if hw.dim() == 2 else hw).to(h.dtype)
            h = h * hw
        wdtype = h.dtype
        for i, block in enumerate(self.layers):
            y = block.norm(h.to(wdtype), plan.hidden_t, hmask)
            kw = dict(plan.layer_kwargs[i])
            for a in block.mixer.axes:
                m = self._mask_for(soft_masks, a.name, block.occurrence, b)
                if m is not None:
                    kw[a.mask_kw] = m
            if cache is not None and cache.layers[i] is not None:
                kw["cache"] = cache.layers[i]
            y = block.mixer(y, **kw)
            if self.config.residual_fp32:  # Mamba2's residual_in_fp32: the stream stays float32
                h = h.to(torch.promote_types(h.dtype, torch.float32))
            h = h + (y * hw if hw is not None else y)
        if cache is not None:
            cache.seqlen += l
        y = self.norm_f(h, plan.hidden_t, hmask).to(wdtype)
        logits = self.lm_head(y) if self.lm_head is not None else \
            torch.nn.functional.linear(y, self.embed.weight[:, :k])
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _forward_packed(self, input_ids: Tensor, budget, soft_masks, cache: HybridCache | None,
                        seq_lens: Sequence[int]) -> Tensor:
        """Packed prefill: token-wise layers see the ``T`` tokens as a batch of ``T`` one-token
        rows at their sequence's widths; token-mixing layers see one packed row (``seq_lens``)."""
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32) \
                or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids of a packed prefill must be an int tensor of shape (1, total tokens), got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        if soft_masks:
            raise ValueError("soft_masks are not taken with seq_lens (a packed prefill)")
        lens = list(seq_lens) if isinstance(seq_lens, (list, tuple)) else None
        if not lens or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in lens):
            raise ValueError(f"seq_lens must be a non-empty list of positive ints, got {seq_lens!r}")
        T, n = input_ids.shape[1], len(lens)
        if sum(lens) != T:
            raise ValueError(f"seq_lens must sum to input_ids.shape[1] ({T}), got sum {sum(lens)}")
        if T and not torch.compiler.is_compiling():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids values must lie in [0, {self.config.vocab_size}), got [{lo}, {hi}]")
        if cache is not None:
            if not isinstance(cache, HybridCache) or len(cache.layers) != len(self.layers):
                raise TypeError("cache must be a HybridCache from this model's new_cache()")
            if cache.batch != n or cache.seqlen:
                raise ValueError(f"a packed prefill needs a fresh cache of batch len(seq_lens)={n}, got batch "
                                 f"{cache.batch} holding {cache.seqlen} tokens")
        plan = self._plan(budget, n, input_ids.device)
        rep = torch.tensor(lens, device=input_ids.device)

        def per_token(v):
            return v.repeat_interleave(rep) if isinstance(v, Tensor) else v

        hidden_t = per_token(plan.hidden_t)
        k = plan.hidden
        h = self.embed(input_ids.reshape(T, 1), k)                       # (T, 1, k): one token per row
        hw = unit_weights(hidden_t, None, k, h, "budget hidden")
        if hw is not None:
            hw = hw[:, None, :].to(h.dtype)
            h = h * hw
        wdtype = h.dtype
        for i, block in enumerate(self.layers):
            y = block.norm(h.to(wdtype), hidden_t)
            kw = {name: per_token(v) for name, v in plan.layer_kwargs[i].items()}
            if block.mixer.mixes_tokens:
                if cache is not None and cache.layers[i] is not None:
                    kw["cache"] = cache.layers[i]
                y = block.mixer(y.reshape(1, T, k), seq_lens=lens, **kw).reshape(T, 1, k)
            else:
                y = block.mixer(y, **kw)
            if self.config.residual_fp32:
                h = h.to(torch.promote_types(h.dtype, torch.float32))
            h = h + (y * hw if hw is not None else y)
        if cache is not None:
            cache.seqlen = max(lens)
        y = self.norm_f(h, hidden_t).to(wdtype)
        logits = self.lm_head(y) if self.lm_head is not None else \
            torch.nn.functional.linear(y, self.embed.weight[:, :k])
        return logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(1, T, -1)

    # -- sizes, slicing -----------------------------------------------------------------------
    def sliced_shapes(self, sizes: Mapping[str, Sequence], active: bool = False) -> dict[str, tuple]:
        """Prefix shape of every parameter (and buffer) at per-layer ``sizes`` (as from
        :meth:`resolve_budget`; entries may be tensors). ``active``: MoE expert weights counted for
        ``moe_top_k`` experts."""
        k = sizes["hidden"][0]
        out = {f"embed.{n}": s for n, s in self.embed.sliced_shapes(k).items()}
        for i, block in enumerate(self.layers):
            out[f"layers.{i}.norm.weight"] = (k,)
            own = {a.name: sizes[a.name][block.occurrence] for a in block.mixer.axes}
            shapes = block.mixer.sliced_shapes(k, own, active)
            out.update({f"layers.{i}.mixer.{n}": s for n, s in shapes.items()})
        out["norm_f.weight"] = (k,)
        if self.lm_head is not None:
            out["lm_head.weight"] = self.lm_head.sliced_shapes(k)["weight"]
        return out

    def quantizable_weights(self) -> dict[str, str]:
        """The linear weights a quantized checkpoint stores in NVFP4/FP8: ``{state-dict name:
        layout}`` (layouts: see :meth:`~elastic_kernels.models.protocol.ElasticLayer.quantizable_weights`)."""
        out = {}
        for i, block in enumerate(self.layers):
            out.update({f"layers.{i}.mixer.{n}": v for n, v in block.mixer.quantizable_weights().items()})
        if self.lm_head is not None:
            out.update({f"lm_head.{n}": v for n, v in self.lm_head.quantizable_weights().items()})
        return out

    def nvfp4_weights(self) -> dict[str, QuantizedTensor]:
        """The weights held packed, as quantized containers (NVFP4 for W4A16 serving; see
        ``load_nested(..., weights="nvfp4")``)."""
        out = {}
        for mname, mod in self.named_modules():
            for attr, v in vars(mod).items():
                if isinstance(v, QuantizedTensor):
                    out[f"{mname}.{attr}" if mname else attr] = v
        return out

    def require_float_weights(self, what: str) -> None:
        """Raise a TypeError naming ``what`` if this model holds NVFP4 weights."""
        if self.nvfp4_weights():
            raise TypeError(f"{what} needs a model with float weights; this one holds NVFP4 weights "
                            f"(load the checkpoint with weights='dequantize' instead)")

    def _count(self, sizes, active: bool):
        """Parameters at ``sizes``: an int, or a float32 tensor when a size is a tensor. The
        shapes are grouped by the tensors among their sizes (``coefficient * prod(tensors)`` per
        group), so a differentiable count costs a few ops per layer, not a few per parameter."""
        buffers = {n for n, _ in self.named_buffers()}
        const, groups = 0, {}  # ids of the tensor sizes -> [those tensors, summed integer coefficient]
        for name, shape in self.sliced_shapes(sizes, active).items():
            if name in buffers:
                continue
            tensors = [s for s in shape if isinstance(s, Tensor)]
            coef = math.prod(s for s in shape if not isinstance(s, Tensor))
            if not tensors:
                const += coef
                continue
            group = groups.setdefault(tuple(sorted(map(id, tensors))), [tensors, 0])
            group[1] += coef
        if not groups:
            return const
        terms = []
        for tensors, coef in groups.values():
            term = torch.as_tensor(tensors[0], dtype=torch.float32)
            for t in tensors[1:]:
                term = term * torch.as_tensor(t, dtype=torch.float32)
            terms.append(term * coef)
        return torch.stack(terms).sum(0) + const

    def param_count(self, budget: Budget | None = None, active: bool = False) -> int:
        """Parameters of the submodel at ``budget`` (== numel of ``slice(budget)``); ``active``
        counts only ``moe_top_k`` routed experts per MoE layer (the parameters one token uses)."""
        return int(self._count(self.resolve_budget(budget), active))

    def expected_param_count(self, sizes: Mapping[str, Any], active: bool = False) -> Tensor:
        """``param_count`` as a differentiable function of sizes ``{axis: number | Tensor |
        per-layer sequence}`` (missing axes: full); equal to ``param_count`` at integer sizes."""
        unknown = sorted(set(sizes) - set(AXES))
        if unknown:
            raise ValueError(f"expected_param_count: unknown axis {unknown}; allowed: {AXES}")
        full = self.resolve_budget(None)
        res: dict[str, tuple] = {}
        for axis in AXES:
            v = sizes.get(axis)
            n = len(full[axis])
            if v is None:
                res[axis] = full[axis]
            elif isinstance(v, (list, tuple)):
                if len(v) != n:
                    raise ValueError(f"expected_param_count: sizes[{axis!r}] needs {n} entries, got {len(v)}")
                res[axis] = tuple(v)
            else:
                res[axis] = (v,) * n
        total = self._count(res, active)
        return total if isinstance(total, Tensor) else torch.tensor(float(total))

    def sliced_config(self, budget: Budget | None) -> ElasticHybridConfig:
        """Config of the standalone submodel at ``budget``."""
        sizes = self.resolve_budget(budget)
        c = self.config
        fields: dict[str, Any] = {"hidden_size": sizes["hidden"][0], "attn_head_dim": c.head_dim,
                                  "nested_choices": {a: (1.0,) for a in AXES}}
        layer_sizes = {}
        for axis, (_, spec) in LAYER_AXES.items():
            fname = spec.size_field
            vals = sizes[axis]
            if len(set(vals)) <= 1:
                if vals:
                    fields[fname] = vals[0]
            else:
                layer_sizes[axis] = tuple(vals)
                fields[fname] = max(vals)
        fields["layer_sizes"] = layer_sizes or None
        return dataclasses.replace(c, **fields)

    @torch.no_grad()
    def slice(self, budget: Budget | None) -> "ElasticHybridLM":
        """A standalone submodel with really smaller tensors (copies of the prefixes)."""
        self.require_float_weights("slice")
        shapes = self.sliced_shapes(self.resolve_budget(budget))
        p = self.embed.weight
        new = ElasticHybridLM(self.sliced_config(budget)).to(device=p.device, dtype=p.dtype)
        state = self.state_dict()
        new.load_state_dict({n: state[n][tuple(slice(0, s) for s in shape)].clone()
                             for n, shape in shapes.items()}, strict=True)
        return new
