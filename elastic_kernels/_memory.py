"""Large CPU buffers that cost their written bytes, not their size (docs/design.md §3: work is skipped).

A fresh CPU buffer costs its page faults: the kernel maps and zeroes every page on its first
touch. glibc maps every allocation of 32 MB and more anew, and smaller ones often enough (after
its heap is trimmed), so a temporary of a few MB faults in 4 KB pages call after call: measured
on one thread (AVX-512 Xeon, THP in ``madvise`` mode), 0.39 ms per MB in 4 KB faults against
0.09-0.12 ms per MB in 2 MB (huge) pages and nothing for memory that is already mapped. Three
kinds of buffers here:

- :func:`zeros`: fresh zero memory (an anonymous private mapping on Linux; numpy's ``calloc``
  elsewhere), never filled: pages nobody writes are never touched. Aligned to 2 MB and advised
  for huge pages (an unaligned mapping faults its partial first and last 2 MB in 4 KB pages:
  2.9 against 2.4 ms for 32 MB written), unless the caller says it writes only a prefix box
  whose 4 KB pages, pre-faulted in one call per run (``MADV_POPULATE_WRITE``), cost less than
  the huge pages it touches (see :func:`zeros`); or a kept mapping of its size (see below),
  cleared with ``memset``. For results handed to the caller (gradients).
- :func:`empty`: the same memory, uninitialized, for results of ``LARGE_BYTES`` and more that
  outlive the call (glibc's heap does not keep them faulted in: the 1.5 MB zero tail of the MoE
  reference's 4 MB saved buffer cost 0.65 ms a call from torch's allocator, 0.10 ms from a
  reused mapping; Zen 4 VM).
- :class:`Scratch`: temporaries of one call, carved from a buffer kept per thread and reused by
  the next call (mapped and cache-warm: no faults), for buffers that do not outlive the call.

The mappings of :func:`zeros` and :func:`empty` go back to a pool when their last tensor is
gone, and the next buffer of the same size (in 2 MB steps) takes one from there instead of
mapping anew: on a virtual machine whose balloon reports freed memory to its host, a fresh
mapping can cost ten times its usual faults after a pause (see :class:`_Pool`); a reused one
costs a ``memset`` (zeros) or nothing (empty).

Small buffers and other devices take torch's own allocator. Under
``torch.use_deterministic_algorithms`` with ``fill_uninitialized_memory``, uninitialized
buffers are filled with NaN (integers: their largest value), as ``torch.empty`` does.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
import threading
import weakref
from collections import OrderedDict

import numpy as np
import torch

# below this torch's allocator is as cheap (glibc reuses its heap for small blocks)
LARGE_BYTES = 1 << 22
HUGE_PAGE = 1 << 21
SMALL_PAGE = mmap.PAGESIZE
_ALIGN = 64  # BLAS stores run best on 64-byte boundaries
_LINUX = sys.platform.startswith("linux")
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; older kernels refuse it (then pages fault as written)
# ms per MB of pages faulted and zeroed by the kernel (one thread, see the module docstring): 2 MB
# pages on first touch, 4 KB pages pre-faulted by MADV_POPULATE_WRITE (32 MB: 10.9 ms; 8 MB in 16
# runs: 2.7 ms against 4.7 ms for the 32 MB of huge pages those runs touch)
_COST_HUGE, _COST_SMALL = 0.125, 0.34
_MAX_RUNS = 256  # at most this many populate calls per buffer; more runs take huge pages


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(int(s) for s in shape) * torch.empty((), dtype=dtype).element_size()


def prefix_runs(shape, written, itemsize: int):
    """The prefix box ``t[:written[0], :written[1], ...]`` of a contiguous ``shape`` as
    ``(count, length, stride)``: ``count`` runs of ``length`` contiguous bytes, ``stride`` apart."""
    inner = itemsize
    for k in range(len(shape) - 1, -1, -1):
        if written[k] < shape[k] or k == 0:
            return math.prod(written[:k]), written[k] * inner, shape[k] * inner
        inner *= shape[k]
    return 1, 0, 0


def pages_touched(count: int, length: int, stride: int, page: int) -> int:
    """Distinct ``page``-sized pages the runs touch (runs start at multiples of ``stride``)."""
    pages, last = 0, -1
    for i in range(count):
        first, end = (i * stride) // page, (i * stride + length - 1) // page
        pages += end - max(first, last + 1) + 1
        last = end
    return pages


class _Pool:
    """Mappings of :func:`_fresh` whose tensors are gone, kept for the next buffer of their size.

    Unmapped memory is what a virtual machine's balloon hands back to its host (free page
    reporting: freed blocks of 2 MB and more, a couple of seconds after they are freed), and
    the host then faults it in again page by page on the next first touch. Measured on one
    thread (AMD EPYC Zen 4 VM, virtio-balloon with free page reporting, 128 MB written right
    after mapping): 2 MB pages 0.11 ms per MB back to back, 0.8-2.1 ms per MB after a 2 s pause,
    4 KB pages 0.39 / 0.47. A pooled mapping stays mapped and faulted in: :func:`zeros` clears a
    reused one with ``memset`` (0.018 ms per MB there), so a call's buffers cost the same
    whatever ran, or idled, before it. At most ``MAX_BYTES`` are kept (the oldest are unmapped
    first); :func:`release` unmaps them all.
    """

    MAX_BYTES = 1 << 30

    def __init__(self) -> None:
        # reentrant: a garbage collection inside a locked section may free a pooled buffer's
        # array, whose finalizer calls give() on the same thread
        self.lock = threading.RLock()
        self.kept: OrderedDict[int, mmap.mmap] = OrderedDict()  # id -> mapping, oldest first
        self.bytes = 0

    def take(self, size: int) -> mmap.mmap | None:
        """A kept mapping of exactly ``size`` bytes (the newest), or None."""
        with self.lock:
            for key, m in reversed(list(self.kept.items())):  # a snapshot: give() may run meanwhile
                if len(m) == size and self.kept.pop(key, None) is m:
                    self.bytes -= size
                    return m
        return None

    def give(self, m: mmap.mmap) -> None:
        """Keep ``m`` (its tensors are gone; called while its numpy array is being freed, so
        ``m`` cannot be closed yet); unmap the oldest kept ones beyond ``MAX_BYTES``. A mapping
        larger than that is not kept (it unmaps when its last reference goes)."""
        if len(m) > self.MAX_BYTES:
            return
        with self.lock:
            while self.kept and self.bytes + len(m) > self.MAX_BYTES:
                _, old = self.kept.popitem(last=False)
                self.bytes -= len(old)
                _close(old)
            self.kept[id(m)] = m
            self.bytes += len(m)

    def release(self) -> int:
        """Unmap every kept mapping; returns the bytes released."""
        with self.lock:
            freed, self.bytes = self.bytes, 0
            for m in self.kept.values():
                _close(m)
            self.kept.clear()
        return freed


def _close(m: mmap.mmap) -> None:
    """Unmap ``m`` now, or (a buffer still exported: its array is still being freed) when its
    last reference goes."""
    try:
        m.close()
    except BufferError:
        pass


_POOL = _Pool()
if hasattr(os, "register_at_fork"):  # a child forked while another thread held the lock would wait forever
    os.register_at_fork(after_in_child=lambda: setattr(_POOL, "lock", threading.RLock()))


def release() -> int:
    """Unmap the memory kept for reuse (see :class:`_Pool`); returns its bytes. Scratch memory
    of live threads stays."""
    return _POOL.release()


def _fresh(nbytes: int, huge: bool) -> tuple[torch.Tensor, mmap.mmap | None, int, bool]:
    """``nbytes`` of memory as uint8 (the mapping kept alive by the tensor and given to the pool
    when its last view is gone), 2 MB aligned on Linux (``MADV_HUGEPAGE`` when ``huge``), 64-byte
    aligned elsewhere; the mapping (None off Linux), the tensor's offset in it and whether the
    mapping is a reused one (its bytes are whatever its last tensors left; otherwise zeros)."""
    if not _LINUX:
        raw = torch.from_numpy(np.zeros(nbytes + _ALIGN, dtype=np.uint8))
        skip = -raw.data_ptr() % _ALIGN
        return raw[skip:skip + nbytes], None, skip, False
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + 2 * HUGE_PAGE  # room to align the start and round the end up
    m = _POOL.take(size) if nbytes else None
    reused = m is not None
    if m is None:
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arr = np.frombuffer(m, dtype=np.uint8)
    weakref.finalize(arr, _POOL.give, m).atexit = False  # the storage holds arr: fires when the last view goes
    raw = torch.from_numpy(arr)
    skip = -raw.data_ptr() % HUGE_PAGE
    if huge and nbytes and not reused:
        m.madvise(mmap.MADV_HUGEPAGE, skip, size - skip)
    return raw[skip:skip + nbytes], m, skip, reused


def _fill_uninitialized(t: torch.Tensor) -> torch.Tensor:
    """NaN (integers: their largest value) when deterministic mode asks for it, as torch.empty."""
    if torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory:
        t.fill_(float("nan") if t.dtype.is_floating_point or t.dtype.is_complex else torch.iinfo(t.dtype).max)
    return t


def zeros(shape, dtype: torch.dtype, device, written=None) -> torch.Tensor:
    """A contiguous zero tensor of ``shape`` (any dtype, any device); on the CPU from
    ``LARGE_BYTES`` on, a kept mapping of its size cleared with ``memset``, or fresh lazily
    zeroed memory (see above), kept alive by the tensor.

    ``written``: the caller writes only inside the prefix box ``t[:written[0], :written[1], ...]``
    (same length as ``shape``; None: anywhere). In fresh memory the box's runs (``count`` runs
    of contiguous bytes) then take 4 KB pages, pre-faulted run by run, when that costs less
    than the 2 MB pages they touch (``_COST_SMALL`` / ``_COST_HUGE`` per MB; at most
    ``_MAX_RUNS`` runs): a quarter of each (E, F, hidden) expert block of a weight gradient
    (F * hidden * 4 bytes = 2 MB) costs a quarter of its pages. Writing outside the box stays
    correct, only slower.
    """
    device = torch.device(device)
    nbytes = _nbytes(shape, dtype)
    if device.type != "cpu" or nbytes < LARGE_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    huge, runs = True, None
    if _LINUX and written is not None:
        count, length, stride = prefix_runs(tuple(shape), tuple(written), torch.empty((), dtype=dtype).element_size())
        if count <= _MAX_RUNS and length:
            small = pages_touched(count, length, stride, SMALL_PAGE) * SMALL_PAGE
            big = pages_touched(count, length, stride, HUGE_PAGE) * HUGE_PAGE
            huge = _COST_HUGE * big <= _COST_SMALL * small
            runs = None if huge else (count, length, stride)
    raw, m, skip, reused = _fresh(nbytes, huge)
    if reused:  # mapped and faulted in already: clearing it beats any fault
        ctypes.memset(raw.data_ptr(), 0, nbytes)
    elif runs is not None:
        count, length, stride = runs
        try:
            for i in range(count):
                lo = skip + i * stride
                start = lo - lo % SMALL_PAGE
                m.madvise(_MADV_POPULATE_WRITE, start, lo + length - start)
        except OSError:  # an older kernel: the pages fault as they are written
            pass
    return raw.view(dtype).view(tuple(shape))


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialized contiguous tensor of ``shape``; on the CPU from ``LARGE_BYTES`` on, a
    pooled or fresh huge-page mapping (see above), for results that outlive the call
    (temporaries: :class:`Scratch`)."""
    device = torch.device(device)
    nbytes = _nbytes(shape, dtype)
    if device.type != "cpu" or nbytes < LARGE_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    return _fill_uninitialized(_fresh(nbytes, True)[0].view(dtype).view(tuple(shape)))


class Scratch:
    """Temporaries of one call, carved from memory this thread reuses call after call::

        with Scratch(device) as s:
            h = s.empty((rows, cols), torch.float32)   # valid until the block ends

    A tensor from :meth:`empty` must not outlive the ``with`` block (the next call on this
    thread writes the same memory). The memory one call takes is kept for the next (the largest
    call's temporaries stay mapped, up to ``MAX_BYTES``; larger calls take fresh memory each
    time). A nested block on the same thread, and devices other than the CPU, take fresh memory.
    """

    MAX_BYTES = 1 << 28
    _local = threading.local()

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self.owner = False
        self.buf: torch.Tensor | None = None
        self.used = 0

    def __enter__(self) -> Scratch:
        if self.device.type == "cpu" and not getattr(self._local, "busy", False):
            self.owner = self._local.busy = True
            self.buf = getattr(self._local, "buf", None)
        return self

    def __exit__(self, *exc) -> None:
        if self.owner:
            self._local.busy = self.owner = False
            if self.used > (0 if self.buf is None else self.buf.numel()) and self.used <= self.MAX_BYTES:
                with torch.inference_mode(False):  # a normal tensor: later calls may run outside it
                    self._local.buf = _fresh(self.used, True)[0]  # the next call fits
            self.buf = None

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized contiguous tensor of ``shape``, valid until the block ends."""
        if not self.owner:
            return empty(shape, dtype, self.device)
        start = -(-self.used // _ALIGN) * _ALIGN
        self.used = start + _nbytes(shape, dtype)
        if self.buf is None or self.used > self.buf.numel():
            return empty(shape, dtype, self.device)
        return _fill_uninitialized(self.buf[start:self.used].view(dtype).view(tuple(shape)))
