"""Crash-trial worker for test_checkpoint.py (run as a script: one python start per test).

``python checkpoint_crash.py nested|training FOLDER TRIALS SEED`` commits version "A" of a
checkpoint, then per trial forks a child that saves the other version and SIGKILLs it after a
random delay (stratified over twice the measured save time, so kills land everywhere in the save
and about half after it). After each kill it loads the checkpoint and prints one JSON line per trial:
``{"trial", "delay_s", "killed": the child was still running, "outcome": "A" | "B" | "neither" |
"wrong", "leftover": files beyond a committed checkpoint}``.
"""
from __future__ import annotations

import copy
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


def main(kind: str, folder: str, trials: int, seed: int) -> None:
    torch.set_num_threads(1)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save, check, leftover = (nested_ops if kind == "nested" else training_ops)(folder)
    for v in "BA":
        save(v)

    def forked_save(v: str, delay: float | None) -> bool:
        """Save version ``v`` in a forked child; SIGKILL it after ``delay`` s (None: let it
        finish). True when the kill landed while the child was still running."""
        pid = os.fork()
        if pid == 0:  # the child: save, then leave without any cleanup
            try:
                save(v)
            finally:
                os._exit(0)
        if delay is not None:
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        return os.WIFSIGNALED(status)

    times = []
    for v in "BA":  # the save time as the trials see it (fork included, under the current load)
        t0 = time.perf_counter()
        forked_save(v, None)
        times.append(time.perf_counter() - t0)
    took = sorted(times)[-1]
    current = "A"
    rng = random.Random(seed)
    # stratified over [0, 2 * took): kills at every point of the save, and about half after it
    fractions = [(i + rng.random()) / trials for i in range(trials)]
    rng.shuffle(fractions)
    for trial in range(trials):
        target = "B" if current == "A" else "A"
        delay = 2.0 * took * fractions[trial]
        killed = forked_save(target, delay)
        outcome = check()
        print(json.dumps({"trial": trial, "delay_s": round(delay, 5), "killed": killed,
                          "outcome": outcome, "leftover": leftover() if outcome in ("A", "B") else None}), flush=True)
        if outcome in ("A", "B"):
            current = outcome
    save(current)
    print(json.dumps({"final_leftover": leftover(), "save_s": round(took, 5)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
