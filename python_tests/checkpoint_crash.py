"""Crash-trial worker for test_checkpoint.py (run as a script: one python start per test).

``python checkpoint_crash.py nested|training FOLDER TRIALS SEED`` commits version "A" of a
checkpoint, then per trial forks a child that saves the other version and is SIGKILLed:

- ``"bytes"`` trials (``TRIALS`` of them): the child SIGKILLs itself at a random point of the
  save's I/O, counted in units of one written byte or one rename/link/unlink/fsync (a write is cut
  there: its first bytes reach the file). Points are stratified over 1.25x the save's units, so
  they cover the whole save (and some land after it), independently of the machine's load;
- ``"delay"`` trials (``TRIALS // 2``): the parent SIGKILLs the child after a random delay.

After each kill it loads the checkpoint and prints one JSON line per trial: ``{"trial", "mode",
"point", "killed": the child died of the kill, "outcome": "A" | "B" | "neither" | "wrong",
"leftover": files beyond a committed checkpoint}``, and a last line ``{"final_leftover",
"units"}`` after one more (uninterrupted) save.
"""
from __future__ import annotations

import builtins
import copy
import io
import json
import os
import random
import signal
import sys
import time
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
    """Counts the I/O units of a save (written bytes; renames, links, unlinks, fsyncs) and
    SIGKILLs this process when unit ``at`` is reached (a write is cut there)."""

    def __init__(self, at: int | None = None) -> None:
        self.at, self.count = at, 0
        self.saved = {}

    def _pass(self, n: int) -> int:
        """How many of the next ``n`` units may happen before the kill."""
        if self.at is not None and self.count + n > self.at:
            return self.at - self.count
        self.count += n
        return n

    def die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        trip = self

        class Cut:  # a writable file whose write stops at the kill point
            def __init__(self, f):
                self.f = f

            def write(self, b):
                k = trip._pass(len(b))
                if k < len(b):
                    self.f.write(bytes(b)[:k])
                    self.f.flush()
                    trip.die()
                return self.f.write(b)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        real_open = builtins.open

        def cut_open(file, mode="r", *args, **kw):
            f = real_open(file, mode, *args, **kw)
            return Cut(f) if any(c in mode for c in "wax+") else f

        def step(fn):
            def wrapped(*args, **kw):
                if trip._pass(1) < 1:
                    trip.die()
                return fn(*args, **kw)
            return wrapped

        self.saved = {"open": (builtins, "open", builtins.open), "io.open": (io, "open", io.open)}
        for name in ("replace", "rename", "link", "unlink", "fsync"):
            self.saved[name] = (os, name, getattr(os, name))
            setattr(os, name, step(getattr(os, name)))
        builtins.open = io.open = cut_open

    def uninstall(self) -> None:
        for mod, name, fn in self.saved.values():
            setattr(mod, name, fn)


def main(kind: str, folder: str, trials: int, seed: int) -> None:
    torch.set_num_threads(1)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save, check, leftover = (nested_ops if kind == "nested" else training_ops)(folder)
    save("B")
    count = Tripwire()
    count.install()
    try:
        save("A")
    finally:
        count.uninstall()
    units = count.count

    def forked_save(v: str, at: int | None, delay: float | None) -> bool:
        """Save ``v`` in a forked child, killed at I/O unit ``at`` or after ``delay`` s; True when
        the child died of the kill."""
        pid = os.fork()
        if pid == 0:  # the child: save, then leave without any cleanup
            try:
                if at is not None:
                    Tripwire(at).install()
                save(v)
            finally:
                os._exit(0)
        if delay is not None:
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        return os.WIFSIGNALED(status)

    t0 = time.perf_counter()
    forked_save("A", None, None)
    took = time.perf_counter() - t0
    rng = random.Random(seed)
    strata = [(i + rng.random()) / trials for i in range(trials)]
    rng.shuffle(strata)
    plan = [("bytes", int(1.25 * units * f)) for f in strata]
    plan += [("delay", rng.uniform(0.0, 2.0 * took)) for _ in range(trials // 2)]
    current = "A"
    for trial, (mode, point) in enumerate(plan):
        target = "B" if current == "A" else "A"
        killed = forked_save(target, point if mode == "bytes" else None, point if mode == "delay" else None)
        outcome = check()
        print(json.dumps({"trial": trial, "mode": mode, "point": round(point, 5), "killed": killed,
                          "outcome": outcome, "leftover": leftover() if outcome in ("A", "B") else None}), flush=True)
        if outcome in ("A", "B"):
            current = outcome
    save(current)
    print(json.dumps({"final_leftover": leftover(), "units": units}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
