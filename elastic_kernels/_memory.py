"""Large CPU buffers that cost their written bytes, not their size (docs/design.md §3: work is skipped).

``torch.zeros`` of a large CPU tensor pays twice for memory it may never need: the allocator maps
fresh pages (glibc ``mmap``s every allocation of 32 MB and more anew), the kernel zeroes each
4 KB page on its first touch (a page fault), and ``fill_`` then writes zeros over it again. A
gradient of a full weight of which a prefix is active is such a buffer. :func:`zeros` takes the
memory from numpy's allocator instead: ``calloc``, whose fresh pages are already zero (no fill;
pages nobody writes are never touched), and on Linux ``madvise(MADV_HUGEPAGE)``, so the pages that
are written fault in 2 MB at a time. Measured on one thread (AVX-512 Xeon, THP in ``madvise``
mode): a 32 MB buffer written in full costs 6 ms this way against 14 ms for ``torch.zeros`` and
a write. Small buffers and other devices take ``torch.zeros``.
"""
from __future__ import annotations

import numpy as np
import torch

# numpy asks for huge pages from 4 MB on; below that torch.zeros is as cheap (glibc reuses the heap)
LARGE_BYTES = 1 << 22
_ALIGN = 64  # calloc gives 16-byte alignment; BLAS stores run best on 64-byte boundaries


def zeros(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A contiguous zero tensor of ``shape`` (any dtype, any device); on the CPU from ``LARGE_BYTES``
    on, lazily zeroed pages from numpy's allocator that the tensor keeps alive (see above)."""
    device = torch.device(device)
    numel = 1
    for s in shape:
        numel *= int(s)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < LARGE_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    raw = torch.from_numpy(np.zeros(nbytes + _ALIGN, dtype=np.uint8))
    skip = -raw.data_ptr() % _ALIGN
    return raw[skip:skip + nbytes].view(dtype).view(shape)
