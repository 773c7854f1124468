"""Large MoE weight gradients in lazily zeroed memory and the reused scratch of temporaries
(elastic_kernels/_memory.py): exact zeros outside the active prefix, values against the float64
truth, buffers that outlive their mapping's Python object, page choices for a written box, and
the pool that hands a gone buffer's mapping to the next one of its size."""
from __future__ import annotations

import gc
import itertools
import math
import sys

import pytest
import torch

from elastic_kernels import _memory
from elastic_kernels._memory import HUGE_PAGE, LARGE_BYTES, Scratch, empty, pages_touched, prefix_runs, release, zeros
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


def test_large_zeros_are_huge_page_aligned():
    """On Linux a large buffer starts on a 2 MB boundary (its first and last 2 MB can be huge pages)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("2 MB alignment is Linux-only")
    z = zeros((4, 1 << 20), torch.float32, "cpu")
    assert z.data_ptr() % HUGE_PAGE == 0


@pytest.mark.parametrize("written", [(16, 256, 512), (16, 1024, 512), (5, 512, 100), (0, 0, 0)])
def test_zeros_with_a_written_box_is_a_plain_zero_tensor(written):
    """Whatever page size the box picks: all zeros, and writes inside and outside the box stick."""
    shape = (16, 1024, 512)
    z = zeros(shape, torch.float32, "cpu", written=written)
    assert z.shape == shape and z.is_contiguous() and not z.any()
    z[: written[0], : written[1], : written[2]] = 1
    z[-1, -1, -1] = 2  # outside the box unless the box is everything
    inside = written == shape
    assert z.double().sum().item() == math.prod(written) + 2 - inside


def test_prefix_box_runs_and_pages():
    """A (E, F, hidden) gradient's prefix d' of F: E runs of d' * hidden floats, F * hidden apart;
    a (E, hidden, F) one: E * hidden runs of d' floats, F apart; the pages they touch."""
    assert prefix_runs((16, 1024, 512), (16, 256, 512), 4) == (16, 256 * 512 * 4, 1024 * 512 * 4)
    assert prefix_runs((16, 512, 1024), (16, 512, 256), 4) == (16 * 512, 256 * 4, 1024 * 4)
    assert prefix_runs((16, 1024, 512), (16, 1024, 512), 4) == (1, 16 * 1024 * 512 * 4, 16 * 1024 * 512 * 4)
    count, length, stride = prefix_runs((16, 1024, 512), (16, 256, 512), 4)
    assert pages_touched(count, length, stride, 4096) == 16 * 128  # a quarter of each 2 MB expert
    assert pages_touched(count, length, stride, 1 << 21) == 16     # every expert's one huge page
    assert pages_touched(4, 100, 50, 4096) == 1                    # runs sharing a page count it once


def test_scratch_reuses_its_memory_and_never_overlaps():
    """Tensors of one block do not overlap; the next block on the thread reuses the memory; a
    nested block and a non-CPU device take fresh memory."""
    shapes = [(1000, 300), (7,), (64, 64)]
    with Scratch("cpu") as s:
        first = [s.empty(sh, torch.float32) for sh in shapes]
    with Scratch("cpu") as s:
        ts = [s.empty(sh, torch.float32) for sh in shapes]
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * 4) for t in ts)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
        assert [t.data_ptr() for t in ts] != [t.data_ptr() for t in first]  # first call: fresh; now the kept buffer
        with Scratch("cpu") as inner:
            n = inner.empty((1000, 300), torch.float32)
            assert not any(lo <= n.data_ptr() < hi for lo, hi in spans)
    with Scratch("cpu") as s:
        again = [s.empty(sh, torch.float32) for sh in shapes]
    assert [t.data_ptr() for t in again] == [t.data_ptr() for t in ts]
    with Scratch("meta") as s:
        assert s.empty((3, 4), torch.float32).device.type == "meta"


@pytest.mark.usefixtures("poison_empty")
def test_uninitialized_buffers_are_poisoned_in_deterministic_mode():
    """As torch.empty: NaN-filled under fill_uninitialized_memory, so a kernel reading unwritten
    memory fails its test."""
    with Scratch("cpu") as s:
        assert s.empty((100, 100), torch.float32).isnan().all()
    assert empty((2, 1 << 20), torch.float32, "cpu").isnan().all()


def test_scratch_kept_under_inference_mode_serves_training_calls():
    """Memory first kept by a call under torch.inference_mode is written in place by later calls
    outside it (an inference tensor would refuse)."""
    shape = (3000, 3000)  # more than any test before asked for: this block keeps new memory
    with torch.inference_mode(), Scratch("cpu") as s:
        s.empty(shape, torch.float32).fill_(1)
    with Scratch("cpu") as s:
        t = s.empty(shape, torch.float32)
        assert not t.is_inference()
        t.fill_(2).add_(1)
        assert (t == 3).all()


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool keeps Linux mappings")


@linux_only
@pytest.mark.parametrize("written", [None, (8, 256, 512), (8, 512, 100)])
def test_a_gone_buffer_is_reused_and_zeroed(written):
    """The next zeros of a gone buffer's size takes its mapping (same address), cleared of what
    the caller wrote, whatever box it is told; ``release`` unmaps the kept ones."""
    release()
    shape = (8, 1024, 512)
    z = zeros(shape, torch.float32, "cpu")
    ptr = z.data_ptr()
    z.fill_(float("nan"))
    del z
    assert _memory._POOL.bytes > 0
    again = zeros(shape, torch.float32, "cpu", written=written)
    assert again.data_ptr() == ptr and not again.any()
    del again
    e = empty((10, 1 << 20), torch.float32, "cpu")  # 40 MB: another size takes a fresh mapping
    assert e.data_ptr() != ptr
    del e
    assert release() > 0 and _memory._POOL.bytes == 0 and not _memory._POOL.kept


@linux_only
def test_a_view_keeps_its_mapping_out_of_the_pool():
    """Until its last view is gone a buffer's memory is never handed out again."""
    release()
    z = zeros((4, 1 << 20), torch.float32, "cpu")
    view = z[1:3].fill_(7)
    del z
    assert _memory._POOL.bytes == 0
    other = zeros((4, 1 << 20), torch.float32, "cpu")
    other.fill_(1)
    assert (view == 7).all()
    del view
    assert _memory._POOL.bytes > 0
    del other
    release()


@linux_only
def test_the_pool_keeps_at_most_its_bytes(monkeypatch):
    """Beyond ``MAX_BYTES`` the oldest kept mappings are unmapped."""
    release()
    monkeypatch.setattr(_memory._POOL, "MAX_BYTES", 20 << 20)
    bufs = [zeros((1 << 20,), torch.float64, "cpu") for _ in range(3)]  # 8 MB each, 12 MB mapped
    del bufs
    assert 0 < _memory._POOL.bytes <= 20 << 20 and len(_memory._POOL.kept) == 1
    monkeypatch.setattr(_memory._POOL, "MAX_BYTES", 4 << 20)
    big = zeros((3 << 19,), torch.float64, "cpu")  # another size, larger than the pool: not kept
    del big
    assert len(_memory._POOL.kept) == 1
    release()


@pytest.mark.usefixtures("poison_empty")
@linux_only
def test_a_reused_uninitialized_buffer_is_poisoned_in_deterministic_mode():
    release()
    e = empty((10, 1 << 20), torch.float32, "cpu")
    e.fill_(3)
    del e
    again = empty((10, 1 << 20), torch.float32, "cpu")
    assert again.isnan().all()
    del again
    release()


@linux_only
def test_threads_share_the_pool_safely():
    """Threads taking and giving back mappings at once: every buffer they get is all zeros and
    no two live buffers share memory."""
    import threading

    release()
    errors, live = [], {}
    lock = threading.Lock()

    def work(i):
        try:
            for _ in range(20):
                z = zeros((1 << 20,), torch.float32, "cpu")
                with lock:
                    assert z.data_ptr() not in live, "a live buffer handed out twice"
                    live[z.data_ptr()] = i
                assert not z.any()
                z.fill_(i + 1)
                with lock:
                    del live[z.data_ptr()]
                del z
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    release()
