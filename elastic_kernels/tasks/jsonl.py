"""The text task ``"jsonl"``: prompt / thinking / answer records, tokenized with a parent's tokenizer.

Each line of the file is a JSON object with string fields ``prompt``, ``thinking`` and ``answer``.
A record becomes::

    <bos> prompt <think> thinking </think> answer <eos>

with the tokenizer of a Hugging Face directory (its ``tokenizer.json``, read with the
``tokenizers`` library). The special tokens are looked up by text: ``bos``/``eos``/``pad`` from
``tokenizer_config.json`` (``bos_token``, ...) or ``config.json`` (``bos_token_id``, ...), and
``<think>`` / ``</think>`` (names configurable) in the vocabulary. The prompt is everything up
to and including ``<think>``; a generated completion scores when the text between ``</think>``
and ``<eos>`` equals the answer (whitespace stripped).

Splits never overlap: a record's split is a pure function of its text (a keyed BLAKE2b hash
bucket), and ``problems(split, n, seed=s)`` draws from that split with a generator seeded by
``(task seed, split, s)`` (with replacement when ``n`` exceeds the split), so resumed runs see the
same batches (docs/design.md §2).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .base import SPLITS, Task

__all__ = ["JsonlTask", "TextRecord", "HFTokenizer"]

FIELDS = ("prompt", "thinking", "answer")


@dataclass(frozen=True)
class TextRecord:
    """One record: its three texts and their token ids."""

    prompt: str
    thinking: str
    answer: str
    prompt_ids: tuple[int, ...]
    thinking_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]


class HFTokenizer:
    """The :class:`~elastic_kernels.tasks.Tokenizer` of a Hugging Face directory's
    ``tokenizer.json`` (``encode`` adds no special tokens)."""

    def __init__(self, directory: str | Path) -> None:
        from tokenizers import Tokenizer as _Tok
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"HFTokenizer: {path} does not exist")
        self.directory = str(directory)
        self._tok = _Tok.from_file(str(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _special_ids(tok: HFTokenizer, directory: Path) -> dict[str, int | None]:
    cfg = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = directory / name
        if p.is_file():
            cfg.update(json.loads(p.read_text()))
    model_cfg = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    out = {}
    for role in ("bos", "eos", "pad"):
        text = cfg.get(f"{role}_token")
        text = text.get("content") if isinstance(text, dict) else text
        tid = tok.token_id(text) if isinstance(text, str) else None
        out[role] = tid if tid is not None else model_cfg.get(f"{role}_token_id")
    return out


class JsonlTask(Task):
    """Prompt / thinking / answer records of a JSONL file (see the module docstring).

    Args:
        path: the JSONL file. tokenizer: a Hugging Face directory holding ``tokenizer.json``.
        seed: seed of the split hashing and sampling. val_fraction, test_fraction: split shares.
        think_token, end_think_token: texts of the thinking delimiters in the vocabulary.
        max_len: records whose full sequence is longer are dropped (0: keep all).
    """

    name = "jsonl"

    def __init__(self, path: str, tokenizer: str, *, seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, think_token: str = "<think>", end_think_token: str = "</think>",
                 max_len: int = 0) -> None:
        if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
            raise ValueError(f"JsonlTask: val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be "
                             f">= 0 with a sum below 1")
        self.path, self.tokenizer_dir, self.seed = str(path), str(tokenizer), int(seed)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.think_token, self.end_think_token, self.max_len = think_token, end_think_token, int(max_len)
        self.tokenizer = HFTokenizer(tokenizer)
        ids = _special_ids(self.tokenizer, Path(tokenizer))
        ids["think"] = self.tokenizer.token_id(think_token)
        ids["end_think"] = self.tokenizer.token_id(end_think_token)
        fields = {"think": "think_token", "end_think": "end_think_token"}
        for role, tid in ids.items():
            if tid is None:
                raise ValueError(f"JsonlTask: the tokenizer in {tokenizer} has no {role} token "
                                 f"({fields.get(role, role + '_token')})")
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        self.think_id, self.end_think_id = ids["think"], ids["end_think"]
        self._splits: dict[str, list[TextRecord]] = {s: [] for s in SPLITS}
        for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"JsonlTask: {path}:{lineno} is not valid JSON ({e})") from None
            if not isinstance(obj, dict) or any(not isinstance(obj.get(f), str) for f in FIELDS):
                raise ValueError(f"JsonlTask: {path}:{lineno} must be an object with string fields {FIELDS}")
            enc = self.tokenizer.encode
            rec = TextRecord(obj["prompt"], obj["thinking"], obj["answer"], tuple(enc(obj["prompt"])),
                             tuple(enc(obj["thinking"])), tuple(enc(obj["answer"])))
            if self.max_len and len(self.prompt_ids(rec)) + len(self.completion_ids(rec)) > self.max_len:
                continue
            self._splits[self.split_of(rec)].append(rec)
        for split, recs in self._splits.items():
            if not recs:
                raise ValueError(f"JsonlTask: {path} gives no records for the {split!r} split "
                                 f"({sum(map(len, self._splits.values()))} records in all)")

    def split_of(self, rec: TextRecord) -> str:
        """A record's split: a pure function of its text and the task seed."""
        h = hashlib.blake2b(json.dumps([rec.prompt, rec.thinking, rec.answer]).encode(), digest_size=8,
                            key=f"split-{self.seed}".encode()).digest()
        u = int.from_bytes(h, "little") / 2 ** 64
        return "val" if u < self.val_fraction else "test" if u < self.val_fraction + self.test_fraction else "train"

    def problems(self, split: str, n: int, *, seed: int, difficulty: int | None = None) -> list[TextRecord]:
        if split not in SPLITS:
            raise ValueError(f"JsonlTask.problems: split must be one of {SPLITS}, got {split!r}")
        if difficulty is not None:
            raise ValueError(f"JsonlTask.problems: the task has no difficulty levels, got difficulty={difficulty!r}")
        recs = self._splits[split]
        rng = random.Random(f"{self.seed}/{split}/{seed}")
        if n <= len(recs):
            return rng.sample(recs, n)
        return [rng.choice(recs) for _ in range(n)]

    def prompt_ids(self, problem: TextRecord) -> list[int]:
        return [self.bos_id, *problem.prompt_ids, self.think_id]

    def completion_ids(self, problem: TextRecord) -> list[int]:
        return [*problem.thinking_ids, self.end_think_id, *problem.answer_ids, self.eos_id]

    def score(self, problem: TextRecord, completion: Sequence[int]) -> bool:
        ans = self.answer_ids(completion)
        return ans is not None and self.tokenizer.decode(ans).strip() == problem.answer.strip()

    def _all(self) -> list[TextRecord]:
        return [r for recs in self._splits.values() for r in recs]

    def max_think_len(self, difficulty: int | None = None) -> int:
        return max(len(r.thinking_ids) for r in self._all())

    def max_answer_len(self) -> int:
        return max(len(r.answer_ids) for r in self._all()) + 1

    def max_new_tokens(self, problems: Sequence[TextRecord]) -> int:
        return max((len(self.completion_ids(p)) for p in problems), default=0) + 4

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "tokenizer": self.tokenizer_dir, "seed": self.seed,
                "val_fraction": self.val_fraction, "test_fraction": self.test_fraction,
                "think_token": self.think_token, "end_think_token": self.end_think_token, "max_len": self.max_len}

    def describe(self) -> str:
        n = {s: len(r) for s, r in self._splits.items()}
        return f"text records of {Path(self.path).name} ({n['train']}/{n['val']}/{n['test']} train/val/test)"
