"""The evaluation stage: every model of the run on the same test problems, and the claims.

Every model is evaluated problem by problem on the run's test split (greedy decoding), so any two
can be compared with paired tests (:mod:`elastic_kernels.infer.stats`): the parent, each nested
budget (its physically sliced submodel from the nested checkpoint), the in-between targets the
router interpolates, the from-scratch and prune+distill baselines of every budget below 1.0 and,
with ``--qad``, the QAD and PTQ exports per budget. Budget control (pairs, thinking caps, measured
latency) comes from :func:`elastic_kernels.infer.report.budget_control`. This is the one place the
test problems are decoded: the training stages record validation numbers only, and
:func:`fill_test_accuracies` writes every model's test accuracy into the run's results.

Under data parallelism every rank runs this stage: each model's test problems are split across
the ranks and the budget-control settings too (:attr:`Runner.workers`); the per-problem outcomes
are gathered back in order, so ``evaluation.json`` is the single-process one (greedy decoding is
deterministic) except for its timings.

The claims (:func:`claims`) are computed from these outcomes; each ``yes``/``no`` is a
comparison of measured numbers, whichever way it comes out.
"""
from __future__ import annotations

import json
from typing import Sequence

from ..infer.stats import accuracy_summary, compare_paired, intervals_overlap
from .evaluate import greedy_outcomes

__all__ = ["run", "run_evaluation", "claims", "fill_test_accuracies", "ROUTER_TOLERANCE"]

ROUTER_TOLERANCE = 0.03
EVAL_BATCH = 256  # requests decoded together by every evaluation of this stage


def _outcomes(runner, model, problems: Sequence) -> list[int]:
    """0/1 per problem of ``model``'s greedy completions, the problems split across the ranks."""
    model.eval()
    max_new = runner.task.max_new_tokens(problems)
    return runner.workers.map(lambda ps: greedy_outcomes(model, runner.task, ps, batch_size=EVAL_BATCH,
                                                         max_new=max_new), problems)


def run_evaluation(runner) -> dict:
    """Per-problem test outcomes of every model of the run and the budget-control report (every
    rank calls it and gets the same result)."""
    from ..infer.report import budget_control
    from ..models import Budget, ElasticHybridConfig, ElasticHybridLM, load_nested
    from .checkpoint import load_checkpoint

    cfg, task, test = runner.cfg, runner.task, runner.test
    res = runner.results
    nested = runner.dir / "nested"
    device = runner.device
    out: dict = {"n": len(test)}
    parent = runner.new_model()
    runner.load_model("parent", {"model": parent})
    out["parent"] = _outcomes(runner, parent, test)
    permuted = runner.new_model()
    runner.load_model("permuted", {"model": permuted})
    full = load_nested(nested, None, device=device)
    out["interpolated"] = [{"target": r["target"],
                            "correct": _outcomes(runner, full.slice(Budget.from_dict(r["budget"])), test)}
                           for r in res.get("interpolated", [])]
    out["scratch"], out["prune_distill"] = {}, {}
    for row in res["budgets"]:
        key = f"{row['target']:g}"
        path = runner.dir / f"baseline-{key}.safetensors"
        if row.get("baseline") and path.is_file():
            _, meta = load_checkpoint(path)
            m = ElasticHybridLM(ElasticHybridConfig.from_dict(meta["config"])).to(device)
            runner.load_model(f"baseline-{key}", {"model": m})
            out["scratch"][key] = _outcomes(runner, m, test)
        path = runner.dir / f"prune-{key}.safetensors"
        if row.get("prune_distill") and path.is_file():
            m = permuted.slice(Budget.from_dict(row["budget"]))
            runner.load_model(f"prune-{key}", {"model": m})
            out["prune_distill"][key] = _outcomes(runner, m, test)
    if res.get("qad"):
        out["qad"], out["ptq"] = {}, {}
        for row in res["budgets"]:
            key = f"{row['target']:g}"
            out["qad"][key] = _outcomes(runner, load_nested(runner.dir / "qad", key, device=device), test)
            out["ptq"][key] = _outcomes(runner, load_nested(runner.dir / "ptq", key, device=device), test)
    # batch 256 like greedy_completions: the tiny models are overhead-bound per decode step, so a
    # wider batch cuts the CPU time of the settings by a quarter; greedy outcomes do not depend on it
    out["budget_control"] = budget_control(nested, task, test, caps=cfg.eval_caps or None, reuse=False,
                                           batch_size=EVAL_BATCH, device=str(device), latency=cfg.eval_latency,
                                           workers=runner.workers)
    return out


def run(runner) -> None:
    """The ``evaluate`` stage: writes ``evaluation.json`` (every per-problem outcome) and stores
    the claims in the run's results."""
    from .._io import atomic_write_text
    from ..models import Budget

    res = runner.results
    ev = run_evaluation(runner)
    if runner.is_main:
        atomic_write_text(runner.dir / "evaluation.json", json.dumps(ev, sort_keys=True))
    fill_test_accuracies(res, ev)
    parent = runner.new_model()
    full = next(r for r in res["budgets"] if r["target"] == 1.0)
    same = parent.resolve_budget(Budget.from_dict(full["budget"])) == parent.resolve_budget(None)
    res["claims"] = claims(ev, res["budgets"], parent_params=parent.param_count(None), full_is_parent=same)
    runner.finish_stage("evaluate")


def _mean(correct: Sequence[int]) -> float:
    return accuracy_summary(correct)["accuracy"]  # the claims' accuracy of the same outcomes


def fill_test_accuracies(results: dict, ev: dict) -> None:
    """Write every model's ``test_acc`` into the run's ``results`` from the evaluate stage's
    per-problem outcomes ``ev``: the training stages record validation numbers only, so each
    model's test problems are decoded once, here."""
    results["parent"]["test_acc"] = _mean(ev["parent"])
    for row in results["budgets"]:
        key = f"{row['target']:g}"
        row["test_acc"] = _mean(_single(ev["budget_control"], key))
        for field, outcomes in (("baseline", ev["scratch"]), ("prune_distill", ev["prune_distill"])):
            if row.get(field) and key in outcomes:
                row[field]["test_acc"] = _mean(outcomes[key])
    for row, got in zip(results.get("interpolated", []), ev["interpolated"]):
        row["test_acc"] = _mean(got["correct"])
    ref = {f"{r['target']:g}": r["test_acc"] for r in results["budgets"]}
    for row in (results.get("qad") or {}).get("budgets", []):
        key = f"{row['target']:g}"
        row |= {"ref_test_acc": ref[key], "test_acc": _mean(ev["qad"][key]), "ptq_test_acc": _mean(ev["ptq"][key])}


def _single(bc: dict, name: str) -> list[int]:
    for r in bc["rows"]:
        s = r["setting"]
        if s["think"] == name and s["answer"] == name and s["max_think_tokens"] is None:
            return r["correct"]
    raise KeyError(f"budget control has no uncapped single row for budget {name!r}")


def _vs(a: Sequence[int], b: Sequence[int] | None) -> dict | None:
    if b is None:
        return None
    t = compare_paired(a, b)
    return {**accuracy_summary(b), **t, "nested_better": t["diff"] > 0,
            "significant": t["mcnemar_p"] < 0.05}


def claims(ev: dict, budgets: Sequence[dict], *, parent_params: int, full_is_parent: bool) -> dict:
    """The claims table from :func:`run_evaluation`'s outcomes.

    budgets: the run's budget rows (target, params_total, params_active), largest first;
    parent_params: the parent's total parameters; full_is_parent: whether the router's budget 1.0
    resolves to the parent's sizes on every axis.
    """
    bc = ev["budget_control"]
    rows = []
    for b in budgets:
        key = f"{b['target']:g}"
        nested = _single(bc, key)
        rows.append({
            "target": b["target"], "params_total": b["params_total"], "params_active": b["params_active"],
            "total_ratio": b["params_total"] / parent_params,
            "within_tolerance": abs(b["params_total"] / parent_params / b["target"] - 1) <= ROUTER_TOLERANCE,
            "nested": accuracy_summary(nested),
            "scratch": _vs(nested, ev["scratch"].get(key)),
            "prune_distill": _vs(nested, ev["prune_distill"].get(key)),
            "qad": _vs(ev["ptq"][key], ev["qad"][key]) if ev.get("qad") else None,
        })
    accs = [r["nested"] for r in rows]  # budgets are sorted from 1.0 down
    adjacent = [{"larger": a["target"], "smaller": b["target"],
                 **compare_paired(_single(bc, f"{a['target']:g}"), _single(bc, f"{b['target']:g}"))}
                for a, b in zip(rows, rows[1:])]
    big, small = accs[0], accs[-1]
    order = {"strictly_decreasing": all(x["accuracy"] > y["accuracy"] for x, y in zip(accs, accs[1:])),
             "largest_minus_smallest": big["accuracy"] - small["accuracy"],
             "gap_at_least_5_points": big["accuracy"] - small["accuracy"] >= 0.05,
             "intervals_overlap": intervals_overlap(big, small), "adjacent": adjacent}
    router = {"all_within_3pct": all(r["within_tolerance"] for r in rows),
              "full_is_parent": bool(full_is_parent)}
    return {"budgets": rows, "order": order, "router": router,
            "parent": accuracy_summary(ev["parent"]),
            "interpolated": [{"target": r["target"], **accuracy_summary(r["correct"])} for r in ev["interpolated"]],
            "think_curves": bc["think_curves"], "pair_swap": bc["pair_swap"],
            "pairs_vs_singles": bc.get("pairs_vs_singles"),
            "caps_strictly_increasing": all(c["strictly_increasing"] for c in bc["think_curves"].values())}
