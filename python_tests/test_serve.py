"""Tests of serving mixed budgets in one ragged batch (elastic_kernels.infer.scheduler): packed
prefill of prompts of different lengths, rows at their own cache lengths, continuous batching,
the scheduler's API, and 200 requests with random arrivals.

The reference of every request is the request generated alone; the model-level tests compare with
plain full forwards of each sequence alone (no cache), in float64 so that only real errors show.
"""
from __future__ import annotations

import random

import pytest
import torch

from elastic_kernels.infer import Scheduler, generate
from elastic_kernels.infer.scheduler import GenerationError
from elastic_kernels.models import HybridCache
from elastic_kernels.models.config import AXES, Budget, ElasticHybridConfig
from elastic_kernels.models.model import ElasticHybridLM

VOCAB = 20


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(dtype=torch.float64, pattern="M-M*ME"):
    torch.manual_seed(0)
    cfg = ElasticHybridConfig(vocab_size=VOCAB, hidden_size=32, pattern=pattern, mamba_heads=4, mamba_head_dim=8,
                              mamba_state=8, mamba_chunk_size=8, moe_experts=4, moe_ffn=32, ffn_size=64,
                              attn_heads=2, attn_kv_heads=1, init_std=0.1,
                              nested_choices={a: (1.0, 0.5) for a in AXES})
    return ElasticHybridLM(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


def table(model):
    return {"full": Budget(), "half": Budget.from_fractions(model.config, 0.5),
            "mixed": Budget.from_fractions(model.config, hidden=0.5, ffn=0.5)}


def _seqs(lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lens]


# ---- the model: packed prefill, per-row cache lengths ------------------------------------------
LENS = [5, 1, 12, 3, 17, 2]  # lengths 1 (shorter than the conv window) and across scan chunks (8)


@pytest.mark.parametrize("pattern", ["M-M*ME", "*M", "M"])
def test_packed_prefill_equals_each_sequence_alone(pattern):
    model = make_model(pattern=pattern)
    b = list(table(model).values())
    budgets = [b[i % 3] for i in range(len(LENS))]
    seqs = _seqs(LENS)
    with torch.no_grad():
        cache = model.new_cache(len(LENS))
        out = model(torch.cat(seqs)[None], budget=budgets, cache=cache, seq_lens=LENS)
        assert out.shape == (1, sum(LENS), VOCAB)
        start = 0
        for s, bud in zip(seqs, budgets):
            torch.testing.assert_close(out[0, start:start + len(s)], model(s[None], budget=bud)[0], rtol=0, atol=1e-12)
            start += len(s)
        # every row continues at its own length, budget and position: one-token steps
        more = _seqs([4] * len(LENS), seed=2)
        for t in range(4):
            step = torch.stack([m[t] for m in more])[:, None]
            logits = model(step, budget=budgets, cache=cache)[:, 0]
            for i, (s, bud) in enumerate(zip(seqs, budgets)):
                want = model(torch.cat([s, more[i][:t + 1]])[None], budget=bud)[0, -1]
                torch.testing.assert_close(logits[i], want, rtol=0, atol=1e-12)


def test_packed_cache_rows_equal_alone_caches(model):
    """Row ``i`` of a packed prefill's cache is the cache a prefill of sequence ``i`` alone leaves
    (conv windows, SSM states zero beyond the row's heads, keys/values at its own length)."""
    b = table(model)
    seqs = _seqs([6, 2, 11])
    budgets = [b["half"], b["full"], b["mixed"]]
    with torch.no_grad():
        packed = model.new_cache(3)
        model(torch.cat(seqs)[None], budget=budgets, cache=packed, seq_lens=[6, 2, 11])
        for i, (s, bud) in enumerate(zip(seqs, budgets)):
            alone = model.new_cache(1)
            model(s[None], budget=bud, cache=alone)
            row = packed.select_rows(torch.tensor([i]))
            for lp, la in zip(row.layers, alone.layers):
                if lp is None:
                    continue
                if hasattr(lp, "ssm"):
                    torch.testing.assert_close(lp.ssm, la.ssm, rtol=0, atol=1e-12)
                    torch.testing.assert_close(lp.conv_x, la.conv_x, rtol=0, atol=1e-12)
                    torch.testing.assert_close(lp.conv_bc, la.conv_bc, rtol=0, atol=1e-12)
                else:
                    n = int(lp.lengths[0])
                    assert n == len(s)
                    torch.testing.assert_close(lp.k[:, :, :n], la.k, rtol=0, atol=1e-12)
                    torch.testing.assert_close(lp.v[:, :, :n], la.v, rtol=0, atol=1e-12)


def test_ragged_merge_continues_every_row(model):
    b = table(model)
    a_seqs, c_seqs = _seqs([3, 9]), _seqs([5], seed=3)
    with torch.no_grad():
        a = model.new_cache(2)
        model(torch.cat(a_seqs)[None], budget=[b["full"], b["half"]], cache=a, seq_lens=[3, 9])
        c = model.new_cache(1)
        model(c_seqs[0][None], budget=b["mixed"], cache=c, seq_lens=[5])
        with pytest.raises(ValueError, match="same length"):
            HybridCache.merge([(torch.tensor([0, 2]), a), (torch.tensor([1]), c)], 3)
        merged = HybridCache.merge([(torch.tensor([0, 2]), a), (torch.tensor([1]), c)], 3, ragged=True)
        tok = torch.tensor([[4], [7], [1]])
        bud = [b["full"], b["mixed"], b["half"]]
        logits = model(tok, budget=bud, cache=merged)[:, 0]
        for i, prefix in enumerate([a_seqs[0], c_seqs[0], a_seqs[1]]):
            want = model(torch.cat([prefix, tok[i]])[None], budget=bud[i])[0, -1]
            torch.testing.assert_close(logits[i], want, rtol=0, atol=1e-12)
        # the long row leaves: the short row's cache keeps only the slots it needs, and continues
        short = merged.select_rows(torch.tensor([0]))
        attn = [lc for lc in short.layers if hasattr(lc, "lengths")]
        assert attn and all(lc.k.shape[2] == 4 and lc.lengths.tolist() == [4] for lc in attn)
        logits = model(torch.tensor([[9]]), budget=bud[0], cache=short)[0, -1]
        want = model(torch.cat([a_seqs[0], tok[0], torch.tensor([9])])[None], budget=bud[0])[0, -1]
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-12)


def test_packed_prefill_bad_arguments(model):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="must sum to input_ids.shape"):
        model(ids, seq_lens=[1, 1])
    with pytest.raises(ValueError, match="positive ints"):
        model(ids, seq_lens=[3, 0])
    with pytest.raises(ValueError, match=r"shape \(1, total tokens\)"):
        model(torch.tensor([[1, 2], [3, 4]]), seq_lens=[2, 2])
    with pytest.raises(ValueError, match="soft_masks are not taken"):
        model(ids, seq_lens=[3], soft_masks={"hidden": torch.ones(32)})
    cache = model.new_cache(2)
    model(ids, seq_lens=[1, 2], cache=cache)
    with pytest.raises(ValueError, match="fresh cache of batch"):
        model(ids, seq_lens=[1, 2], cache=cache)
    with pytest.raises(ValueError, match="one Budget per sample"):
        model(ids, seq_lens=[1, 2], budget=[Budget()] * 3)


# ---- the scheduler -----------------------------------------------------------------------------
def _ids(model, prompt=(1, 5, 6, 7, 3)):
    """Special ids that occur: the end of thinking and eos are tokens the parent produces."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    out = seq[len(prompt):]
    end = out[2]
    eos = next(t for t in out[3:] if t != end)
    return dict(end_think_id=end, eos_id=eos)


def _requests(n, seed):
    rng = random.Random(seed)
    names = ["full", "half", "mixed"]
    return [dict(prompt=[rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))],
                 think_budget=rng.choice(names), answer_budget=rng.choice(names),
                 max_think_tokens=rng.choice([None, 0, 1, 2, 4, 7]), max_answer_tokens=rng.randint(1, 6))
            for _ in range(n)]


def _alone(model, req, ids, cache_mode="reprefill", max_length=40):
    sched = Scheduler(model, budgets=table(model), max_batch=1, max_length=max_length, cache_mode=cache_mode, **ids)
    r = sched.submit(**req)
    sched.run()
    return r.result()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cache_mode", ["reprefill", "reuse"])
def test_mixed_ragged_batch_equals_alone(dtype, cache_mode):
    """Different prompt lengths, budgets, caps (switch points) and answer caps in one running
    batch: every request's tokens and work equal the request generated alone; the prompts are
    prefilled by one packed forward (no padding)."""
    model = make_model(dtype)
    ids = _ids(model)
    reqs = _requests(12, seed=5)
    calls = []
    hook = model.register_forward_hook(lambda m, a, kw, out: calls.append((tuple(a[0].shape), kw.get("seq_lens"))),
                                       with_kwargs=True)
    try:
        sched = Scheduler(model, budgets=table(model), max_batch=64, max_length=40, cache_mode=cache_mode, **ids)
        handles = [sched.submit(**r) for r in reqs]
        sched.run()
    finally:
        hook.remove()
    first_shape, first_lens = calls[0]
    assert first_lens == [len(r["prompt"]) for r in reqs] and first_shape == (1, sum(first_lens))
    assert len({len(r["prompt"]) for r in reqs}) > 3
    gens = [h.result() for h in handles]
    assert len({len(g.thinking) for g in gens}) > 2 and len({g.stop for g in gens}) > 1
    for r, g in zip(reqs, gens):
        alone = _alone(model, r, ids, cache_mode)
        assert (g.thinking, g.answer, g.stop) == (alone.thinking, alone.answer, alone.stop), r
        assert g.work == alone.work


def test_padding_baseline_computes_padding_and_keeps_outputs(model):
    """``pad_prefill`` (the benchmark's padding baseline) prefills every prompt padded to the
    longest (separate packed segments) and gives the same tokens as the ragged batch."""
    ids = _ids(model)
    reqs = _requests(6, seed=4)
    out = {}
    for pad in (False, True):
        calls = []
        hook = model.register_forward_hook(lambda m, a, kw, o: calls.append((tuple(a[0].shape), kw.get("seq_lens"))),
                                           with_kwargs=True)
        try:
            sched = Scheduler(model, budgets=table(model), max_length=40, pad_prefill=pad, **ids)
            handles = [sched.submit(**r) for r in reqs]
            sched.run()
        finally:
            hook.remove()
        lens = [len(r["prompt"]) for r in reqs]
        assert calls[0][0] == (1, len(lens) * max(lens) if pad else sum(lens))
        out[pad] = [(h.result().completion, h.result().work) for h in handles]
    assert out[True] == out[False]


def test_alone_equals_full_reforward_oracle(model):
    """The scheduler alone is itself checked against plain full re-forwards (no cache), so the
    batch-equals-alone tests rest on an independent oracle."""
    ids = _ids(model)
    b = table(model)
    for r in _requests(6, seed=9):
        g = _alone(model, r, ids)
        seq, thinking, answer = list(r["prompt"]), [], []
        phase_b = b[r["think_budget"]]
        while True:
            with torch.no_grad():
                tok = int(model(torch.tensor([seq]), budget=phase_b)[0, -1].argmax())
            if not answer and (not thinking or thinking[-1] != ids["end_think_id"]):
                if r["max_think_tokens"] is not None and len(thinking) == r["max_think_tokens"]:
                    tok = ids["end_think_id"]
                thinking.append(tok)
                if tok == ids["end_think_id"]:
                    phase_b = b[r["answer_budget"]]
                elif tok == ids["eos_id"]:
                    break
            else:
                answer.append(tok)
                if tok == ids["eos_id"] or len(answer) == r["max_answer_tokens"]:
                    break
            seq.append(tok)
            if len(seq) >= 40:
                break
        assert (g.thinking, g.answer) == (thinking, answer), r


def test_joins_and_switches_reprefill_only_their_own_rows(model):
    """Requests join at different steps; at every step one prefill forward (packed, or batched
    when the contexts are all of one length) prefills exactly the joining prompts and the
    ``prompt + thinking`` of the rows that switched to another submodel at the previous step,
    while one decode forward advances all the other rows."""
    ids = _ids(model)
    reqs = _requests(24, seed=21)
    calls = []

    def record(m, a, kw):  # (input shape, seq_lens, whether the cache is fresh: a prefill)
        calls.append((tuple(a[0].shape), kw.get("seq_lens"), kw["cache"].seqlen == 0))
    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    sched = Scheduler(model, budgets=table(model), max_batch=8, max_length=40, **ids)
    b = table(model)
    switched, handles, todo, seen_switch = [], [], list(reqs), 0
    try:
        while todo or not sched.idle:
            for _ in range(min(len(todo), 3 if sched.steps % 4 == 0 else 0)):
                handles.append(sched.submit(**todo.pop(0)))
            room = sched.max_batch - sum(1 for h in handles if not h.done and h.tokens)
            joining = [h for h in handles if not h.tokens and not h.done][:room]
            want = sorted([(h.id, len(reqs[h.id]["prompt"]) + len(h.tokens)) for h in switched]
                          + [(h.id, len(reqs[h.id]["prompt"])) for h in joining])
            running_before = [h for h in handles if h.tokens and not h.done and h not in switched]
            calls.clear()
            events = sched.step()
            prefills = [lens if lens is not None else [shape[1]] * shape[0] for shape, lens, fresh in calls if fresh]
            batched = [lens is None for _, lens, fresh in calls if fresh]
            decode = [shape for shape, _, fresh in calls if not fresh]
            assert [sorted(lens) for lens in prefills] == ([sorted(n for _, n in want)] if want else []), sched.steps
            assert batched == ([len({n for _, n in want}) == 1] if want else []), sched.steps
            assert decode == ([(len(running_before), 1)] if running_before else [])
            seen_switch += len(switched)
            switched = [e.request for e in events if e.token == ids["end_think_id"] and e.phase == "think"
                        and not e.finished and model.resolve_budget(b[reqs[e.request.id]["think_budget"]])
                        != model.resolve_budget(b[reqs[e.request.id]["answer_budget"]])]
    finally:
        hook.remove()
    assert seen_switch >= 3
    for h in handles:
        alone = _alone(model, reqs[h.id], ids)
        assert h.result().completion == alone.completion and h.result().work == alone.work


def test_api_stream_poll_cancel(model):
    ids = _ids(model)
    sched = Scheduler(model, budgets=table(model), max_batch=2, max_length=40, **ids)
    reqs = _requests(3, seed=3)
    h = [sched.submit(**r) for r in reqs]
    with pytest.raises(GenerationError, match="before the request finished"):
        h[0].result()
    events = sched.step()
    assert sched.num_running == 2 and sched.num_waiting == 1  # max_batch: the third waits
    assert [e.request for e in events] == h[:2] and all(e.phase == "think" for e in events)
    assert h[0].poll() == [events[0].token] and h[0].poll() == []
    streamed = list(sched.stream(h[1]))  # from its first token on (never polled before)
    assert streamed == h[1].result().completion == _alone(model, reqs[1], ids).completion
    sched.cancel(h[0])
    sched.run()
    assert h[0].result().stop == "cancelled" and sched.idle
    assert h[2].result().completion == _alone(model, reqs[2], ids).completion
    with pytest.raises(GenerationError, match="think_budget 'huge' is not a known budget"):
        sched.submit([1, 2], think_budget="huge")
    with pytest.raises(GenerationError, match="prompt is empty"):
        sched.submit([])
    with pytest.raises(GenerationError, match="max_batch must be >= 1"):
        Scheduler(model, max_batch=0, **ids)


def test_generate_serves_ragged_prompts_in_one_batch(model):
    """The synchronous ``generate`` sits on the scheduler: prompts of different lengths share one
    packed prefill and every decode forward."""
    ids = _ids(model)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [1], [2, 4, 6, 8]]
    calls = []
    hook = model.register_forward_hook(lambda m, a, kw, out: calls.append((tuple(a[0].shape), kw.get("seq_lens"))),
                                       with_kwargs=True)
    try:
        gens = generate(model, prompts, think_budget=["half", "full", "mixed", "full"], budgets=table(model),
                        max_think_tokens=3, max_answer_tokens=2, **ids)
    finally:
        hook.remove()
    assert calls[0] == ((1, 14), [3, 6, 1, 4])
    steps = max(len(g.completion) for g in gens) - 1
    assert sum(1 for shape, lens in calls if lens is None) == steps  # one decode forward per step for all rows
    for i, p in enumerate(prompts):
        (alone,) = generate(model, [p], think_budget=["half", "full", "mixed", "full"][i], budgets=table(model),
                            max_think_tokens=3, max_answer_tokens=2, **ids)
        assert gens[i].completion == alone.completion


def test_200_requests_random_arrivals():
    """200 requests arrive at random steps (a few per step, bursts), at most 16 running: every
    request finishes exactly once, none is lost, each equals the request generated alone. (A
    4-layer model with every layer kind keeps the 200 one-at-a-time references fast.)"""
    model = make_model(pattern="M*-E")
    ids = _ids(model)
    reqs = _requests(200, seed=11)
    rng = random.Random(12)
    sched = Scheduler(model, budgets=table(model), max_batch=16, max_length=40, **ids)
    handles, finished, pending = [], [], list(range(200))
    while pending or not sched.idle:
        for _ in range(min(len(pending), rng.choice([0, 0, 1, 2, 5]))):
            i = pending.pop(0)
            handles.append((i, sched.submit(**reqs[i])))
        for e in sched.step():
            if e.finished:
                finished.append(e.request.id)
        assert sched.num_running <= 16
    assert sorted(finished) == list(range(200))  # each request finished once
    assert all(h.done for _, h in handles) and len(handles) == 200
    for i, h in handles:
        alone = _alone(model, reqs[i], ids)
        assert (h.result().thinking, h.result().answer, h.result().stop) == (alone.thinking, alone.answer,
                                                                              alone.stop), i
