"""Large MoE weight gradients in lazily zeroed memory (elastic_kernels/_memory.py): exact zeros
outside the active prefix, values against the float64 truth, buffers that outlive numpy's array."""
from __future__ import annotations

import gc

import pytest
import torch

from elastic_kernels._memory import LARGE_BYTES, zeros
from test_moe import check_fp32_reference, make_case


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 5), (2, 1024, 513)])
def test_zeros_is_a_plain_zero_tensor(dtype, shape):
    """Small and large (numpy-backed) buffers alike: the shape and dtype asked for, contiguous,
    all zeros, 64-byte aligned when large, writable, alive after numpy's array is gone."""
    z = zeros(shape, dtype, "cpu")
    gc.collect()
    assert z.shape == shape and z.dtype == dtype and z.is_contiguous() and z.device.type == "cpu"
    assert not z.any()
    if z.numel() * z.element_size() >= LARGE_BYTES:
        assert z.data_ptr() % 64 == 0
    z.view(-1)[-1] = 3
    z.add_(1)
    assert z.double().sum().item() == z.numel() + 3


def test_zeros_on_the_meta_device_is_torch_zeros():
    assert zeros((4, 1 << 20), torch.float32, "meta").device.type == "meta"


@pytest.mark.parametrize("width", [256, "tensor"])
def test_large_partial_width_gradients_match_truth(width):
    """Weights of 4 MB and more (the numpy-backed gradient buffers): fp32 gradients of the first
    E' = 2 of 3 experts at d' = 256 of 1024 (or per-token widths) against the float64 truth,
    exactly 0 for experts >= E' and channels >= d'."""
    tokens, hidden, ffn, n_exp, n_act, top_k = 24, 512, 1024, 3, 2, 2
    inp, w = make_case(tokens, hidden, ffn, n_exp, n_act, top_k, gated=True, width=width if width == "tensor" else None,
                       cs=None)
    w = width if isinstance(width, int) else w
    assert inp["w1"].numel() * 4 >= LARGE_BYTES
    _, g = check_fp32_reference(inp, "silu", n_act, w)
    for k in g:
        if k in ("w1", "w2", "w3"):
            assert not g[k][n_act:].any(), k
            if isinstance(w, int):
                assert not (g[k][:, w:] if k != "w2" else g[k][:, :, w:]).any(), k
