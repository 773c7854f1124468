"""Test configuration.

Without a GPU, Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1``; the variable must be
set before triton (and hence elastic_kernels.triton) is imported, so it is set here, first.
"""
import os

if os.environ.get("ELASTIC_KERNELS_TEST_GPU") != "1":
    try:
        import torch as _torch
        _has_cuda = _torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_cuda = False
    if not _has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def triton_device():
    """Device on which Triton kernels are tested: CUDA when present, else CPU in the interpreter."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    return torch.device("cpu")


@pytest.fixture
def cuda_device():
    """A CUDA device with elastic_kernels._C built with CUDA; skips cleanly otherwise."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from elastic_kernels import _ext
    if not _ext.c_has_cuda():
        pytest.skip("elastic_kernels._C was built without CUDA")
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """The test models are tiny, so per-op overhead dominates: one intra-op thread avoids
    oversubscription on a shared CPU (much faster under load). Restored afterwards. Modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def poison_empty():
    """torch.empty returns NaN-filled memory, so a kernel reading unwritten memory fails."""
    import torch.utils.deterministic as det
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
    det.fill_uninitialized_memory = prev[2]
