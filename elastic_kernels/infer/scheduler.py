"""Continuous batching of elastic requests: the one decode loop (docs/serving.md, docs/design.md §1).

Every request carries its own think budget, answer budget, thinking cap and answer cap. The
:class:`Scheduler` keeps one running batch whose rows are at their *own* lengths, budgets and
phases (per-sample cache lengths, :class:`~elastic_kernels.models.HybridCache`):

- **join**: at a step boundary, waiting requests enter the batch (up to ``max_batch`` rows). Their
  prompts, of any lengths, are prefilled together in *one* packed forward
  (``model(ids (1, total), budget=[...], cache=fresh, seq_lens=[...])``: no padding), at each
  request's think budget; contexts all of one length take the plain batched forward
  ``model(ids (n, length), ...)`` instead, which has no sequence boundaries to mask (an
  evaluation submits its prompts sorted by length, so most of its joins are of that kind).
- **decode**: every row that has a token to feed is advanced by one shared one-token forward
  with per-row budgets; each row attends to and updates only its own cache row.
- **switch**: a row that produces the end-of-thinking token (or reaches its thinking cap, which
  forces it) continues at its answer budget. When both budgets resolve to the same submodel its
  cache is exact and decoding simply continues. Otherwise ``cache_mode="reprefill"`` (exact)
  re-prefills only that row's ``prompt + thinking`` at the answer budget (packed together with
  the step's joining prompts), while the other rows decode; ``cache_mode="reuse"``
  (approximate) keeps its cache, zeroing the Mamba heads the answer model adds.
- **leave**: a finished row (``<eos>``, answer cap, ``max_length``, ``<eos>`` while thinking, or
  cancelled) leaves the batch at the step boundary; its cache row is dropped.

Greedy tokens of a request do not depend on what else is in the batch: every row equals the
request generated alone (the tests check it token for token). Sampling draws from the request's
own generator, so sampled tokens do not depend on the batch either.

API for a front end (one thread drives the scheduler): :meth:`Scheduler.submit` returns a
:class:`Request` handle; :meth:`Scheduler.step` runs one step and returns the
:class:`TokenEvent` of every token produced; :meth:`Request.poll` returns the tokens produced
since the last poll; :meth:`Scheduler.stream` yields one request's tokens as they come;
:meth:`Scheduler.run` steps until every request finished; :meth:`Request.result` is the finished
:class:`Generation`.
"""
from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from ..models.config import Budget

__all__ = ["Scheduler", "Request", "TokenEvent", "Generation", "GenerationError", "UnknownBudgetError",
           "EmptyPromptError", "PromptTooLongError", "resolve_budget", "check_prompt", "budget_name", "FULL",
           "SAMPLING", "CACHE_MODES", "STOPS"]

FULL = "full"
SAMPLING = ("greedy", "sample")
CACHE_MODES = ("reprefill", "reuse")
STOPS = ("eos", "max_answer_tokens", "max_length", "eos_in_thinking", "cancelled")


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
    stop: why decoding stopped, one of :data:`STOPS`: ``"eos"`` (answer finished),
        ``"max_answer_tokens"``, ``"max_length"``, ``"eos_in_thinking"`` (the think model emitted
        ``<eos>``) or ``"cancelled"``.
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


def budget_name(spec) -> str:
    """The name a :class:`Generation` reports for a budget spec (a table name, ``"full"`` for
    None, ``"custom:..."`` for a Budget)."""
    if spec is None:
        return FULL
    if isinstance(spec, str):
        return spec
    return "custom:" + ",".join(f"{k}={v}" for k, v in spec.to_dict().items())


def resolve_budget(spec, budgets: Mapping[str, Budget] | None, name: str = "budget",
                   where: str = "generate") -> Budget:
    """A :class:`Budget` from ``None``/``"full"`` (the parent), a table name, or a Budget.

    Raises :class:`UnknownBudgetError` naming the known budgets for a name that is not in
    ``budgets``, TypeError for anything else (messages start with ``where``).
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
                raise TypeError(f"{where}: budgets[{spec!r}] must be a Budget, got {type(b).__name__}")
            return b
        if spec == FULL:
            return Budget()
        known = sorted(set(table) | {FULL})
        raise UnknownBudgetError(f"{where}: {name} {spec!r} is not a known budget; known: {known}")
    raise TypeError(f"{where}: {name} must be a budget name, a Budget or None, got {type(spec).__name__}")


def check_count(value, name: str, allow_none: bool, where: str = "generate") -> None:
    """``value`` is an int >= 0 (or None when ``allow_none``); TypeError/GenerationError naming it."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__}")
    if value < 0:
        raise GenerationError(f"{where}: {name} must be >= 0, got {value}")


def check_prompt(p, vocab: int, max_length: int, name: str = "prompt", where: str = "generate") -> list[int]:
    """The token ids of prompt ``p`` (a list of ints, int scalar tensors, or an int tensor) as a
    list; EmptyPromptError, PromptTooLongError (``len >= max_length``), GenerationError (an id
    outside ``[0, vocab)``) or TypeError naming ``name``."""
    if isinstance(p, Tensor):
        if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
            raise TypeError(f"{where}: {name} must hold int token ids, got a {p.dtype} tensor")
        p = p.tolist()
    if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
        raise TypeError(f"{where}: {name} must be a list of token ids, got {type(p).__name__}")
    for j, t in enumerate(p):
        if isinstance(t, Tensor) and t.ndim == 0 and not t.is_floating_point() and not t.is_complex() \
                and t.dtype != torch.bool:
            continue
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"{where}: {name}[{j}] must be an int token id, got {type(t).__name__} {t!r}")
    p = [int(t) for t in p]
    if not p:
        raise EmptyPromptError(f"{where}: {name} is empty; a prompt needs at least one token")
    if len(p) >= max_length:
        raise PromptTooLongError(f"{where}: {name} has {len(p)} tokens; max_length={max_length} "
                                 "leaves no room to generate (a prompt must be shorter than max_length)")
    bad = [t for t in p if not 0 <= t < vocab]
    if bad:
        raise GenerationError(f"{where}: {name} has token id {bad[0]} outside [0, {vocab}) (vocab_size={vocab})")
    return p


class _Seq:
    """Decoding state of one request."""

    def __init__(self, prompt: list[int], think: Budget, answer: Budget, think_name: str, answer_name: str,
                 max_think: int | None, max_answer: int, gen: torch.Generator | None, same_model: bool) -> None:
        self.prompt, self.same_model = prompt, same_model
        self.think, self.answer_b = think, answer
        self.think_name, self.answer_name = think_name, answer_name
        self.max_think, self.max_answer, self.gen = max_think, max_answer, gen
        self.thinking: list[int] = []
        self.answer: list[int] = []
        self.phase = "think"
        self.action = "prefill"  # what the next step does for it: "prefill" its context or "decode" its last token
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

    def context(self) -> list[int]:
        """Every token so far (what a prefill consumes)."""
        return self.prompt + self.thinking + self.answer

    def count_prefill(self, tokens: int) -> None:
        w = self.work[self.phase]
        w["prefill_tokens"] += tokens
        w["prefill_forwards"] += 1
        w["prefill_context"] += tokens * (tokens + 1) // 2

    def count_decode(self) -> None:
        w = self.work[self.phase]
        w["decode_tokens"] += 1
        w["decode_context"] += self.length

    def result(self, cache_mode: str) -> Generation:
        return Generation(prompt=list(self.prompt), thinking=list(self.thinking), answer=list(self.answer),
                          think_budget=self.think_name, answer_budget=self.answer_name,
                          switched=self.switched, forced_switch=self.forced, stop=self.stop,
                          cache_mode=cache_mode, work=self.work)


@dataclass(frozen=True)
class TokenEvent:
    """One produced token: the request, the token id, the phase it belongs to (``"think"``: the
    end-of-thinking token included; ``"answer"``) and whether the request finished with it."""

    request: "Request"
    token: int
    phase: str
    finished: bool


class Request:
    """Handle of a submitted request (returned by :meth:`Scheduler.submit`).

    ``id``: submission number; ``done``: finished (its :meth:`result` is ready); ``tokens``: every
    token produced so far (thinking then answer).
    """

    def __init__(self, rid: int, seq: _Seq, cache_mode: str) -> None:
        self.id = rid
        self._seq, self._cache_mode = seq, cache_mode
        self._read = 0

    @property
    def done(self) -> bool:
        return self._seq.stop is not None

    @property
    def tokens(self) -> list[int]:
        return self._seq.thinking + self._seq.answer

    @property
    def phase(self) -> str:
        return self._seq.phase

    def poll(self) -> list[int]:
        """The tokens produced since the previous poll."""
        toks = self.tokens
        new, self._read = toks[self._read:], len(toks)
        return new

    def result(self) -> Generation:
        """The finished generation; GenerationError if the request is still running."""
        if not self.done:
            raise GenerationError(f"Request {self.id}: result() before the request finished")
        return self._seq.result(self._cache_mode)

    def __repr__(self) -> str:
        return f"Request(id={self.id}, phase={self.phase!r}, tokens={len(self.tokens)}, done={self.done})"


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


class Scheduler:
    """Continuous batching over one model (see the module docstring).

    Args:
        model: an :class:`~elastic_kernels.models.ElasticHybridLM` (per-sample budgets, packed
            prefill with ``seq_lens``, ragged caches); the scheduler does not change its mode.
        end_think_id, eos_id: the end-of-thinking and end-of-sequence token ids (the task's).
        budgets: the budget table ``{name: Budget}`` requests may name.
        max_batch: the most requests in the running batch (the rest wait, first come first served).
        max_length: the most tokens of prompt + completion of a request.
        sampling: ``"greedy"`` or ``"sample"`` (``temperature`` > 0, nucleus ``top_p`` in (0, 1]).
        cache_mode: ``"reprefill"`` (exact) or ``"reuse"`` (approximate) at a budget switch.
        pad_prefill: the padding baseline (``bench/bench_serve.py``): every packed prefill also
            computes, after each sequence, padding up to the longest one (in separate packed
            segments whose cache rows are dropped): the cost of padding to equal lengths, with
            unchanged outputs.
    """

    def __init__(self, model, *, end_think_id: int, eos_id: int, budgets: Mapping[str, Budget] | None = None,
                 max_batch: int = 64, max_length: int = 2048, sampling: str = "greedy", temperature: float = 1.0,
                 top_p: float = 1.0, cache_mode: str = "reprefill", pad_prefill: bool = False,
                 where: str = "Scheduler") -> None:
        if sampling not in SAMPLING:
            raise GenerationError(f"{where}: sampling must be one of {SAMPLING}, got {sampling!r}")
        if cache_mode not in CACHE_MODES:
            raise GenerationError(f"{where}: cache_mode must be one of {CACHE_MODES}, got {cache_mode!r}")
        for name, v in (("temperature", temperature), ("top_p", top_p)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{where}: {name} must be a float, got {type(v).__name__}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise GenerationError(f"{where}: temperature must be finite and >= 0, got {temperature!r}")
        if sampling == "sample":
            if temperature <= 0:
                raise GenerationError(f"{where}: temperature must be > 0 when sampling, got {temperature!r}")
            if not 0 < top_p <= 1:
                raise GenerationError(f"{where}: top_p must lie in (0, 1], got {top_p!r}")
        check_count(max_length, "max_length", False, where)
        check_count(max_batch, "max_batch", False, where)
        if max_batch < 1:
            raise GenerationError(f"{where}: max_batch must be >= 1, got {max_batch}")
        vocab = model.config.vocab_size
        for name, tid in (("end_think_id", end_think_id), ("eos_id", eos_id)):
            check_count(tid, name, False, where)
            if tid >= vocab:
                raise GenerationError(f"{where}: {name} ({tid}) must be below the vocabulary size ({vocab})")
        self.model, self.budgets = model, dict(budgets or {})
        self.end_id, self.eos_id = end_think_id, eos_id
        self.max_batch, self.max_length = max_batch, max_length
        self.sampling, self.temperature, self.top_p = sampling, float(temperature), float(top_p)
        self.cache_mode, self.pad_prefill = cache_mode, bool(pad_prefill)
        self.device = next(model.parameters()).device
        self._ids = itertools.count()
        self._waiting: list[Request] = []
        self._running: list[Request] = []   # in cache-row order, then the requests that joined this step
        self._rows: list[Request] = []      # cache row i holds _rows[i]
        self._cache = None
        self.steps = 0

    # -- submitting --------------------------------------------------------------------------
    def submit(self, prompt, *, think_budget=FULL, answer_budget=FULL, max_think_tokens: int | None = None,
               max_answer_tokens: int = 16, seed: int = 0, name: str = "prompt",
               where: str = "submit") -> Request:
        """Queue a request; it joins the batch at the next step with room. ``think_budget`` /
        ``answer_budget``: a name of the budget table, ``"full"``, a :class:`Budget` or None;
        ``max_think_tokens``: None (no cap) or the most thinking tokens before the end-of-thinking
        token is forced; ``max_answer_tokens``: the most answer tokens (``<eos>`` included);
        ``seed``: its sampling generator's seed. ``name`` / ``where`` label errors."""
        p = check_prompt(prompt, self.model.config.vocab_size, self.max_length, name, where)
        check_count(max_think_tokens, "max_think_tokens", True, where)
        check_count(max_answer_tokens, "max_answer_tokens", False, where)
        tb = resolve_budget(think_budget, self.budgets, "think_budget", where)
        ab = resolve_budget(answer_budget, self.budgets, "answer_budget", where)
        same = self.model.resolve_budget(tb) == self.model.resolve_budget(ab)
        gen = None
        if self.sampling == "sample":
            check_count(seed, "seed", False, where)
            gen = torch.Generator(device=self.device).manual_seed(seed)
        seq = _Seq(p, tb, ab, budget_name(think_budget), budget_name(answer_budget), max_think_tokens,
                   max_answer_tokens, gen, same)
        req = Request(next(self._ids), seq, self.cache_mode)
        self._waiting.append(req)
        return req

    def cancel(self, request: Request) -> None:
        """Stop ``request`` (stop reason ``"cancelled"``); it leaves at the next step boundary."""
        if not request.done:
            request._seq.stop = "cancelled"

    # -- state -------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """No request waiting or running."""
        return not self._waiting and not self._running

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # -- stepping ----------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """One step: finished requests leave, waiting ones join, one decode forward for the rows
        with a token to feed and one packed prefill forward for the rows that need one (joining
        prompts, re-prefills at a switch); every row gets its next token."""
        self._leave()
        while self._waiting and len(self._running) < self.max_batch:
            req = self._waiting.pop(0)
            if not req.done:  # cancelled while waiting
                self._running.append(req)
        if not self._running:
            return []
        with torch.no_grad():
            rows, logits = self._forward()
        events = []
        for req, tok in zip(rows, _pick(logits, [r._seq for r in rows], self.sampling, self.temperature,
                                        self.top_p)):
            s = req._seq
            phase = s.phase
            tok = self._advance(s, tok)
            events.append(TokenEvent(req, tok, phase, s.stop is not None))
        if self.cache_mode == "reuse":
            for i, req in enumerate(self._rows):
                if req._seq.action == "reuse":
                    # the heads the answer model adds start from an empty state (batch-independent)
                    self._cache.clear_outside(i, self.model.resolve_budget(req._seq.think))
                    req._seq.action = "decode"
        self.steps += 1
        return events

    def run(self) -> None:
        """Step until every submitted request finished."""
        while not self.idle:
            self.step()
            self._leave()

    def stream(self, request: Request) -> Iterator[int]:
        """Yield ``request``'s tokens as they are produced, stepping the scheduler (and so every
        other request) as needed, until it finishes."""
        while True:
            yield from request.poll()
            if request.done:
                return
            self.step()

    def _leave(self) -> None:
        gone = [r for r in self._running if r.done]
        if not gone:
            return
        keep = [i for i, r in enumerate(self._rows) if not r.done]
        if len(keep) < len(self._rows):
            self._cache = self._cache.select_rows(torch.tensor(keep, device=self.device)) if keep else None
            self._rows = [self._rows[i] for i in keep]
        self._running = [r for r in self._running if not r.done]

    def _forward(self) -> tuple[list[Request], Tensor]:
        """The step's forwards; returns the rows (new cache order) and their next-token logits."""
        model, dev = self.model, self.device
        pos = {id(r): i for i, r in enumerate(self._rows)}
        decode = [r for r in self._running if r._seq.action == "decode"]
        prefill = [r for r in self._running if r._seq.action == "prefill"]
        parts, logits = [], []
        if decode:
            idx = [pos[id(r)] for r in decode]
            sub = self._cache if idx == list(range(len(self._rows))) else \
                self._cache.select_rows(torch.tensor(idx, device=dev))
            last = torch.tensor([[r._seq.last] for r in decode], dtype=torch.long, device=dev)
            logits.append(model(last, budget=_budget_arg([r._seq.budget for r in decode]), cache=sub)[:, -1])
            for r in decode:
                r._seq.count_decode()
            parts.append(sub)
        if prefill:
            ctx = [r._seq.context() for r in prefill]
            budgets = [r._seq.budget for r in prefill]
            if not self.pad_prefill and len({len(c) for c in ctx}) == 1:
                # contexts all of one length (an evaluation's, sorted by prompt length) need no
                # packing: one batched forward with the rows as the batch, no boundaries to mask
                fresh = model.new_cache(len(ctx))
                ids = torch.tensor(ctx, dtype=torch.long, device=dev)
                logits.append(model(ids, budget=_budget_arg(budgets), cache=fresh)[:, -1])
            else:
                out, fresh = self._packed_prefill(ctx, budgets)
                logits.append(out)
            for r, c in zip(prefill, ctx):
                r._seq.count_prefill(len(c))
                r._seq.action = "decode"
            parts.append(fresh)
        rows = decode + prefill
        if len(parts) == 1:
            self._cache = parts[0]
        else:
            self._cache = type(parts[0]).merge(
                [(torch.arange(len(decode), device=dev), parts[0]),
                 (torch.arange(len(decode), len(rows), device=dev), parts[1])], len(rows), ragged=True)
        # the running order follows the cache rows, so that the next decode takes the cache as is
        self._rows, self._running = rows, list(rows)
        return rows, torch.cat(logits, 0)

    def _packed_prefill(self, ctx: list[list[int]], budgets: list) -> tuple[Tensor, object]:
        """One packed forward of the contexts ``ctx`` (any lengths) at ``budgets``: their
        next-token logits (rows, vocab) and the fresh cache whose row i holds context i."""
        model, dev = self.model, self.device
        lens = [len(c) for c in ctx]
        segs, seg_budgets, real = list(lens), list(budgets), list(range(len(lens)))
        if self.pad_prefill:  # a padding segment (token 0) after each sequence, up to the longest
            longest, segs, seg_budgets, real = max(lens), [], [], []
            for n, b in zip(lens, budgets):
                real.append(len(segs))
                segs += [n] + ([longest - n] if n < longest else [])
                seg_budgets += [b] * (2 if n < longest else 1)
            ctx = [c + [0] * (longest - len(c)) for c in ctx]
        ids = torch.tensor([t for c in ctx for t in c], dtype=torch.long, device=dev)[None]
        fresh = model.new_cache(len(segs))
        out = model(ids, budget=_budget_arg(seg_budgets), cache=fresh, seq_lens=segs)
        ends = (torch.tensor(segs, device=dev).cumsum(0) - 1)[torch.tensor(real, device=dev)]
        if len(segs) > len(lens):
            fresh = fresh.select_rows(torch.tensor(real, device=dev))
        return out[0, ends], fresh

    def _advance(self, s: _Seq, tok: int) -> int:
        """Apply the chosen token ``tok`` to ``s`` (forcing the end of thinking at its cap); set
        its next action or its stop reason; return the token appended."""
        s.action = "decode"
        if s.phase == "think":
            if s.max_think is not None and len(s.thinking) >= s.max_think:
                tok, s.forced = self.end_id, True
            s.thinking.append(tok)
            if tok == self.end_id:
                s.phase, s.switched = "answer", True
                if s.length >= self.max_length:
                    s.stop = "max_length"
                elif s.max_answer == 0:
                    s.stop = "max_answer_tokens"
                elif not s.same_model:  # the same submodel for both phases: its cache is exact, nothing to rebuild
                    s.action = "prefill" if self.cache_mode == "reprefill" else "reuse"
                return tok
            if tok == self.eos_id:
                s.stop = "eos_in_thinking"
                return tok
        else:
            s.answer.append(tok)
            if tok == self.eos_id:
                s.stop = "eos"
                return tok
            if len(s.answer) >= s.max_answer:
                s.stop = "max_answer_tokens"
                return tok
        if s.length >= self.max_length:
            s.stop = "max_length"
        return tok
