"""Fused-answer chain arithmetic: a generated task where budgets, thinking and answering separate.

A problem is a left-to-right chain ``a0 op1 a1 op2 a2 ...`` modulo ``m`` plus two *answer keys*
``f, g`` in the prompt. The thinking trace writes every intermediate step of the chain, exactly
as in the plain arithmetic task, and (``keys_in_trace``, the default) ends by restating the keys;
the answer is *not* the trace's last value ``r`` but one harder three-input function of it,
computed in the answer phase without a trace::

    <bos>3+5*2|7,4=<think>3+5=8;8*2=6|7,4</think>6<eos>        (6 = (6 * 7 + 4) mod 10)

With the keys restated next to ``r`` the answer step is local (its three inputs are the five
tokens before ``</think>``), so what limits it is the capacity to compute the ``m**3``-case
function, not retrieval over a long trace (with ``keys_in_trace=False`` the keys stay only in the
prompt, and the answer step must also fetch them).

**Table recall** (``answer="table"``, the default preset's choice): the answer is instead
``T[f,g][r]``, the entry ``r`` of a fixed random permutation of ``[0, m)`` that belongs to the key
pair ``(f, g)`` (one table per task seed). Nothing about it can be computed; it is knowledge stored in
the weights, ``m**3`` facts (``recall_inputs=2``: ``T[f,g][p,r]`` of the last two chain values,
``m**4`` facts). With ``key_zipf = s > 0`` the key pairs are drawn with probability
``1 / rank**s`` (a seeded random rank order, the same in every split), so a model recalls the frequent
pairs first and holds more of the rare ones the more capacity and training it has: accuracy grows
smoothly with both instead of jumping when one algorithm is learned. ``ops`` restricts the chain's
operations (``"+"``: the trace is learned early and reliably, leaving the answer step as what
separates models).

The premise the task encodes (and which the reports state): **the thinking phase is a long,
step-by-step computation whose steps are easy; the answer phase is one short, hard step.** So

- accuracy falls with the model's capacity without saturating (the fused step ``(r*f + g) mod m``
  is a function of ``m**3`` cases computed in one token, learned better by larger models);
- thinking helps: a trace cut short (``max_think_tokens``) leaves the rest of the chain to the
  answer step, which rarely gets it right;
- the answer phase needs capacity, so (think small, answer big) and (think big, answer small)
  differ.

**Graded thinking caps the model was trained for.** A share ``truncate_prob`` of training
problems has its trace cut after a uniformly drawn number of tokens ``t`` in ``[0, len(trace))``
and closed with a *forced* ``</think>`` — exactly what a thinking cap does at inference. The
forced ``</think>`` is an input, not a target (it is masked out of the loss), so the model never
learns to stop early by itself; the answer after a cut trace is still the true answer. Capping the
thinking is therefore a fair baseline: the model has seen every cap.

Splits never overlap: a problem's split is a pure function of its question text (a keyed BLAKE2b
hash bucket), and generators only emit problems that hash into the requested split. Batches are a
pure function of ``(seed, split, index)``.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .arithmetic import Tokenizer
from .base import SPLITS, Batch, Task, draw_split, hash_split

__all__ = ["FusedTokenizer", "FusedProblem", "FusedAnswerTask", "RecallTask", "FUSED_OPS", "ANSWERS"]

# difficulty level -> (min, max) chained operations per problem
FUSED_OPS = {1: (1, 2), 2: (1, 3), 3: (2, 4), 4: (3, 6), 5: (4, 8)}
# the answer step: "affine" computes (r*f + g) mod m, "table" recalls a fixed random table entry T[f,g][r]
ANSWERS = ("affine", "table")


class FusedTokenizer(Tokenizer):
    """The arithmetic task's character tokenizer with ``|`` and ``,`` added: ``0 <pad>``, ``1 <bos>``,
    ``2 <eos>``, ``3 <think>``, ``4 </think>``, then one id per character of ``0123456789+-*=;|,``."""

    CHARS = Tokenizer.CHARS + "|,"


@dataclass(frozen=True)
class FusedProblem:
    """One problem: the chain (``operands``, ``ops``), the answer keys ``f, g`` and the modulus.
    ``keys_in_trace``: the trace ends by restating the keys (``...;r|f,g``), so the answer step
    reads all three inputs next to it. ``table``: the answer table of the key pair ``(f, g)``:
    ``modulus`` entries (answer ``table[r]``) or ``modulus**2`` (answer ``table[p * modulus + r]``
    with ``p`` the chain value before ``r``, the first operand for a one-step chain); None: the
    affine answer ``(r*f + g) mod modulus``."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]
    f: int
    g: int
    modulus: int
    keys_in_trace: bool = False
    table: tuple[int, ...] | None = None

    @property
    def question(self) -> str:
        s = str(self.operands[0])
        for op, b in zip(self.ops, self.operands[1:]):
            s += op + str(b)
        return f"{s}|{self.f},{self.g}"

    def steps(self) -> list[tuple[int, str, int, int]]:
        """``(lhs, op, rhs, result)`` for every step of the left-to-right evaluation mod ``modulus``."""
        acc, m = self.operands[0], self.modulus
        out = []
        for op, b in zip(self.ops, self.operands[1:]):
            r = (acc + b) % m if op == "+" else (acc - b) % m if op == "-" else (acc * b) % m
            out.append((acc, op, b, r))
            acc = r
        return out

    @property
    def chain_value(self) -> int:
        """The trace's last value ``r``."""
        return self.steps()[-1][3]

    @property
    def answer(self) -> int:
        """``table[r]`` or ``table[p * modulus + r]`` with a table, else ``(r * f + g) mod modulus``."""
        if self.table is not None:
            values = [self.operands[0]] + [r for *_, r in self.steps()]
            index = values[-1] if len(self.table) == self.modulus else values[-2] * self.modulus + values[-1]
            return self.table[index]
        return (self.chain_value * self.f + self.g) % self.modulus

    @property
    def thinking(self) -> str:
        trace = ";".join(f"{a}{op}{b}={r}" for a, op, b, r in self.steps())
        return trace + (f"|{self.f},{self.g}" if self.keys_in_trace else "")

    @property
    def prompt_text(self) -> str:
        return f"<bos>{self.question}=<think>"

    @property
    def completion_text(self) -> str:
        return f"{self.thinking}</think>{self.answer}<eos>"

    @property
    def text(self) -> str:
        return self.prompt_text + self.completion_text


class FusedAnswerTask(Task):
    """Generator of fused-answer problems, training batches (with cut traces) and evaluation sets.

    modulus: numbers are in ``[0, modulus)``; difficulty: 1-5, the chain length range
    (:data:`FUSED_OPS`); truncate_prob: share of training problems whose trace is cut at a random
    token and closed with a forced ``</think>``; keys_in_trace: the trace ends by restating the
    keys (see the module docstring); answer: ``"affine"`` (``(r*f + g) mod modulus``) or
    ``"table"`` (recall ``T[f,g][r]``, :data:`ANSWERS`); key_zipf: Zipf exponent of the key pairs'
    frequencies (0 = uniform); recall_inputs: 1 (``T[f,g][r]``) or 2 (``T[f,g][p,r]``); ops: the
    chain's operations, distinct characters of ``"+-*"``.
    """

    name = "fused"

    def __init__(self, *, modulus: int = 10, difficulty: int = 2, seed: int = 0, truncate_prob: float = 0.25,
                 keys_in_trace: bool = True, answer: str = "affine", key_zipf: float = 0.0, recall_inputs: int = 1,
                 ops: str = "+-*", val_fraction: float = 0.05, test_fraction: float = 0.05) -> None:
        if isinstance(modulus, bool) or not isinstance(modulus, int) or not 2 <= modulus <= 10:
            raise ValueError(f"FusedAnswerTask: modulus must be an int in [2, 10] (one digit per number), "
                             f"got {modulus!r}")
        if difficulty not in FUSED_OPS:
            raise ValueError(f"FusedAnswerTask: difficulty must be one of {tuple(FUSED_OPS)}, got {difficulty!r}")
        if not 0 <= truncate_prob < 1:
            raise ValueError(f"FusedAnswerTask: truncate_prob must be in [0, 1), got {truncate_prob!r}")
        if answer not in ANSWERS:
            raise ValueError(f"FusedAnswerTask: answer must be one of {ANSWERS}, got {answer!r}")
        if isinstance(key_zipf, bool) or not isinstance(key_zipf, (int, float)) or not 0 <= key_zipf <= 4:
            raise ValueError(f"FusedAnswerTask: key_zipf must be a number in [0, 4], got {key_zipf!r}")
        if recall_inputs not in (1, 2) or isinstance(recall_inputs, bool):
            raise ValueError(f"FusedAnswerTask: recall_inputs must be 1 or 2, got {recall_inputs!r}")
        if not isinstance(ops, str) or not ops or set(ops) - set("+-*") or len(set(ops)) != len(ops):
            raise ValueError(f"FusedAnswerTask: ops must be distinct characters of '+-*', got {ops!r}")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError("FusedAnswerTask: val_fraction and test_fraction must be in (0, 1) with a sum below 1, "
                             f"got {val_fraction} and {test_fraction}")
        self.modulus, self.difficulty, self.seed = modulus, difficulty, seed
        self.truncate_prob = truncate_prob
        self.keys_in_trace = bool(keys_in_trace)
        self.answer, self.key_zipf, self.recall_inputs, self.ops = answer, float(key_zipf), recall_inputs, ops
        # key pairs (f, g) in a seeded random rank order, drawn with weight 1 / rank**key_zipf
        rng = random.Random(f"fused-keys/{seed}/{modulus}")
        self.keys = [(f, g) for f in range(modulus) for g in range(modulus)]
        rng.shuffle(self.keys)
        self.key_cum_weights = list(itertools.accumulate(1.0 / (rank + 1) ** self.key_zipf
                                                         for rank in range(len(self.keys))))
        # answer = tables[(f, g)][r] (or [p * modulus + r]): per key pair, recall_inputs == 1: a seeded random
        # permutation of [0, modulus); 2: modulus of them, one per value p of the chain before r
        self.tables: dict[tuple[int, int], tuple[int, ...]] = {}
        if answer == "table":
            for key in sorted(self.keys):
                rows = []
                for _ in range(modulus ** (recall_inputs - 1)):
                    perm = list(range(modulus))
                    rng.shuffle(perm)
                    rows += perm
                self.tables[key] = tuple(rows)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.tokenizer = FusedTokenizer()
        tok = self.tokenizer
        self.pad_id, self.bos_id, self.eos_id = tok.pad_id, tok.bos_id, tok.eos_id
        self.think_id, self.end_think_id = tok.think_id, tok.end_think_id

    def to_dict(self) -> dict:
        return {"name": self.name, "modulus": self.modulus, "difficulty": self.difficulty, "seed": self.seed,
                "truncate_prob": self.truncate_prob, "keys_in_trace": self.keys_in_trace, "answer": self.answer,
                "key_zipf": self.key_zipf, "recall_inputs": self.recall_inputs, "ops": self.ops,
                "val_fraction": self.val_fraction, "test_fraction": self.test_fraction}

    def key_share(self, rank: int) -> float:
        """The probability of the key pair of frequency rank ``rank`` (0 = most frequent)."""
        cum = self.key_cum_weights
        return (cum[rank] - (cum[rank - 1] if rank else 0.0)) / cum[-1]

    def describe(self) -> str:
        lo, hi = FUSED_OPS[self.difficulty]
        keys = "restated at the end of the trace" if self.keys_in_trace else "only in the prompt"
        ops = " ".join(self.ops)
        if self.answer == "table":
            n = len(self.keys)
            freq = ("uniform" if self.key_zipf == 0 else
                    f"Zipf-distributed with exponent {self.key_zipf:g}: the most frequent pair "
                    f"{100 * self.key_share(0):.1f}% of problems, the rarest {100 * self.key_share(n - 1):.2f}%")
            what = ("the trace's last value r" if self.recall_inputs == 1 else
                    "the trace's last two values p, r")
            idx = "r" if self.recall_inputs == 1 else "p,r"
            facts = n * self.modulus ** self.recall_inputs
            rule = (f"the answer T[f,g][{idx}] looks {what} up in a fixed random table of the key pair f, g "
                    f"({keys}; {n} pairs, {facts} facts, {freq}), in one token without a trace")
        else:
            rule = (f"the answer (r*f + g) mod {self.modulus} of the trace's last value r and two keys f, g ({keys}) "
                    "is computed in one token without a trace")
        return (f"fused-answer chain arithmetic mod {self.modulus} ({lo}-{hi} chained {ops} steps written in the "
                f"thinking trace; {rule}); {100 * self.truncate_prob:.0f}% of training traces cut at a random "
                "token with a forced </think>")

    def premise(self) -> str:
        """The premise the task encodes, one sentence for reports."""
        if self.answer == "table":
            return ("thinking is a long chain of easy steps written out token by token, the answer one step of "
                    "recall from knowledge stored in the weights (a fact table whose facts are seen with Zipfian "
                    "frequencies, so a model holds more of them the more capacity and training it has): model "
                    "capacity matters most in the answer phase, and a thinking trace cut short leaves the rest of "
                    "the chain to that one step")
        return ("thinking is a long chain of easy steps written out token by token, the answer one short hard "
                "step done in a single token without a trace: model capacity matters most in the answer phase, "
                "and a thinking trace cut short leaves the rest of the chain to that one step")

    # ---- splits -------------------------------------------------------------------------------
    def split_of(self, problem: FusedProblem) -> str:
        """The split of a problem: a pure function of its question text (and the task seed)."""
        return hash_split(problem.question, self.seed, self.val_fraction, self.test_fraction)

    def _random_problem(self, rng: random.Random, difficulty: int) -> FusedProblem:
        lo, hi = FUSED_OPS[difficulty]
        n = rng.randint(lo, hi)
        m = self.modulus
        operands = tuple(rng.randrange(m) for _ in range(n + 1))
        ops = tuple(rng.choice(self.ops) for _ in range(n))
        if self.key_zipf == 0:
            f, g = rng.randrange(m), rng.randrange(m)
        else:
            f, g = rng.choices(self.keys, cum_weights=self.key_cum_weights)[0]  # the draws of weights=, once summed
        return FusedProblem(operands, ops, f, g, m, self.keys_in_trace, self.tables.get((f, g)))

    def problems(self, split: str, n: int, *, seed: int, difficulty: int | None = None) -> list[FusedProblem]:
        """``n`` problems of ``split``, a pure function of ``(task seed, split, seed, difficulty)``.

        Problems may repeat within a draw (the space is finite); they never cross splits.
        """
        if split not in SPLITS:
            raise ValueError(f"FusedAnswerTask.problems: split must be one of {SPLITS}, got {split!r}")
        difficulty = self.difficulty if difficulty is None else difficulty
        if difficulty not in FUSED_OPS:
            raise ValueError(f"FusedAnswerTask.problems: difficulty must be one of {tuple(FUSED_OPS)}, "
                             f"got {difficulty!r}")
        rng = random.Random(f"fused/{self.seed}/{split}/{seed}/{difficulty}")
        return draw_split("FusedAnswerTask", rng, n, split, lambda r: self._random_problem(r, difficulty),
                          self.split_of)

    # ---- tensors ------------------------------------------------------------------------------
    def collate(self, problems: Sequence[FusedProblem], cuts: Sequence[int | None] | None = None) -> Batch:
        """Pad problems into a batch. ``cuts[i]`` (None: whole trace) keeps only the first
        ``cuts[i]`` trace tokens of problem i, followed by a forced ``</think>`` (not a target)."""
        tok = self.tokenizer
        cuts = [None] * len(problems) if cuts is None else list(cuts)
        if len(cuts) != len(problems):
            raise ValueError(f"FusedAnswerTask.collate: cuts needs one entry per problem ({len(problems)}), "
                             f"got {len(cuts)}")
        seqs, masks = [], []
        for p, cut in zip(problems, cuts):
            prompt = self.prompt_ids(p)
            trace = tok.encode(p.thinking)
            tail = tok.encode(f"</think>{p.answer}<eos>")
            if cut is not None:
                if not 0 <= cut < len(trace):
                    raise ValueError(f"FusedAnswerTask.collate: cut must be in [0, {len(trace)}) for "
                                     f"{p.question!r}, got {cut}")
                trace = trace[:cut]
            seq = prompt + trace + tail
            # mask over target positions j (predicting token j+1): completion tokens, except a forced </think>
            m = [0.0] * (len(prompt) - 1) + [1.0] * (len(trace) + len(tail))
            if cut is not None:
                m[len(prompt) - 1 + len(trace)] = 0.0
            seqs.append(seq)
            masks.append(m)
        length = max(len(s) for s in seqs)
        # padded on the host and made into tensors at once (one copy each, not one per row)
        ids = torch.tensor([s + [tok.pad_id] * (length - len(s)) for s in seqs], dtype=torch.long)
        mask = torch.tensor([m + [0.0] * (length - 1 - len(m)) for m in masks], dtype=torch.float32)
        return Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), mask)

    def batch(self, split: str, batch_size: int, *, index: int, difficulty: int | None = None) -> Batch:
        """Batch number ``index`` of ``split`` (deterministic). Training batches cut a share
        ``truncate_prob`` of their traces; validation and test batches never do."""
        probs = self.problems(split, batch_size, seed=index, difficulty=difficulty)
        cuts: list[int | None] = [None] * len(probs)
        if split == "train" and self.truncate_prob > 0:
            rng = random.Random(f"fused-cut/{self.seed}/{index}/{difficulty}")
            for i, p in enumerate(probs):
                if rng.random() < self.truncate_prob:
                    cuts[i] = rng.randrange(self.think_len(len(p.ops)))
        return self.collate(probs, cuts)

    # ---- ids and scoring ---------------------------------------------------------------------
    def prompt_ids(self, problem: FusedProblem) -> list[int]:
        return self.tokenizer.encode(problem.prompt_text)

    def completion_ids(self, problem: FusedProblem) -> list[int]:
        return self.tokenizer.encode(problem.completion_text)

    def score(self, problem: FusedProblem, completion: Sequence[int]) -> bool:
        return self.parse_answer(completion) == problem.answer

    def parse_answer(self, completion_ids: Sequence[int]) -> int | None:
        """The answer a generated completion states (text between ``</think>`` and ``<eos>``)."""
        rest = self.answer_ids(completion_ids)
        text = None if rest is None else self.tokenizer.decode(rest)
        return int(text) if text is not None and text.isdigit() else None

    # ---- length bounds -----------------------------------------------------------------------
    def think_len(self, num_ops: int) -> int:
        """Tokens of the trace of a ``num_ops``-step problem (``a op b = r`` per step, ``;`` between,
        ``|f,g`` at the end with ``keys_in_trace``)."""
        return 6 * num_ops - 1 + (4 if self.keys_in_trace else 0)

    def _level(self, difficulty: int | None) -> int:
        difficulty = self.difficulty if difficulty is None else difficulty
        if difficulty not in FUSED_OPS:
            raise ValueError(f"FusedAnswerTask: difficulty must be one of {tuple(FUSED_OPS)}, got {difficulty!r}")
        return difficulty

    def max_think_len(self, difficulty: int | None = None) -> int:
        return self.think_len(FUSED_OPS[self._level(difficulty)][1])

    def max_answer_len(self) -> int:
        """One digit and ``<eos>``."""
        return 2

    def max_new_tokens(self, problems: Sequence[FusedProblem]) -> int:
        """The longest reference completion of ``problems`` plus slack for a model that rambles."""
        return self.think_len(max((len(p.ops) for p in problems), default=1)) + 1 + self.max_answer_len() + 4


class RecallTask(FusedAnswerTask):
    """The fused task with table recall as its defaults (the default preset's task, ``"recall"``):
    ``answer="table"``, ``key_zipf=1.4``, ``ops="+"``; every other argument and every behaviour as
    :class:`FusedAnswerTask` (the same problems for the same arguments)."""

    name = "recall"

    def __init__(self, *, answer: str = "table", key_zipf: float = 1.4, ops: str = "+", **kwargs) -> None:
        super().__init__(answer=answer, key_zipf=key_zipf, ops=ops, **kwargs)
