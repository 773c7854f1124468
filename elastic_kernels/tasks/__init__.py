"""Tasks behind one interface (:class:`Task`, docs/design.md §2), used by training and inference.

``get(name, **kwargs)`` builds a registered task; ``from_dict(task.to_dict())`` rebuilds the one a
run saved. Registered: ``"arithmetic"`` (:class:`ArithmeticTask`, modular arithmetic with a
thinking trace), ``"fused"`` (:class:`FusedAnswerTask`, the same chain with a hard one-token answer
step — a computed function or the recall of a Zipf-weighted fact table — and training traces cut at random
thinking caps), ``"recall"`` (:class:`RecallTask`, the fused task with table recall as its defaults),
``"jsonl"`` (:class:`JsonlTask`, prompt /
thinking / answer text records tokenized with a Hugging Face tokenizer). A new task subclasses :class:`Task` and calls :func:`register`.
"""
from __future__ import annotations

from typing import Any

from .arithmetic import DIFFICULTY_OPS, ArithmeticTask, Problem
from .base import SPLITS, Batch, Task, Tokenizer
from .fused import FUSED_OPS, FusedAnswerTask, FusedProblem, RecallTask
from .jsonl import JsonlTask, TextRecord

__all__ = ["Task", "Tokenizer", "Batch", "SPLITS", "ArithmeticTask", "Problem", "DIFFICULTY_OPS", "FusedAnswerTask",
           "FusedProblem", "RecallTask", "FUSED_OPS", "JsonlTask", "TextRecord", "get",
           "from_dict", "register", "names"]

_REGISTRY: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Register a :class:`Task` subclass under its ``name`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"tasks.register: expected a Task subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"tasks.register: {cls.__name__} needs a non-empty string `name`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"tasks.register: the name {name!r} is already taken by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def names() -> tuple[str, ...]:
    """The registered task names."""
    return tuple(sorted(_REGISTRY))


def get(name: str, **kwargs: Any) -> Task:
    """The registered task ``name`` built with ``kwargs``."""
    if name not in _REGISTRY:
        raise ValueError(f"tasks.get: unknown task {name!r}; known: {list(names())}")
    return _REGISTRY[name](**kwargs)


def from_dict(spec: dict[str, Any]) -> Task:
    """Rebuild a task from :meth:`Task.to_dict` (``{"name": ..., **kwargs}``)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"tasks.from_dict: expected a dict with a 'name' entry, got {spec!r}")
    kwargs = dict(spec)
    return get(kwargs.pop("name"), **kwargs)


register(ArithmeticTask)
register(FusedAnswerTask)
register(RecallTask)
register(JsonlTask)
