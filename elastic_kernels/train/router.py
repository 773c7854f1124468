"""Star Elastic budget routers, Gumbel-softmax schedules and the budget-sampling curriculum.

One :class:`AxisRouter` per elastic axis maps a target budget to logits over that axis's nested
choices — one set of logits per *slot* (a slot is a layer for per-layer axes such as Mamba heads or
FFN width; the hidden size is one global slot). A *shared* axis (``AxisSpec.shared``) has one set of
logits and one Gumbel draw for all its slots, so every layer takes the same choice: Megatron-LM's
elastification router does this for every axis unless its ``flex_hetero_*`` flag asks for per-layer
choices, and a Hugging Face NemotronH config can only hold one Mamba head count (docs/interop.md).
The router input is the budget's one-hot over the
trained budgets, blended linearly between the two neighbouring budgets for an in-between target.

During training the logits go through a Gumbel-softmax with the schedules of Megatron-LM's
elastification router (Flextron): temperature ``tau = tau_init * tau_decay ** step`` (defaults
1.0 and 0.9999 per optimizer step, floored at ``tau_min``), logit scale ramped linearly ``1 -> 10``
over the stage, and with probability ``hard_sample_prob`` per step a *hard* sample (the one-hot of
the Gumbel argmax in the forward pass, the soft probabilities' gradient in the backward pass).
The resulting probabilities ``p`` over choices (widths ``c_1..c_K`` of a ``full``-unit axis) make
the differentiable *soft mask* ``mask[u] = sum_k p_k * [u < c_k]``. At the end each budget takes
the argmax choice (``router_decode="argmax"``) or, by default, the argmax when its size is within
``router_decode_tolerance`` of the target and else the most probable choice within it
(:meth:`BudgetRouters.choose_within`, docs/design.md §1): late in the stage the logit scale
saturates the softmax, and a router whose argmax sits off its target no longer receives a
gradient that moves it.

**The full budget is the parent.** Budget 1.0 is never routed: its samples run the full model
(:func:`pin_full`), it is drawn with probability ``full_prob`` (the reference's
``original_model_sample_prob``, 0.33), and :func:`full_choice_loss` pulls the routers' logits for
the 1.0 input toward the full-size choice, so the blended input of a target just below 1.0 starts
from the parent's shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["AxisSpec", "AxisRouter", "BudgetRouters", "budget_weights", "gumbel_softmax",
           "prefix_mask", "decay_temperature", "ramp_scale", "curriculum_probs", "pin_full", "full_choice_loss",
           "sample_budget_indices", "router_size_loss"]


@dataclass(frozen=True)
class AxisSpec:
    """One elastic axis as seen by the router.

    name: axis name (e.g. ``"hidden"``, ``"mamba_heads"``)
    slots: number of independent choices (1 for a global axis, the number of layers carrying the
        axis for a per-layer axis)
    choices: the nested sizes in units, ascending, the last one the full size
    shared: one choice for all slots (one set of logits, one Gumbel draw) instead of one per slot
    """

    name: str
    slots: int
    choices: tuple[int, ...]
    shared: bool = False

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"AxisSpec {self.name}: slots must be >= 1, got {self.slots}")
        if not self.choices or list(self.choices) != sorted(set(self.choices)) or self.choices[0] < 1:
            raise ValueError(f"AxisSpec {self.name}: choices must be distinct positive ints in ascending "
                             f"order, got {self.choices}")

    @property
    def full(self) -> int:
        return self.choices[-1]


def budget_weights(targets: torch.Tensor, budgets: Sequence[float]) -> torch.Tensor:
    """Router inputs for target budgets.

    targets: (batch,) fractions of the full model
    budgets: the trained budget fractions (any order, distinct)
    returns: (batch, len(budgets)) — the one-hot of an exact budget; for a target between two
        neighbouring budgets, the linear blend of their one-hots; clamped outside the range.
    """
    b = torch.tensor(list(budgets), dtype=torch.float64)
    if b.numel() == 0 or torch.unique(b).numel() != b.numel():
        raise ValueError(f"budget_weights: budgets must be distinct and non-empty, got {list(budgets)}")
    order = torch.argsort(b)
    sb = b[order]
    t = targets.detach().to(torch.float64).clamp(float(sb[0]), float(sb[-1]))
    out = torch.zeros(t.shape[0], b.numel(), dtype=torch.float64)
    if b.numel() == 1:
        out[:, 0] = 1.0
        return out.float()
    hi = torch.searchsorted(sb, t, right=False).clamp(1, b.numel() - 1)
    lo = hi - 1
    w_hi = (t - sb[lo]) / (sb[hi] - sb[lo])
    rows = torch.arange(t.shape[0])
    out[rows, order[lo]] += 1.0 - w_hi
    out[rows, order[hi]] += w_hi
    return out.float()


class AxisRouter(nn.Module):
    """MLP from the budget encoding to logits ``(batch, slots, choices)`` for one axis (a shared
    axis' MLP has ``choices`` outputs, the same logits for every slot)."""

    def __init__(self, spec: AxisSpec, num_budgets: int, hidden: int = 64) -> None:
        super().__init__()
        self.spec = spec
        self.net = nn.Sequential(nn.Linear(num_budgets, hidden), nn.GELU(),
                                 nn.Linear(hidden, self.independent_slots * len(spec.choices)))
        # start from a near-uniform distribution over choices
        nn.init.normal_(self.net[2].weight, std=0.01)
        nn.init.zeros_(self.net[2].bias)

    @property
    def independent_slots(self) -> int:
        """How many slots choose independently: 1 for a shared axis, else ``slots``."""
        return 1 if self.spec.shared else self.spec.slots

    def forward(self, budget_enc: torch.Tensor) -> torch.Tensor:
        """budget_enc: (batch, num_budgets) -> logits: (batch, slots, choices)."""
        lg = self.net(budget_enc).view(budget_enc.shape[0], self.independent_slots, len(self.spec.choices))
        return lg.expand(-1, self.spec.slots, -1)


class BudgetRouters(nn.Module):
    """All axis routers of one model."""

    def __init__(self, specs: Sequence[AxisSpec], budgets: Sequence[float], hidden: int = 64) -> None:
        super().__init__()
        if not specs:
            raise ValueError("BudgetRouters: specs is empty: no elastic axis has two or more nested choices (the "
                             "model's nested_choices keep only the full size), so there is nothing to route")
        self.specs = {s.name: s for s in specs}
        self.budgets = [float(b) for b in budgets]
        self.routers = nn.ModuleDict({s.name: AxisRouter(s, len(self.budgets), hidden) for s in specs})

    def logits(self, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        enc = budget_weights(targets, self.budgets).to(next(self.parameters()).device)
        return {name: r(enc) for name, r in self.routers.items()}

    def sample(self, targets: torch.Tensor, *, tau: float, scale: float, hard: bool = False,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Gumbel-softmax probabilities per axis: ``{axis: (batch, slots, choices)}``; rows whose
        target is 1.0 are the full-size one-hot (:func:`pin_full`); a shared axis draws once for
        all its slots."""
        out = {}
        for name, lg in self.logits(targets).items():
            lg = lg[:, :self.routers[name].independent_slots]
            y = pin_full(gumbel_softmax(lg, tau=tau, scale=scale, hard=hard, generator=generator), targets)
            out[name] = y.expand(-1, self.specs[name].slots, -1)
        return out

    @torch.no_grad()
    def choose(self, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Argmax choice indices per axis: ``{axis: (batch, slots)}`` (LongTensor); the full-size
        choice for a target of 1.0."""
        full = (targets.detach().to(torch.float64) >= 1.0).to(next(self.parameters()).device)
        out = {}
        for name, lg in self.logits(targets).items():
            idx = lg.argmax(-1)
            out[name] = torch.where(full[:, None], torch.full_like(idx, lg.shape[-1] - 1), idx)
        return out

    @torch.no_grad()
    def choose_within(self, targets: Sequence[float], count: Callable[[dict[str, torch.Tensor]], float],
                      tolerance: float, beam: int = 4096) -> list[dict[str, torch.Tensor]]:
        """The most probable choice of every target whose size lies in the target's band.

        The routers' logits give a log-probability to every joint choice (the sum over axes and
        independent slots of the log-softmax of the chosen entry). A beam search (width ``beam``,
        exact when the joint space is smaller) lists joint choices in decreasing probability;
        ``count(widths)`` (``{axis: (slots,)}`` sizes in units -> the size the budgets measure, as
        a fraction of the full model) is evaluated on the finished beam, and the most probable
        choice with ``|count / target - 1| <= tolerance`` is kept — the argmax itself when it is in
        the band. With none in the band, the beam's choice nearest to the target. A target of 1.0
        takes the full-size choice. Returns one ``{axis: (slots,) choice indices}`` per target.
        """
        tg = torch.tensor([float(t) for t in targets], dtype=torch.float32)
        logp = {name: F.log_softmax(lg[:, :self.routers[name].independent_slots].double(), -1)
                for name, lg in self.logits(tg).items()}
        units = [(name, s) for name in self.specs for s in range(self.routers[name].independent_slots)]
        out = []
        for i, t in enumerate(tg.tolist()):
            if t >= 1.0:
                out.append({name: torch.full((spec.slots,), len(spec.choices) - 1, dtype=torch.long)
                            for name, spec in self.specs.items()})
                continue
            beams: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
            for name, s in units:
                lp = logp[name][i, s].tolist()
                beams = sorted(((sc + lp[k], pick + (k,)) for sc, pick in beams for k in range(len(lp))),
                               key=lambda b: -b[0])[:beam]

            best, nearest = None, None
            for _, pick in beams:  # decreasing probability
                idx = self._choice_indices(pick)
                dev = abs(count(self.widths(idx)) / t - 1.0)
                if dev <= tolerance:
                    best = idx
                    break
                if nearest is None or dev < nearest[0]:
                    nearest = (dev, idx)
            out.append(best if best is not None else nearest[1])
        return out

    def _choice_indices(self, pick: Sequence[int]) -> dict[str, torch.Tensor]:
        """One joint choice (a choice index per independent slot, axes in order) as
        ``{axis: (slots,) choice indices}``, a shared axis' choice repeated over its slots."""
        it = iter(pick)
        out = {}
        for name, spec in self.specs.items():
            own = [next(it) for _ in range(self.routers[name].independent_slots)]
            out[name] = torch.tensor(own * (spec.slots // len(own)), dtype=torch.long)
        return out

    def widths(self, choice_idx: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Choice indices -> sizes in units, ``{axis: (batch, slots)}``."""
        out = {}
        for name, idx in choice_idx.items():
            ch = torch.tensor(self.specs[name].choices, device=idx.device)
            out[name] = ch[idx]
        return out


def gumbel_softmax(logits: torch.Tensor, *, tau: float, scale: float = 1.0, hard: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``y = softmax((scale * logits + g) / tau)`` with ``g ~ Gumbel(0, 1)`` drawn from ``generator``.

    ``hard``: the forward value is the one-hot of ``argmax y``, the gradient that of ``y``
    (straight-through, as ``torch.nn.functional.gumbel_softmax(hard=True)``).
    """
    if tau <= 0:
        raise ValueError(f"gumbel_softmax: tau must be > 0, got {tau}")
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float32).to(logits.device)
    g = -torch.log((-torch.log(u.clamp_min(1e-10))).clamp_min(1e-10))
    y = F.softmax((scale * logits + g.to(logits.dtype)) / tau, dim=-1)
    if not hard:
        return y
    one = F.one_hot(y.argmax(-1), y.shape[-1]).to(y.dtype)
    return one - y.detach() + y


def pin_full(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``probs: (batch, slots, choices)`` with the rows of ``targets >= 1.0`` replaced by the
    one-hot of the last (full-size) choice: the full budget runs the parent, unrouted."""
    full = (targets.detach() >= 1.0).to(probs.device)
    if not bool(full.any()):
        return probs
    one = torch.zeros_like(probs)
    one[..., -1] = 1.0
    return torch.where(full[:, None, None], one, probs)


def full_choice_loss(routers: "BudgetRouters") -> torch.Tensor:
    """Cross-entropy of every axis' logits for the 1.0 input toward the full-size choice (mean over
    axes and slots): keeps the routers' view of the full budget at the parent's shape."""
    lg = routers.logits(torch.ones(1))
    losses = [F.cross_entropy(v[0], torch.full((v.shape[1],), v.shape[-1] - 1, device=v.device)) for v in lg.values()]
    return torch.stack(losses).mean()


def prefix_mask(probs: torch.Tensor, choices: Sequence[int]) -> torch.Tensor:
    """Soft nested mask over units.

    probs: (..., choices) — distribution over the nested sizes ``choices`` (ascending)
    returns: (..., full) with ``mask[u] = sum_k probs[k] * [u < choices[k]]``
    """
    full = choices[-1]
    ch = torch.tensor(list(choices), device=probs.device)
    prefix = (torch.arange(full, device=probs.device)[None, :] < ch[:, None]).to(probs.dtype)
    return probs @ prefix


def decay_temperature(step: int, start: float = 1.0, decay: float = 0.9999, minimum: float = 0.05) -> float:
    """``max(start * decay ** step, minimum)``: the per-step exponential decay of the reference."""
    if start <= 0 or not 0 < decay <= 1 or minimum <= 0:
        raise ValueError(f"decay_temperature: need start > 0, decay in (0, 1], minimum > 0; got {start}, {decay}, "
                         f"{minimum}")
    return float(max(start * math.exp(step * math.log(decay)), minimum))


def ramp_scale(progress: float, start: float = 1.0, end: float = 10.0) -> float:
    """Linear ramp of the logit scale from ``start`` to ``end``."""
    p = min(max(progress, 0.0), 1.0)
    return float(start + p * (end - start))


def curriculum_probs(num_budgets: int, phase: str, skew: Sequence[float] = (0.5, 0.3, 0.2),
                     full_prob: float | None = None) -> list[float]:
    """Sampling probabilities over budgets sorted from largest (the full model) to smallest.

    phase ``"A"``: the full model with ``full_prob`` (None: uniform over all budgets), the rest
    uniform. Phase ``"B"``: ``skew = (full, middle, smallest)``; the middle share is split evenly
    over the budgets between the largest and the smallest (with two budgets, the full and smallest
    shares are renormalized).
    """
    if phase not in ("A", "B"):
        raise ValueError(f"curriculum_probs: phase must be 'A' or 'B', got {phase!r}")
    if num_budgets < 1:
        raise ValueError(f"curriculum_probs: num_budgets must be >= 1, got {num_budgets}")
    if num_budgets == 1:
        return [1.0]
    if phase == "A":
        if full_prob is None:
            return [1.0 / num_budgets] * num_budgets
        if not 0 <= full_prob <= 1:
            raise ValueError(f"curriculum_probs: full_prob must be in [0, 1], got {full_prob}")
        return [float(full_prob)] + [(1.0 - full_prob) / (num_budgets - 1)] * (num_budgets - 1)
    full, middle, small = (float(x) for x in skew)
    if min(full, middle, small) < 0 or full + middle + small <= 0:
        raise ValueError(f"curriculum_probs: skew must be three non-negative weights, got {tuple(skew)}")
    if num_budgets == 2:
        w = [full, small]
    else:
        w = [full] + [middle / (num_budgets - 2)] * (num_budgets - 2) + [small]
    s = sum(w)
    return [x / s for x in w]


def sample_budget_indices(n: int, probs: Sequence[float], generator: torch.Generator) -> torch.Tensor:
    """``n`` budget indices drawn from ``probs`` (deterministic for a given generator state)."""
    return torch.multinomial(torch.tensor(list(probs), dtype=torch.float64), n, replacement=True,
                             generator=generator)


def router_size_loss(params: torch.Tensor, target: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
    """``max(|params / target - 1| - tolerance, 0)`` averaged over the batch.

    params: (batch,) differentiable (expected) parameter counts of the chosen submodels
    target: (batch,) target parameter counts
    """
    return F.relu((params / target - 1.0).abs() - tolerance).mean()
