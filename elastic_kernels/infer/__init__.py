"""Elastic budget control at inference (issue 7; DESIGN §1).

- :func:`generate`: phase-switched generation (think budget until the end-of-thinking token, then
  the answer budget), batched with per-request budgets, phases and thinking caps.
- :mod:`.evaluate`: accuracy and latency (wall time and a FLOPs/bytes cost model) of every
  (think, answer) budget pair and of single-model thinking-token caps; the Pareto frontier.
- :mod:`.report`: the JSON/PNG/Markdown report and :func:`budget_control_markdown`, the table the
  training report includes.
- CLI: ``elastic-eval RUN_DIR`` / ``python -m elastic_kernels.infer RUN_DIR``.
"""
from .evaluate import (COST_AXES, CostModel, Setting, analyze, build_settings, default_caps, evaluate_settings,
                       pareto_frontier)
from .generate import (CACHE_MODES, FULL, SAMPLING, EmptyPromptError, Generation, GenerationError,
                       PromptTooLongError, UnknownBudgetError, generate, resolve_budget)
from .report import (RunDirError, budget_control_markdown, plot_budget_control, run_budget_control,
                     write_budget_control)

__all__ = ["generate", "Generation", "GenerationError", "UnknownBudgetError", "EmptyPromptError",
           "PromptTooLongError", "resolve_budget", "FULL", "SAMPLING", "CACHE_MODES",
           "Setting", "CostModel", "build_settings", "evaluate_settings", "pareto_frontier", "analyze",
           "default_caps", "COST_AXES",
           "run_budget_control", "write_budget_control", "budget_control_markdown", "plot_budget_control",
           "RunDirError"]
