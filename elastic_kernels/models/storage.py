"""Checked safetensors files: a canonical header, strict validation, and a checksum per block of
every tensor, so that a prefix read verifies exactly the bytes it reads (docs/design.md §6).

A file written by :func:`encode` is a plain safetensors file (``safetensors.torch.load_file``
reads it): tensors sorted by name and stored back to back, the header compact JSON with sorted
keys, padded with spaces to a multiple of 8 bytes. Its ``__metadata__`` carries two more entries:

- ``"ek.blocks"``: per tensor ``{"bounds": [[b_1, ..., shape[d]] per dim d], "blake2b": [...]}``:
  the block boundaries of every dimension and one BLAKE2b-128 digest per block (blocks in
  row-major order, each hashed over its elements in row-major order). A prefix whose sizes are
  boundaries (every budget of a nested checkpoint's table) is a union of whole blocks, so reading
  and verifying it touches only its own bytes; any other prefix is read up to the next boundary;
- ``"ek.header"``: the digest of the canonical header without this entry.

:class:`TensorFile` rejects, with a :class:`~elastic_kernels._io.CheckpointError` naming the file,
any header that is not the canonical encoding of its content, fails its digest, names an unknown
dtype, has a shape that does not match its byte range, or has byte ranges that overlap, leave
gaps, or do not end exactly at the end of the file; reads verify every block they cover.
``verify=False`` skips the digests (the structural checks stay).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import struct
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .._io import CheckpointError
from ..formats.dtypes import SAFETENSORS_DTYPES

BLOCKS_KEY = "ek.blocks"
HEADER_KEY = "ek.header"
MAX_HEADER_BYTES = 100 * 2 ** 20
_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def digest(data: bytes) -> str:
    """BLAKE2b-128 hex digest of ``data``."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _canonical(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _raw(t: Tensor) -> bytes:
    """The bytes of ``t`` in row-major order."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _cells(bounds: Sequence[Sequence[int]], upto: Sequence[int] | None = None):
    """``(flat index, slices)`` of the blocks of ``bounds`` (within the prefix ``upto``)."""
    segs = []
    for d, b in enumerate(bounds):
        edges = list(zip([0] + list(b[:-1]), b))
        segs.append([(i, lo, hi) for i, (lo, hi) in enumerate(edges) if upto is None or hi <= upto[d]])
    counts = [len(b) for b in bounds]
    for combo in itertools.product(*segs):
        flat = 0
        for d, (i, _, _) in enumerate(combo):
            flat = flat * counts[d] + i
        yield flat, tuple(slice(lo, hi) for _, lo, hi in combo)


def _full_bounds(shape: Sequence[int], extra: Sequence[Sequence[int]] | None) -> list[list[int]]:
    """Sorted block boundaries per dimension: ``extra[d]`` (prefix sizes in ``(0, shape[d])``) and
    ``shape[d]``."""
    out = []
    for d, n in enumerate(shape):
        cuts = {int(v) for v in (extra[d] if extra is not None else ()) if 0 < int(v) < n}
        out.append(sorted(cuts | {int(n)}))
    return out


def encode(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None,
           bounds: Mapping[str, Sequence[Sequence[int]]] | None = None) -> tuple[bytes, str]:
    """The checked safetensors bytes of ``tensors`` and the digest of their header (which a
    manifest can record to tie itself to this file). ``bounds[name][d]``: extra block boundaries
    of dimension ``d`` (the prefix sizes that reads will ask for); ``metadata``: str -> str."""
    header: dict = {}
    blocks: dict = {}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _CODES:
            raise TypeError(f"storage.encode: tensor {name!r} has dtype {t.dtype}, not storable in safetensors")
        b = _full_bounds(t.shape, (bounds or {}).get(name))
        blocks[name] = {"bounds": b, "blake2b": [digest(_raw(t[s])) for _, s in _cells(b)]}
        data = _raw(t)
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    md = {str(k): str(v) for k, v in (metadata or {}).items()}
    md[BLOCKS_KEY] = json.dumps(blocks, separators=(",", ":"), sort_keys=True)
    header["__metadata__"] = md
    md[HEADER_KEY] = digest(_canonical(header))
    raw = _canonical(header)
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks), md[HEADER_KEY]


class TensorFile:
    """Validated reader of a safetensors file with positioned prefix reads (no read-ahead).

    ``what`` prefixes error messages (the caller's name); ``bytes_read``, ``header_bytes`` and
    ``size`` count the I/O.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True, what: str = "checkpoint") -> None:
        self.path, self.verify, self.what = os.fspath(path), verify, what
        self.bytes_read = 0
        try:
            self.f = open(self.path, "rb", buffering=0)
        except OSError as e:
            raise self.error(f"cannot be opened ({e.strerror or e})") from None
        try:
            self.size = os.fstat(self.f.fileno()).st_size
            if self.size < 8:
                raise self.error(f"is truncated or not a safetensors file ({self.size} bytes)")
            (n,) = struct.unpack("<Q", self._read(8, 0))
            if n > self.size - 8 or n > MAX_HEADER_BYTES:
                raise self.error(f"is corrupt: header length {n} exceeds the file ({self.size} bytes)")
            raw = self._read(n, 8)
            try:
                header = json.loads(raw.decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise self.error(f"is corrupt: bad safetensors header ({e})") from None
            if not isinstance(header, dict):
                raise self.error("is corrupt: its safetensors header is not a JSON object")
            self.data_start, self.header_bytes = 8 + n, self.bytes_read
            md = header.pop("__metadata__", None)
            if md is None:
                md = {}
            if not isinstance(md, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in md.items()):
                raise self.error("is corrupt: its __metadata__ is not a str -> str object")
            self.metadata = md
            self.entries = self._validate_entries(header)
            self.blocks: dict = {}
            if verify:
                self._verify_header(raw, header, md)
        except BaseException:
            self.f.close()
            raise

    # -- validation ---------------------------------------------------------------------------
    def error(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.what}: {self.path} {msg}")

    def _validate_entries(self, header: dict) -> dict[str, tuple[torch.dtype, tuple, int, int]]:
        entries = {}
        for name, info in header.items():
            if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
                raise self.error(f"is corrupt: tensor {name!r} has a bad header entry")
            dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
            shape, offs = info["shape"], info["data_offsets"]
            if dtype is None:
                raise self.error(f"is corrupt: tensor {name!r} has unknown dtype {info['dtype']!r}")
            if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
                raise self.error(f"is corrupt: tensor {name!r} has a bad shape {shape!r}")
            if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                    and 0 <= offs[0] <= offs[1]):
                raise self.error(f"is corrupt: tensor {name!r} has bad data offsets {offs!r}")
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            if offs[1] - offs[0] != nbytes:
                raise self.error(f"is corrupt: tensor {name!r} of shape {shape} and dtype {info['dtype']} needs "
                                 f"{nbytes} bytes, its data offsets {offs} span {offs[1] - offs[0]}")
            entries[name] = (dtype, tuple(shape), offs[0], offs[1])
        end = 0
        for name, (_, _, begin, stop) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if begin != end:
                kind = "overlaps the previous tensor" if begin < end else f"leaves a gap at byte {end}"
                raise self.error(f"is corrupt: tensor {name!r} at data offsets [{begin}, {stop}] {kind}")
            end = stop
        if self.data_start + end != self.size:
            raise self.error(f"is corrupt: the tensors cover {end} data bytes, the file holds "
                             f"{self.size - self.data_start}")
        return entries

    def _verify_header(self, raw: bytes, header: dict, md: dict) -> None:
        if HEADER_KEY not in md or BLOCKS_KEY not in md:
            raise self.error("carries no checksums (not written by elastic_kernels, or by an older version); "
                             "load it with verify=False to skip verification")
        full = dict(header)
        full["__metadata__"] = md
        canon = _canonical(full)
        if raw != canon + b" " * (len(raw) - len(canon)) or len(raw) - len(canon) >= 8:
            raise self.error("is corrupt: its header is not in canonical form")
        rest = dict(md)
        claimed = rest.pop(HEADER_KEY)
        if digest(_canonical({**header, "__metadata__": rest})) != claimed:
            raise self.error("is corrupt: its header fails its checksum")
        try:
            blocks = json.loads(md[BLOCKS_KEY])
        except json.JSONDecodeError as e:
            raise self.error(f"is corrupt: bad block checksums ({e})") from None
        if not isinstance(blocks, dict) or set(blocks) != set(self.entries):
            raise self.error("is corrupt: its block checksums do not name its tensors")
        for name, rec in blocks.items():
            shape = self.entries[name][1]
            ok = isinstance(rec, dict) and isinstance(rec.get("bounds"), list) and len(rec["bounds"]) == len(shape)
            if ok:
                for b, n in zip(rec["bounds"], shape):
                    ok = ok and isinstance(b, list) and bool(b) and all(type(v) is int for v in b) \
                        and b == sorted(set(b)) and b[-1] == n and b[0] >= 0 and (b[0] > 0 or n == 0)
            if ok:
                hashes = rec.get("blake2b")
                ok = isinstance(hashes, list) and len(hashes) == math.prod(len(b) for b in rec["bounds"])
            if not ok:
                raise self.error(f"is corrupt: bad block checksums of tensor {name!r}")
        self.blocks = blocks

    @property
    def header_digest(self) -> str | None:
        return self.metadata.get(HEADER_KEY)

    # -- reads --------------------------------------------------------------------------------
    def _read(self, n: int, offset: int) -> bytes:
        buf = os.pread(self.f.fileno(), n, offset)
        self.bytes_read += len(buf)
        if len(buf) != n:
            raise self.error(f"is truncated (wanted {n} bytes at {offset}, got {len(buf)})")
        return buf

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def entry(self, name: str, shape: Sequence[int] | None = None, want: torch.dtype | None = None
              ) -> tuple[torch.dtype, tuple]:
        """dtype and shape of tensor ``name``, checked against ``shape`` / ``want`` when given."""
        if name not in self.entries:
            raise self.error(f"lacks tensor {name!r}")
        dtype, full = self.entries[name][:2]
        if want is not None and dtype != want:
            raise self.error(f"holds tensor {name!r} as {dtype}, expected {want}")
        if shape is not None and tuple(shape) != full:
            raise self.error(f"holds tensor {name!r} with shape {list(full)}, expected {list(shape)}")
        return dtype, full

    def read(self, name: str, shape: Sequence[int] | None = None, want: torch.dtype | None = None) -> Tensor:
        """The whole tensor ``name`` (verified)."""
        full = self.entry(name, shape, want)[1]
        return self.read_prefix(name, full)

    def read_prefix(self, name: str, prefix: Sequence[int], *, shape: Sequence[int] | None = None,
                    want: torch.dtype | None = None) -> Tensor:
        """``tensor[:prefix[0], :prefix[1], ...]`` of tensor ``name`` with positioned reads of the
        covered bytes only; with verification, up to the next block boundary of every dim, and
        every covered block checked against its digest."""
        dtype, full = self.entry(name, shape, want)
        prefix = tuple(int(p) for p in prefix)
        if len(prefix) != len(full) or any(not 0 <= p <= n for p, n in zip(prefix, full)):
            raise ValueError(f"{self.what}: prefix {list(prefix)} of tensor {name!r} does not fit its shape {list(full)}")
        if any(p == 0 for p in prefix):
            return torch.empty(prefix, dtype=dtype)
        rec = self.blocks.get(name) if self.verify else None
        want_shape = prefix
        if rec is not None:
            prefix = tuple(next(v for v in b if v >= p) for b, p in zip(rec["bounds"], prefix))
        out = self._read_runs(name, dtype, full, prefix)
        if rec is not None:
            for flat, cell in _cells(rec["bounds"], prefix):
                if digest(_raw(out[cell])) != rec["blake2b"][flat]:
                    at = [s.start for s in cell]
                    raise self.error(f"is corrupt: tensor {name!r} fails its checksum in the block at {at}")
            if prefix != want_shape:
                out = out[tuple(slice(0, p) for p in want_shape)].clone()
        return out

    def _read_runs(self, name: str, dtype: torch.dtype, shape: tuple, prefix: tuple) -> Tensor:
        item = torch.empty(0, dtype=dtype).element_size()
        offset = self.data_start + self.entries[name][2]
        out = torch.empty(prefix, dtype=dtype)
        # dims after `j` are whole: each outer index of the prefix is one contiguous run
        j = max((d for d in range(len(shape)) if prefix[d] != shape[d]), default=-1)
        if j < 0:
            return torch.frombuffer(bytearray(self._read(out.numel() * item, offset)), dtype=dtype).reshape(prefix)
        strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
        run = prefix[j] * strides[j]
        flat = out.view(-1, run)
        outer = torch.cartesian_prod(*[torch.arange(p) for p in prefix[:j]]).reshape(-1, j) if j else \
            torch.zeros(1, 0, dtype=torch.int64)
        starts = (outer * torch.tensor(strides[:j], dtype=torch.int64)).sum(1).tolist()
        for r, s in enumerate(starts):
            flat[r] = torch.frombuffer(bytearray(self._read(run * item, offset + s * item)), dtype=dtype)
        return out
