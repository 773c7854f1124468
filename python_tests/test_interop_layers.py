"""The model features Hugging Face parents need (docs/interop.md), checked without transformers:
group-limited routing, ``norm_topk`` off, routed scaling, gated experts, float32 router, dt limit
and the float32 residual stream."""
from __future__ import annotations

import math

import pytest
import torch

from elastic_kernels import moe_route
from elastic_kernels.models import (
    Budget,
    ElasticHybridConfig,
    ElasticHybridLM,
    estimate_importance,
    permute_by_importance,
)
from elastic_kernels.models.layers import ElasticMamba2Mixer, ElasticMoE


def _dense_groups_reference(moe: ElasticMoE, x: torch.Tensor) -> torch.Tensor:
    """The routing of DeepSeek-V3 / NemotronH written out for interleaved groups, float64."""
    xd = x.double().reshape(-1, x.shape[-1])
    scores = torch.sigmoid(xd @ moe.router.double().T)
    sel = scores + moe.correction_bias.double()
    g, E = moe.n_group, moe.num_experts
    gs = sel.view(-1, E // g, g).topk(2, dim=1).values.sum(1)
    keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(moe.topk_group, -1).indices, True)
    sel = sel.masked_fill(~keep[:, torch.arange(E) % g], -math.inf)
    ids = sel.topk(moe.top_k, -1).indices
    w = scores.gather(1, ids)
    if moe.norm_topk:
        w = w / w.sum(-1, keepdim=True)
    w = w * moe.routed_scaling
    y = torch.zeros_like(xd)
    for t in range(xd.shape[0]):
        for j in range(moe.top_k):
            e = ids[t, j]
            h = torch.relu(xd[t] @ moe.w1[e].double().T).square() * (xd[t] @ moe.w3[e].double().T)
            y[t] += w[t, j] * (h @ moe.w2[e].double().T)
    return y.reshape(x.shape)


@pytest.mark.parametrize("norm_topk", [True, False])
def test_group_limited_gated_moe_matches_the_written_out_routing(norm_topk):
    torch.manual_seed(0)
    moe = ElasticMoE(24, 12, 3, 20, score="sigmoid", gated=True, n_group=3, topk_group=2, norm_topk=norm_topk,
                     routed_scaling=2.5, init_std=0.3).double()
    moe.correction_bias.normal_(0, 0.1)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    assert torch.allclose(moe(x), _dense_groups_reference(moe, x), rtol=1e-12, atol=1e-12)


def test_selection_mask_excludes_experts_and_needs_top_k():
    logits = torch.randn(5, 6)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[:, :3] = False
    w, ids = moe_route(logits, 2, score="sigmoid", selection_mask=mask)
    assert (ids >= 3).all()
    mask[0, 3:5] = False
    with pytest.raises(ValueError, match="selection_mask"):
        moe_route(logits, 2, selection_mask=mask)
    with pytest.raises(TypeError, match="selection_mask"):
        moe_route(logits, 2, selection_mask=mask.float())


def test_router_stays_float32_under_to_bf16():
    moe = ElasticMoE(16, 4, 2, 8, score="sigmoid", router_fp32=True).to(torch.bfloat16)
    assert moe.router.dtype == torch.float32 and moe.correction_bias.dtype == torch.float32
    assert moe.w1.dtype == torch.bfloat16
    y = moe(torch.randn(2, 3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_expert_permutation_keeps_groups():
    moe = ElasticMoE(8, 8, 2, 4, score="sigmoid", n_group=2)
    with pytest.raises(ValueError, match="group"):
        moe.permute_("experts", torch.tensor([1, 0, 2, 3, 4, 5, 6, 7]))
    moe.permute_("experts", torch.tensor([2, 1, 0, 3, 4, 5, 6, 7]))  # 0 <-> 2: same group


def test_importance_permutation_of_a_grouped_model_keeps_its_function():
    torch.manual_seed(0)
    cfg = ElasticHybridConfig(pattern="ME", moe_experts=8, moe_top_k=2, moe_score="sigmoid", moe_n_group=2,
                              moe_topk_group=1, moe_gated=True, moe_routed_scaling=1.5, moe_norm_topk=False,
                              nested_choices={"experts": (1.0, 0.5)}, init_std=0.2)
    model = ElasticHybridLM(cfg).double()
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    before = model(ids)
    permute_by_importance(model, estimate_importance(model, [ids]))
    assert torch.allclose(model(ids), before, rtol=1e-10, atol=1e-12)
    assert torch.equal(model(ids, budget=Budget(experts=4)), model.slice(Budget(experts=4))(ids))
    with pytest.raises(ValueError, match="moe_n_group"):
        Budget(experts=5).resolve(cfg)  # not a multiple of the 2 groups
    with pytest.raises(ValueError, match="moe_n_group"):
        Budget(experts=2).resolve(cfg)  # one expert per group


def test_dt_limit_clamps_prefill_only():
    torch.manual_seed(0)
    m = ElasticMamba2Mixer(16, 4, 8, 2, 8, chunk_size=8, dt_limit=(0.5, 0.6)).double()
    free = ElasticMamba2Mixer(16, 4, 8, 2, 8, chunk_size=8).double()
    free.load_state_dict(m.state_dict())
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    assert not torch.allclose(m(x), free(x))
    cache_a, cache_b = m.new_cache(1, dtype=torch.float64), free.new_cache(1, dtype=torch.float64)
    m(x, cache=cache_a)
    free(x, cache=cache_b)
    cache_b.ssm.copy_(cache_a.ssm)
    cache_b.conv_x.copy_(cache_a.conv_x)
    cache_b.conv_bc.copy_(cache_a.conv_bc)
    step = torch.randn(1, 1, 16, dtype=torch.float64)
    assert torch.equal(m(step, cache=cache_a), free(step, cache=cache_b))  # decode steps do not clamp


def test_residual_fp32_keeps_the_stream_in_float32():
    torch.manual_seed(0)
    seen = {}
    for flag in (True, False):
        model = ElasticHybridLM(ElasticHybridConfig(pattern="MM", residual_fp32=flag)).to(torch.bfloat16)
        model.norm_f.register_forward_pre_hook(lambda mod, args, f=flag: seen.__setitem__(f, args[0].dtype))
        out = model(torch.randint(0, 48, (1, 9)))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert seen == {True: torch.float32, False: torch.bfloat16}
    with pytest.raises(ValueError, match="mamba_dt_limit"):
        ElasticHybridConfig(mamba_dt_limit=(0.2, 0.1))
