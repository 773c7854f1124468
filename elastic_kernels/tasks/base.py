"""The Task interface shared by training (:mod:`elastic_kernels.train`) and inference
(:mod:`elastic_kernels.infer`): tokenizer, special token ids, problems per disjoint split,
batches, prompts, scoring, length bounds and a serializable spec (docs/design.md §2).

A *problem* is whatever object a task uses for one example; the interface only asks a task to
turn it into prompt ids (everything the model is given, ending with the think-start token) and
completion ids (the target: thinking trace, end-of-thinking token, answer, end-of-sequence), and
to score a generated completion against it. Everything else here (padding, batching, loss masks)
is written once on top of those two.
"""
from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol, Sequence

import torch

__all__ = ["Task", "Tokenizer", "Batch", "SPLITS", "hash_split", "draw_split"]

SPLITS = ("train", "val", "test")


def hash_split(text: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split of a problem whose identity is ``text``: a keyed BLAKE2b hash bucket, a pure
    function of ``(text, seed)``, so splits never overlap."""
    h = hashlib.blake2b(text.encode(), digest_size=8, key=f"split-{seed}".encode()).digest()
    u = int.from_bytes(h, "little") / 2.0 ** 64
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def draw_split(owner: str, rng: random.Random, n: int, split: str, make: Callable[[random.Random], Any],
               split_of: Callable[[Any], str]) -> list:
    """``n`` problems drawn with ``make(rng)`` that fall into ``split``; raises a RuntimeError
    naming ``owner`` when the split is (nearly) empty of problems."""
    out: list = []
    attempts = 0
    while len(out) < n:
        p = make(rng)
        attempts += 1
        if split_of(p) == split:
            out.append(p)
        elif attempts > 1000 * (n + 10):
            raise RuntimeError(f"{owner}: could not draw {n} problems of split {split!r}; "
                               "the problem space is too small for this split fraction")
    return out


class Tokenizer(Protocol):
    """What a task's tokenizer offers: ``encode(text) -> ids``, ``decode(ids) -> text``,
    ``vocab_size``."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class Batch:
    """A padded batch of ``prompt + completion`` sequences for next-token training.

    input_ids: (batch, seqlen) long — tokens ``0..L-2`` of each padded sequence
    targets: (batch, seqlen) long — tokens ``1..L-1``
    loss_mask: (batch, seqlen) float — 1 where the target is a completion token
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor


class Task(ABC):
    """A generated (or loaded) reasoning task.

    Subclasses set ``name`` (the registry key of :func:`elastic_kernels.tasks.get`), a
    ``tokenizer`` and the five special ids, and implement the abstract methods. Splits never
    overlap, and ``problems(split, n, seed=s)`` is a pure function of the task's spec and its
    arguments, so a resumed training run sees exactly the batches of an uninterrupted one.
    """

    name: ClassVar[str]
    tokenizer: Tokenizer
    pad_id: int
    bos_id: int
    eos_id: int
    think_id: int
    end_think_id: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # ---- what every task implements -----------------------------------------------------------
    @abstractmethod
    def problems(self, split: str, n: int, *, seed: int, difficulty: int | None = None) -> list:
        """``n`` problems of ``split`` (one of :data:`SPLITS`), a pure function of the task spec,
        ``split``, ``seed`` and ``difficulty`` (None: the task's own; a task without levels accepts
        only None)."""

    @abstractmethod
    def prompt_ids(self, problem) -> list[int]:
        """Token ids the model is given (they end with ``think_id``)."""

    @abstractmethod
    def completion_ids(self, problem) -> list[int]:
        """Token ids of the reference completion (thinking, ``end_think_id``, answer, ``eos_id``)."""

    @abstractmethod
    def score(self, problem, completion: Sequence[int]) -> bool:
        """Whether a generated completion (ids after the prompt) states the right answer."""

    def answer_ids(self, completion: Sequence[int]) -> list[int] | None:
        """The ids a generated completion gives as its answer: after ``end_think_id``, up to
        ``eos_id`` (or the end); None when the completion never ends its thinking."""
        ids = list(completion)
        if self.end_think_id not in ids:
            return None
        rest = ids[ids.index(self.end_think_id) + 1:]
        return rest[:rest.index(self.eos_id)] if self.eos_id in rest else rest

    @abstractmethod
    def max_think_len(self, difficulty: int | None = None) -> int:
        """An upper bound on the thinking-trace tokens of a reference completion (``</think>``
        excluded) at ``difficulty``."""

    @abstractmethod
    def max_answer_len(self) -> int:
        """An upper bound on the answer tokens after ``</think>`` (``<eos>`` included)."""

    @abstractmethod
    def max_new_tokens(self, problems: Sequence) -> int:
        """Room to generate for ``problems``: their longest reference completion and some slack."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **kwargs}``: :func:`elastic_kernels.tasks.from_dict` rebuilds the task."""

    @abstractmethod
    def describe(self) -> str:
        """One line for reports."""

    # ---- written once on top of the above -----------------------------------------------------
    def max_completion_len(self, difficulty: int | None = None) -> int:
        """An upper bound on the completion tokens at ``difficulty``."""
        return self.max_think_len(difficulty) + 1 + self.max_answer_len()

    def prompts(self, problems: Sequence) -> list[list[int]]:
        return [self.prompt_ids(p) for p in problems]

    def collate(self, problems: Sequence) -> Batch:
        """Right-padded ``prompt + completion`` of every problem; the loss covers the completion."""
        if not problems:
            raise ValueError(f"{type(self).__name__}.collate: problems must not be empty")
        seqs, prompt_lens = [], []
        for p in problems:
            prompt = self.prompt_ids(p)
            seqs.append(prompt + self.completion_ids(p))
            prompt_lens.append(len(prompt))
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), length - 1)
        for i, (s, pl) in enumerate(zip(seqs, prompt_lens)):
            ids[i, :len(s)] = torch.tensor(s)
            # target position j predicts token j+1; completion tokens are pl..len(s)-1
            mask[i, pl - 1:len(s) - 1] = 1.0
        return Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), mask)

    def batch(self, split: str, batch_size: int, *, index: int, difficulty: int | None = None) -> Batch:
        """Batch number ``index`` of ``split`` (deterministic)."""
        return self.collate(self.problems(split, batch_size, seed=index, difficulty=difficulty))

    def accuracy(self, problems: Sequence, completions: Sequence[Sequence[int]]) -> float:
        """Fraction of ``completions`` that :meth:`score` accepts (0 for no problems)."""
        if not problems:
            return 0.0
        return sum(self.score(p, c) for p, c in zip(problems, completions)) / len(problems)
