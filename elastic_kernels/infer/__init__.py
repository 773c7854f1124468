"""Elastic budget control at inference (docs/design.md §1).

- :class:`Scheduler`: the one decode loop — continuous batching of requests with their own
  budgets, phases and prompt lengths in one ragged batch (submit, step, stream, cancel).
- :func:`generate`: its synchronous face — phase-switched generation (think budget until the
  end-of-thinking token, then the answer budget), batched with per-request budgets, phases and
  thinking caps.
- :mod:`.evaluate`: accuracy and latency (wall time and a FLOPs/bytes cost model) of every
  (think, answer) budget pair and of single-model thinking-token caps; the Pareto frontier.
- :mod:`.latency`: measured batch-1 latency of physically sliced submodels; :mod:`.stats`: Wilson
  intervals, exact McNemar, paired bootstrap; :mod:`.claims`: the budget-control questions with them.
- :mod:`.report`: the JSON/PNG/Markdown report and :func:`budget_control_markdown`, the table the
  training report includes.
- CLI: ``elastic-eval --run-dir X`` / ``python -m elastic_kernels.infer --run-dir X``.

Names load on first use (so the CLI parses its arguments before torch is imported).
"""
from __future__ import annotations

import importlib
import sys
import types

_EXPORTS = {
    ".cost": ("CostModel",),
    ".evaluate": ("COST_AXES", "Setting", "analyze", "build_settings", "default_caps",
                  "evaluate_settings", "pareto_frontier"),
    ".generate": ("CACHE_MODES", "FULL", "SAMPLING", "EmptyPromptError", "Generation", "GenerationError",
                  "PromptTooLongError", "UnknownBudgetError", "generate", "resolve_budget"),
    ".scheduler": ("Request", "Scheduler", "TokenEvent"),
    ".report": ("RunDirError", "budget_control_markdown", "plot_budget_control", "run_budget_control",
                "write_budget_control"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Face(types.ModuleType):
    """Keeps ``infer.generate`` the function: importing the submodule ``infer/generate.py`` would
    otherwise bind the package attribute to the module (as an eager ``from .generate import
    generate`` here used to overwrite it)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Face
