"""JSONL metrics: one JSON object per line, flushed as written, truncatable on resume."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .._io import atomic_write_text

__all__ = ["MetricsLog", "read_metrics"]


class MetricsLog:
    """Append-only JSONL log. Every record carries ``stage`` and ``step``.

    Wall-clock fields are kept under the ``time`` key so deterministic comparisons can drop them.
    """

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()

    def truncate_after(self, keep) -> None:
        """Keep only records for which ``keep(record)`` is true (used when resuming)."""
        if not self.enabled or not self.path.exists():
            return
        records = read_metrics(self.path)
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records if keep(r)))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    # a line cut short by a hard kill: everything after it is lost too
                    break
    return out
