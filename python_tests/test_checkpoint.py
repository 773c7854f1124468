"""Crash-safe, verified checkpoints (docs/design.md §6): nested checkpoints (save_nested /
load_nested) and training checkpoints (train.checkpoint): SIGKILL at every I/O point of a save,
flipped and truncated bytes, strict headers, names confined to the checkpoint directory, stale
temporary files."""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from elastic_kernels import _io
from elastic_kernels.models import (Budget, CheckpointError, ElasticHybridConfig, ElasticHybridLM, load_nested,
                                    load_nested_state, save_nested)
from elastic_kernels.models import checkpoint as nested_ckpt
from elastic_kernels.models.storage import digest
from elastic_kernels.train import checkpoint as train_ckpt
from elastic_kernels.train.checkpoint import load_checkpoint, load_latest_good, previous_path, save_checkpoint

HERE = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(seed: int = 0, **kw) -> ElasticHybridLM:
    base = dict(vocab_size=40, hidden_size=32, pattern="M-EM*E", mamba_heads=8, mamba_head_dim=8, mamba_groups=2,
                mamba_state=8, mamba_chunk_size=8, moe_experts=8, moe_ffn=32, attn_heads=4, attn_kv_heads=2,
                ffn_size=48)
    base.update(kw)
    torch.manual_seed(seed)
    return ElasticHybridLM(ElasticHybridConfig(**base))


def manifest(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def weights_of(folder: Path) -> Path:
    return folder / manifest(folder)["weights"]


def write_manifest(folder: Path, meta: dict) -> None:
    """Rewrite config.json with a valid checksum (what a careful forger would do)."""
    meta = {k: v for k, v in meta.items() if k != "checksum"}
    meta["checksum"] = digest(json.dumps(meta, indent=2, sort_keys=True).encode())
    (folder / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def flip(path: Path, pos: int, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= rng.randint(1, 255)
    path.write_bytes(bytes(data))


def train_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.w": torch.randn(16, 24, generator=g), "model.b": torch.randn(24, generator=g).to(torch.bfloat16),
            "opt.0.step": torch.tensor(3.0), "opt.0.mask": torch.rand(5, generator=g) > 0.5,
            "opt.0.codes": torch.randint(0, 255, (7, 3), generator=g, dtype=torch.uint8)}


# ---------------------------------------------------------------------------------------------
# crash safety: SIGKILL at every I/O point of a save
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, cuts", [("nested", 8), ("training", 16)])
def test_sigkill_during_save_leaves_old_or_new(tmp_path, kind, cuts):
    """Saves SIGKILLed at every I/O point of the save (checkpoint_crash.py: before each rename,
    link, unlink and fsync, and at ``cuts`` byte counts of each write; counted, not timed, so
    the same points are hit at any machine load), first each on a freshly saved checkpoint, then
    one after the other on what the killed saves left. After each kill the old or the new
    checkpoint loads, never neither; the new one from the commit on; the next save removes what
    the killed ones left behind."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(HERE / "checkpoint_crash.py"), kind, str(tmp_path / "ck"), str(cuts)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    trials, final = lines[:-1], lines[-1]
    units = final["units"]
    assert units >= 20 and len(trials) == 2 * (units + 1)
    assert all(t["outcome"] in (t["old"], t["new"]) for t in trials), \
        [t for t in trials if t["outcome"] not in (t["old"], t["new"])]
    clean = [t for t in trials if t["phase"] == "clean"]
    assert [t["unit"] for t in clean] == list(range(units + 1))
    assert [t["killed"] for t in clean] == [True] * units + [False]  # every point lies inside the save
    calls = {t["at"].split()[0] for t in clean[:-1]}
    assert calls >= {"write", "fsync", "replace"} | ({"link", "unlink"} if kind == "training" else {"unlink"}), calls
    committed = [t["outcome"] == t["new"] for t in clean]
    first = committed.index(True)
    assert 0 < first < units and all(committed[first:]), committed  # old until the commit, new after it
    assert any(t["leftover"] for t in clean)  # torn saves left files behind ...
    assert all(t["before"] == [] for t in clean)  # ... which the next save removed
    dirty = [t for t in trials if t["phase"] == "dirty"]
    assert sum(t["killed"] for t in dirty) >= units // 2  # kills on top of torn saves too
    assert final["final_leftover"] == []


def test_interrupted_nested_save_keeps_old_and_next_save_cleans(tmp_path, monkeypatch):
    old, new = small_model(0), small_model(1)
    table = {"half": Budget.from_fractions(old.config, 0.5)}
    save_nested(old, tmp_path, table)
    real = nested_ckpt.atomic_write_bytes

    def die_at_commit(path, data):
        if Path(path).name == "config.json":
            Path(_io.temp_path(path)).write_bytes(data[: len(data) // 2])  # a torn temp file
            raise KeyboardInterrupt
        real(path, data)
    monkeypatch.setattr(nested_ckpt, "atomic_write_bytes", die_at_commit)
    with pytest.raises(KeyboardInterrupt):
        save_nested(new, tmp_path, table)
    monkeypatch.setattr(nested_ckpt, "atomic_write_bytes", real)
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 2 and list(tmp_path.glob(".tmp-*"))
    assert same_state(load_nested(tmp_path).state_dict(), old.state_dict())  # the old one still loads
    (tmp_path / ".tmp-999999-model-0123456789abcdef.safetensors").write_bytes(b"torn")
    save_nested(new, tmp_path, table)
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", weights_of(tmp_path).name])
    assert same_state(load_nested(tmp_path).state_dict(), new.state_dict())


def test_training_checkpoint_keeps_previous_and_cleans_temps(tmp_path):
    path = tmp_path / "state.safetensors"
    a, b = train_state(0), train_state(1)
    (tmp_path / ".tmp-999999-state.safetensors").write_bytes(b"torn")
    (tmp_path / ".tmp-999998-state.prev.safetensors").write_bytes(b"torn")
    (tmp_path / ".tmp-999997-other.safetensors").write_bytes(b"not ours")
    save_checkpoint(path, a, {"v": "a"}, keep_previous=True)
    assert sorted(os.listdir(tmp_path)) == [".tmp-999997-other.safetensors", "state.safetensors"]
    save_checkpoint(path, b, {"v": "b"}, keep_previous=True)
    assert same_state(load_checkpoint(previous_path(path))[0], a)
    tensors, meta, used = load_latest_good(path)
    assert used == path and meta == {"v": "b"} and same_state(tensors, b)
    plain = safetensors.torch.load_file(path)  # still a standard safetensors file
    assert same_state(plain, b)
    train_ckpt.remove_checkpoint(path)
    assert sorted(os.listdir(tmp_path)) == [".tmp-999997-other.safetensors"]
    assert load_latest_good(path) is None


# ---------------------------------------------------------------------------------------------
# corruption: flipped or truncated bytes anywhere
# ---------------------------------------------------------------------------------------------

def test_flipped_bytes_in_nested_checkpoint_give_a_clear_error(tmp_path):
    """72 random flips (24 in the safetensors header, 24 in the data, 24 in config.json) and 8
    truncations: loading the parent (which reads every byte) raises CheckpointError naming the
    file; a budget either raises or, when the flip is outside its bytes, loads exactly."""
    model = small_model()
    table = {"half": Budget.from_fractions(model.config, 0.5)}
    save_nested(model, tmp_path, table)
    weights, config = weights_of(tmp_path), tmp_path / "config.json"
    pristine = {p: p.read_bytes() for p in (weights, config)}
    n = struct.unpack("<Q", pristine[weights][:8])[0]
    want_half = model.slice(table["half"]).state_dict()
    rng = random.Random(0)
    cases = [(weights, rng.randrange(0, 8 + n)) for _ in range(24)]
    cases += [(weights, rng.randrange(8 + n, len(pristine[weights]))) for _ in range(24)]
    cases += [(config, rng.randrange(0, len(pristine[config]))) for _ in range(24)]
    half_refused = 0
    for path, pos in cases + [(weights, -1)] * 4 + [(config, -1)] * 4:
        for p, data in pristine.items():
            p.write_bytes(data)
        if pos < 0:
            path.write_bytes(pristine[path][: rng.randrange(0, len(pristine[path]))])
        else:
            flip(path, pos, rng)
        with pytest.raises(CheckpointError) as err:
            load_nested(tmp_path)
        assert path.name in str(err.value), (pos, str(err.value))
        try:
            got = load_nested(tmp_path, "half").state_dict()
        except CheckpointError:
            half_refused += 1
        else:
            assert same_state(got, want_half), (path.name, pos)
    assert half_refused >= 56  # everything but data flips outside the half budget's bytes


def test_flipped_bytes_in_quantized_nested_checkpoint(tmp_path):
    model = small_model()
    save_nested(model, tmp_path, {"half": Budget.from_fractions(model.config, 0.5)}, quantization="nvfp4")
    weights = weights_of(tmp_path)
    pristine = weights.read_bytes()
    rng = random.Random(1)
    for _ in range(12):
        weights.write_bytes(pristine)
        flip(weights, rng.randrange(0, len(pristine)), rng)
        for kw in ({}, {"weights": "nvfp4"}):
            with pytest.raises(CheckpointError, match=weights.name):
                load_nested(tmp_path, **kw)
        with pytest.raises(CheckpointError, match=weights.name):
            load_nested_state(tmp_path)


def test_verify_false_skips_checksums_only(tmp_path):
    model = small_model()
    table = {"half": Budget.from_fractions(model.config, 0.5)}
    save_nested(model, tmp_path, table)
    weights = weights_of(tmp_path)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x40  # the last data byte
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_nested(tmp_path)
    load_nested(tmp_path, verify=False)  # explicitly unchecked: loads
    weights.write_bytes(bytes(data[:-1]))  # structure is still checked
    with pytest.raises(CheckpointError, match="cover"):
        load_nested(tmp_path, verify=False)


def test_off_table_budget_reads_whole_blocks_and_verifies(tmp_path):
    """A budget of the table reads exactly its bytes; another one reads up to the next block
    boundary and still equals the sliced model."""
    model = small_model()
    table = {"half": Budget.from_fractions(model.config, 0.5)}
    save_nested(model, tmp_path, table)
    own = sum(t.numel() * t.element_size() for t in model.slice(table["half"]).state_dict().values())
    stats: dict = {}
    load_nested(tmp_path, "half", stats=stats)
    assert stats["bytes_read"] == stats["header_bytes"] + own
    odd = Budget(hidden=20, ffn=40)
    got = load_nested(tmp_path, odd, stats=stats).state_dict()
    assert same_state(got, model.slice(odd).state_dict())
    loose: dict = {}
    load_nested(tmp_path, odd, stats=loose, verify=False)
    own_odd = sum(t.numel() * t.element_size() for t in got.values())
    assert loose["bytes_read"] == loose["header_bytes"] + own_odd < stats["bytes_read"]


def test_flipped_bytes_in_training_checkpoint_fall_back_to_previous(tmp_path):
    """60 random flips anywhere in the newest training checkpoint: load_checkpoint raises a
    CheckpointError naming it; load_latest_good returns the previous checkpoint."""
    path = tmp_path / "state.safetensors"
    a, b = train_state(0), train_state(1)
    save_checkpoint(path, a, {"v": "a"}, keep_previous=True)
    save_checkpoint(path, b, {"v": "b"}, keep_previous=True)
    pristine = path.read_bytes()
    rng = random.Random(2)
    for i in range(64):
        path.write_bytes(pristine)
        if i < 60:
            flip(path, rng.randrange(0, len(pristine)), rng)
        else:
            path.write_bytes(pristine[: rng.randrange(0, len(pristine))])
        with pytest.raises(CheckpointError, match=path.name):
            load_checkpoint(path)
        tensors, meta, used = load_latest_good(path)
        assert used == previous_path(path) and meta == {"v": "a"} and same_state(tensors, a)
    previous_path(path).write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="no good checkpoint.*state.safetensors.*state.prev.safetensors"):
        load_latest_good(path)


# ---------------------------------------------------------------------------------------------
# strict headers, confined names (regressions)
# ---------------------------------------------------------------------------------------------

def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_overlapping_offsets_in_a_header_are_refused(tmp_path):
    path = tmp_path / "state.safetensors"
    header = {"__metadata__": {"meta": "{}"},
              "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    path.write_bytes(_safetensors_bytes(header, bytes(12)))
    for verify in (True, False):
        with pytest.raises(CheckpointError, match="overlaps"):
            load_checkpoint(path, verify=verify)
    # the same in a nested checkpoint's weights file: two tensors sharing one byte range
    model = small_model()
    save_nested(model, tmp_path / "n", {})
    weights = weights_of(tmp_path / "n")
    data = weights.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    a, b = names[0], names[1]
    header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + (
        header[b]["data_offsets"][1] - header[b]["data_offsets"][0])]
    weights.write_bytes(_safetensors_bytes(header, data[8 + n:]))
    for verify in (True, False):
        with pytest.raises(CheckpointError, match=weights.name):
            load_nested(tmp_path / "n", verify=verify)
    with pytest.raises(CheckpointError, match="overlaps"):
        load_nested(tmp_path / "n", verify=False)


@pytest.mark.parametrize("bad", [lambda other: f"../other/{other}", lambda other: "/etc/passwd",
                                 lambda other: "sub/../../other/x", lambda other: "", lambda other: 7])
def test_weights_name_must_stay_inside_the_checkpoint(tmp_path, bad):
    model = small_model()
    save_nested(model, tmp_path / "ck", {})
    save_nested(model, tmp_path / "other", {})
    meta = manifest(tmp_path / "ck")
    meta["weights"] = bad(weights_of(tmp_path / "other").name)
    write_manifest(tmp_path / "ck", meta)
    for verify in (True, False):
        with pytest.raises(CheckpointError, match="inside the checkpoint directory"):
            load_nested(tmp_path / "ck", verify=verify)


def test_weights_symlink_out_of_the_checkpoint_is_refused(tmp_path):
    model = small_model()
    save_nested(model, tmp_path / "ck", {})
    save_nested(model, tmp_path / "other", {})
    meta = manifest(tmp_path / "ck")
    (tmp_path / "ck" / "model-link.safetensors").symlink_to(weights_of(tmp_path / "other"))
    meta["weights"] = "model-link.safetensors"
    write_manifest(tmp_path / "ck", meta)
    with pytest.raises(CheckpointError, match="inside the checkpoint directory"):
        load_nested(tmp_path / "ck")


def test_header_and_manifest_must_be_canonical(tmp_path):
    """Value-preserving edits (whitespace) are refused too: nothing but the written bytes loads."""
    model = small_model()
    save_nested(model, tmp_path, {})
    config = tmp_path / "config.json"
    config.write_text(config.read_text() + "\n")
    with pytest.raises(CheckpointError, match="config.json"):
        load_nested(tmp_path)
    load_nested(tmp_path, verify=False)
    save_nested(model, tmp_path, {})
    weights = weights_of(tmp_path)
    data = weights.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    raw = data[8:8 + n].replace(b'{"', b'{ "', 1)[:n]  # same JSON, one padding byte less
    assert json.loads(raw) == json.loads(data[8:8 + n])
    weights.write_bytes(data[:8] + raw + data[8 + n:])
    with pytest.raises(CheckpointError, match="canonical"):
        load_nested(tmp_path)


def test_one_checkpoint_error_everywhere():
    from elastic_kernels.models import checkpoint
    assert CheckpointError is _io.CheckpointError is train_ckpt.CheckpointError is checkpoint.CheckpointError
    assert issubclass(CheckpointError, ValueError) and issubclass(CheckpointError, RuntimeError)


def test_config_fields_are_range_checked():
    for kw, match in [(dict(init_std=float("nan")), "init_std"), (dict(init_std=0.0), "init_std"),
                      (dict(norm_eps=float("inf")), "norm_eps"), (dict(tie_embeddings=1), "tie_embeddings")]:
        with pytest.raises((ValueError, TypeError), match=match):
            ElasticHybridConfig(**kw)
