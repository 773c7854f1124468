"""Generation with elastic budget control (Star Elastic; docs/design.md §1): the one decode loop.

A request is decoded by two nested submodels of one parent: the *think* budget until the
end-of-thinking token, the *answer* budget after it. The switch happens exactly at the
end-of-thinking token: the think model produces it (or it is forced once ``max_think_tokens``
thinking tokens were generated), and the next token is the answer model's first.

On the switch the answer model needs its own decode caches (a nested submodel's state is not the
parent's state). When both budgets resolve to the same submodel nothing is rebuilt: decoding
simply continues on the same cache (the exact result, no extra work). Otherwise, two modes:

- ``cache_mode="reprefill"`` (default, exact): the answer model prefills ``prompt + thinking``
  into a fresh cache at the answer budget; its last logits give the first answer token. The
  result equals running the answer model on the whole sequence from scratch.
- ``cache_mode="reuse"`` (experimental, approximate): the think model's caches are kept and the
  answer model continues from them (it consumes the end-of-thinking token at the answer budget).
  Cache units outside the think budget hold no state of this sequence: the Mamba heads the
  answer model adds start from an empty state (they are zeroed at the switch), and attention
  keys/values stay those projected from the think model's hidden prefix. It saves the
  re-prefill; :mod:`elastic_kernels.infer.evaluate` measures its accuracy cost.

Batched decoding: every request carries its own think/answer budget, phase and thinking cap.
Requests whose prompts have the same length advance in lockstep with one shared
:class:`~elastic_kernels.models.model.HybridCache`; every decode step is *one* forward with
per-sample budgets (``model(ids, budget=[Budget, ...], cache=cache)``), rows in the think phase
at their think budget next to rows in the answer phase at their answer budget. A switch keeps
the sequence length, so a switched row stays in its group: on a step where rows switch, those rows
are re-prefilled (one more forward, batched over the rows switching at that step, at their answer
budgets) while the others decode, and the two caches are merged row by row. Finished rows leave
the group. Prompts of different lengths form different groups (one forward per group and step):
the model's caches have no per-sample length, and causal SSM layers cannot skip padding.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..models.config import Budget

__all__ = ["generate", "Generation", "GenerationError", "UnknownBudgetError", "EmptyPromptError",
           "PromptTooLongError", "resolve_budget", "FULL", "SAMPLING", "CACHE_MODES"]


FULL = "full"
SAMPLING = ("greedy", "sample")
CACHE_MODES = ("reprefill", "reuse")


class GenerationError(ValueError):
    """A bad generation request."""


class UnknownBudgetError(GenerationError):
    """A budget name that is not in the budget table."""


class EmptyPromptError(GenerationError):
    """A prompt without tokens."""


class PromptTooLongError(GenerationError):
    """A prompt that leaves no room to generate within ``max_length``."""


@dataclass
class Generation:
    """One generated request.

    prompt: the prompt token ids.
    thinking: tokens of the think phase, ending with the end-of-thinking token when the switch
        happened (``forced_switch``: it was appended because ``max_think_tokens`` was reached).
    answer: tokens of the answer phase (ending with ``<eos>`` when it was produced).
    stop: why decoding stopped: ``"eos"`` (answer finished), ``"max_answer_tokens"``,
        ``"max_length"``, or ``"eos_in_thinking"`` (the think model emitted ``<eos>``).
    work: per phase (``"think"``, ``"answer"``): ``prefill_tokens``, ``prefill_forwards``,
        ``decode_tokens`` (one-token forwards), ``prefill_context`` and ``decode_context`` (sums
        over the computed tokens of the number of positions each attends to, itself included);
        the input of the cost model (:mod:`elastic_kernels.infer.evaluate`).
    """

    prompt: list[int]
    thinking: list[int]
    answer: list[int]
    think_budget: str
    answer_budget: str
    switched: bool
    forced_switch: bool
    stop: str
    cache_mode: str
    work: dict[str, dict[str, int]]

    @property
    def completion(self) -> list[int]:
        """Every generated token: ``thinking + answer``."""
        return self.thinking + self.answer


def _budget_name(spec) -> str:
    if spec is None:
        return FULL
    if isinstance(spec, str):
        return spec
    return "custom:" + ",".join(f"{k}={v}" for k, v in spec.to_dict().items())


def resolve_budget(spec, budgets: Mapping[str, Budget] | None, name: str = "budget") -> Budget:
    """A :class:`Budget` from ``None``/``"full"`` (the parent), a table name, or a Budget.

    Raises :class:`UnknownBudgetError` naming the known budgets for a name that is not in
    ``budgets``, TypeError for anything else.
    """
    if spec is None:
        return Budget()
    if isinstance(spec, Budget):
        return spec
    if isinstance(spec, str):
        table = dict(budgets or {})
        if spec in table:
            b = table[spec]
            if not isinstance(b, Budget):
                raise TypeError(f"generate: budgets[{spec!r}] must be a Budget, got {type(b).__name__}")
            return b
        if spec == FULL:
            return Budget()
        known = sorted(set(table) | {FULL})
        raise UnknownBudgetError(f"generate: {name} {spec!r} is not a known budget; known: {known}")
    raise TypeError(f"generate: {name} must be a budget name, a Budget or None, got {type(spec).__name__}")


def _per_request(value, n: int, name: str, scalar_types: tuple) -> list:
    """``value`` for every request: a scalar is shared, a list/tuple gives one entry per request."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise GenerationError(f"generate: {name} has {len(value)} entries, expected one per prompt ({n})")
        return list(value)
    if value is not None and not isinstance(value, scalar_types):
        raise TypeError(f"generate: {name} must be one of {[t.__name__ for t in scalar_types]} or a list with "
                        f"one per prompt, got {type(value).__name__}")
    return [value] * n


def _check_count(value, name: str, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"generate: {name} must be an int{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__}")
    if value < 0:
        raise GenerationError(f"generate: {name} must be >= 0, got {value}")


class _Seq:
    """Decoding state of one request."""

    def __init__(self, prompt: list[int], think: Budget, answer: Budget, think_name: str, answer_name: str,
                 max_think: int | None, gen: torch.Generator | None, same_model: bool) -> None:
        self.prompt, self.same_model = prompt, same_model
        self.think, self.answer_b = think, answer
        self.think_name, self.answer_name = think_name, answer_name
        self.max_think, self.gen = max_think, gen
        self.thinking: list[int] = []
        self.answer: list[int] = []
        self.phase = "think"
        self.switched = False
        self.forced = False
        self.stop: str | None = None
        self.work = {p: {"prefill_tokens": 0, "prefill_forwards": 0, "decode_tokens": 0, "prefill_context": 0,
                         "decode_context": 0}
                     for p in ("think", "answer")}

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.thinking) + len(self.answer)

    @property
    def last(self) -> int:
        return (self.answer or self.thinking)[-1]

    @property
    def budget(self) -> Budget:
        return self.think if self.phase == "think" else self.answer_b

    def count_prefill(self, phase: str, start: int, tokens: int) -> None:
        w = self.work[phase]
        w["prefill_tokens"] += tokens
        w["prefill_forwards"] += 1
        w["prefill_context"] += sum(range(start + 1, start + tokens + 1))

    def count_decode(self, phase: str, position: int) -> None:
        w = self.work[phase]
        w["decode_tokens"] += 1
        w["decode_context"] += position + 1

    def result(self, cache_mode: str) -> Generation:
        return Generation(prompt=list(self.prompt), thinking=self.thinking, answer=self.answer,
                          think_budget=self.think_name, answer_budget=self.answer_name,
                          switched=self.switched, forced_switch=self.forced, stop=self.stop,
                          cache_mode=cache_mode, work=self.work)


def _pick(logits: Tensor, seqs: Sequence[_Seq], sampling: str, temperature: float, top_p: float) -> list[int]:
    """Next token of every row of ``logits: (rows, vocab)``."""
    if sampling == "greedy":
        return logits.argmax(-1).tolist()
    out = []
    for row, s in zip(logits, seqs):
        probs = torch.softmax(row.double() / temperature, -1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = (sorted_p.cumsum(0) - sorted_p) < top_p  # the smallest prefix reaching top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        out.append(int(torch.multinomial(probs, 1, generator=s.gen)))
    return out


def _budget_arg(budgets: Sequence[Budget]):
    """The model's budget argument: one Budget when all rows share it, else one per row."""
    return budgets[0] if all(b == budgets[0] for b in budgets) else list(budgets)


@torch.no_grad()
def _run_group(model, seqs: list[_Seq], *, max_answer: int, max_length: int, sampling: str,
               temperature: float, top_p: float, cache_mode: str, end_id: int, eos_id: int) -> None:
    """Decode a group of requests with equal prompt lengths to the end."""
    device = next(model.parameters()).device
    ids = torch.tensor([s.prompt for s in seqs], dtype=torch.long, device=device)
    cache = model.new_cache(len(seqs))
    logits = model(ids, budget=_budget_arg([s.think for s in seqs]), cache=cache)[:, -1]
    for s in seqs:
        s.count_prefill("think", 0, len(s.prompt))
    active = list(seqs)
    while active:
        chosen = _pick(logits, active, sampling, temperature, top_p)
        feed, switch = [], []  # row indices (into active) that continue / that switch phase
        for r, (s, tok) in enumerate(zip(active, chosen)):
            if s.phase == "think":
                if s.max_think is not None and len(s.thinking) >= s.max_think:
                    tok, s.forced = end_id, True
                s.thinking.append(tok)
                if tok == end_id:
                    s.phase, s.switched = "answer", True
                    if s.length >= max_length:
                        s.stop = "max_length"
                    elif max_answer == 0:
                        s.stop = "max_answer_tokens"
                    else:  # same submodel for both phases: its cache is exact, nothing to rebuild
                        (feed if s.same_model else switch).append(r)
                    continue
                if tok == eos_id:
                    s.stop = "eos_in_thinking"
                    continue
            else:
                s.answer.append(tok)
                if tok == eos_id:
                    s.stop = "eos"
                    continue
                if len(s.answer) >= max_answer:
                    s.stop = "max_answer_tokens"
                    continue
            if s.length >= max_length:
                s.stop = "max_length"
                continue
            feed.append(r)
        if cache_mode == "reuse":
            for r in switch:
                # the heads the answer model adds start from an empty state (batch-independent)
                cache.clear_outside(r, model.resolve_budget(active[r].think))
            feed, switch = sorted(feed + switch), []
        keep = sorted(feed + switch)
        if not keep:
            break
        if len(keep) < len(active):
            cache = cache.select_rows(torch.tensor(keep, device=device))
        pos = {r: i for i, r in enumerate(keep)}
        active = [active[r] for r in keep]
        feed_rows = [pos[r] for r in feed]
        switch_rows = [pos[r] for r in switch]
        logits = torch.empty(len(active), logits.shape[-1], device=device)
        parts = []
        if feed_rows:
            sub = cache if len(feed_rows) == len(active) else cache.select_rows(torch.tensor(feed_rows,
                                                                                             device=device))
            last = torch.tensor([[active[i].last] for i in feed_rows], dtype=torch.long, device=device)
            logits[feed_rows] = model(last, budget=_budget_arg([active[i].budget for i in feed_rows]),
                                      cache=sub)[:, -1]
            for i in feed_rows:
                s = active[i]
                s.count_decode(s.phase, s.length - 1)
            parts.append((torch.tensor(feed_rows, device=device), sub))
        if switch_rows:
            full_ids = torch.tensor([active[i].prompt + active[i].thinking for i in switch_rows],
                                    dtype=torch.long, device=device)
            fresh = model.new_cache(len(switch_rows))
            logits[switch_rows] = model(full_ids, budget=_budget_arg([active[i].answer_b for i in switch_rows]),
                                        cache=fresh)[:, -1]
            for i in switch_rows:
                active[i].count_prefill("answer", 0, full_ids.shape[1])
            parts.append((torch.tensor(switch_rows, device=device), fresh))
        cache = parts[0][1] if len(parts) == 1 else type(cache).merge(parts, len(active))


def generate(model, prompts: Sequence[Sequence[int]], *, think_budget=FULL, answer_budget=FULL,
             budgets: Mapping[str, Budget] | None = None, max_think_tokens=None, max_answer_tokens: int = 16,
             max_length: int = 2048, sampling: str = "greedy", temperature: float = 1.0, top_p: float = 1.0,
             seed=0, cache_mode: str = "reprefill", batch_size: int = 64, end_think_id: int,
             eos_id: int) -> list[Generation]:
    """Generate completions with a think budget and an answer budget.

    Args:
        model: an :class:`~elastic_kernels.models.ElasticHybridLM` (``forward(ids, budget, cache)``
            with per-sample budgets, ``new_cache(batch)``).
        prompts: token-id lists; the prompt normally ends with the think-start token.
        think_budget, answer_budget: a budget name from ``budgets`` (``"full"`` is always the
            parent), a :class:`Budget`, or None (full); or a list with one per prompt (a
            mixed-budget batch).
        budgets: the budget table ``{name: Budget}`` (e.g. of a nested checkpoint).
        max_think_tokens: None (no cap) or the most thinking tokens before the end-of-thinking
            token is forced; an int shared by every prompt or a list with one per prompt.
        max_answer_tokens: the most answer tokens (``<eos>`` included).
        max_length: the most tokens of prompt + completion; a prompt must be shorter.
        sampling: ``"greedy"`` or ``"sample"`` (``temperature`` > 0, nucleus ``top_p`` in (0, 1]).
        seed: sampling seed; request ``i`` draws from its own generator seeded ``seed + i`` (or
            ``seed[i]`` for a list), so a request samples the same tokens alone or in any batch.
        cache_mode: ``"reprefill"`` (exact) or ``"reuse"`` (experimental); see the module docstring.
        batch_size: the most requests decoded together.
        end_think_id, eos_id: the end-of-thinking and end-of-sequence token ids (required: they
            belong to the task's tokenizer, e.g. ``task.end_think_id`` and ``task.eos_id`` of an
            :class:`elastic_kernels.tasks.Task`).

    Returns:
        One :class:`Generation` per prompt, in order.

    Raises:
        UnknownBudgetError, EmptyPromptError, PromptTooLongError (all :class:`GenerationError`, a
        ValueError) and TypeError, naming the argument.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"generate: prompts must be a list of token-id lists, got {type(prompts).__name__}")
    n = len(prompts)
    if sampling not in SAMPLING:
        raise GenerationError(f"generate: sampling must be one of {SAMPLING}, got {sampling!r}")
    if cache_mode not in CACHE_MODES:
        raise GenerationError(f"generate: cache_mode must be one of {CACHE_MODES}, got {cache_mode!r}")
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"generate: {name} must be a float, got {type(v).__name__}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise GenerationError(f"generate: temperature must be finite and >= 0, got {temperature!r}")
    if sampling == "sample":
        if temperature <= 0:
            raise GenerationError(f"generate: temperature must be > 0 when sampling, got {temperature!r}")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise GenerationError(f"generate: top_p must lie in (0, 1], got {top_p!r}")
    _check_count(max_answer_tokens, "max_answer_tokens", False)
    _check_count(max_length, "max_length", False)
    _check_count(batch_size, "batch_size", False)
    if batch_size < 1:
        raise GenerationError(f"generate: batch_size must be >= 1, got {batch_size}")
    vocab = model.config.vocab_size
    for name, tid in (("end_think_id", end_think_id), ("eos_id", eos_id)):
        _check_count(tid, name, False)
        if tid >= vocab:
            raise GenerationError(f"generate: {name} ({tid}) must be below the vocabulary size ({vocab})")
    thinks = _per_request(think_budget, n, "think_budget", (str, Budget))
    answers = _per_request(answer_budget, n, "answer_budget", (str, Budget))
    caps = _per_request(max_think_tokens, n, "max_think_tokens", (int,))
    seeds = _per_request(seed, n, "seed", (int,))
    seqs: list[_Seq] = []
    for i, p in enumerate(prompts):
        if isinstance(p, Tensor):
            if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
                raise TypeError(f"generate: prompts[{i}] must hold int token ids, got a {p.dtype} tensor")
            p = p.tolist()
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise TypeError(f"generate: prompts[{i}] must be a list of token ids, got {type(p).__name__}")
        for j, t in enumerate(p):
            if isinstance(t, Tensor) and t.ndim == 0 and not t.is_floating_point() and not t.is_complex() \
                    and t.dtype != torch.bool:
                continue
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise TypeError(f"generate: prompts[{i}][{j}] must be an int token id, got {type(t).__name__} {t!r}")
        p = [int(t) for t in p]
        if not p:
            raise EmptyPromptError(f"generate: prompts[{i}] is empty; a prompt needs at least one token")
        if len(p) >= max_length:
            raise PromptTooLongError(f"generate: prompts[{i}] has {len(p)} tokens; max_length={max_length} "
                                     "leaves no room to generate (a prompt must be shorter than max_length)")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"generate: prompts[{i}] has token id {bad[0]} outside [0, {vocab}) "
                                  f"(vocab_size={vocab})")
        _check_count(caps[i], f"max_think_tokens[{i}]" if isinstance(max_think_tokens, (list, tuple))
                     else "max_think_tokens", True)
        tb = resolve_budget(thinks[i], budgets, "think_budget")
        ab = resolve_budget(answers[i], budgets, "answer_budget")
        same = model.resolve_budget(tb) == model.resolve_budget(ab)
        gen = None
        if sampling == "sample":
            _check_count(seeds[i], "seed", False)
            gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seeds[i] + (
                0 if isinstance(seed, (list, tuple)) else i))
        seqs.append(_Seq(p, tb, ab, _budget_name(thinks[i]), _budget_name(answers[i]), caps[i], gen,
                         same))
    groups: dict[int, list[_Seq]] = {}
    for s in seqs:
        groups.setdefault(len(s.prompt), []).append(s)
    was_training = model.training
    model.eval()
    try:
        for _, members in sorted(groups.items()):
            for c in range(0, len(members), batch_size):
                _run_group(model, members[c:c + batch_size], max_answer=max_answer_tokens, max_length=max_length,
                           sampling=sampling, temperature=float(temperature), top_p=float(top_p),
                           cache_mode=cache_mode, end_id=end_think_id, eos_id=eos_id)
    finally:
        model.train(was_training)
    return [s.result(cache_mode) for s in seqs]
