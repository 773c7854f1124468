"""Every budget of a trained run exports to Hugging Face exactly (docs/interop.md): the router ties
the Mamba head count across layers (``router_shared_axes``), and a run with the default preset's
architecture plus sigmoid routing exports every budget with ``elastic-export --format hf``, its
transformers logits within 1e-5 of our sliced model's and its greedy generations identical."""
from __future__ import annotations

import pytest
import torch

from elastic_kernels.models import AXES, ElasticHybridConfig
from elastic_kernels.train.config import ELASTIC_AXES, PRESETS, ConfigError, make_config
from elastic_kernels.train.router import AxisSpec, BudgetRouters, full_choice_loss

# the model-dict changes that make the default ("tiny") preset's model a NemotronH: NemotronH
# routes with sigmoid scores (plus correction bias); every other default field has an exact form
EXPORTABLE = {"moe_score": "sigmoid"}


def test_shared_axis_makes_one_choice_for_all_layers():
    torch.manual_seed(0)
    specs = [AxisSpec("m", 3, (2, 4, 8), shared=True), AxisSpec("f", 3, (2, 4, 8))]
    routers = BudgetRouters(specs, [1.0, 0.75, 0.5], hidden=8)
    with torch.no_grad():  # logits far from uniform, so the choices show
        for r in routers.routers.values():
            r.net[2].weight.normal_(0, 3.0)
    assert routers.routers["m"].net[2].out_features == 3 and routers.routers["f"].net[2].out_features == 9
    targets = torch.tensor([1.0, 0.75, 0.5, 0.6])
    gen = torch.Generator().manual_seed(1)
    probs = routers.sample(targets, tau=0.5, scale=2.0, generator=gen)
    assert probs["m"].shape == probs["f"].shape == (4, 3, 3)
    assert torch.equal(probs["m"], probs["m"][:, :1].expand(-1, 3, -1))  # one Gumbel draw for all layers
    assert not torch.equal(probs["f"][1:], probs["f"][1:, :1].expand(-1, 3, -1))  # per-layer draws
    assert torch.equal(probs["m"][0], torch.eye(3)[[2, 2, 2]])  # the full budget stays the parent
    widths = routers.widths(routers.choose(targets))
    assert all(len(set(row)) == 1 for row in widths["m"].tolist())
    assert widths["m"][0].tolist() == [8, 8, 8]
    loss = (probs["m"] * torch.arange(3.0)).sum() + full_choice_loss(routers)
    loss.backward()
    w = routers.routers["m"].net[2].weight
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_router_shared_axes_config():
    cfg = make_config("tiny")
    assert cfg.router_shared_axes == ["mamba_heads"]
    assert ELASTIC_AXES == AXES
    assert make_config("smoke", router_shared_axes=[]).router_shared_axes == []
    for bad in (["heads"], ["ffn", "ffn"]):
        with pytest.raises(ConfigError, match="router_shared_axes"):
            make_config("smoke", router_shared_axes=bad)
    with pytest.raises(ConfigError, match="router_shared_axes"):
        make_config("smoke", router_shared_axes="mamba_heads")


def test_default_architecture_run_exports_every_budget(tmp_path):
    """A smoke-length run of the tiny preset's model with EXPORTABLE: every budget of its nested
    checkpoint exports (elastic-export --format hf), loads in transformers with no missing or
    unexpected keys, gives our sliced model's logits (fp32, <= 1e-5 relative) and the same greedy
    generations (cached decode)."""
    transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")
    from hf_models import hf_logits, our_greedy, our_logits

    from elastic_kernels.interop import cli as export_cli
    from elastic_kernels.models import load_nested, read_nested_config
    from elastic_kernels.tasks import get as get_task
    from elastic_kernels.train.pipeline import run

    schedule = {k: v for k, v in PRESETS["smoke"].items() if k != "model"}
    run_dir = tmp_path / "run"
    cfg = make_config("tiny", **{**schedule, "val_size": 8, "test_size": 8}, model=EXPORTABLE, baselines=False,
                      eval_latency=False, threads=1, run_dir=str(run_dir))
    run(cfg)
    config, budgets = read_nested_config(run_dir / "nested")
    tiny = ElasticHybridConfig(**{**PRESETS["tiny"]["model"], **EXPORTABLE})
    assert config.pattern == tiny.pattern and config.moe_score == "sigmoid"
    assert sorted(budgets) == sorted(f"{b:g}" for b in cfg.budgets)
    parent = load_nested(run_dir / "nested")
    task = get_task(cfg.resolved_task(), **cfg.task_kwargs())
    prompts = [torch.tensor([task.prompt_ids(p)]) for p in task.problems("test", 3, seed=5)]
    ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    for name, budget in budgets.items():
        heads = budget.mamba_heads
        assert heads is None or isinstance(heads, int) or len(set(heads)) == 1, (name, heads)
        out = tmp_path / f"hf-{name}"
        assert export_cli.main([str(run_dir), str(out), "--budget", name, "--format", "hf"]) == 0
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                         experts_implementation="eager")
        assert not info["missing_keys"] and not info["unexpected_keys"], (name, info)
        loaded.eval()
        sub = parent.slice(budget)
        want = our_logits(sub, ids)[0]
        got = hf_logits(loaded, ids)[0]
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (name, float((got - want).abs().max()))
        for p in prompts:
            gen = loaded.generate(p, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, p.shape[1]:]
            assert torch.equal(gen, our_greedy(sub, p, 12)), (name, gen, our_greedy(sub, p, 12))



def test_nested_parent_keeps_its_nested_choices(tmp_path):
    """``--parent`` one of our nested checkpoints: the parent keeps the checkpoint's nested choices
    (so its axes are routed), ``parent_config`` (what FSDP2 ranks > 0 read instead of the weights)
    agrees with it, and the weights are the checkpoint's full budget."""
    from elastic_kernels.interop import load_parent, parent_config
    from elastic_kernels.models import Budget, ElasticHybridLM, load_nested, save_nested
    from elastic_kernels.train.elastic import axis_specs

    torch.manual_seed(0)
    config = ElasticHybridConfig(pattern="M*E-", nested_choices={"hidden": (1.0, 0.5), "mamba_heads": (1.0, 0.5)})
    save_nested(ElasticHybridLM(config), tmp_path / "ck", {"0.5": Budget(hidden=32, mamba_heads=4)})
    model, got = load_parent(tmp_path / "ck")
    assert got.nested_choices == config.nested_choices and got == parent_config(tmp_path / "ck")
    assert [s.name for s in axis_specs(got)] == ["hidden", "mamba_heads"]
    ids = torch.randint(0, config.vocab_size, (2, 9))
    assert torch.equal(model(ids), load_nested(tmp_path / "ck")(ids))
    other = {"ffn": (1.0, 0.25)}
    assert load_parent(tmp_path / "ck", nested_choices=other)[1] == parent_config(tmp_path / "ck", nested_choices=other)
    with pytest.raises(ValueError, match="nothing to route"):
        BudgetRouters(axis_specs(ElasticHybridConfig(nested_choices={})), [1.0, 0.5])
