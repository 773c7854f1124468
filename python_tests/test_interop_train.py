"""``elastic-train --parent <HF dir> --data <jsonl>`` end to end, then ``elastic-export`` of every
budget and a reload in transformers (docs/interop.md)."""
from __future__ import annotations

import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")
tokenizers = pytest.importorskip("tokenizers", reason="the [hf] extra (tokenizers) is not installed")

from hf_models import NEMOTRON, L, hf_logits, our_logits  # noqa: E402

from elastic_kernels.interop import cli as export_cli  # noqa: E402
from elastic_kernels.interop import from_hf  # noqa: E402
from elastic_kernels.models import load_nested, read_nested_config  # noqa: E402
from elastic_kernels.tasks import JsonlTask  # noqa: E402
from elastic_kernels.train import cli as train_cli  # noqa: E402

SPECIALS = ["<pad>", "<bos>", "<eos>", "<think>", "</think>"]


def _records(n=160, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        out.append({"prompt": f"{a} plus {b}", "thinking": f"{a} and {b} make {(a + b) % 10}",
                    "answer": str((a + b) % 10)})
    return out


def _tokenizer(directory, texts):
    """A word-level tokenizer trained locally, saved as transformers writes one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.WordLevel(unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def parent_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("parent")
    recs = _records()
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    hf_dir = root / "hf"
    hf_dir.mkdir()
    vocab = _tokenizer(hf_dir, [r[k] for r in recs for k in ("prompt", "thinking", "answer")])
    torch.manual_seed(0)
    cfg = transformers.NemotronHConfig(**{**NEMOTRON, "vocab_size": vocab + 3, "pad_token_id": 0, "bos_token_id": 1,
                                          "eos_token_id": 2, "layers_block_type": [L[c] for c in "M*E-"],
                                          "n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.5})
    transformers.NemotronHForCausalLM(cfg).save_pretrained(hf_dir)
    return hf_dir, data


def test_jsonl_task_uses_the_parent_tokenizer(parent_and_data):
    hf_dir, data = parent_and_data
    task = JsonlTask(str(data), str(hf_dir))
    p = task.problems("train", 4, seed=0)
    assert p == task.problems("train", 4, seed=0)  # a pure function of its arguments
    ids = task.prompt_ids(p[0]) + task.completion_ids(p[0])
    assert ids[0] == task.bos_id and ids[-1] == task.eos_id and task.think_id in ids and task.end_think_id in ids
    assert task.score(p[0], task.completion_ids(p[0]))
    assert not task.score(p[0], task.completion_ids(p[0])[:-3])
    seen = {s: {json.dumps([r.prompt, r.thinking]) for r in task.problems(s, 400, seed=1)}
            for s in ("train", "val", "test")}
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
    with pytest.raises(ValueError, match="end_think_token"):
        JsonlTask(str(data), str(hf_dir), end_think_token="<nothink>")


def test_train_from_hf_parent_then_export_every_budget(parent_and_data, tmp_path, capsys):
    hf_dir, data = parent_and_data
    run = tmp_path / "run"
    rc = train_cli.main(["--preset", "smoke", "--parent", str(hf_dir), "--data", str(data), "--run-dir", str(run),
                         "--no-baselines", "--val-size", "8", "--test-size", "8"])
    assert rc == 0
    config, budgets = read_nested_config(run / "nested")
    assert config.pattern == "M*E-" and config.moe_n_group == 2 and config.moe_routed_scaling == 1.5
    assert len(budgets) == 3
    parent = load_nested(run / "nested")
    ids = torch.randint(3, 20, (2, 11))
    for name, budget in budgets.items():
        out = tmp_path / f"hf-{name}"
        assert export_cli.main([str(run), str(out), "--budget", name, "--format", "hf"]) == 0
        assert (out / "tokenizer.json").is_file()
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                         experts_implementation="eager")
        assert not info["missing_keys"] and not info["unexpected_keys"]
        want = our_logits(parent, ids, budget=budget)[0]
        got = hf_logits(loaded.eval(), ids)[0]
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), name
        q = tmp_path / f"nvfp4-{name}"
        assert export_cli.main([str(run), str(q), "--budget", name, "--format", "hf", "--quantization", "nvfp4"]) == 0
        assert json.loads((q / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
        back, _ = from_hf(q)  # NVFP4 weights of the slice: close to, not equal to, the float slice
        err = (our_logits(back, ids)[0] - want).abs().max()
        assert 0 < err <= 0.25 * want.abs().max(), (name, float(err))
        nested = tmp_path / f"nested-{name}"
        assert export_cli.main([str(run), str(nested), "--budget", name, "--format", "nested"]) == 0
        assert torch.equal(our_logits(load_nested(nested), ids)[0], our_logits(parent.slice(budget), ids)[0])


def test_export_cli_usage_errors_exit_2(parent_and_data, tmp_path):
    hf_dir, data = parent_and_data
    run = tmp_path / "run"
    for argv in ([str(run), str(tmp_path / "o"), "--budget", "0.5", "--format", "hf"],       # no checkpoint
                 [str(run), str(tmp_path / "o"), "--budget", "0.5", "--format", "onnx"],
                 [str(run), str(tmp_path / "o"), "--budget", "0.5", "--format", "hf", "--quantization", "int4"],
                 [str(run), str(tmp_path / "o"), "--format", "hf"]):
        with pytest.raises(SystemExit) as e:
            export_cli.main(argv)
        assert e.value.code == 2
