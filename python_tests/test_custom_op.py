"""Op registration (elastic_kernels/ops/_autograd.py, CustomOp): what ``torch.library.custom_op``
guarantees, without importing ``torch._dynamo`` on the first call of an op."""
import os
import subprocess
import sys

import pytest
import torch

import elastic_kernels as ek
from elastic_kernels.ops._autograd import CustomOp


def test_ops_and_meta_models_import_no_compiler():
    """Every op forward and backward, a model built on the meta device (as checkpoint loading
    does) and the statistics import neither torch._dynamo, sympy nor scipy.stats."""
    code = """
import sys, torch
import elastic_kernels as ek
from elastic_kernels import nvfp4
from elastic_kernels.infer import stats
from elastic_kernels.models import ElasticHybridConfig, ElasticHybridLM
x = torch.randn(4, 32, requires_grad=True)
q = nvfp4.quantize(torch.randn(8, 32))
(ek.fake_quant_nvfp4(x).sum() + ek.fake_quant_fp8(x).sum() + ek.nvfp4_linear(x, q).sum()).backward()
cfg = ElasticHybridConfig(vocab_size=16, hidden_size=32, pattern="M*E-", mamba_heads=8, mamba_head_dim=8,
                          mamba_groups=2, mamba_state=8, mamba_chunk_size=8, moe_experts=4, moe_top_k=2, moe_ffn=32,
                          attn_heads=2, attn_kv_heads=1, ffn_size=32)
m = ElasticHybridLM(cfg)
m(torch.randint(0, 16, (2, 9)))[..., :4].sum().backward()
with torch.no_grad():
    cache = m.new_cache(1)
    m(torch.randint(0, 16, (1, 5)), cache=cache)
    m(torch.randint(0, 16, (1, 1)), cache=cache)  # the ssd_state_update decode step
with torch.device("meta"):
    meta = ElasticHybridLM(cfg)
assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in m.named_parameters()}
stats.compare_paired([1, 0, 1, 1], [0, 0, 1, 0])
print(sorted(n for n in ("torch._dynamo", "sympy", "scipy.stats") if n in sys.modules))
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_an_output_sharing_storage_with_an_input_is_an_error():
    def same(x: torch.Tensor) -> torch.Tensor:
        return x

    def view(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x + 1
        return y, y[1:]

    def fresh(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + 1, x.new_empty(0)  # empty outputs own no storage

    x = torch.randn(3)
    for name, fn in (("ek_test::alias_same", same), ("ek_test::alias_view", view)):
        with pytest.raises(RuntimeError, match="shares storage"):
            CustomOp(name, fn)(x)
    y, e = CustomOp("ek_test::alias_fresh", fresh)(x)
    torch.testing.assert_close(y, x + 1, rtol=0, atol=0)
    assert e.numel() == 0


def test_autograd_registered_later_and_ops_without_one():
    def twice(x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    op = CustomOp("ek_test::twice", twice)
    op.register_fake(lambda x: torch.empty_like(x))
    x = torch.randn(3, requires_grad=True)
    y = op(x)
    assert y.requires_grad
    with pytest.raises(RuntimeError, match="ek_test::twice has no derivative"):
        y.sum().backward()
    op.register_autograd(lambda ctx, g: 2 * g, setup_context=lambda ctx, inputs, output: None)
    op(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.ek_test.twice.default, (torch.randn(3, requires_grad=True),))
    with pytest.raises(ValueError, match="mutates_args"):
        CustomOp("ek_test::bad_mutation", twice, mutates_args=("state",))


def test_mutating_op_bumps_versions_and_has_no_derivative():
    g = torch.Generator().manual_seed(0)
    b, h, p, n, grp = 2, 4, 8, 8, 2
    x, dt = torch.randn(b, h, p, generator=g), torch.rand(b, h, generator=g)
    A, B, C = -torch.rand(h, generator=g), torch.randn(b, grp, n, generator=g), torch.randn(b, grp, n, generator=g)
    state = torch.zeros(b, h, p, n)
    before = state._version
    with torch.no_grad():
        ek.ssd_state_update(state, x, dt, A, B, C)
    assert state._version > before and state.abs().sum() > 0
    y = ek.ssd_state_update(state, x.requires_grad_(True), dt, A, B, C)  # runs in grad mode
    assert y.requires_grad
    with pytest.raises(RuntimeError, match="ssd_state_update has no derivative"):
        y.sum().backward()
