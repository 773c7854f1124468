"""The single-request latency harness on a toy model: physically sliced submodels, timings, fits,
per-request composition from real token counts, the wider clone."""
import pytest
import torch

from elastic_kernels.infer.generate import generate
from elastic_kernels.infer.latency import (BudgetLatency, fit_time_vs_bytes, measure_budget, measure_budgets,
                                           overhead_bound, percentile, request_latency, wider_budget, wider_clone)
from elastic_kernels.models import Budget, ElasticHybridConfig, ElasticHybridLM, load_nested, save_nested

TOY = dict(vocab_size=24, hidden_size=32, pattern="M-*E", mamba_heads=8, mamba_head_dim=8, mamba_groups=2,
           mamba_state=8, mamba_chunk_size=8, moe_experts=4, moe_top_k=2, moe_ffn=32, attn_heads=2, attn_kv_heads=1,
           ffn_size=32)


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    torch.manual_seed(0)
    model = ElasticHybridLM(ElasticHybridConfig(**TOY)).eval()
    table = {"1": Budget(), "0.5": Budget.from_fractions(model.config, 0.5)}
    path = tmp_path_factory.mktemp("nested") / "ck"
    save_nested(model, path, table)
    return model, table, path


def test_measure_budget_on_sliced_submodels(nested):
    model, table, path = nested
    subs = {n: load_nested(path, n) for n in table}
    assert subs["0.5"].param_count(None) == model.param_count(table["0.5"]) < model.param_count(None)
    lat = measure_budgets(subs, prefill_lengths=[4, 9], decode_contexts=[5, 12], repeats=7, warmup=1)
    for name, b in lat.items():
        assert [p["tokens"] for p in b.prefill] == [4, 9] and [d["context"] for d in b.decode] == [5, 12]
        for row in b.prefill + b.decode:
            assert 0 < row["min_s"] <= row["median_s"]
        assert b.params_total == subs[name].param_count(None)
        # two points: the fit goes through both medians
        for p in b.prefill:
            assert b.prefill_s(p["tokens"]) == pytest.approx(p["median_s"], rel=1e-6)
        for d in b.decode:
            assert b.decode_s(d["context"]) == pytest.approx(d["median_s"], rel=1e-6)
            assert b.decode_median_at(d["context"] + 1) == d["median_s"]
        assert b.to_dict()["name"] == name
    ob = overhead_bound(lat, "1", "0.5", 5)
    assert ob["ratio"] == pytest.approx(lat["0.5"].decode[0]["median_s"] / lat["1"].decode[0]["median_s"])
    assert ob["overhead_bound"] == (ob["ratio"] > 0.9)


def test_measure_budget_rejects_few_repeats(nested):
    model = nested[0]
    with pytest.raises(ValueError, match="repeats"):
        measure_budget(model, "1", prefill_lengths=[4], decode_contexts=[4], repeats=3)
    with pytest.raises(ValueError, match="prefill_lengths"):
        measure_budget(model, "1", prefill_lengths=[], decode_contexts=[4])


def test_decode_timing_does_not_advance_the_cache(nested):
    """Every timed decode sees the same cache length: a cloned cache per run."""
    model = nested[0]
    lengths = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: lengths.append(kw["cache"].seqlen)
                                           if args[0].shape[1] == 1 else None, with_kwargs=True)
    try:
        measure_budget(model, "1", prefill_lengths=[3], decode_contexts=[6], repeats=7, warmup=2)
    finally:
        hook.remove()
    assert lengths == [6] * 9


def _fixed(name, pre, dec):
    b = BudgetLatency(name, 1)
    b.prefill_fit = {"intercept": pre[0], "slope": pre[1], "r2": 1.0}
    b.decode_fit = {"intercept": dec[0], "slope": dec[1], "r2": 1.0}
    return b


def test_request_latency_from_token_counts(nested):
    model, table, _ = nested
    think, answer = _fixed("small", (1.0, 0.1), (0.5, 0.01)), _fixed("big", (2.0, 0.2), (1.0, 0.02))
    g = generate(model, [[1, 5, 6, 7]], think_budget="0.5", answer_budget="1", budgets=table, max_think_tokens=3,
                 max_answer_tokens=2, end_think_id=4, eos_id=2)[0]
    w = g.work
    r = request_latency(w, think, answer)
    # think: prompt prefill, then one decode per generated thinking token at cache length 4, 5, ...
    assert r["prefill_s"] == pytest.approx(1.0 + 0.1 * 4)
    nd = w["think"]["decode_tokens"]
    assert r["think_s"] == pytest.approx(sum(0.5 + 0.01 * (4 + i) for i in range(nd)))
    assert w["answer"]["prefill_forwards"] == 1
    assert r["switch_s"] == pytest.approx(2.0 + 0.2 * w["answer"]["prefill_tokens"])
    na = w["answer"]["decode_tokens"]
    start = w["answer"]["prefill_tokens"]
    assert r["answer_s"] == pytest.approx(sum(1.0 + 0.02 * (start + i) for i in range(na)))
    assert r["total_s"] == pytest.approx(r["prefill_s"] + r["think_s"] + r["switch_s"] + r["answer_s"])
    same = generate(model, [[1, 5, 6, 7]], think_budget="1", answer_budget="1", budgets=table, max_think_tokens=3,
                    max_answer_tokens=2, end_think_id=4, eos_id=2)[0]
    assert request_latency(same.work, answer, answer)["switch_s"] == 0.0


def test_wider_clone_keeps_shape_fractions(nested):
    model, table, _ = nested
    wide = wider_clone(model.config, 4)
    assert wide.config.hidden_size == 4 * model.config.hidden_size
    assert wide.config.head_dim == model.config.head_dim
    for name, b in table.items():
        wb = wider_budget(b, model.config, 4)
        small, big = b.resolve(model.config), wb.resolve(wide.config)
        for axis in small:
            full_s = [model.config.full_size(axis, i) for i in range(len(small[axis]))]
            full_b = [wide.config.full_size(axis, i) for i in range(len(big[axis]))]
            assert [s / f for s, f in zip(small[axis], full_s)] == [s / f for s, f in zip(big[axis], full_b)]
        sub = wide.slice(wb)
        assert sub(torch.tensor([[1, 2, 3]])).shape == (1, 3, model.config.vocab_size)
    with pytest.raises(ValueError, match="factor"):
        wider_clone(model.config, 0)


def test_fit_time_vs_bytes_and_percentile():
    pts = [(1e3 * i, 2e-5 + 3e-9 * 1e3 * i) for i in range(1, 6)]
    f = fit_time_vs_bytes(pts)
    assert f["slope"] == pytest.approx(3e-9) and f["intercept"] == pytest.approx(2e-5) and f["r2"] == pytest.approx(1)
    assert f["n"] == 5
    assert fit_time_vs_bytes([(1.0, 2.0), (1.0, 4.0)])["r2"] is None
    assert fit_time_vs_bytes([(1.0, 2.0), (3.0, 2.0)]) == {"intercept": 2.0, "slope": 0.0, "r2": None, "n": 2}
    assert percentile([3, 1, 2, 4], 50) == pytest.approx(2.5)
    assert percentile(list(range(11)), 90) == pytest.approx(9.0)
    with pytest.raises(ValueError):
        percentile([], 50)
