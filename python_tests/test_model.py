"""The elastic hybrid reference model: budgets, slicing, soft masks, importance and
permutation, per-sample budgets, decode caches, nested checkpoints, bad input."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from elastic_kernels import fake_quant_fp8, nvfp4
from elastic_kernels.models import (AXES, Budget, CheckpointError, ElasticGatedRMSNorm, ElasticHybridConfig,
                                    ElasticHybridLM, ElasticRMSNorm, estimate_importance, load_nested,
                                    load_nested_state, permute_by_importance, read_nested_config, save_nested)
from elastic_kernels.models.layers import causal_conv_silu

# fp32 "tight": masked and sliced forwards do the same arithmetic up to summation order
ATOL, RTOL = 2e-5, 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(**kw) -> ElasticHybridConfig:
    base = dict(vocab_size=40, hidden_size=32, pattern="M-EM*E", mamba_heads=8, mamba_head_dim=8,
                mamba_groups=2, mamba_state=8, mamba_chunk_size=8, moe_experts=8, moe_top_k=2, moe_ffn=32,
                attn_heads=4, attn_kv_heads=2, ffn_size=48, init_std=0.2)
    base.update(kw)
    return ElasticHybridConfig(**base)


CONFIGS = {
    "softmax": small_config(),
    "sigmoid-shared-tied": small_config(moe_score="sigmoid", moe_shared_ffn=16, tie_embeddings=True,
                                        moe_activation="gelu", ffn_activation="silu", pattern="ME*-M"),
}


def make_model(name: str = "softmax", seed: int = 0) -> ElasticHybridLM:
    torch.manual_seed(seed)
    m = ElasticHybridLM(CONFIGS[name])
    for block in m.layers:  # non-trivial sigmoid correction bias and norm weights
        if block.kind == "E" and block.mixer.correction_bias is not None:
            block.mixer.correction_bias.uniform_(-0.1, 0.1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") or n == "norm_f.weight":
                p.uniform_(0.5, 1.5)
    return m


def ids_for(cfg, batch=3, seqlen=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seqlen), generator=g)


def budgets_for(cfg):
    """Every axis alone, combined budgets and a per-layer budget."""
    out = {"full": Budget()}
    for axis in AXES:
        out[f"{axis}-0.5"] = Budget.from_fractions(cfg, **{axis: 0.5})
    out["all-0.75"] = Budget.from_fractions(cfg, 0.75)
    out["all-0.5"] = Budget.from_fractions(cfg, 0.5)
    nm, ne, nf = cfg.num_units("mamba_heads"), cfg.num_units("experts"), cfg.num_units("ffn")
    out["per-layer"] = Budget(hidden=24, mamba_heads=tuple([4, 6, 2, 8][:nm]), experts=tuple([3, 6][:ne]),
                              expert_ffn=tuple([16, 24][:ne]), ffn=tuple([20][:nf]))
    return out


def weights_file(folder):
    """The weights file a nested checkpoint's manifest names."""
    return folder / json.loads((folder / "config.json").read_text())["weights"]


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# config, layers
# ---------------------------------------------------------------------------------------------

def test_config_json_round_trip():
    for cfg in CONFIGS.values():
        assert ElasticHybridConfig.from_json(cfg.to_json()) == cfg
    cfg = dataclasses.replace(CONFIGS["softmax"], layer_sizes={"mamba_heads": (8, 4)},
                              nested_choices={"mamba_heads": (1.0, 0.5), "hidden": (1.0, 0.5)})
    back = ElasticHybridConfig.from_json(cfg.to_json())
    assert back == cfg and back.full_size("mamba_heads", 1) == 4
    assert CONFIGS["softmax"].choice_sizes("mamba_heads") == (8, 6, 4)


@pytest.mark.parametrize("kw, match", [
    (dict(hidden_size=30, attn_heads=4), "hidden_size"),
    (dict(mamba_heads=8, mamba_groups=4), "nested_choices\\['mamba_heads'\\]"),
    (dict(mamba_heads=6, mamba_groups=4), "mamba_heads"),
    (dict(pattern="M-X*"), "pattern"),
    (dict(pattern=""), "pattern"),
    (dict(moe_top_k=9), "moe_top_k"),
    (dict(moe_score="relu"), "moe_score"),
    (dict(ffn_activation="tanh"), "ffn_activation"),
    (dict(attn_heads=4, attn_kv_heads=3), "attn_heads"),
    (dict(nested_choices={"hidden": (1.0, 1.5)}), "nested_choices"),
    (dict(nested_choices={"hidden": (0.3,)}), "whole number"),
    (dict(nested_choices={"depth": (1.0,)}), "unknown axis"),
    (dict(nested_choices={"experts": (0.125,)}), "experts"),
    (dict(layer_sizes={"mamba_heads": (8,)}), "layer_sizes"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(norm_eps=-1.0), "norm_eps"),
    (dict(norm_eps=float("nan")), "norm_eps"),
    (dict(init_std=float("nan")), "init_std"),
    (dict(init_std=float("inf")), "init_std"),
    (dict(init_std=-0.02), "init_std"),
])
def test_bad_config_named_error(kw, match):
    with pytest.raises(ValueError, match=match):
        small_config(**kw)


def test_bad_config_types_and_json():
    with pytest.raises(TypeError, match="hidden_size"):
        small_config(hidden_size=32.0)
    with pytest.raises(ValueError, match="unknown field"):
        ElasticHybridConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="not valid JSON"):
        ElasticHybridConfig.from_json("{")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_layer_kind_implements_the_protocol(name):
    """Each registered kind: full sliced shapes are its parameter shapes, its axes name config
    fields, quantizable weights are 2-D+ parameters, permuting by identity changes nothing."""
    from elastic_kernels.models import LAYER_KINDS, ElasticLayer
    model = make_model(name)
    cfg = model.config
    assert set(LAYER_KINDS) == set("ME*-")
    for block in model.layers:
        mixer = block.mixer
        assert isinstance(mixer, ElasticLayer) and LAYER_KINDS[block.kind] is type(mixer)
        assert set(mixer.sizes()) == {a.name for a in mixer.axes}
        for a in mixer.axes:
            assert mixer.sizes()[a.name] == cfg.full_size(a.name, block.occurrence) == getattr(cfg, a.size_field)
        state = dict(mixer.state_dict())
        assert {n: tuple(t.shape) for n, t in state.items()} == mixer.sliced_shapes(cfg.hidden_size, mixer.sizes())
        assert all(state[n].dim() >= 2 for n in mixer.quantizable_weights())
        before = {n: t.clone() for n, t in state.items()}
        mixer.permute_("hidden", torch.arange(cfg.hidden_size))
        for a in mixer.axes:
            units = mixer.sizes()[a.name]
            ident = torch.arange(units)
            mixer.permute_(a.name, ident if a.name != "expert_ffn" else ident.expand(mixer.num_experts, units))
        assert all(torch.equal(before[n], t) for n, t in mixer.state_dict().items())
        with pytest.raises(ValueError, match="axis must be"):
            mixer.permute_("bogus", torch.arange(3))


def test_elastic_rmsnorm_active_prefix():
    torch.manual_seed(0)
    norm = ElasticRMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    for k in (16, 9, 1):
        xk = x[..., :k]
        want = xk / torch.sqrt(xk.square().mean(-1, keepdim=True) + norm.eps) * norm.weight[:k].double()
        torch.testing.assert_close(norm(xk.float()).double(), want, atol=1e-6, rtol=1e-6)
    # per-sample widths and a 0/1 prefix soft mask both equal the narrow call
    width = torch.tensor([16, 7])
    xm = x.float() * (torch.arange(16)[None, :] < width[:, None])[:, None, :]
    per = norm(xm, width=width)
    soft = norm(xm, mask=(torch.arange(16)[None, :] < width[:, None]).float())
    torch.testing.assert_close(per[1, :, :7], norm(xm[1:, :, :7])[0])
    torch.testing.assert_close(soft, per)
    assert (per[1, :, 7:] == 0).all()


def test_gated_rmsnorm_per_group_interleaved():
    torch.manual_seed(0)
    H, P, G = 6, 4, 2
    norm = ElasticGatedRMSNorm(H, P, G)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    y, z = torch.randn(2, 3, H, P, dtype=torch.float64), torch.randn(2, 3, H, P, dtype=torch.float64)
    for h in (6, 4, 2):  # the first h/G heads of every group: heads [0, h) in the interleaved layout
        g = y[:, :, :h] * F.silu(z[:, :, :h])
        want = torch.empty_like(g)
        for grp in range(G):
            heads = list(range(grp, h, G))
            ms = g[:, :, heads].square().mean(dim=(-2, -1), keepdim=True)
            want[:, :, heads] = g[:, :, heads] / torch.sqrt(ms + norm.eps) * norm.weight[heads].double()
        got = norm(y[:, :, :h].float(), z[:, :, :h].float())
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_prev", [False, True])
@pytest.mark.parametrize("seqlen,K", [(1, 4), (7, 4), (17, 1), (5, 3)])
def test_causal_conv_silu_matches_grouped_conv1d(with_prev, seqlen, K):
    """Output and gradients of the written-out conv against the float64 grouped conv1d (the
    truth), on strided-view inputs: fp32 within 1e-5 x scale, float64 to rounding."""
    torch.manual_seed(seqlen * 10 + K)
    b, c1, c2 = 3, 6, 5
    ch = c1 + c2
    base = torch.randn(b, seqlen, 2 * c1 + 1, dtype=torch.float64)
    bc = torch.randn(b, seqlen, c2, dtype=torch.float64)
    w = torch.randn(K, ch, dtype=torch.float64).t()                       # (ch, K), a transposed view
    bias = torch.randn(ch, dtype=torch.float64)
    prev = torch.randn(b, ch, K - 1, dtype=torch.float64).transpose(1, 2) if with_prev else None
    g = torch.randn(b, seqlen, ch, dtype=torch.float64)

    def truth():
        leaves = [t.clone().requires_grad_(True) for t in (base, bc, w, bias)]
        xb, bcb, wb, biasb = leaves
        u = torch.cat([xb[..., 1:1 + c1], bcb], -1).transpose(1, 2)
        p0 = torch.zeros(b, ch, K - 1, dtype=torch.float64) if prev is None else prev.transpose(1, 2)
        out = F.silu(F.conv1d(torch.cat([p0, u], -1), wb[:, None], biasb, groups=ch)).transpose(1, 2)
        return out, torch.autograd.grad(out, leaves, g)

    want, want_grads = truth()
    scale = max(want.abs().max().item(), 1.0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        leaves = [t.to(dtype).requires_grad_(True) for t in (base, bc, w, bias)]
        xb, bcb, wb, biasb = leaves
        got = causal_conv_silu(None if prev is None else prev.to(dtype), wb, biasb, xb[..., 1:1 + c1], bcb)
        assert got.dtype == dtype and got.shape == (b, seqlen, ch)
        grads = torch.autograd.grad(got, leaves, g.to(dtype))
        torch.testing.assert_close(got.double(), want, atol=tol * scale, rtol=0)
        for gg, wg in zip(grads, want_grads):
            torch.testing.assert_close(gg.double(), wg, atol=tol * max(wg.abs().max().item(), 1.0), rtol=0)


# ---------------------------------------------------------------------------------------------
# masked forward == sliced forward, param_count == numel(slice)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_masked_forward_equals_sliced_model(name):
    model = make_model(name)
    cfg = model.config
    ids = ids_for(cfg)
    parent_numel = numel(model)
    for bname, budget in budgets_for(cfg).items():
        sub = model.slice(budget)
        close(model(ids, budget), sub(ids))
        assert model.param_count(budget) == numel(sub), bname
        assert model.param_count(budget, active=True) == sub.param_count(active=True), bname
        if bname == "full":
            assert numel(sub) == parent_numel
        else:
            assert numel(sub) < parent_numel, bname
        # tensors are really smaller, not views of the parent
        assert all(p.untyped_storage().data_ptr() != q.untyped_storage().data_ptr()
                   for p, q in zip(sub.parameters(), model.parameters()))


def test_hard_budgets_do_the_work_of_the_sliced_model():
    """Hard widths skip work: the masked forward counts exactly the FLOPs of the sliced model."""
    from torch.utils.flop_counter import FlopCounterMode

    model = make_model()
    ids = ids_for(model.config, batch=2, seqlen=16)

    def flops(m, budget=None):
        with FlopCounterMode(display=False) as fc:
            m(ids, budget)
        return fc.get_total_flops()
    full = flops(model)
    for bname, budget in budgets_for(model.config).items():
        got = flops(model, budget)
        assert got == flops(model.slice(budget)), bname
        if bname in ("hidden-0.5", "mamba_heads-0.5", "ffn-0.5", "all-0.5", "per-layer"):
            assert got < full, bname


def test_empty_and_low_precision_inputs():
    model = make_model()
    cfg = model.config
    half = Budget.from_fractions(cfg, 0.5)
    for shape in [(2, 0), (0, 5)]:
        ids = torch.zeros(shape, dtype=torch.int64)
        assert model(ids, half).shape == (*shape, cfg.vocab_size)
        assert model(ids, [half] * shape[0]).shape == (*shape, cfg.vocab_size)
    cache = model.new_cache(2)
    assert model(torch.zeros(2, 0, dtype=torch.int64), cache=cache).shape == (2, 0, cfg.vocab_size)
    assert cache.seqlen == 0
    bf16 = make_model().to(torch.bfloat16)
    out = bf16(ids_for(cfg), half)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert bf16.new_cache(1).layers[0].ssm.dtype == torch.float32


def test_active_param_count_counts_top_k_experts():
    model = make_model()
    cfg = model.config
    per_expert = 2 * cfg.moe_ffn * cfg.hidden_size
    diff = model.param_count() - model.param_count(active=True)
    assert diff == cfg.num_units("experts") * (cfg.moe_experts - cfg.moe_top_k) * per_expert


def test_expected_param_count_matches_and_is_differentiable():
    model = make_model()
    cfg = model.config
    for budget in budgets_for(cfg).values():
        sizes = model.resolve_budget(budget)
        got = model.expected_param_count({a: tuple(float(s) for s in v) for a, v in sizes.items()})
        assert int(round(got.item())) == model.param_count(budget)
    h = torch.tensor(24.0, requires_grad=True)
    ffn = torch.tensor(30.0, requires_grad=True)
    total = model.expected_param_count({"hidden": h, "ffn": ffn}, active=True)
    total.backward()
    assert h.grad > 0 and ffn.grad == 2 * 24.0


def test_hard_budget_gradients_of_inactive_parameters_are_zero():
    model = make_model()
    cfg = model.config
    budget = Budget.from_fractions(cfg, 0.5)
    model(ids_for(cfg), budget).square().mean().backward()
    shapes = model.sliced_shapes(model.resolve_budget(budget))
    for n, p in model.named_parameters():
        inside = tuple(slice(0, s) for s in shapes[n])
        mask = torch.ones_like(p, dtype=torch.bool)
        mask[inside] = False
        assert p.grad is not None, n
        assert (p.grad[mask] == 0).all(), n
    assert model.embed.weight.grad[:, :budget.hidden].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# soft masks
# ---------------------------------------------------------------------------------------------

def prefix_masks(model, budget, batch=None):
    cfg = model.config
    sizes = model.resolve_budget(budget)

    def m(n, full):
        v = (torch.arange(full) < n).float()
        return v.expand(batch, full).clone() if batch else v
    out = {"hidden": m(sizes["hidden"][0], cfg.hidden_size)}
    for axis in AXES[1:]:
        out[axis] = [m(s, cfg.full_size(axis, o)) for o, s in enumerate(sizes[axis])]
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_zero_one_prefix_soft_masks_equal_hard_budget(name):
    model = make_model(name)
    cfg = model.config
    ids = ids_for(cfg)
    for bname in ("all-0.5", "per-layer", "hidden-0.5", "experts-0.5"):
        budget = budgets_for(cfg)[bname]
        close(model(ids, soft_masks=prefix_masks(model, budget)), model(ids, budget))
        close(model(ids, soft_masks=prefix_masks(model, budget, batch=ids.shape[0])), model(ids, budget))


def test_soft_masks_are_differentiable_and_combine_with_hard_widths():
    model = make_model()
    cfg = model.config
    ids = ids_for(cfg)
    torch.manual_seed(3)
    masks = {"hidden": torch.rand(ids.shape[0], cfg.hidden_size) * 0.5 + 0.5,
             "mamba_heads": torch.rand(cfg.mamba_heads) * 0.5 + 0.5,
             "experts": [torch.rand(cfg.moe_experts) * 0.5 + 0.5, None],
             "expert_ffn": torch.rand(ids.shape[0], cfg.moe_ffn) * 0.5 + 0.5,
             "ffn": torch.rand(cfg.ffn_size) * 0.5 + 0.5}
    leaves = {k: ([t.requires_grad_() if t is not None else None for t in v] if isinstance(v, list)
                  else v.requires_grad_()) for k, v in masks.items()}
    out = model(ids, Budget.from_fractions(cfg, 0.75), soft_masks=leaves)
    out.square().mean().backward()
    budget = Budget.from_fractions(cfg, 0.75)
    sizes = model.resolve_budget(budget)
    for axis, v in leaves.items():
        for o, t in enumerate(v if isinstance(v, list) else [v]):
            if t is None:
                continue
            n = sizes[axis][min(o, len(sizes[axis]) - 1)]
            assert torch.isfinite(t.grad).all(), axis
            assert t.grad[..., :n].abs().sum() > 0, axis
            assert (t.grad[..., n:] == 0).all(), axis  # beyond the hard width: cut, no gradient


# ---------------------------------------------------------------------------------------------
# importance and permutation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_permutation_by_importance_keeps_full_width_outputs(name):
    model = make_model(name)
    cfg = model.config
    ids = ids_for(cfg, batch=4, seqlen=16)
    before = model(ids)
    scores = estimate_importance(model, [ids_for(cfg, seed=s) for s in range(2)])
    assert not any(p.grad is not None for p in model.parameters())
    perms = permute_by_importance(model, scores)
    close(model(ids), before)
    assert any(not torch.equal(p, torch.arange(p.numel())) for p in [perms["hidden"], *perms["ffn"]])
    after = estimate_importance(model, [ids_for(cfg, seed=s) for s in range(2)])
    for axis in ("hidden",):  # the permuted model's scores are sorted
        assert (after[axis][:-1] >= after[axis][1:] - 1e-6 * after[axis].max()).all()


def test_importance_ranks_planted_units_first():
    model = make_model().double()  # permuting the hidden channels reorders fp32 sums: compare in float64
    cfg = model.config
    G, P = cfg.mamba_groups, cfg.mamba_head_dim
    planted = {"hidden": 19, "mamba_heads": 5, "experts": 6, "expert_ffn": 21, "ffn": 33}
    with torch.no_grad():
        for mod in [model.norm_f] + [b.norm for b in model.layers]:
            mod.weight[planted["hidden"]] = 8.0
        for b in model.layers:
            if b.kind == "M":
                b.mixer.in_heads[planted["mamba_heads"], P:2 * P] *= 20.0
            elif b.kind == "E":
                b.mixer.w2[planted["experts"]] *= 50.0
            elif b.kind == "-":
                b.mixer.up[planted["ffn"]] *= 20.0
    ids = ids_for(cfg, batch=4, seqlen=32)
    before = model(ids)
    scores = estimate_importance(model, [ids])
    assert int(scores["hidden"].argmax()) == planted["hidden"]
    h = planted["mamba_heads"]
    for s in scores["mamba_heads"]:
        assert int(s[h % G::G].argmax()) * G + h % G == h  # first within its group
    for s in scores["experts"]:
        assert int(s.argmax()) == planted["experts"]
    for s in scores["ffn"]:
        assert int(s.argmax()) == planted["ffn"]
    perms = permute_by_importance(model, scores)
    close(model(ids), before)
    assert int(perms["hidden"][0]) == planted["hidden"]
    for p in perms["mamba_heads"]:
        assert int(p[h % G]) == h  # moved to the front of its group
    assert all(int(p[0]) == planted["experts"] for p in perms["experts"])
    assert all(int(p[0]) == planted["ffn"] for p in perms["ffn"])


def test_importance_ranks_planted_expert_channel_first():
    model = make_model().double()  # the plant makes activations large: compare in float64
    planted = 21
    with torch.no_grad():
        for b in model.layers:
            if b.kind == "E":
                b.mixer.w1[:, planted] *= 20.0
    ids = ids_for(model.config, batch=4, seqlen=32)
    before = model(ids)
    scores = estimate_importance(model, [ids])
    for s in scores["expert_ffn"]:
        routed = s.sum(1) > 0
        assert (s.argmax(dim=1)[routed] == planted).all()
    perms = permute_by_importance(model, scores)
    torch.testing.assert_close(model(ids), before, atol=1e-10, rtol=1e-10)
    for p, s in zip(perms["expert_ffn"], scores["expert_ffn"]):
        assert (p[s.sum(1) > 0, 0] == planted).all()


# ---------------------------------------------------------------------------------------------
# per-sample budgets, decode caches
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_per_sample_budgets_equal_each_sample_alone(name):
    model = make_model(name)
    cfg = model.config
    table = budgets_for(cfg)
    chosen = [table["full"], table["all-0.5"], table["per-layer"], table["experts-0.5"], table["hidden-0.5"]]
    ids = ids_for(cfg, batch=len(chosen))
    out = model(ids, chosen)
    for i, b in enumerate(chosen):
        close(out[i], model(ids[i:i + 1], b)[0])


def test_per_sample_budgets_with_per_sample_soft_masks():
    model = make_model()
    cfg = model.config
    table = budgets_for(cfg)
    chosen = [table["full"], table["all-0.5"], table["per-layer"]]
    ids = ids_for(cfg, batch=3)
    g = torch.Generator().manual_seed(5)
    masks = {"hidden": torch.rand(3, cfg.hidden_size, generator=g) + 0.5,
             "mamba_heads": torch.rand(3, cfg.mamba_heads, generator=g) + 0.5,
             "experts": torch.rand(3, cfg.moe_experts, generator=g) + 0.5,
             "expert_ffn": torch.rand(3, cfg.moe_ffn, generator=g) + 0.5,
             "ffn": torch.rand(3, cfg.ffn_size, generator=g) + 0.5}
    out = model(ids, chosen, soft_masks=masks)
    for i, b in enumerate(chosen):
        alone = model(ids[i:i + 1], b, soft_masks={k: v[i:i + 1] for k, v in masks.items()})
        close(out[i], alone[0])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_with_caches_equals_full_forward(name):
    model = make_model(name)
    cfg = model.config
    ids = ids_for(cfg, batch=2, seqlen=12)
    table = budgets_for(cfg)
    cases = list(table.values()) + [[table["full"], table["all-0.5"]], [table["per-layer"], table["hidden-0.5"]]]
    for budget in cases:
        want = model(ids, budget)
        cache = model.new_cache(ids.shape[0])
        parts = [model(ids[:, :5], budget, cache=cache), model(ids[:, 5:7], budget, cache=cache)]
        parts += [model(ids[:, t:t + 1], budget, cache=cache) for t in range(7, ids.shape[1])]
        assert cache.seqlen == ids.shape[1]
        close(torch.cat(parts, 1), want)


def test_decode_from_one_token_prompts_equals_full_forward():
    """A one-token first step (the decode path's conv against an empty cached window) and then
    one token at a time give the full forward's logits."""
    model = make_model("softmax")
    ids = ids_for(model.config, batch=2, seqlen=7)
    cache = model.new_cache(ids.shape[0])
    parts = [model(ids[:, t:t + 1], cache=cache) for t in range(ids.shape[1])]
    close(torch.cat(parts, 1), model(ids))


def test_balanced_chunks_keep_the_count_and_the_result():
    """balanced_chunk: as many chunks as chunk_size gives, equal lengths <= chunk_size; the model's
    output does not depend on the chunk size it is configured with."""
    from elastic_kernels.models.layers import balanced_chunk
    for seqlen in range(1, 80):
        for chunk in (1, 3, 8, 16, 32, 64):
            got = balanced_chunk(seqlen, chunk)
            assert 1 <= got <= chunk and -(-seqlen // got) == -(-seqlen // chunk), (seqlen, chunk, got)
    assert balanced_chunk(37, 32) == 19 and balanced_chunk(64, 32) == 32 and balanced_chunk(5, 64) == 5
    ids = ids_for(CONFIGS["softmax"], batch=2, seqlen=13)
    outs = []
    for chunk in (4, 5, 8, 64):
        torch.manual_seed(0)
        outs.append(ElasticHybridLM(small_config(mamba_chunk_size=chunk))(ids))
    for o in outs[1:]:
        close(o, outs[0])


def test_sliced_model_decodes_like_masked_model():
    model = make_model()
    budget = budgets_for(model.config)["per-layer"]
    sub = model.slice(budget)
    ids = ids_for(model.config, batch=2, seqlen=6)
    cache = sub.new_cache(2)
    steps = torch.cat([sub(ids[:, t:t + 1], cache=cache) for t in range(6)], 1)
    close(steps, model(ids, budget))


@torch.no_grad()
def _decode(model, cache, ids, budget):
    """Continue ``cache`` over ``ids`` one token at a time; logits (batch, seqlen, vocab)."""
    return torch.cat([model(ids[:, t:t + 1], budget, cache=cache) for t in range(ids.shape[1])], 1)


def test_cache_select_rows_and_merge_continue_like_separate_caches():
    model = make_model()
    table = budgets_for(model.config)
    ids = ids_for(model.config, batch=3, seqlen=9)
    budgets = [table["full"], table["all-0.5"], table["per-layer"]]
    cache = model.new_cache(3)
    model(ids[:, :5], budgets, cache=cache)
    sub = cache.select_rows(torch.tensor([2, 0]))
    assert sub.batch == 2 and sub.seqlen == 5
    close(_decode(model, sub, ids[[2, 0], 5:], [budgets[2], budgets[0]]),
          model(ids[[2, 0]], [budgets[2], budgets[0]])[:, 5:])
    # merge rows decoded in two separate caches back into one cache of the original order
    a, b = cache.select_rows(torch.tensor([1])), cache.select_rows(torch.tensor([0, 2]))
    merged = type(cache).merge([(torch.tensor([1]), a), (torch.tensor([0, 2]), b)], 3)
    close(_decode(model, merged, ids[:, 5:], budgets), model(ids, budgets)[:, 5:])
    b.seqlen += 1
    with pytest.raises(ValueError, match="same length"):
        type(cache).merge([(torch.tensor([1]), a), (torch.tensor([0, 2]), b)], 3)
    with pytest.raises(ValueError, match="must not be empty"):
        type(cache).merge([], 3)


def test_cache_clear_outside_leaves_what_a_narrow_decode_alone_leaves():
    model = make_model()
    table = budgets_for(model.config)
    ids = ids_for(model.config, batch=2, seqlen=7)
    narrow = table["per-layer"]
    batched = model.new_cache(2)
    _decode(model, batched, ids, [table["full"], narrow])
    alone = model.new_cache(1)
    _decode(model, alone, ids[1:], narrow)
    row = batched.select_rows(torch.tensor([1]))
    assert any(not torch.allclose(got.conv_x, want.conv_x) for got, want in zip(row.layers, alone.layers)
               if got is not None and hasattr(got, "ssm"))  # the wide neighbour left state beyond the budget
    batched.clear_outside(1, model.resolve_budget(narrow))
    row = batched.select_rows(torch.tensor([1]))
    for got, want in zip(row.layers, alone.layers):
        if got is None or not hasattr(got, "ssm"):
            continue
        close(got.ssm, want.ssm)
        close(got.conv_x, want.conv_x)
    with pytest.raises(ValueError, match="row must lie"):
        batched.clear_outside(2, model.resolve_budget(narrow))
    with pytest.raises(ValueError, match="units"):
        type(batched)(layers=batched.layers, batch=2).clear_outside(0, model.resolve_budget(narrow))


# ---------------------------------------------------------------------------------------------
# nested checkpoints
# ---------------------------------------------------------------------------------------------

def _rchar() -> int | None:
    try:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar")).split()[1])
    except OSError:
        return None


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nested_checkpoint_round_trip(tmp_path, name):
    model = make_model(name)
    cfg = model.config
    table = budgets_for(cfg)
    save_nested(model, tmp_path, table)
    weights = weights_file(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", weights.name])  # no temp files left
    plain = safetensors.torch.load_file(weights)  # a standard safetensors file
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())
    cfg2, table2 = read_nested_config(tmp_path)
    assert cfg2 == cfg and table2 == table
    ids = ids_for(cfg)
    for bname, budget in table.items():
        loaded = load_nested(tmp_path, bname)
        want = model.slice(budget)
        assert loaded.config == want.config
        sd, wd = loaded.state_dict(), want.state_dict()
        assert sd.keys() == wd.keys()
        for k in sd:
            assert sd[k].dtype == wd[k].dtype and torch.equal(sd[k], wd[k]), (bname, k)
        torch.testing.assert_close(loaded(ids), want(ids), atol=0, rtol=0)
    full = load_nested(tmp_path)  # None = the parent
    torch.testing.assert_close(full(ids), model(ids), atol=0, rtol=0)


def test_nested_checkpoint_keeps_bf16(tmp_path):
    model = make_model().to(torch.bfloat16)
    table = {"half": Budget.from_fractions(model.config, 0.5), "per-layer": budgets_for(model.config)["per-layer"]}
    save_nested(model, tmp_path, table)
    for bname, budget in table.items():
        loaded, want = load_nested(tmp_path, bname), model.slice(budget)
        for k, v in loaded.state_dict().items():
            assert v.dtype == torch.bfloat16 and torch.equal(v, want.state_dict()[k]), (bname, k)


def test_load_nested_smallest_budget_reads_only_its_bytes(tmp_path):
    model = make_model()
    cfg = model.config
    table = {"full": Budget(), "half": Budget.from_fractions(cfg, 0.5)}
    save_nested(model, tmp_path, table)
    own = sum(t.numel() * t.element_size() for t in model.slice(table["half"]).state_dict().values())
    cfg_bytes = os.path.getsize(tmp_path / "config.json")
    stats = {}
    r0 = _rchar()
    load_nested(tmp_path, "half", stats=stats)
    r1 = _rchar()
    assert stats["bytes_read"] == stats["header_bytes"] + own
    assert stats["bytes_read"] < 0.5 * stats["file_bytes"]
    if r0 is not None:  # the kernel's own count of bytes read by this process
        assert r1 - r0 <= stats["header_bytes"] + own + cfg_bytes + 4096


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_quantized_nested_checkpoint_round_trip(tmp_path, fmt):
    model = make_model()
    cfg = model.config
    t = budgets_for(cfg)
    table = {n: t[n] for n in ("full", "all-0.5", "hidden-0.5", "mamba_heads-0.5", "experts-0.5")}
    save_nested(model, tmp_path, table, quantization=fmt)
    qtable = json.loads((tmp_path / "config.json").read_text())["quantization"]["tensors"]
    assert {"layers.0.mixer.in_heads", "layers.2.mixer.w1", "lm_head.weight"} <= set(qtable)
    # the truth: the parent with every stored weight replaced by its own quantize-dequantize
    truth = make_model()
    with torch.no_grad():
        for name, p in truth.named_parameters():
            if name in qtable:
                w = p.reshape(-1, p.shape[-1]) if qtable[name] == "flat" else p
                deq = nvfp4.quantize(w).dequantize(p.dtype) if fmt == "nvfp4" else fake_quant_fp8(w)
                p.copy_(deq.reshape(p.shape))
    ids = ids_for(cfg)
    smallest = min(table, key=lambda n: model.param_count(table[n]))
    for bname, budget in table.items():
        stats = {}
        loaded, want = load_nested(tmp_path, bname, stats=stats), truth.slice(budget)
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, want.state_dict()[k]), (bname, k)
        torch.testing.assert_close(loaded(ids), want(ids), atol=0, rtol=0)
        if bname == smallest:
            _, raw = load_nested_state(tmp_path, bname)
            own = sum(v.nbytes for v in raw.values())  # tensors and quantized containers alike
            assert stats["bytes_read"] == stats["header_bytes"] + own
            assert stats["bytes_read"] < 0.5 * stats["file_bytes"]
    if fmt == "nvfp4":  # W4A16 serving: packed weights, nvfp4_linear / NVFP4 moe_experts in the layers
        packed = load_nested(tmp_path, weights="nvfp4")
        deq = load_nested(tmp_path)
        assert set(packed.nvfp4_weights()) == set(qtable)
        assert packed.param_count() == deq.param_count()
        for bname in table:  # nested slices of the packed parent, in the forward
            close(packed(ids, table[bname]), deq(ids, table[bname]))
        close(load_nested(tmp_path, "all-0.5", weights="nvfp4")(ids), deq(ids, table["all-0.5"]))
        with pytest.raises(TypeError, match="NVFP4"):
            packed.slice(table["all-0.5"])
        with pytest.raises(TypeError, match="NVFP4"):
            save_nested(packed, tmp_path / "again", {})
    with pytest.raises(ValueError, match="weights"):
        load_nested(tmp_path, weights="int4")
    _, raw = load_nested_state(tmp_path, "all-0.5")
    if fmt == "nvfp4":
        q = raw["layers.0.mixer.in_heads"]
        assert isinstance(q, nvfp4.NVFP4Tensor) and q.data.dtype == torch.uint8
        with pytest.raises(CheckpointError, match="multiples of 16"):
            load_nested(tmp_path, Budget(hidden=24))
    with pytest.raises(ValueError, match="quantization"):
        save_nested(model, tmp_path, table, quantization="int4")


def test_nested_checkpoint_errors(tmp_path):
    model = make_model()
    cfg = model.config
    save_nested(model, tmp_path, {"half": Budget.from_fractions(cfg, 0.5)})
    weights, config = weights_file(tmp_path), tmp_path / "config.json"
    with pytest.raises(CheckpointError, match="not in the checkpoint's table"):
        load_nested(tmp_path, "quarter")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_nested(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="budget"):
        load_nested(tmp_path, 0.5)
    with pytest.raises(ValueError, match="mamba_heads"):
        load_nested(tmp_path, Budget(mamba_heads=5))
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        load_nested(tmp_path, "half")
    weights.write_bytes(b"\xff" * 8 + good[8:])  # absurd header length
    with pytest.raises(CheckpointError, match="header length"):
        load_nested(tmp_path, "half")
    n = int.from_bytes(good[:8], "little")
    weights.write_bytes(good[:8] + b"{" * n + good[8 + n:])  # garbage header
    with pytest.raises(CheckpointError, match="bad safetensors header"):
        load_nested(tmp_path, "half")
    weights.write_bytes(good)
    meta = json.loads(config.read_text())
    meta["config"]["hidden_size"] = 48
    meta["config"]["nested_choices"]["hidden"] = [1.0]
    config.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_nested(tmp_path, "half")
    with pytest.raises(CheckpointError, match="config_sha256"):
        load_nested(tmp_path, "half", verify=False)
    save_nested(model, tmp_path, {"half": Budget.from_fractions(cfg, 0.5)})
    other = small_config(ffn_size=64)
    save_nested(ElasticHybridLM(other), tmp_path / "other", {})
    weights_file(tmp_path / "other").replace(weights)  # another model's weights under this manifest's name
    with pytest.raises(CheckpointError, match="does not belong"):
        load_nested(tmp_path, None)
    config.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_nested(tmp_path)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def test_bad_budgets_and_inputs_named_errors():
    model = make_model()
    cfg = model.config
    ids = ids_for(cfg)
    bad = [
        (Budget(mamba_heads=5), ValueError, "mamba_groups"),
        (Budget(experts=1), ValueError, "experts"),
        (Budget(hidden=cfg.hidden_size + 1), ValueError, "hidden"),
        (Budget(ffn=(10, 20)), ValueError, "per-layer entries"),
        (Budget(hidden=(16,)), TypeError, "hidden"),
        (Budget(expert_ffn=2.5), TypeError, "expert_ffn"),
        ("half", TypeError, "budget"),
        ([Budget()], ValueError, "one Budget per sample"),
    ]
    for budget, exc, match in bad:
        with pytest.raises(exc, match=match):
            model(ids, budget)
    with pytest.raises(TypeError, match="input_ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    with pytest.raises(ValueError, match="input_ids values"):
        model(ids + cfg.vocab_size)
    with pytest.raises(ValueError, match="unknown axis"):
        model(ids, soft_masks={"depth": torch.ones(3)})
    with pytest.raises(ValueError, match="soft_masks\\['ffn'\\]"):
        model(ids, soft_masks={"ffn": torch.ones(cfg.ffn_size + 1)})
    with pytest.raises(ValueError, match="soft_masks\\['experts'\\]"):
        model(ids, soft_masks={"experts": [torch.ones(cfg.moe_experts)]})
    with pytest.raises(TypeError, match="soft_masks\\['hidden'\\]"):
        model(ids, soft_masks={"hidden": torch.ones(cfg.hidden_size, dtype=torch.int64)})
    with pytest.raises(ValueError, match="cache"):
        model(ids, cache=model.new_cache(ids.shape[0] + 1))
    with pytest.raises(ValueError, match="unknown axis"):
        Budget.from_dict({"depth": 2})
    with pytest.raises(ValueError, match="unknown score axis"):
        permute_by_importance(model, {"depth": torch.ones(2)})
    with pytest.raises(ValueError, match="scores\\['hidden'\\]"):
        permute_by_importance(model, {"hidden": torch.ones(3)})
    with pytest.raises(TypeError, match="ElasticHybridConfig"):
        ElasticHybridLM({"hidden_size": 32})
