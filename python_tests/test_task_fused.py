"""The fused-answer task: disjoint splits, answers correct by construction, trained thinking caps."""
import re

import pytest
import torch

from elastic_kernels import tasks
from elastic_kernels.tasks import FUSED_OPS, FusedAnswerTask


def _evaluate(question: str, m: int) -> tuple[list[int], int]:
    """Independent evaluation of a question text ``a0 op a1 ... | f,g``: the chain values and the answer."""
    chain, keys = question.split("|")
    f, g = (int(x) for x in keys.split(","))
    nums = [int(x) for x in re.findall(r"\d", chain)]
    ops = re.findall(r"[+\-*]", chain)
    acc, vals = nums[0], []
    for op, b in zip(ops, nums[1:]):
        acc = {"+": acc + b, "-": acc - b, "*": acc * b}[op] % m
        vals.append(acc)
    return vals, (acc * f + g) % m


@pytest.mark.parametrize("modulus,difficulty,keys", [(10, 2, True), (10, 2, False), (7, 4, True), (2, 1, False)])
def test_answers_correct_by_construction(modulus, difficulty, keys):
    t = FusedAnswerTask(modulus=modulus, difficulty=difficulty, seed=3, keys_in_trace=keys)
    lo, hi = FUSED_OPS[difficulty]
    for p in t.problems("train", 300, seed=1):
        vals, ans = _evaluate(p.question, modulus)
        assert lo <= len(p.ops) <= hi
        assert p.answer == ans and p.chain_value == vals[-1]
        assert [r for *_, r in p.steps()] == vals
        text = t.tokenizer.decode(t.prompt_ids(p) + t.completion_ids(p))
        assert text == p.text and text.endswith(f"</think>{ans}<eos>")
        trace = t.tokenizer.decode(t.completion_ids(p)).split("</think>")[0]
        chain, _, keys_part = trace.partition("|")
        assert (keys_part == p.question.split("|")[1]) if keys else (keys_part == "")
        assert [int(s.split("=")[1]) for s in chain.split(";")] == vals
        assert len(t.tokenizer.encode(trace)) == t.think_len(len(p.ops)) <= t.max_think_len()
        assert t.score(p, t.completion_ids(p))
        wrong = t.tokenizer.encode(f"{trace}</think>{(ans + 1) % modulus}<eos>")
        assert not t.score(p, wrong)


def test_splits_disjoint_and_deterministic():
    t = FusedAnswerTask(seed=5)
    qs = {s: {p.question for i in range(4) for p in t.problems(s, 400, seed=i)} for s in ("train", "val", "test")}
    assert not qs["train"] & qs["val"] and not qs["train"] & qs["test"] and not qs["val"] & qs["test"]
    assert all(t.split_of(p) == "test" for p in t.problems("test", 200, seed=0))
    assert [p.question for p in t.problems("val", 50, seed=2)] == [p.question for p in t.problems("val", 50, seed=2)]
    other = FusedAnswerTask(seed=6)
    assert [p.question for p in t.problems("test", 50, seed=0)] != [p.question for p in other.problems("test", 50, seed=0)]
    a, b = t.batch("train", 16, index=7), t.batch("train", 16, index=7)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)


def test_trained_caps_cut_trace_with_forced_stop():
    t = FusedAnswerTask(truncate_prob=0.5, seed=0)
    probs = t.problems("train", 8, seed=0)
    cuts = [0, 1, 3, None, 2, 0, None, 4]
    b = t.collate(probs, cuts)
    for i, (p, cut) in enumerate(zip(probs, cuts)):
        prompt = t.prompt_ids(p)
        full = t.completion_ids(p)
        trace = full[:full.index(t.end_think_id)]
        seq = b.input_ids[i].tolist() + [b.targets[i, -1].item()]
        kept = trace if cut is None else trace[:cut]
        want = prompt + kept + [t.end_think_id] + t.tokenizer.encode(f"{p.answer}<eos>")
        assert seq[:len(want)] == want and all(x == t.pad_id for x in seq[len(want):])
        mask = b.loss_mask[i].tolist()
        # targets are the completion, except a forced </think> (an input the model never learns to emit)
        stop = len(prompt) - 1 + len(kept)
        for j, v in enumerate(mask):
            inside = len(prompt) - 1 <= j < len(want) - 1
            assert v == (1.0 if inside and not (cut is not None and j == stop) else 0.0), (i, j)
        assert b.targets[i, stop] == t.end_think_id
    with pytest.raises(ValueError, match="cut"):
        t.collate(probs[:1], [t.think_len(len(probs[0].ops))])
    with pytest.raises(ValueError, match="one entry per problem"):
        t.collate(probs[:2], [None])


def test_training_batches_cut_a_share_eval_batches_never():
    t = FusedAnswerTask(truncate_prob=0.3, seed=1)
    forced = total = 0
    for i in range(20):
        b = t.batch("train", 32, index=i)
        stops = (b.targets == t.end_think_id)
        forced += int((stops & (b.loss_mask == 0)).any(1).sum())
        total += b.targets.shape[0]
    assert 0.2 < forced / total < 0.4
    for split in ("val", "test"):
        b = t.batch(split, 64, index=0)
        stops = (b.targets == t.end_think_id)
        assert bool((b.loss_mask[stops] == 1).all())
    none = FusedAnswerTask(truncate_prob=0.0).batch("train", 64, index=0)
    assert bool((none.loss_mask[none.targets == t.end_think_id] == 1).all())


def test_registry_roundtrip_and_validation():
    t = tasks.get("fused", modulus=9, difficulty=3, seed=2, truncate_prob=0.1)
    assert tasks.from_dict(t.to_dict()).to_dict() == t.to_dict()
    assert "fused" in tasks.names() and "mod 9" in t.describe() and t.premise()
    assert t.max_new_tokens(t.problems("val", 5, seed=0)) >= max(len(t.completion_ids(p)) for p in t.problems("val", 5, seed=0))
    for kw, msg in [({"modulus": 11}, "modulus"), ({"difficulty": 6}, "difficulty"), ({"truncate_prob": 1.0},
                                                                                         "truncate_prob")]:
        with pytest.raises(ValueError, match=msg):
            FusedAnswerTask(**kw)
    with pytest.raises(ValueError, match="split"):
        t.problems("dev", 3, seed=0)
    assert t.vocab_size == len(t.tokenizer.itos) and t.tokenizer.decode(t.tokenizer.encode("1|2,3")) == "1|2,3"


def test_table_answer_is_the_keyed_permutation_entry():
    """answer="table": T[f,g] is a fixed permutation of [0, m) per key pair, the answer T[f,g][r] of the
    chain value r (checked by an independent chain evaluation), the same table for the same task seed."""
    t = FusedAnswerTask(answer="table", key_zipf=1.0, ops="+-", seed=4, modulus=7)
    same, other = FusedAnswerTask(answer="table", seed=4, modulus=7), FusedAnswerTask(answer="table", seed=5, modulus=7)
    assert len(t.tables) == 49 and all(sorted(v) == list(range(7)) for v in t.tables.values())
    assert t.tables == same.tables and t.tables != other.tables
    for p in t.problems("train", 300, seed=2):
        vals, _ = _evaluate(p.question, 7)
        assert set(p.ops) <= {"+", "-"} and p.chain_value == vals[-1]
        assert p.answer == t.tables[(p.f, p.g)][vals[-1]]
        assert t.score(p, t.completion_ids(p))
        assert p.text.endswith(f"</think>{p.answer}<eos>")
    assert tasks.from_dict(t.to_dict()).tables == t.tables


def test_two_input_table_recalls_the_last_two_chain_values():
    """recall_inputs=2: T[f,g] holds m rows, each a permutation; the answer is row p (the chain value before
    r, the first operand for one step), entry r."""
    m = 10
    t = FusedAnswerTask(answer="table", key_zipf=1.4, ops="+", recall_inputs=2, seed=1)
    assert all(len(v) == m * m and all(sorted(v[i * m:(i + 1) * m]) == list(range(m)) for i in range(m))
               for v in t.tables.values())
    seen_one_step = False
    for p in t.problems("train", 300, seed=3):
        vals, _ = _evaluate(p.question, m)
        prev = vals[-2] if len(vals) > 1 else int(p.question[0])
        seen_one_step |= len(vals) == 1
        assert p.answer == t.tables[(p.f, p.g)][prev * m + vals[-1]] and t.score(p, t.completion_ids(p))
    assert seen_one_step and "10000 facts" in t.describe()
    assert tasks.from_dict(t.to_dict()).tables == t.tables
    with pytest.raises(ValueError, match="recall_inputs"):
        FusedAnswerTask(answer="table", recall_inputs=3)


def test_zipf_keys_follow_their_weights_in_every_split():
    """key_zipf: the key pair of rank k is drawn with probability proportional to 1 / (k+1)**s, in every split
    (the test set measures the same frequency-weighted recall the training set teaches)."""
    t = FusedAnswerTask(answer="table", key_zipf=1.0, seed=0)
    shares = [t.key_share(k) for k in range(len(t.keys))]
    assert abs(sum(shares) - 1) < 1e-12 and shares[0] / shares[9] == pytest.approx(10)
    for split, n in (("train", 8000), ("test", 4000)):
        counts: dict = {}
        for p in t.problems(split, n, seed=0):
            counts[(p.f, p.g)] = counts.get((p.f, p.g), 0) + 1
        top = counts.get(t.keys[0], 0) / n
        assert abs(top - shares[0]) < 4 * (shares[0] * (1 - shares[0]) / n) ** 0.5, (split, top, shares[0])
        assert counts.get(t.keys[0], 0) > counts.get(t.keys[50], 0)
    uniform = FusedAnswerTask(answer="table", seed=0)
    assert uniform.key_share(0) == uniform.key_share(99) == pytest.approx(0.01)
    assert "Zipf" in t.describe() and "fact table" in t.premise() and "uniform" in uniform.describe()


@pytest.mark.parametrize("kw,msg", [({"answer": "lookup"}, "answer"), ({"key_zipf": -1}, "key_zipf"),
                                    ({"key_zipf": True}, "key_zipf"), ({"ops": "+/"}, "ops"), ({"ops": ""}, "ops"),
                                    ({"ops": "++"}, "ops")])
def test_table_options_validated(kw, msg):
    with pytest.raises(ValueError, match=msg):
        FusedAnswerTask(**kw)


def test_recall_task_is_fused_with_table_defaults():
    """"recall" (the default preset's task) draws exactly the fused task's problems with table recall, rebuilds from
    its saved spec, and a preset run switched to another task carries none of its options."""
    from elastic_kernels.tasks import RecallTask
    from elastic_kernels.train.config import make_config
    r = tasks.get("recall", seed=3)
    f = FusedAnswerTask(answer="table", key_zipf=1.4, ops="+", seed=3)
    assert isinstance(r, RecallTask) and r.tables == f.tables
    assert [p.text for p in r.problems("train", 200, seed=1)] == [p.text for p in f.problems("train", 200, seed=1)]
    assert tasks.from_dict(r.to_dict()).to_dict() == r.to_dict() and r.to_dict()["name"] == "recall"
    assert tasks.get("recall", answer="affine", key_zipf=0, ops="+-*").to_dict() == {**FusedAnswerTask().to_dict(),
                                                                                 "name": "recall"}
    cfg = make_config("tiny")
    assert cfg.resolved_task() == "recall" and cfg.task_args == {}
    other = make_config("tiny", task="arithmetic")
    assert tasks.get(other.resolved_task(), **other.task_kwargs()).name == "arithmetic"
