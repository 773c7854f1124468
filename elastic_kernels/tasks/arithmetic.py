"""The self-generated reasoning task ``"arithmetic"``: multi-step modular arithmetic with a thinking trace.

A problem is a chain ``a0 op1 a1 op2 a2 ...`` of numbers in ``[0, modulus)`` evaluated left to right
modulo ``modulus``. The model sees the problem and a think-start token, writes every intermediate
step in its thinking trace, closes it with the think-end token, then writes the final value::

    <bos>3+5*2-4=<think>3+5=8;8*2=6;6-4=2</think>2<eos>

The answer depends on the trace: each step consumes the previous step's result, so a model that
skips or garbles a step gets the answer wrong. Prompt = everything up to and including
``<think>``; loss and exact-match accuracy cover the thinking trace, the answer and ``<eos>``.

Splits never overlap: a problem's split is a pure function of its text (a keyed BLAKE2b hash
bucket), and generators only emit problems that hash into the requested split. Batches are a pure
function of ``(seed, split, index)``, so a resumed run sees exactly the batches an uninterrupted
run would have seen.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from .base import SPLITS, Task, draw_split, hash_split

__all__ = ["Tokenizer", "Problem", "DIFFICULTY_OPS", "ArithmeticTask"]

# difficulty level -> (min ops, max ops) per problem; sequence length grows with the level
DIFFICULTY_OPS = {1: (1, 2), 2: (1, 3), 3: (2, 4), 4: (3, 6), 5: (4, 8)}


class Tokenizer:
    """Character tokenizer with special tokens.

    Ids: ``0 <pad>``, ``1 <bos>``, ``2 <eos>``, ``3 <think>``, ``4 </think>``, then one id per
    character of ``0123456789+-*=;``.
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<think>", "</think>")
    CHARS = "0123456789+-*=;"

    # texts are short and repeat (prompts, answer tails): encode each distinct one once
    MEMO_SIZE = 1 << 16

    def __init__(self) -> None:
        self.itos = list(self.SPECIALS) + list(self.CHARS)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.think_id, self.end_think_id = range(5)
        self._memo: dict[str, tuple[int, ...]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Encode text; special tokens are written literally (``<think>``)."""
        hit = self._memo.get(text)
        if hit is None:
            hit = tuple(self._encode(text))
            if len(self._memo) < self.MEMO_SIZE:
                self._memo[text] = hit
        return list(hit)

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        i = 0
        while i < len(text):
            if text[i] == "<":
                end = text.find(">", i)
                tok = text[i:end + 1] if end >= 0 else ""
                if tok not in self.stoi:
                    raise ValueError(f"Tokenizer.encode: unknown special token at position {i} in {text!r}")
                ids.append(self.stoi[tok])
                i = end + 1
                continue
            if text[i] not in self.stoi:
                raise ValueError(f"Tokenizer.encode: character {text[i]!r} is not in the vocabulary")
            ids.append(self.stoi[text[i]])
            i += 1
        return ids

    def decode(self, ids: Sequence[int], *, skip_pad: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.itos):
                raise ValueError(f"Tokenizer.decode: id {i} is outside [0, {len(self.itos)})")
            if skip_pad and i == self.pad_id:
                continue
            out.append(self.itos[i])
        return "".join(out)


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]
    ops: tuple[str, ...]
    modulus: int

    @property
    def question(self) -> str:
        s = str(self.operands[0])
        for op, b in zip(self.ops, self.operands[1:]):
            s += op + str(b)
        return s

    def steps(self) -> list[tuple[int, str, int, int]]:
        """``(lhs, op, rhs, result)`` for every step of the left-to-right evaluation."""
        acc = self.operands[0]
        out = []
        for op, b in zip(self.ops, self.operands[1:]):
            if op == "+":
                r = (acc + b) % self.modulus
            elif op == "-":
                r = (acc - b) % self.modulus
            else:
                r = (acc * b) % self.modulus
            out.append((acc, op, b, r))
            acc = r
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]

    @property
    def thinking(self) -> str:
        return ";".join(f"{a}{op}{b}={r}" for a, op, b, r in self.steps())

    @property
    def prompt_text(self) -> str:
        return f"<bos>{self.question}=<think>"

    @property
    def completion_text(self) -> str:
        return f"{self.thinking}</think>{self.answer}<eos>"

    @property
    def text(self) -> str:
        return self.prompt_text + self.completion_text


class ArithmeticTask(Task):
    """Generator of problems, batches and evaluation sets for one task configuration."""

    name = "arithmetic"

    def __init__(self, *, modulus: int = 10, difficulty: int = 2, seed: int = 0,
                 val_fraction: float = 0.05, test_fraction: float = 0.05) -> None:
        if not isinstance(modulus, int) or modulus < 2:
            raise ValueError(f"ArithmeticTask: modulus must be an int >= 2, got {modulus!r}")
        if difficulty not in DIFFICULTY_OPS:
            raise ValueError(f"ArithmeticTask: difficulty must be one of {tuple(DIFFICULTY_OPS)}, got {difficulty!r}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError("ArithmeticTask: val_fraction and test_fraction must be in (0, 1) "
                             f"with a sum below 1, got {val_fraction} and {test_fraction}")
        self.modulus = modulus
        self.difficulty = difficulty
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.tokenizer = Tokenizer()
        tok = self.tokenizer
        self.pad_id, self.bos_id, self.eos_id = tok.pad_id, tok.bos_id, tok.eos_id
        self.think_id, self.end_think_id = tok.think_id, tok.end_think_id

    def to_dict(self) -> dict:
        return {"name": self.name, "modulus": self.modulus, "difficulty": self.difficulty, "seed": self.seed,
                "val_fraction": self.val_fraction, "test_fraction": self.test_fraction}

    def describe(self) -> str:
        return (f"left-to-right arithmetic mod {self.modulus}, difficulty {self.difficulty}, with a thinking "
                "trace of every intermediate result")

    # ---- splits -------------------------------------------------------------------------------
    def split_of(self, problem: Problem) -> str:
        """The split a problem belongs to: a pure function of its text (and the task seed)."""
        return hash_split(problem.question, self.seed, self.val_fraction, self.test_fraction)

    def _random_problem(self, rng: random.Random, difficulty: int) -> Problem:
        lo, hi = DIFFICULTY_OPS[difficulty]
        n = rng.randint(lo, hi)
        operands = tuple(rng.randrange(self.modulus) for _ in range(n + 1))
        ops = tuple(rng.choice("+-*") for _ in range(n))
        return Problem(operands, ops, self.modulus)

    def problems(self, split: str, n: int, *, seed: int, difficulty: int | None = None) -> list[Problem]:
        """``n`` problems of ``split``, a pure function of ``(task seed, split, seed, difficulty)``."""
        if split not in SPLITS:
            raise ValueError(f"ArithmeticTask.problems: split must be one of {SPLITS}, got {split!r}")
        difficulty = self.difficulty if difficulty is None else difficulty
        if difficulty not in DIFFICULTY_OPS:
            raise ValueError(f"ArithmeticTask.problems: difficulty must be one of {tuple(DIFFICULTY_OPS)}, "
                             f"got {difficulty!r}")
        rng = random.Random(f"{self.seed}/{split}/{seed}/{difficulty}")
        return draw_split("ArithmeticTask", rng, n, split, lambda r: self._random_problem(r, difficulty),
                          self.split_of)

    # ---- ids and scoring ---------------------------------------------------------------------
    def prompt_ids(self, problem: Problem) -> list[int]:
        return self.tokenizer.encode(problem.prompt_text)

    def completion_ids(self, problem: Problem) -> list[int]:
        return self.tokenizer.encode(problem.completion_text)

    def score(self, problem: Problem, completion: Sequence[int]) -> bool:
        return self.parse_answer(completion) == problem.answer

    def parse_answer(self, completion_ids: Sequence[int]) -> int | None:
        """The answer a generated completion states (text between ``</think>`` and ``<eos>``)."""
        rest = self.answer_ids(completion_ids)
        text = None if rest is None else self.tokenizer.decode(rest)
        return int(text) if text is not None and text.isdigit() else None

    def completion_bound(self, num_ops: int) -> int:
        """An upper bound on the completion length in tokens of a problem with ``num_ops`` operations."""
        w = len(str(self.modulus - 1))
        return num_ops * (3 * w + 3) + w + 2

    def _level(self, difficulty: int | None) -> int:
        difficulty = self.difficulty if difficulty is None else difficulty
        if difficulty not in DIFFICULTY_OPS:
            raise ValueError(f"ArithmeticTask: difficulty must be one of {tuple(DIFFICULTY_OPS)}, got {difficulty!r}")
        return difficulty

    def max_completion_len(self, difficulty: int | None = None) -> int:
        """An upper bound on the completion length in tokens at ``difficulty``."""
        return self.completion_bound(DIFFICULTY_OPS[self._level(difficulty)][1])

    def max_think_len(self, difficulty: int | None = None) -> int:
        """The longest thinking trace at ``difficulty``: every step ``a op b = r`` and the ``;`` between."""
        w = len(str(self.modulus - 1))
        return DIFFICULTY_OPS[self._level(difficulty)][1] * (3 * w + 3) - 1

    def max_answer_len(self) -> int:
        """The answer's digits and ``<eos>``."""
        return len(str(self.modulus - 1)) + 1

    def max_new_tokens(self, problems: Sequence[Problem]) -> int:
        """Room for the longest correct completion of ``problems`` plus slack for a model that rambles."""
        return self.completion_bound(max((len(p.ops) for p in problems), default=0)) + 4
