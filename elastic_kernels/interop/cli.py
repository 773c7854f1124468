"""``elastic-export RUN_DIR --budget NAME --format hf|nested [--quantization nvfp4|fp8] OUT``:
one nested budget of a training run as a standalone checkpoint (docs/interop.md).

``--format hf`` writes a Hugging Face directory (NemotronH or Mamba2, :func:`.to_hf`) with the
run's tokenizer files (those of the parent or ``task_args.tokenizer``); ``--format nested``
writes one of our nested checkpoints holding only that submodel. ``--quantization`` stores the
weights as NVFP4 / FP8 (Model-Optimizer's layout for ``hf``; ours for ``nested``). Every bad
option value is a usage error (exit 2) before any work starts.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, NoReturn, Optional, Sequence

import tyro

from ..models import Budget, CheckpointError, load_nested, read_nested_config, save_nested
from .hf import export_nested, read_hf_config

__all__ = ["main", "ExportArgs"]
PROG = "elastic-export"
FULL = "full"


@dataclass
class ExportArgs:
    """Export one nested budget of an elastic-train run as a standalone checkpoint: a Hugging Face
    directory that transformers loads (--format hf) or a nested checkpoint (--format nested)."""

    run_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """run directory written by elastic-train"""
    out: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="OUT")]
    """output directory (must not exist or be empty)"""
    budget: str
    """budget name of the run's budget table (e.g. 0.5), or full"""
    format: Literal["hf", "nested"]
    """checkpoint format: hf (transformers directory) | nested (our nested checkpoint)"""
    quantization: Optional[Literal["nvfp4", "fp8"]] = None
    """quantized weights (Model-Optimizer's layout for hf)"""
    checkpoint: str = "nested"
    """nested checkpoint directory inside RUN_DIR (nested, or qad after --qad)"""
    architecture: Optional[Literal["nemotron_h", "mamba2"]] = None
    """Hugging Face architecture (default: mamba2 for an all-Mamba float32-residual model, else nemotron_h)"""


def _usage_exit(message: str) -> NoReturn:
    print(f"usage: {PROG} [-h] RUN_DIR OUT --budget NAME --format {{hf,nested}} [OPTIONS]\n{PROG}: error: {message}",
          file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: Sequence[str] | None = None) -> ExportArgs:
    """The checked arguments of a command line (exit status 2 naming the option for a bad one)."""
    a = tyro.cli(ExportArgs, args=list(sys.argv[1:] if argv is None else argv), prog=PROG)
    ckpt = Path(a.run_dir) / a.checkpoint
    if not (ckpt / "config.json").is_file():
        _usage_exit(f"RUN_DIR: {ckpt} is not a nested checkpoint directory (no config.json)")
    try:
        _, budgets = read_nested_config(ckpt)
    except CheckpointError as e:
        _usage_exit(f"RUN_DIR: {e}")
    if a.budget != FULL and a.budget not in budgets:
        _usage_exit(f"--budget: {a.budget!r} is not in the run's budget table {sorted(budgets)} (or {FULL!r})")
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        _usage_exit(f"OUT: {out} exists and is not an empty directory")
    return a


def _run_files(run_dir: Path) -> tuple[str | None, dict]:
    """The run's tokenizer directory and Hugging Face token-id fields of its parent (if any)."""
    prog = run_dir / "progress.json"
    if not prog.is_file():
        return None, {}
    info = json.loads(prog.read_text())
    cfg = info.get("config", {})
    tok = (info.get("task") or {}).get("tokenizer") or cfg.get("parent") or None
    extra = {}
    if cfg.get("parent"):
        try:
            extra = read_hf_config(cfg["parent"])
        except FileNotFoundError:
            extra = {}
    return tok, extra


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_dir, out = Path(a.run_dir), Path(a.out)
    ckpt = run_dir / a.checkpoint
    _, budgets = read_nested_config(ckpt)
    budget = Budget() if a.budget == FULL else budgets[a.budget]
    tok, extra = _run_files(run_dir)
    if a.format == "nested":
        save_nested(load_nested(ckpt, budget), out, {a.budget: Budget()}, quantization=a.quantization)
    else:
        try:
            export_nested(ckpt, budget, out, architecture=a.architecture, tokenizer_dir=tok,
                          quantization=a.quantization, extra=extra)
        except ValueError as e:  # the budget or the model has no exact form in that architecture
            print(f"{PROG}: {e}", file=sys.stderr)
            return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
