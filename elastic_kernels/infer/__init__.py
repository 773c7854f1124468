"""Elastic budget control at inference (issue 7; DESIGN §1).

- :func:`generate`: phase-switched generation (think budget until the end-of-thinking token, then
  the answer budget), batched with per-request budgets, phases and thinking caps.
- :mod:`.evaluate`: accuracy and latency (wall time and a FLOPs/bytes cost model) of every
  (think, answer) budget pair and of single-model thinking-token caps; the Pareto frontier.
- :mod:`.report`: the JSON/PNG/Markdown report and :func:`budget_control_markdown`, the table the
  training report includes.
- CLI: ``elastic-eval RUN_DIR`` / ``python -m elastic_kernels.infer RUN_DIR``.
"""
from .generate import (CACHE_MODES, FULL, SAMPLING, EmptyPromptError, Generation, GenerationError,
                       PromptTooLongError, UnknownBudgetError, generate, resolve_budget)

__all__ = ["generate", "Generation", "GenerationError", "UnknownBudgetError", "EmptyPromptError",
           "PromptTooLongError", "resolve_budget", "FULL", "SAMPLING", "CACHE_MODES"]
