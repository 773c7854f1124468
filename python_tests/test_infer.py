"""Tests of elastic budget control (elastic_kernels.infer): phase-switched generation, mixed-budget
batches, evaluation and the Pareto report, the CLI.

The oracles below are written plainly: every token is the argmax of a *full re-forward* of the
whole sequence (no cache) at the budget of the current phase.
"""
from __future__ import annotations

import json

import pytest
import torch

from elastic_kernels.infer import (EmptyPromptError, GenerationError, PromptTooLongError, UnknownBudgetError,
                                   generate)
from elastic_kernels.models.config import AXES, Budget, ElasticHybridConfig
from elastic_kernels.models.model import ElasticHybridLM
from elastic_kernels.tasks import get as get_task

VOCAB = 20
TASK = get_task("arithmetic")  # its special ids; the model below shares its vocabulary size
IDS = dict(end_think_id=TASK.end_think_id, eos_id=TASK.eos_id)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ElasticHybridConfig(vocab_size=VOCAB, hidden_size=32, pattern="M-M*ME", mamba_heads=4, mamba_head_dim=8,
                              mamba_state=8, mamba_chunk_size=8, moe_experts=4, moe_ffn=32, ffn_size=64,
                              attn_heads=2, attn_kv_heads=1, init_std=0.1,
                              nested_choices={a: (1.0, 0.5) for a in AXES})
    return ElasticHybridLM(cfg).eval()


@pytest.fixture(scope="module")
def budgets(model):
    return {"full": Budget(), "half": Budget.from_fractions(model.config, 0.5),
            "mixed": Budget.from_fractions(model.config, hidden=0.5, ffn=0.5)}


def _argmax_next(model, seq, budget):
    with torch.no_grad():
        return int(model(torch.tensor([seq]), budget=budget)[0, -1].argmax())


def plain_greedy(model, prompt, steps, budget=None):
    seq = list(prompt)
    for _ in range(steps):
        seq.append(_argmax_next(model, seq, budget))
    return seq[len(prompt):]


def switch_oracle(model, prompt, think_b, answer_b, *, end_id, eos_id, max_think=None, max_answer=8):
    """Think at ``think_b`` until ``end_id`` (forced after ``max_think`` tokens), answer at ``answer_b``."""
    seq, thinking, answer = list(prompt), [], []
    while True:
        tok = end_id if max_think is not None and len(thinking) == max_think else _argmax_next(model, seq, think_b)
        thinking.append(tok)
        seq.append(tok)
        if tok == end_id:
            break
        if tok == eos_id:
            return thinking, answer
    while len(answer) < max_answer:
        tok = _argmax_next(model, seq, answer_b)
        answer.append(tok)
        seq.append(tok)
        if tok == eos_id:
            break
    return thinking, answer


def _first_new(tokens, start):
    """Index of the first token at or after ``start`` that does not occur earlier."""
    for j in range(start, len(tokens)):
        if tokens[j] not in tokens[:j]:
            return j
    raise AssertionError(f"no fresh token in {tokens}")


PROMPTS = [[1, 5, 6, 7, 3], [1, 8, 9, 3], [1, 12, 10, 7, 3], [1, 5, 5, 5, 5, 5, 3], [1, 9, 3]]


# ---- phase switching ---------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_full_full_equals_plain_greedy(model, prompt):
    """think = answer = full: the output is plain greedy decoding of the parent, token for token,
    through the switch (end-of-thinking and eos ids are taken from the greedy output itself)."""
    ref = plain_greedy(model, prompt, 24)
    j = _first_new(ref, 3)          # this token ends the thinking
    k = _first_new(ref, j + 2)      # this one ends the answer
    end_id, eos_id = ref[j], ref[k]
    (g,) = generate(model, [prompt], think_budget="full", answer_budget="full", max_answer_tokens=64,
                    end_think_id=end_id, eos_id=eos_id)
    assert g.completion == ref[:k + 1]
    assert g.thinking == ref[:j + 1] and g.answer == ref[j + 1:k + 1]
    assert g.switched and not g.forced_switch and g.stop == "eos"
    # one submodel for both phases: its cache stays valid, no re-prefill at the switch
    assert g.work["answer"]["prefill_tokens"] == 0 and g.work["answer"]["decode_tokens"] == k - j


@pytest.mark.parametrize("think,answer", [("half", "full"), ("full", "half"), ("mixed", "half")])
def test_switch_exactly_at_end_of_thinking(model, budgets, think, answer):
    prompt = PROMPTS[0]
    ref = plain_greedy(model, prompt, 12, budgets[think])
    j = _first_new(ref, 2)
    end_id = ref[j]
    eos_id = next(t for t in range(VOCAB) if t not in ref[:j + 1] and t != end_id)
    (g,) = generate(model, [prompt], think_budget=think, answer_budget=answer, budgets=budgets,
                    max_answer_tokens=8, end_think_id=end_id, eos_id=eos_id)
    assert g.thinking == ref[:j + 1]  # think model up to and including the end-of-thinking token
    assert g.thinking.count(end_id) == 1 and g.thinking[-1] == end_id and g.switched and not g.forced_switch
    want_t, want_a = switch_oracle(model, prompt, budgets[think], budgets[answer], end_id=end_id, eos_id=eos_id)
    assert (g.thinking, g.answer) == (want_t, want_a)
    # the answer model really is another model here: staying at the think budget answers differently
    stay = switch_oracle(model, prompt, budgets[think], budgets[think], end_id=end_id, eos_id=eos_id)[1]
    assert stay != g.answer


@pytest.mark.parametrize("cap", [0, 1, 5])
def test_forced_switch_at_max_think_tokens(model, budgets, cap):
    prompt = PROMPTS[1]
    ref = plain_greedy(model, prompt, 16, budgets["half"])
    end_id = next(t for t in range(VOCAB) if t not in ref)  # never produced: only the cap can end thinking
    eos_id = next(t for t in range(VOCAB) if t not in ref and t != end_id)
    (g,) = generate(model, [prompt], think_budget="half", answer_budget="full", budgets=budgets,
                    max_think_tokens=cap, max_answer_tokens=6, end_think_id=end_id, eos_id=eos_id)
    assert g.thinking == ref[:cap] + [end_id]
    assert g.forced_switch and g.switched
    want = switch_oracle(model, prompt, budgets["half"], Budget(), end_id=end_id, eos_id=eos_id, max_think=cap,
                         max_answer=6)
    assert (g.thinking, g.answer) == want
    assert len(g.answer) == 6 and g.stop == "max_answer_tokens"


def test_cap_does_not_fire_after_natural_end(model, budgets):
    """A cap larger than the natural thinking length changes nothing."""
    prompt = PROMPTS[2]
    ref = plain_greedy(model, prompt, 12, budgets["half"])
    j = _first_new(ref, 2)
    kw = dict(think_budget="half", budgets=budgets, end_think_id=ref[j], eos_id=TASK.eos_id)
    a = generate(model, [prompt], max_think_tokens=j + 1, **kw)
    b = generate(model, [prompt], **kw)
    assert a[0].completion == b[0].completion and not a[0].forced_switch


# ---- batching ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cache_mode", ["reprefill", "reuse"])
def test_mixed_budget_batch_equals_alone(model, budgets, cache_mode):
    """Requests with different think/answer budgets, caps and prompt lengths in one call (rows that
    switch at different steps, finish at different steps) equal each request generated alone."""
    ref = plain_greedy(model, PROMPTS[0], 10)
    end_id, eos_id = ref[_first_new(ref, 2)], ref[_first_new(ref, 5)]
    prompts = PROMPTS + [PROMPTS[0], PROMPTS[1]]
    names = list(budgets)
    thinks = [names[i % 3] for i in range(len(prompts))]
    answers = [names[(i + 1) % 3] for i in range(len(prompts))]
    caps = [None, 3, None, 2, 6, 1, None]
    kw = dict(budgets=budgets, max_answer_tokens=5, end_think_id=end_id, eos_id=eos_id, cache_mode=cache_mode)
    batch = generate(model, prompts, think_budget=thinks, answer_budget=answers, max_think_tokens=caps, **kw)
    assert len({len(g.thinking) for g in batch}) > 1  # the rows really switch at different steps
    for i, p in enumerate(prompts):
        (alone,) = generate(model, [p], think_budget=thinks[i], answer_budget=answers[i], max_think_tokens=caps[i],
                            **kw)
        assert (batch[i].thinking, batch[i].answer) == (alone.thinking, alone.answer), i
        assert batch[i].work == alone.work
        assert (batch[i].think_budget, batch[i].answer_budget) == (thinks[i], answers[i])


@pytest.mark.parametrize("cache_mode", ["reprefill", "reuse"])
def test_one_forward_per_step(model, budgets, cache_mode):
    """Equal-length requests in different phases and budgets share each decode forward; a step
    where rows switch adds one batched re-prefill (re-prefill mode only)."""
    calls = []

    def hook(mod, args, kwargs, out):
        calls.append((tuple(args[0].shape), kwargs["budget"]))

    ref = plain_greedy(model, PROMPTS[0], 10)
    end_id = ref[_first_new(ref, 2)]
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[0], PROMPTS[2]]  # one length
    thinks, answers, caps = ["half", "full", "mixed", "full"], ["full", "half", "half", "full"], [1, 2, None, 4]
    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        gens = generate(model, prompts, think_budget=thinks, answer_budget=answers, max_think_tokens=caps,
                        budgets=budgets, max_answer_tokens=3, end_think_id=end_id, eos_id=TASK.eos_id,
                        cache_mode=cache_mode)
    finally:
        handle.remove()
    steps = max(len(g.completion) for g in gens) - 1  # the last tokens are never fed
    switch_steps = {len(g.thinking) for g in gens if g.switched and g.think_budget != g.answer_budget}
    assert len(calls) == 1 + steps + (len(switch_steps) if cache_mode == "reprefill" else 0)
    decode = [b for shape, b in calls if shape[1] == 1]
    assert len(decode) == steps
    # some decode forward served think-phase and answer-phase rows at different budgets together
    assert any(isinstance(b, list) and len({bb.hidden for bb in b}) > 1 for b in decode)


def test_batch_size_does_not_change_results(model, budgets):
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[2]] * 2
    kw = dict(think_budget="half", answer_budget="full", budgets=budgets, max_think_tokens=4, max_answer_tokens=3,
              **IDS)
    a = generate(model, prompts, batch_size=64, **kw)
    b = generate(model, prompts, batch_size=2, **kw)
    assert [g.completion for g in a] == [g.completion for g in b]


def test_reuse_mode_with_one_budget_is_exact(model, budgets):
    """With think == answer budget the reused cache is the exact cache: both modes agree."""
    prompts = PROMPTS[:3]
    kw = dict(think_budget="half", answer_budget="half", budgets=budgets, max_think_tokens=3, max_answer_tokens=4,
              **IDS)
    a = generate(model, prompts, cache_mode="reprefill", **kw)
    b = generate(model, prompts, cache_mode="reuse", **kw)
    assert [g.completion for g in a] == [g.completion for g in b]
    assert all(g.work["answer"]["prefill_tokens"] == 0 for g in b)


# ---- sampling and limits -----------------------------------------------------------------------
def test_sampling_seeded_per_request(model, budgets):
    kw = dict(think_budget="half", answer_budget="full", budgets=budgets, max_think_tokens=6, max_answer_tokens=4,
              **IDS,
              sampling="sample", temperature=1.5, top_p=0.9)
    batch = generate(model, PROMPTS[:3], seed=11, **kw)
    again = generate(model, PROMPTS[:3], seed=11, **kw)
    assert [g.completion for g in batch] == [g.completion for g in again]
    for i, p in enumerate(PROMPTS[:3]):
        (alone,) = generate(model, [p], seed=[11 + i], **kw)
        assert alone.completion == batch[i].completion
    # a nucleus that keeps only the top token is greedy
    tiny = generate(model, PROMPTS[:3], **{**kw, "top_p": 1e-9})
    greedy = generate(model, PROMPTS[:3], **{**kw, "sampling": "greedy"})
    assert [g.completion for g in tiny] == [g.completion for g in greedy]


def test_max_length_stops(model):
    prompt = PROMPTS[0]
    ref = plain_greedy(model, prompt, 8)
    end_id = next(t for t in range(VOCAB) if t not in ref)
    (g,) = generate(model, [prompt], max_length=len(prompt) + 4, end_think_id=end_id, eos_id=end_id)
    assert g.thinking == ref[:4] and g.answer == [] and g.stop == "max_length" and not g.switched


# ---- bad requests ------------------------------------------------------------------------------
def test_bad_requests(model, budgets):
    with pytest.raises(UnknownBudgetError, match=r"think_budget 'huge' is not a known budget.*half"):
        generate(model, [PROMPTS[0]], think_budget="huge", budgets=budgets, **IDS)
    with pytest.raises(UnknownBudgetError, match="answer_budget 'tiny'"):
        generate(model, [PROMPTS[0]], answer_budget="tiny", budgets=budgets, **IDS)
    with pytest.raises(EmptyPromptError, match=r"prompts\[1\] is empty"):
        generate(model, [PROMPTS[0], []], **IDS)
    with pytest.raises(PromptTooLongError, match=r"prompts\[0\] has 5 tokens; max_length=5"):
        generate(model, [PROMPTS[0]], max_length=5, **IDS)
    with pytest.raises(GenerationError, match="sampling must be one of"):
        generate(model, [PROMPTS[0]], sampling="beam", **IDS)
    with pytest.raises(GenerationError, match="temperature"):
        generate(model, [PROMPTS[0]], sampling="sample", temperature=0.0, **IDS)
    with pytest.raises(GenerationError, match="cache_mode"):
        generate(model, [PROMPTS[0]], cache_mode="magic", **IDS)
    with pytest.raises(GenerationError, match="think_budget has 1 entries, expected one per prompt"):
        generate(model, PROMPTS[:2], think_budget=["full"], **IDS)
    with pytest.raises(GenerationError, match=r"token id 99 outside \[0, 20\)"):
        generate(model, [[1, 99]], **IDS)
    with pytest.raises(GenerationError, match="max_think_tokens must be >= 0"):
        generate(model, [PROMPTS[0]], max_think_tokens=-1, **IDS)
    with pytest.raises(TypeError, match="prompts must be a list"):
        generate(model, "1+2", **IDS)
    with pytest.raises(ValueError, match="mamba_heads"):
        generate(model, [PROMPTS[0]], think_budget=Budget(mamba_heads=3), **IDS)
    assert generate(model, [], **IDS) == []  # no requests: no work
    # token ids must be ints (not floats, bools, strings) in range; temperature finite and >= 0
    for bad in ([1, 2.0, 3], [1, True], [1, "3"]):
        with pytest.raises(TypeError, match=r"prompts\[1\]\[1\] must be an int token id"):
            generate(model, [PROMPTS[0], bad], **IDS)
    with pytest.raises(TypeError, match=r"prompts\[0\] must hold int token ids, got a torch.float32 tensor"):
        generate(model, [torch.tensor([1, 3.5])], **IDS)
    with pytest.raises(GenerationError, match=r"prompts\[0\] has token id -1 outside"):
        generate(model, [[1, -1]], **IDS)
    for t in (float("nan"), float("inf"), -1.0):
        with pytest.raises(GenerationError, match="temperature must be finite and >= 0"):
            generate(model, [PROMPTS[0]], temperature=t, **IDS)
    with pytest.raises(TypeError, match="temperature must be a float"):
        generate(model, [PROMPTS[0]], temperature="hot", **IDS)
    with pytest.raises(TypeError, match="end_think_id"):
        generate(model, [PROMPTS[0]])  # the special ids belong to the task: no hidden defaults
    ok = generate(model, [torch.tensor(PROMPTS[0]), [torch.tensor(t) for t in PROMPTS[1]]], max_think_tokens=1,
                  **IDS)
    assert ok[0].prompt == PROMPTS[0] and ok[1].prompt == PROMPTS[1]
    assert issubclass(UnknownBudgetError, ValueError) and issubclass(EmptyPromptError, ValueError)
    assert json.dumps(str(PromptTooLongError("x")))


def test_work_counters(model, budgets):
    """The cost model's inputs: what each phase computed, for both cache modes."""
    ref = plain_greedy(model, PROMPTS[0], 12, budgets["half"])
    j = _first_new(ref, 2)
    kw = dict(think_budget="half", answer_budget="full", budgets=budgets, end_think_id=ref[j], max_answer_tokens=3,
              eos_id=TASK.eos_id)
    (g,) = generate(model, [PROMPTS[0]], **kw)
    L, T = len(PROMPTS[0]), len(g.thinking)
    assert T == j + 1 and g.stop == "max_answer_tokens" and len(g.answer) == 3
    assert g.work["think"] == {"prefill_tokens": L, "prefill_forwards": 1, "decode_tokens": T - 1,
                               "prefill_context": L * (L + 1) // 2,
                               "decode_context": sum(range(L + 1, L + T))}
    assert g.work["answer"] == {"prefill_tokens": L + T, "prefill_forwards": 1, "decode_tokens": 2,
                                "prefill_context": (L + T) * (L + T + 1) // 2,
                                "decode_context": (L + T + 1) + (L + T + 2)}
    (r,) = generate(model, [PROMPTS[0]], cache_mode="reuse", **kw)
    assert r.thinking == g.thinking
    assert r.work["think"] == g.work["think"]
    assert r.work["answer"] == {"prefill_tokens": 0, "prefill_forwards": 0, "decode_tokens": 3,
                                "prefill_context": 0, "decode_context": sum(range(L + T, L + T + 3))}


# ---- evaluation, Pareto, report, CLI -----------------------------------------------------------
def _row(label, kind, acc, cost, think=None, answer=None, cap=None, mode="reprefill"):
    think = think or label
    return {"label": label, "kind": kind, "accuracy": acc, "flops": cost, "bytes": 2 * cost, "wall_s": cost / 10,
            "setting": {"think": think, "answer": answer or think, "max_think_tokens": cap, "cache_mode": mode}}


def test_pareto_frontier():
    from elastic_kernels.infer import pareto_frontier
    rows = [{"c": 3.0, "accuracy": 0.9}, {"c": 1.0, "accuracy": 0.2}, {"c": 2.0, "accuracy": 0.2},
            {"c": 2.0, "accuracy": 0.5}, {"c": 5.0, "accuracy": 0.9}, {"c": 4.0, "accuracy": 0.95},
            {"c": 1.0, "accuracy": 0.2}]
    assert pareto_frontier(rows, "c") == [1, 3, 0, 5]
    assert pareto_frontier([], "c") == []


def test_analyze_pair_against_singles():
    from elastic_kernels.infer import analyze
    rows = [_row("big", "single", 0.8, 10.0), _row("small", "single", 0.3, 4.0),
            _row("big cap4", "single", 0.4, 6.0, think="big", cap=4),
            _row("small->big", "pair", 0.6, 6.0, think="small", answer="big"),
            _row("big->small", "pair", 0.35, 7.0, think="big", answer="small"),
            _row("small->big (reuse)", "reuse", 0.45, 5.0, think="small", answer="big", mode="reuse")]
    an = analyze(rows)
    a = an["flops"]
    assert a["frontier"] == ["small", "small->big", "big"]
    assert a["pair_dominates_best_single"]
    (b,) = a["pairs_beating_singles"]
    assert b["pair"] == "small->big" and b["best_single_within_cost"] == "big cap4"
    assert b["best_single_accuracy"] == 0.4 and b["dominates"] == ["big cap4"]
    (r,) = an["reuse"]
    assert r["pair"] == "small->big" and r["delta"] == pytest.approx(-0.15) and r["flops_saved"] == pytest.approx(1 / 6)
    # no pair above the single-model frontier: said plainly
    rows[3]["accuracy"] = 0.35
    rows[4]["accuracy"] = 0.4
    assert not analyze(rows)["flops"]["pair_dominates_best_single"]
    assert analyze(rows)["flops"]["pairs_beating_singles"] == []


def test_cost_model(model, budgets):
    from elastic_kernels.infer import CostModel
    cm = CostModel(model, budgets)
    full, half = cm.per_budget["full"], cm.per_budget["half"]
    assert full["params_active"] == model.param_count(None, active=True)
    assert half["flops_per_token"] < full["flops_per_token"] and half["decode_bytes"] < full["decode_bytes"]
    (g,) = generate(model, [PROMPTS[0]], think_budget="half", answer_budget="half", budgets=budgets,
                    max_think_tokens=3, max_answer_tokens=2, **IDS)
    w = g.work
    assert w["think"]["prefill_forwards"] == 1 and w["answer"]["prefill_forwards"] == 0  # same model: no re-prefill
    tokens = sum(w[p]["prefill_tokens"] + w[p]["decode_tokens"] for p in w)
    ctx = sum(w[p]["prefill_context"] + w[p]["decode_context"] for p in w)
    c = cm.request_cost(g)
    assert c["flops"] == pytest.approx(half["flops_per_token"] * tokens + cm.attn_flops_per_position * ctx)
    assert c["bytes"] == pytest.approx(half["decode_bytes"] * (w["think"]["decode_tokens"] + w["answer"]["decode_tokens"])
                                       + half["prefill_bytes"] * 1
                                       + cm.kv_bytes_per_position * (w["think"]["decode_context"]
                                                                     + w["answer"]["decode_context"]))


def _fake_run(tmp_path, model, budgets, test_size=6):
    from elastic_kernels.models import save_nested
    save_nested(model, tmp_path / "nested", {"1": budgets["full"], "0.5": budgets["half"]})
    task = get_task("arithmetic", modulus=10, difficulty=1, seed=0)
    (tmp_path / "progress.json").write_text(json.dumps({"config": {"test_size": test_size}, "task": task.to_dict()}))
    return tmp_path


def test_evaluate_run_and_cli(model, budgets, tmp_path, capsys):
    from elastic_kernels.infer import budget_control_markdown
    from elastic_kernels.infer.cli import main
    run = _fake_run(tmp_path, model, budgets)
    assert budget_control_markdown(run) == ""  # nothing evaluated yet: the training report adds nothing
    assert main(["--run-dir", str(run), "--limit", "5", "--caps", "1", "3", "--batch-size", "4", "--repeats", "2",
                 "--device", "cpu"]) == 0
    rep = json.loads((run / "budget_control.json").read_text())
    assert (run / "budget_control.png").stat().st_size > 0
    labels = [r["label"] for r in rep["rows"]]
    assert labels == ["1", "1->0.5", "0.5->1", "0.5", "1 cap1", "1 cap3", "0.5 cap1", "0.5 cap3",
                      "1->0.5 (reuse)", "0.5->1 (reuse)"]
    assert rep["task"]["n_problems"] == 5 and all(r["n"] == 5 for r in rep["rows"])
    assert all(len(r["wall_s_passes"]) == 2 and r["wall_s_total"] == min(r["wall_s_passes"]) for r in rep["rows"])
    for r in rep["rows"]:
        assert 0 <= r["accuracy"] <= 1 and r["flops"] > 0 and r["bytes"] > 0 and r["wall_s"] > 0
        if r["setting"]["max_think_tokens"] is not None:  # the cap holds (</think> included)
            assert r["think_tokens"] <= r["setting"]["max_think_tokens"] + 1
    md = (run / "budget_control.md").read_text()
    assert md == budget_control_markdown(run) == budget_control_markdown(rep)
    assert "| 1->0.5 | pair |" in md and "cache reuse" in md
    assert "frontier" in capsys.readouterr().out


def _usage_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    return err


def test_cli_bad_run_dir(tmp_path, capsys):
    from elastic_kernels.infer.cli import main
    assert "no progress.json" in _usage_error(main, ["--run-dir", str(tmp_path)], capsys)
    (tmp_path / "progress.json").write_text(json.dumps({"config": {}, "task": TASK.to_dict()}))
    assert "has not finished its elastic stage" in _usage_error(main, ["--run-dir", str(tmp_path)], capsys)
    err = _usage_error(main, ["--run-dir", str(tmp_path), "--checkpoint", "qad"], capsys)
    assert "no nested checkpoint 'qad'" in err


EVAL_BAD_VALUES = [
    ([], "--run-dir"), (["--limit", "-1"], "--limit"), (["--limit", "x"], "--limit"), (["--caps", "a", "b"], "--caps"),
    (["--caps", "-1"], "--caps"), (["--batch-size", "0"], "--batch-size"), (["--repeats", "0"], "--repeats"),
    (["--checkpoint", "foo"], "--checkpoint"), (["--threads", "-2"], "--threads"), (["--device", "tpu"], "--device"),
    (["--reuse", "false"], "false"), (["--out", "x"], "--out"),
]


@pytest.mark.parametrize("argv,option", EVAL_BAD_VALUES, ids=[" ".join(a) or "no-run-dir" for a, _ in EVAL_BAD_VALUES])
def test_eval_cli_bad_value_is_usage_error(argv, option, tmp_path, capsys):
    from elastic_kernels.infer.cli import main
    run_dir = ["--run-dir", str(tmp_path)] if option != "--run-dir" else []
    assert option in _usage_error(main, run_dir + argv, capsys)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_eval_cli_device_and_interrupt(model, budgets, tmp_path, capsys, signame):
    """--device cuda without CUDA is a usage error; SIGTERM or Ctrl-C (SIGINT) mid-run exits
    cleanly (143 / 130, no traceback). The child runs in its own session; SIGINT is skipped when
    this process ignores it (a background job), since the child would inherit that."""
    import os
    import signal
    import subprocess
    import sys
    from elastic_kernels.infer.cli import main
    sig = getattr(signal, signame)
    if sig == signal.SIGINT and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        pytest.skip("SIGINT is ignored by this process (background job); the child would inherit that")
    if not torch.cuda.is_available():
        assert "--device: cuda was requested" in _usage_error(main, ["--run-dir", str(tmp_path), "--device", "cuda"],
                                                             capsys)
    run = _fake_run(tmp_path, model, budgets, test_size=400)
    proc = subprocess.Popen([sys.executable, "-m", "elastic_kernels.infer", "--run-dir", str(run), "--repeats", "50"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    seen = []
    for line in proc.stdout:  # the first finished setting: evaluation is under way
        seen.append(line)
        if "budget control 1/" in line:
            break
    proc.send_signal(sig)
    out = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], out[-2000:]
    assert "interrupted; no report written" in out and "Traceback" not in out


def test_module_entry_point():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "elastic_kernels.infer", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--run-dir" in out.stdout and "--caps" in out.stdout and "--no-reuse" in out.stdout


def test_eval_on_smoke_training_run(tmp_path):
    """elastic-eval on the run directory the training loop writes (smoke preset, with the QAD export)."""
    from elastic_kernels.infer import run_budget_control
    from elastic_kernels.train.config import make_config
    from elastic_kernels.train.pipeline import run
    run_dir = tmp_path / "run"
    run(make_config("smoke", run_dir=str(run_dir), baselines=False, qad=True, threads=1))
    for ckpt in ("nested", "qad"):
        rep = run_budget_control(run_dir, limit=4, caps=[2], reuse=False, checkpoint=ckpt,
                                 out_dir=tmp_path / ckpt)
        names = rep["budget_order"]
        assert sorted(names) == ["0.5", "0.75", "1"]
        assert len(rep["rows"]) == len(names) ** 2 + len(names)
        assert (tmp_path / ckpt / "budget_control.md").is_file()
