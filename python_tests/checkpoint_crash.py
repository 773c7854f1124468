"""Crash-trial worker for test_checkpoint.py (run as a script: one python start per test).

``python checkpoint_crash.py nested|training FOLDER CUTS`` commits versions "A" then "B" of
a checkpoint, then per trial forks a child that saves the other version and SIGKILLs itself at
one I/O point of the save. The points are counted, not timed, so the trials do not depend on the
machine's load: the save's I/O calls (every write, rename/replace, link, unlink, fsync; the only
calls that change the files) are numbered in order, a call that is not a write is one point
(killed just before the call) and a write of ``n`` bytes is ``CUTS`` points (killed after
``n * j // CUTS`` of its bytes reached the file, ``j = 0 .. CUTS-1``). An uninterrupted save of
the other version over a committed checkpoint has ``units`` points; a kill between two calls
leaves the files as a kill at the next call would.

- ``"clean"`` trials (``units + 1`` of them): before each one an uninterrupted save of the
  current version (which must leave no stray file), then the child is killed at point ``u`` for
  every ``u`` in ``0 .. units`` (``units``: after the last call, the save completes);
- ``"dirty"`` trials: the same ``u`` again, one after the other without the cleaning save, so
  each save starts on the files the killed one before left behind.

After each kill it loads the checkpoint and prints one JSON line per trial: ``{"trial",
"phase", "unit", "old", "new": the committed version and the one being saved, "killed": the
child died of the kill, "at": the I/O call it died at, "outcome": "A" | "B" | "neither" |
"wrong", "leftover": files beyond a committed checkpoint, "before": stray files before the
trial}``, and a last line ``{"final_leftover", "units"}`` after one more (uninterrupted) save.
"""
from __future__ import annotations

import builtins
import copy
import io
import json
import os
import re
import signal
import sys
from pathlib import Path

import torch

from elastic_kernels.models import Budget, CheckpointError, ElasticHybridConfig, ElasticHybridLM, load_nested, save_nested
from elastic_kernels.train.checkpoint import load_checkpoint, load_latest_good, save_checkpoint


def _models():
    cfg = ElasticHybridConfig(vocab_size=40, hidden_size=32, pattern="M-EM*E", mamba_heads=8, mamba_head_dim=8,
                              mamba_groups=2, mamba_state=8, mamba_chunk_size=8, moe_experts=8, moe_ffn=32,
                              attn_heads=4, attn_kv_heads=2, ffn_size=48)
    torch.manual_seed(0)
    a = ElasticHybridLM(cfg)
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.5)
    return {"A": a, "B": b}, {"half": Budget.from_fractions(cfg, 0.5)}


def _same(sd: dict, want: dict) -> bool:
    return sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in sd)


def nested_ops(folder: Path):
    models, table = _models()
    states = {v: m.state_dict() for v, m in models.items()}
    halves = {v: m.slice(table["half"]).state_dict() for v, m in models.items()}

    def save(v):
        save_nested(models[v], folder, table)

    def check():
        try:
            full = load_nested(folder).state_dict()
            half = load_nested(folder, "half").state_dict()
        except CheckpointError:
            return "neither"
        for v in states:
            if _same(full, states[v]):
                return v if _same(half, halves[v]) else "wrong"
        return "wrong"

    def leftover():
        names = set(os.listdir(folder)) - {"config.json", json.loads((folder / "config.json").read_text())["weights"]}
        return sorted(names)
    return save, check, leftover


def training_ops(folder: Path):
    path = folder / "state.safetensors"
    g = torch.Generator().manual_seed(0)
    data = {v: {f"t{i}": torch.randn(64, 256, generator=g) for i in range(8)} for v in "AB"}

    def save(v):
        save_checkpoint(path, data[v], {"version": v}, keep_previous=True)

    def check():
        try:
            tensors, meta = load_checkpoint(path)
            good = load_latest_good(path)
        except CheckpointError:
            return "neither"
        v = meta.get("version")
        if v not in data or not _same(tensors, data[v]) or good is None or good[1].get("version") != v:
            return "wrong"
        return v

    def leftover():
        return sorted(set(os.listdir(folder)) - {path.name, "state.prev.safetensors"})
    return save, check, leftover


class Tripwire:
    """Counts the I/O points of a save (see the module docstring) and SIGKILLs this process at
    point ``at``, after writing a description of the call it died at to file descriptor ``report``."""

    def __init__(self, at: int | None = None, cuts: int = 1, report: int | None = None) -> None:
        self.at, self.cuts, self.report, self.count = at, cuts, report, 0
        self.saved = {}

    def die(self, what: str) -> None:
        if self.report is not None:
            os.write(self.report, what.encode())
        os.kill(os.getpid(), signal.SIGKILL)

    def call(self, name: str, args: tuple) -> None:
        """Before the I/O call ``name(*args)``: die if it is the kill point."""
        if self.count == self.at:
            self.die(f"{name} {' '.join(_shown(a) for a in args)}")
        self.count += 1

    def write(self, f, b, target) -> int:
        """``f.write(b)``, cut at the kill point when it falls inside this write."""
        n = len(b)
        if self.at is not None and self.count <= self.at < self.count + self.cuts:
            j = self.at - self.count
            k = n * j // self.cuts
            f.write(bytes(b)[:k])
            f.flush()
            self.die(f"write {_shown(target)} {k}/{n} bytes")
        self.count += self.cuts
        return f.write(b)

    def install(self) -> None:
        trip = self

        class Cut:  # a writable file whose writes pass the tripwire
            def __init__(self, f, target):
                self.f, self.target = f, target

            def write(self, b):
                return trip.write(self.f, b, self.target)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        real_open = builtins.open

        def cut_open(file, mode="r", *args, **kw):
            f = real_open(file, mode, *args, **kw)
            return Cut(f, file) if any(c in mode for c in "wax+") else f

        def step(name, fn):
            def wrapped(*args, **kw):
                trip.call(name, args)
                return fn(*args, **kw)
            return wrapped

        self.saved = {"open": (builtins, "open", builtins.open), "io.open": (io, "open", io.open)}
        for name in ("replace", "rename", "link", "unlink", "fsync"):
            self.saved[name] = (os, name, getattr(os, name))
            setattr(os, name, step(name, getattr(os, name)))
        builtins.open = io.open = cut_open

    def uninstall(self) -> None:
        for mod, name, fn in self.saved.values():
            setattr(mod, name, fn)


def _shown(arg) -> str:
    """A path argument without the writer's pid (so reports of different trials compare)."""
    if isinstance(arg, int):  # fsync(fd): name the file or directory
        try:
            arg = os.readlink(f"/proc/self/fd/{arg}")
        except OSError:
            return "<fd>"
        if os.path.isdir(arg):
            return "<folder>"
    return re.sub(r"^\.tmp-\d+-", ".tmp-<pid>-", os.path.basename(os.fspath(arg)))


def main(kind: str, folder: str, cuts: int) -> None:
    torch.set_num_threads(1)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save, check, leftover = (nested_ops if kind == "nested" else training_ops)(folder)
    save("A")
    count = Tripwire(cuts=cuts)
    count.install()
    try:
        save("B")  # a save of the other version over a committed one, as in the trials
    finally:
        count.uninstall()
    units = count.count

    def forked_save(v: str, at: int) -> tuple[bool, str | None]:
        """Save ``v`` in a forked child killed at I/O point ``at``: (the child died of the kill,
        the call it died at)."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: save, then leave without any cleanup
            try:
                os.close(r)
                Tripwire(at, cuts, w).install()
                save(v)
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            at_call = f.read().decode() or None
        _, status = os.waitpid(pid, 0)
        return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, at_call

    current, trial = "B", 0
    for phase in ("clean", "dirty"):
        for u in range(units + 1):
            before = []
            if phase == "clean":
                save(current)
                before = leftover()
            target = "B" if current == "A" else "A"
            killed, at_call = forked_save(target, u)
            outcome = check()
            print(json.dumps({"trial": trial, "phase": phase, "unit": u, "old": current, "new": target,
                              "killed": killed, "at": at_call,
                              "outcome": outcome, "leftover": leftover() if outcome in ("A", "B") else None,
                              "before": before}), flush=True)
            if outcome in ("A", "B"):
                current = outcome
            trial += 1
    save(current)
    print(json.dumps({"final_leftover": leftover(), "units": units}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
