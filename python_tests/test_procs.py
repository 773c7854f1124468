"""``elastic-train --procs N``: the launcher (train/launch.py) and evaluation split across ranks.

Evaluation results must not depend on how many processes ran them: every split is checked
against the single-process numbers, in process (a two-"rank" :class:`Workers` emulation) and
with two real worker processes on the same trained checkpoints.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from elastic_kernels.infer.evaluate import Workers

pytestmark = pytest.mark.usefixtures("one_thread")

# fields of evaluation.json that are timings (they differ between any two runs)
_TIMINGS = {"latency_s", "latency_p90_s", "latency_mean_s", "latency_parts", "wall_s", "wall_s_total",
            "wall_s_passes"}


class _TwoRanks(Workers):
    """Two ranks emulated in one process: fn runs on items[0::2], then items[1::2]."""

    world = 2

    def map(self, fn, items):
        items = list(items)
        out = [None] * len(items)
        for r in range(2):
            out[r::2] = super().map(fn, items[r::2])
        return out


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def _train(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "elastic_kernels.train", *args], env=_env(), capture_output=True,
                          text=True, timeout=timeout, **kw)


def _outcomes(ev: dict) -> dict:
    """evaluation.json without its timings: every per-problem outcome and count of every setting."""
    bc = ev["budget_control"]
    rows = [{k: v for k, v in r.items() if k not in _TIMINGS} for r in bc["rows"]]
    return {**{k: v for k, v in ev.items() if k != "budget_control"}, "rows": rows,
            "caps": bc["caps"], "budget_order": bc["budget_order"], "budgets": bc["budgets"]}


def test_workers_map_keeps_order_and_checks_counts():
    items = list(range(7))
    assert _TwoRanks().map(lambda xs: [10 * x for x in xs], items) == [10 * x for x in items]
    assert Workers().once(lambda: 3) == 3
    with pytest.raises(ValueError, match="2 results for 3 items"):
        Workers().map(lambda xs: xs[:2], [1, 2, 3])


def test_evaluation_split_equals_single_process(tmp_path):
    """Runner.evaluate's numbers and budget control's rows are those of one process when the
    problems / settings are split over two (emulated) ranks."""
    from elastic_kernels import tasks
    from elastic_kernels.infer.report import budget_control
    from elastic_kernels.models import ElasticHybridConfig, ElasticHybridLM, save_nested
    from elastic_kernels.train.config import PRESETS
    from elastic_kernels.train.evaluate import evaluate_model

    task = tasks.get("fused", modulus=10, difficulty=1, seed=0)
    model = ElasticHybridLM(ElasticHybridConfig(vocab_size=task.vocab_size, **PRESETS["smoke"]["model"])).eval()
    val, test = task.problems("val", 13, seed=0), task.problems("test", 11, seed=0)
    one = evaluate_model(model, task, val, test)
    two = evaluate_model(model, task, val, test, workers=_TwoRanks())
    assert two["val_acc"] == one["val_acc"] and two["test_acc"] == one["test_acc"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)
    from elastic_kernels.models import Budget
    half = Budget(hidden=32)
    save_nested(model, tmp_path / "nested", {"1": Budget(), "0.5": half})
    kw = dict(caps=[2], latency=False)
    a = budget_control(tmp_path / "nested", task, test, **kw)
    b = budget_control(tmp_path / "nested", task, test, workers=_TwoRanks(), **kw)
    assert b["processes"] == 2 and a["processes"] == 1
    strip = [[{k: v for k, v in r.items() if k not in _TIMINGS} for r in rep["rows"]] for rep in (a, b)]
    assert strip[0] == strip[1] and len(strip[0]) == 6


def test_two_processes_evaluate_like_one(tmp_path):
    """The evaluate stage of the same trained smoke checkpoints run by ``--procs 2``: the same
    evaluation.json (every outcome; timings aside) as one process, and the same claims."""
    from elastic_kernels.train.config import make_config
    from elastic_kernels.train.pipeline import run

    one = tmp_path / "one"
    run(make_config("smoke", run_dir=str(one)))
    two = tmp_path / "two"
    shutil.copytree(one, two)
    prog = json.loads((two / "progress.json").read_text())
    prog["done"] = [s for s in prog["done"] if s not in ("evaluate", "report")]
    (two / "progress.json").write_text(json.dumps(prog))
    (two / "evaluation.json").unlink()
    res = _train("--resume", "--run-dir", str(two), "--procs", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "terminate called" not in res.stderr and res.stdout.count("report:") == 1, res.stderr[-3000:]
    ev1 = json.loads((one / "evaluation.json").read_text())
    ev2 = json.loads((two / "evaluation.json").read_text())
    assert ev2["budget_control"]["processes"] == 2
    assert _outcomes(ev2) == _outcomes(ev1)
    c1 = json.loads((one / "report.json").read_text())["claims"]
    c2 = json.loads((two / "report.json").read_text())["claims"]
    assert c2["budgets"] == c1["budgets"] and c2["order"] == c1["order"] and c2["parent"] == c1["parent"]


def _start(run_dir, *extra):
    args = [sys.executable, "-m", "elastic_kernels.train", "--preset", "smoke", "--run-dir", str(run_dir),
            "--procs", "2", "--parent-steps", "60", "--no-baselines", "--log-every", "1", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)


def _wait_for_steps(run_dir, n, proc):
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= n:
            return
        time.sleep(0.2)
    pytest.fail(f"no {n} metric lines in time: {proc.communicate()[0][-3000:] if proc.poll() is not None else ''}")


def _workers_of(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def test_sigterm_stops_every_worker_with_a_checkpoint_and_resumes(tmp_path):
    """SIGTERM to the launcher: forwarded once to each worker, exit 143, a resumable checkpoint;
    ``--resume`` (the saved --procs 2) logs every step exactly once."""
    from elastic_kernels.train.checkpoint import load_checkpoint
    from elastic_kernels.train.metrics import read_metrics

    run_dir = tmp_path / "term"
    proc = _start(run_dir)
    _wait_for_steps(run_dir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143, out[-3000:]
    assert "Traceback" not in out and "--resume --run-dir" in out, out[-3000:]
    _, meta = load_checkpoint(run_dir / "state.safetensors")
    assert meta["stage"] == "parent" and 2 <= meta["step"] < 60
    res = _train("--resume", "--run-dir", str(run_dir), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "started 2 worker processes" in res.stderr
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "parent" and "loss" in r]
    assert steps == list(range(1, 61))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the worker pids")
def test_a_failing_worker_stops_the_others(tmp_path):
    """A worker killed mid-training: the launcher terminates the other one (no hang in a
    collective) and exits with the killed worker's status."""
    run_dir = tmp_path / "kill"
    proc = _start(run_dir)
    _wait_for_steps(run_dir, 2, proc)
    workers = _workers_of(proc.pid)
    assert len(workers) == 2
    t0 = time.time()
    os.kill(workers[1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGKILL, out[-3000:]
    assert "worker rank 1 exited with status 137" in out, out[-3000:]
    assert time.time() - t0 < 60
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_launcher_leaves_the_torch_checks_to_its_workers(tmp_path):
    """With --procs 2 the launcher starts its workers without importing torch; a bad --task is
    then rank 0's usage error (exit 2, no traceback) and no run starts."""
    run_dir = tmp_path / "bad"
    proc = _start(run_dir, "--task", "nope")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out[-3000:]
    assert "--task" in out and "Traceback" not in out, out[-3000:]
    assert not run_dir.exists()


def test_procs_option():
    from elastic_kernels._cli import UsageError
    from elastic_kernels.train.cli import parse_args
    from elastic_kernels.train.config import RESUME_FREE, make_config

    assert make_config("tiny").procs == 2 and make_config("smoke").procs == 1
    assert "procs" in RESUME_FREE
    assert parse_args(["--preset", "smoke", "--procs", "3"]).procs == 3
    with pytest.raises(UsageError, match="--procs"):
        parse_args(["--preset", "smoke", "--procs", "0"])


def test_concurrent_baseline_stages_equal_one_process_and_resume(tmp_path):
    """``--procs 2`` runs the baseline and prune+distill stages one per process (full batch, no
    gradient exchange): on the same elastic-stage checkpoints their metrics and results equal the
    single-process run's exactly; a ``--stop-after`` inside them stops both processes with
    resumable checkpoints, and the resumed run logs every step once."""
    from elastic_kernels.train.config import make_config
    from elastic_kernels.train.metrics import read_metrics
    from elastic_kernels.train.pipeline import run

    one = tmp_path / "one"
    run(make_config("smoke", run_dir=str(one)))
    two = tmp_path / "two"
    shutil.copytree(one, two)
    keep = ("parent", "importance", "elastic")
    prog = json.loads((two / "progress.json").read_text())
    prog["done"] = [s for s in prog["done"] if s in keep]
    for row in prog["results"]["budgets"]:
        row["baseline"] = None
        row.pop("prune_distill", None)
    prog["results"].pop("claims", None)
    (two / "progress.json").write_text(json.dumps(prog))
    for f in list(two.glob("baseline-*")) + list(two.glob("prune-*")) + [two / "evaluation.json"]:
        f.unlink()
    lines = [r for r in read_metrics(two / "metrics.jsonl") if r["stage"] in keep]
    (two / "metrics.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))

    res = _train("--resume", "--run-dir", str(two), "--procs", "2", "--stop-after", "2")
    assert res.returncode == 0 and "--resume --run-dir" in res.stderr, res.stdout[-3000:] + res.stderr[-3000:]
    held = sorted(p.name for p in two.glob("state.*.safetensors"))
    assert len(held) == 2, held  # each process stopped inside its own stage, with its own checkpoint
    res = _train("--resume", "--run-dir", str(two), "--procs", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert not list(two.glob("stages/*")) and not list(two.glob("state*.safetensors"))

    names = [n for n in json.loads((one / "progress.json").read_text())["done"] if n.startswith(("baseline", "prune"))]
    assert len(names) == 4
    p2 = json.loads((two / "progress.json").read_text())
    assert [n for n in p2["done"] if n in names] == names  # merged in stage order

    def stage_lines(run_dir):
        return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run_dir / "metrics.jsonl")
                if r["stage"] in names]

    assert stage_lines(two) == stage_lines(one)
    b1 = json.loads((one / "report.json").read_text())["budgets"]
    b2 = json.loads((two / "report.json").read_text())["budgets"]
    for a, b in zip(b1, b2):
        assert a.get("baseline") == b.get("baseline") and a.get("prune_distill") == b.get("prune_distill")
    ev1 = json.loads((one / "evaluation.json").read_text())
    ev2 = json.loads((two / "evaluation.json").read_text())
    assert ev2["scratch"] == ev1["scratch"] and ev2["prune_distill"] == ev1["prune_distill"]


def test_seeds_share_one_process_group(tmp_path):
    """``--procs 2 --seeds 2``: every seed's run uses the one process group (a group created and
    destroyed per run raced into the previous run's rendezvous and hung); rank 0 alone writes the
    spread; every rank's CPU time of every stage is recorded."""
    run_dir = tmp_path / "seeds"
    res = _train("--preset", "smoke", "--procs", "2", "--seeds", "2", "--no-baselines", "--no-eval-latency",
                 "--run-dir", str(run_dir), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("seeds [0, 1]") == 1
    assert json.loads((run_dir / "seeds.json").read_text())["seeds"] == [0, 1]
    prog = json.loads((run_dir / "seed-1" / "progress.json").read_text())
    assert all(len(v) == 2 for v in prog["cpu_s_ranks"].values()) and "evaluate" in prog["cpu_s_ranks"]
