"""Generation with elastic budget control (Star Elastic; docs/design.md §1).

A request is decoded by two nested submodels of one parent: the *think* budget until the
end-of-thinking token, the *answer* budget after it. The switch happens exactly at the
end-of-thinking token: the think model produces it (or it is forced once ``max_think_tokens``
thinking tokens were generated), and the next token is the answer model's first.

On the switch the answer model needs its own decode caches (a nested submodel's state is not the
parent's state). When both budgets resolve to the same submodel nothing is rebuilt: decoding
simply continues on the same cache (the exact result, no extra work). Otherwise, two modes:

- ``cache_mode="reprefill"`` (default, exact): the answer model prefills ``prompt + thinking``
  into a fresh cache row at the answer budget; its last logits give the first answer token. The
  result equals running the answer model on the whole sequence from scratch.
- ``cache_mode="reuse"`` (experimental, approximate): the think model's caches are kept and the
  answer model continues from them (it consumes the end-of-thinking token at the answer budget).
  Cache units outside the think budget hold no state of this sequence: the Mamba heads the
  answer model adds start from an empty state (they are zeroed at the switch), and attention
  keys/values stay those projected from the think model's hidden prefix. It saves the
  re-prefill; :mod:`elastic_kernels.infer.evaluate` measures its accuracy cost.

:func:`generate` is the synchronous face of the one decode loop, the continuous-batching
:class:`~elastic_kernels.infer.scheduler.Scheduler`: every request carries its own think/answer
budget, phase and thinking cap; prompts of any lengths share the running batch (one packed
prefill, no padding; rows at their own cache lengths), every decode step is *one* forward with
per-sample budgets, and a step where rows switch adds one packed re-prefill of only those rows.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from ..models.config import Budget
from .scheduler import (CACHE_MODES, FULL, SAMPLING, EmptyPromptError, Generation, GenerationError,
                        PromptTooLongError, Scheduler, UnknownBudgetError, check_count, check_prompt,
                        resolve_budget)

__all__ = ["generate", "Generation", "GenerationError", "UnknownBudgetError", "EmptyPromptError",
           "PromptTooLongError", "resolve_budget", "FULL", "SAMPLING", "CACHE_MODES"]


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
        batch_size: the most requests decoded together (the scheduler's ``max_batch``).
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
    check_count(max_answer_tokens, "max_answer_tokens", False)
    check_count(batch_size, "batch_size", False)
    if batch_size < 1:
        raise GenerationError(f"generate: batch_size must be >= 1, got {batch_size}")
    sched = Scheduler(model, end_think_id=end_think_id, eos_id=eos_id, budgets=budgets, max_batch=batch_size,
                      max_length=max_length, sampling=sampling, temperature=temperature, top_p=top_p,
                      cache_mode=cache_mode, where="generate")
    thinks = _per_request(think_budget, n, "think_budget", (str, Budget))
    answers = _per_request(answer_budget, n, "answer_budget", (str, Budget))
    caps = _per_request(max_think_tokens, n, "max_think_tokens", (int,))
    seeds = _per_request(seed, n, "seed", (int,))
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):  # every request is checked before any work starts
        check_prompt(p, vocab, max_length, f"prompts[{i}]")
        check_count(caps[i], f"max_think_tokens[{i}]" if isinstance(max_think_tokens, (list, tuple))
                    else "max_think_tokens", True)
        model.resolve_budget(resolve_budget(thinks[i], budgets, "think_budget"))
        model.resolve_budget(resolve_budget(answers[i], budgets, "answer_budget"))
        if sampling == "sample":
            check_count(seeds[i], "seed", False)
    requests = [sched.submit(p, think_budget=thinks[i], answer_budget=answers[i], max_think_tokens=caps[i],
                             max_answer_tokens=max_answer_tokens,
                             seed=seeds[i] + (0 if isinstance(seed, (list, tuple)) else i) if sampling == "sample"
                             else 0, name=f"prompts[{i}]", where="generate")
                for i, p in enumerate(prompts)]
    was_training = model.training
    model.eval()
    try:
        sched.run()
    finally:
        model.train(was_training)
    return [r.result() for r in requests]
