"""The claims of the main job: computed from per-problem outcomes (synthetic, known answers) and
end to end on the smoke preset (every number in the claims table recomputed from evaluation.json)."""
import json

import pytest

from elastic_kernels.infer.claims import pair_swap, pairs_vs_singles, think_curves
from elastic_kernels.infer.stats import accuracy_summary, mcnemar_exact
from elastic_kernels.train import make_config, run
from elastic_kernels.train.science import claims


def _row(think, answer, correct, cap=None, latency=1.0):
    kind = "single" if think == answer else "pair"
    label = think if kind == "single" else f"{think}->{answer}"
    if cap is not None:
        label += f" cap{cap}"
    return {"setting": {"think": think, "answer": answer, "max_think_tokens": cap, "cache_mode": "reprefill"},
            "label": label, "kind": kind, "accuracy": sum(correct) / len(correct), "correct": correct,
            "think_tokens": 5.0 if cap is None else float(cap), "latency_s": latency}


N = 200


def _ok(k):
    return [1] * k + [0] * (N - k)


def _synthetic():
    rows = [_row("1", "1", _ok(160), latency=3.0), _row("0.5", "0.5", _ok(120), latency=2.0),
            _row("0.5", "1", _ok(150), latency=2.5), _row("1", "0.5", _ok(125), latency=2.8),
            _row("1", "1", _ok(100), cap=4, latency=1.5), _row("1", "1", _ok(130), cap=8, latency=2.2),
            _row("0.5", "0.5", _ok(90), cap=4, latency=1.0), _row("0.5", "0.5", _ok(90), cap=8, latency=1.6)]
    bc = {"rows": rows, "think_curves": think_curves(rows, ["1", "0.5"]), "pair_swap": pair_swap(rows, "0.5", "1"),
          "pairs_vs_singles": pairs_vs_singles(rows)}
    ev = {"parent": _ok(161), "interpolated": [{"target": 0.75, "correct": _ok(140)}],
          "scratch": {"0.5": _ok(100)}, "prune_distill": {"0.5": _ok(119)}, "budget_control": bc}
    budgets = [{"target": 1.0, "params_total": 1000, "params_active": 800},
               {"target": 0.5, "params_total": 510, "params_active": 400}]
    return ev, budgets


def test_claims_from_known_outcomes():
    ev, budgets = _synthetic()
    c = claims(ev, budgets, parent_params=1000, full_is_parent=True)
    r1, r05 = c["budgets"]
    assert r1["nested"]["accuracy"] == 0.8 and r05["nested"]["accuracy"] == 0.6
    assert r05["scratch"]["diff"] == pytest.approx(0.1) and r05["scratch"]["mcnemar_p"] == mcnemar_exact(
        _ok(120), _ok(100))["p_value"]
    assert r05["scratch"]["significant"] and r05["scratch"]["nested_better"]
    assert r05["prune_distill"]["diff"] == pytest.approx(0.005) and not r05["prune_distill"]["significant"]
    assert r05["within_tolerance"] and r1["within_tolerance"]  # 0.51 is +2% of 0.5
    assert c["order"]["strictly_decreasing"] and c["order"]["gap_at_least_5_points"]
    assert not c["order"]["intervals_overlap"]
    (adj,) = c["order"]["adjacent"]  # 1.0 against 0.5 on the same problems
    assert (adj["larger"], adj["smaller"]) == (1.0, 0.5) and adj["diff"] == pytest.approx(0.2)
    assert adj["mcnemar_p"] == pytest.approx(mcnemar_exact(_ok(160), _ok(120))["p_value"])
    assert c["router"] == {"all_within_3pct": True, "full_is_parent": True}
    # caps: 1 rises 100 -> 130 -> 160; 0.5 stays flat at 90 then rises: not strictly increasing
    assert c["think_curves"]["1"]["strictly_increasing"] and not c["think_curves"]["0.5"]["strictly_increasing"]
    assert not c["caps_strictly_increasing"]
    assert c["pair_swap"]["diff"] == pytest.approx(0.125) and c["pair_swap"]["differ"]
    pv = c["pairs_vs_singles"]
    # 0.5->1 (0.75 at 2.5 s) against the best single no slower: 1 cap8 (0.65 at 2.2 s)
    assert pv["best"]["pair"]["label"] == "0.5->1" and pv["best"]["best_single"]["label"] == "1 cap8"
    assert pv["best"]["gain"] == pytest.approx(0.1) and pv["pair_above_singles"] and pv["significant"]
    assert pv["on_frontier"] == ["0.5->1"]
    assert c["interpolated"][0]["accuracy"] == 0.7
    budgets[1]["params_total"] = 540
    assert not claims(ev, budgets, parent_params=1000, full_is_parent=False)["router"]["all_within_3pct"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    d = tmp_path_factory.mktemp("science") / "run"
    rep = run(make_config("smoke", run_dir=str(d), qad=True))
    return d, rep


def test_smoke_claims_recomputed_from_outcomes(smoke):
    d, rep = smoke
    ev = json.loads((d / "evaluation.json").read_text())
    c = rep["claims"]
    assert c["parent"] == accuracy_summary(ev["parent"])
    singles = {r["setting"]["think"]: r for r in ev["budget_control"]["rows"]
               if r["kind"] == "single" and r["setting"]["max_think_tokens"] is None}
    for r in c["budgets"]:
        key = f"{r['target']:g}"
        assert r["nested"] == accuracy_summary(singles[key]["correct"])
        for base in ("scratch", "prune_distill"):
            if r["target"] < 1.0:
                want = mcnemar_exact(singles[key]["correct"], ev[base][key])["p_value"]
                assert r[base]["mcnemar_p"] == pytest.approx(want)
                assert r[base]["accuracy"] == pytest.approx(sum(ev[base][key]) / len(ev[base][key]))
            else:
                assert r[base] is None
        assert r["qad"] is not None
        assert r["within_tolerance"] == (abs(r["total_ratio"] / r["target"] - 1) <= 0.03)
    accs = [r["nested"]["accuracy"] for r in c["budgets"]]
    assert c["order"]["strictly_decreasing"] == all(a > b for a, b in zip(accs, accs[1:]))
    assert c["router"]["full_is_parent"]
    assert len(ev["parent"]) == rep["task"]["test_size"]
    for name in ("report.md", "report.png", "budget_control.md", "budget_control.png", "budget_control.json",
                 "baseline-0.5.safetensors", "prune-0.5.safetensors"):
        assert (d / name).is_file(), name
    md = (d / "report.md").read_text()
    assert md.index("## Claims") < md.index("## Elastic budget control")
    assert "Premise the task encodes" in md and "McNemar" in md
    assert "Budget ordering, each budget against the next smaller one" in md and "1 vs 0.75:" in md
    lat = rep["budget_control"]["latency"]
    assert lat["timed_on"] in ("checkpoint", "wider clone") and lat["bytes_fit"]["n"] >= 3
    assert all(len(p["decode"]) >= 1 for p in lat["profiles"].values())


def test_seed_summary_spread():
    from elastic_kernels.train.seeds import seed_summary
    ev, budgets = _synthetic()
    a = claims(ev, budgets, parent_params=1000, full_is_parent=True)
    ev["parent"] = _ok(151)
    b = claims(ev, budgets, parent_params=1000, full_is_parent=True)
    s = seed_summary({0: {"claims": a}, 1: {"claims": b}})
    q = s["quantities"]["parent"]
    assert s["seeds"] == [0, 1] and q["values"] == [0.805, 0.755] and q["mean"] == pytest.approx(0.78)
    assert q["std"] == pytest.approx(0.0353553, rel=1e-5) and q["min"] == 0.755 and q["max"] == 0.805
    assert s["claims"]["strictly_decreasing"] == {"yes": 2, "of": 2}
    assert s["claims"]["caps_strictly_increasing"] == {"yes": 0, "of": 2}
    assert s["quantities"]["scratch@0.5"]["values"] == [0.5, 0.5]


def test_write_seed_summary_merges_separate_runs(tmp_path):
    """Reports of separate runs (seed 0 alone, then --seed 1 --seeds 2) merge into one seeds.json / seeds.md."""
    from elastic_kernels.train.seeds import seed_summary, write_seed_summary
    ev, budgets = _synthetic()
    reps = {}
    for seed, k in ((0, 161), (1, 151), (2, 141)):
        ev["parent"] = _ok(k)
        reps[seed] = {"claims": claims(ev, budgets, parent_params=1000, full_is_parent=True)}
    got = write_seed_summary(reps, tmp_path / "out")
    assert got == seed_summary(reps) == json.loads((tmp_path / "out" / "seeds.json").read_text())
    md = (tmp_path / "out" / "seeds.md").read_text()
    assert md.startswith("# Spread over seeds [0, 1, 2]") and "0.805, 0.755, 0.705" in md


def test_seed_summary_counts_qad_against_ptq():
    """With QAD, every seed's QAD accuracy, its gain over PTQ and whether it is significant per budget."""
    from elastic_kernels.train.seeds import seed_summary
    ev, budgets = _synthetic()
    # budget 1: QAD 150 vs PTQ 100 correct of 200 (50 discordant problems, all for QAD); budget 0.5: a tie
    ev["qad"], ev["ptq"] = {"1": _ok(150), "0.5": _ok(120)}, {"1": _ok(100), "0.5": _ok(120)}
    s = seed_summary({0: {"claims": claims(ev, budgets, parent_params=1000, full_is_parent=True)}})
    assert s["quantities"]["qad@1"]["values"] == [0.75] and s["quantities"]["qad-ptq@1"]["values"] == [0.25]
    assert s["quantities"]["qad-ptq@0.5"]["values"] == [0.0]
    assert s["claims"]["qad>ptq@1 (p<0.05)"] == {"yes": 1, "of": 1}
    assert s["claims"]["qad>ptq@0.5 (p<0.05)"] == {"yes": 0, "of": 1}
