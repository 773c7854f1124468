r"""The NVFP4 weight format: constants, decode, global scales and the :class:`NVFP4Tensor` container.

The recipe (docs/design.md §5, one everywhere, bit-exact across backends):

    g     = amax / 2688                   (fp32 per-tensor *decode* scale; 2688 = 6 * 448)
    s     = e4m3(clamp((block_amax / 6) / g, 2**-6, 448))     (per block of 16 along K)
    code  = e2m1_rne(clamp(x * ((1 / g) / s), -6, 6))         (bit 3 = sign)
    value = e2m1(code) * float(s) * g                         (decode)

Storage: two E2M1 codes per byte (element 2i in the low nibble, 2i+1 in the high nibble), one
float8_e4m3fn block scale per 16 consecutive elements of the last (input, K) dimension, and the
float32 decode scale ``g``. The encode (the quantize kernels and their PyTorch reference) lives in
:mod:`elastic_kernels.reference.nvfp4`, :mod:`elastic_kernels.triton.nvfp4` and
:mod:`elastic_kernels.cuda.nvfp4`; :func:`elastic_kernels.nvfp4.quantize` dispatches to them.

Conventions that make the recipe total (no inf/NaN for any finite input): an all-zero tensor has
``g = 1``; ``g`` is clamped below at ``2**-121``, the smallest decode scale whose encode multiplier
``(1 / g) / s`` is finite for every block scale ``s >= 2**-6`` (``2**121 * 2**6 = 2**127``). It only
matters when ``amax < 2688 * 2**-121 ≈ 1.0e-33``; a caller's ``global_scale`` below it is rejected.

Example::

    q = elastic_kernels.nvfp4.quantize(w)          # w: (N, K), K % 16 == 0
    q_small = q[:n, :k]                            # nested slice, zero-copy (k % 16 == 0)
    y = elastic_kernels.ops.linear(x, q_small)     # W4A16
"""
from __future__ import annotations

import functools
import math
from typing import Mapping

import torch

from .._validation import can_read_values, check_int, check_tensor
from .base import QuantizedTensor

BLOCK = 16                 # elements per block scale (along the last dimension)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
SCALE_MIN = 2.0 ** -6      # smallest normal e4m3: block scales are never subnormal
G_DIVISOR = E2M1_MAX * E4M3_MAX   # 2688
# Smallest decode scale g: (1 / g) / s <= 2**121 * 2**6 = 2**127 stays finite for every block scale s >= 2**-6
# (with 2**-126, the smallest normal float32, a block scale below 1/4 made it overflow: every nonzero
# element of a tiny tensor then encoded as +-6).
G_MIN = 2.0 ** -121
# E2M1 magnitudes of codes 0..7 (times 4 they are the integers 0, 2, 4, 6, 8, 12, 16, 24).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# global (per-tensor decode) scales
# ---------------------------------------------------------------------------------------------

def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """``g = amax / 2688`` in float32, with ``g = 1`` for ``amax == 0`` and ``g >= 2**-121``; a NaN
    or Inf amax gives a NaN or Inf ``g`` (every output of a fake quantization then is NaN)."""
    amax = amax.float()
    g = torch.clamp(amax / G_DIVISOR, min=G_MIN)
    return torch.where(amax == 0, torch.ones_like(g), g)


def global_scale_of(w: torch.Tensor, dims) -> torch.Tensor:
    """The recipe's global scale of ``w`` reduced over ``dims`` (float32)."""
    dims = tuple(d % w.dim() for d in dims)
    if w.numel():
        amax = w.abs().amax(dim=dims)
    else:
        amax = w.new_zeros([size for i, size in enumerate(w.shape) if i not in dims])
    return global_scale_from_amax(amax)


def resolve_global_scale(op: str, global_scale, shape: tuple, device: torch.device, minimum: float = G_MIN):
    """Validate a user decode scale: None (returned as is), a float, or a float32/float64 tensor of
    ``shape``; finite and at least ``minimum`` (NVFP4's ``G_MIN`` by default; FP8 passes 0: any
    positive scale). Returns a float32 tensor of ``shape`` or None."""
    if global_scale is None:
        return None
    if isinstance(global_scale, (int, float)) and not isinstance(global_scale, bool):
        g = torch.full(shape, float(global_scale), dtype=torch.float32, device=device)
    else:
        check_tensor(op, "global_scale", global_scale, dtypes=(torch.float32, torch.float64), device=device)
        if tuple(global_scale.shape) != shape:
            raise ValueError(f"{op}: global_scale must have shape {shape}, got {tuple(global_scale.shape)}")
        g = global_scale.detach().float()
    if can_read_values(g) and g.numel() and not bool(((g > 0) & (g >= minimum) & torch.isfinite(g)).all()):
        need = "positive and finite" if minimum <= 0 else f"finite and at least {minimum:.4g} (2**{math.log2(minimum):g})"
        raise ValueError(f"{op}: global_scale must be {need}, got {g.tolist()}")
    return g


# ---------------------------------------------------------------------------------------------
# packing and decode
# ---------------------------------------------------------------------------------------------

def pack(codes: torch.Tensor) -> torch.Tensor:
    """(..., K) uint8 codes -> (..., K/2) bytes: element 2i low nibble, 2i+1 high nibble."""
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return c[..., 0] | (c[..., 1] << 4)


def unpack(data: torch.Tensor) -> torch.Tensor:
    """(..., K/2) bytes -> (..., K) uint8 codes."""
    return torch.stack((data & 0xF, data >> 4), dim=-1).reshape(*data.shape[:-1], data.shape[-1] * 2)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 codes (any integer tensor, low 4 bits used; code 8 is -0.0)."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    c = codes.to(torch.int64)
    mag = lut[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def _make_tables(dtype: torch.dtype, device: torch.device):
    """The decode tables in ``dtype`` (exact in every float dtype):

    - ``pairs``: (256,) the two E2M1 values of byte ``b`` (low nibble first) as one 4- or 8-byte
      integer, so that gathering it and viewing the result as ``dtype`` decodes both nibbles
      (None for float64, whose pair does not fit an integer: it gathers the (256, 2) rows);
    - ``scaled``: for the 2-byte dtypes (bf16, fp16) only, (65536,) the pair of byte ``b`` already
      multiplied by block-scale byte ``sb``, at index ``sb * 256 + b`` (as int32; 256 KiB): their
      elementwise multiply runs several times slower than float32's on the CPU, so one lookup
      decodes and scales (float32 keeps the small table and multiplies: measured faster there,
      building the wide index costs more than its multiply);
    - ``byte``: (256, 2) the same values as floats;
    - ``scale``: (256,) the value of every e4m3 byte.

    The scaled products are computed in float32, as a decode that multiplies after the lookup
    does (``e2m1 * s`` has at most 6 significant bits: exact in fp32, bf16 and fp16, whose range
    holds 6 * 448 and 0.5 * 2**-9).
    """
    b = torch.arange(256, device=device)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    byte = torch.stack((e2m1_decode(b & 15), e2m1_decode(b >> 4)), dim=-1).to(work)
    scale = b.to(torch.uint8).view(torch.float8_e4m3fn).to(work)
    as_int = {2: torch.int32, 4: torch.int64}.get(torch.empty((), dtype=dtype).element_size())
    pairs = None if as_int is None else byte.to(dtype).view(as_int).reshape(256)
    scaled = None
    if as_int == torch.int32:
        scaled = (scale[:, None, None] * byte[None]).to(dtype).contiguous().view(as_int).reshape(65536)
    return pairs, scaled, byte.to(dtype), scale.to(dtype)


_cached_tables = functools.lru_cache(maxsize=None)(_make_tables)


def _tables(dtype: torch.dtype, t: torch.Tensor):
    """Cached tables for ``t``'s device; tensor subclasses (fake and functional tensors while
    tracing) build them afresh instead."""
    return (_cached_tables if type(t) is torch.Tensor else _make_tables)(dtype, t.device)


def scaled_values(data: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``e2m1(code) * float(s)`` in ``dtype`` (float32 by default), (..., K): exact in fp32 and
    exact in bf16/fp16 too. One table lookup per byte (both nibbles at once; bf16/fp16 already
    scaled, the table indexed by the block-scale byte and the data byte) and, for fp32/fp64, one
    per block scale and a multiply, over exactly the (possibly sliced) view given. ``out``: a
    contiguous float32 tensor of the result's numel to write into (float32 only; a caller's
    reused buffer instead of a fresh one)."""
    *lead, half = data.shape
    rows, nb = data.shape[:-1].numel(), half * 2 // BLOCK
    if out is not None and (dtype != torch.float32 or out.dtype != torch.float32 or not out.is_contiguous()
                            or out.numel() != rows * half * 2):
        raise ValueError(f"scaled_values: out must be a contiguous float32 tensor of {rows * half * 2} "
                         f"elements for a float32 result, got {out.dtype} {tuple(out.shape)} for {dtype}")
    if out is not None and out.numel() == 0:  # nothing to decode (and no int64 view of 0 floats)
        return out.reshape(*lead, half * 2)
    pairs, scaled, byte, scale = _tables(dtype, data)
    if scaled is not None:
        return lookup_scaled(data, scales, scaled, dtype)
    sb = scales.reshape(rows, nb, 1).view(torch.uint8)
    idx = data.reshape(-1).to(torch.int32)
    if out is not None:
        vals = torch.index_select(pairs, 0, idx, out=out.view(torch.int64).view(-1)).view(dtype)
    else:
        vals = byte.index_select(0, idx) if pairs is None else pairs.index_select(0, idx).view(dtype)
    vals = vals.reshape(rows, nb, BLOCK)
    vals.mul_(scale.index_select(0, sb.reshape(-1).to(torch.int32)).reshape(rows, nb, 1))
    return vals.reshape(*lead, half * 2)


def lookup_scaled(data: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Decode (..., K/2) bytes through a (65536,) int32 table of 2-byte value pairs indexed by
    ``scale byte * 256 + data byte`` (:func:`dequantize_table`): (..., K) in ``dtype``."""
    *lead, half = data.shape
    rows, nb = data.shape[:-1].numel(), half * 2 // BLOCK
    idx = data.reshape(rows, nb, BLOCK // 2).to(torch.int32)
    idx.bitwise_or_(scales.reshape(rows, nb, 1).view(torch.uint8).to(torch.int32).mul_(256))
    return table.index_select(0, idx.reshape(-1)).view(dtype).reshape(*lead, half * 2)


def dequantize_table(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (65536,) int32 table of :func:`lookup_scaled` for one scalar decode scale ``g`` and a
    2-byte ``dtype`` (bf16/fp16): the pair ``e2m1 * s * g`` of every (scale byte, data byte),
    computed in float32 and rounded once, as :func:`dequantize` does (65536 products): with
    :func:`lookup_scaled`, ``dequantize(data, scales, g, dtype)`` bit for bit, one gather per byte."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dequantize_table: dtype must be bfloat16 or float16, got {dtype}")
    _, _, byte, scale = _tables(torch.float32, g)
    return ((scale[:, None, None] * byte[None]) * g.float().reshape(())).to(dtype).view(torch.int32).reshape(65536)


def dequantize(data: torch.Tensor, scales: torch.Tensor, g: torch.Tensor,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Decode ``e2m1(code) * s * g``: computed in float32 (float64 when ``dtype`` is float64,
    where it is exact), then cast to ``dtype``. ``g`` has shape ``data.shape[:-2]`` or ``()``."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    sv = scaled_values(data, scales, work)
    gg = g.to(work).reshape(*g.shape, 1, 1) if data.dim() >= 2 else g.to(work)
    return (sv * gg).to(dtype)


# ---------------------------------------------------------------------------------------------
# the container
# ---------------------------------------------------------------------------------------------

class NVFP4Tensor(QuantizedTensor):
    """An NVFP4-quantized weight ``(..., N, K)``: ``(N, K)``, or 3-d such as stacked experts
    ``(E, N, K)`` or the Mamba head projection ``(H, 2P+1, K)``.

    Attributes:
        data: (..., N, K/2) uint8, two E2M1 codes per byte (element 2i in the low nibble).
        scales: (..., N, K/16) float8_e4m3fn block decode scales.
        global_scale: float32 decode scale ``g``: shape ``(...)`` (one per matrix, e.g. per
            expert) or ``()`` (one shared by the whole tensor).

    Slices (``q[..., :n, :k]``, :meth:`narrow_nested`, ``q[e]``) and :meth:`reshape` of the
    leading dimensions are views of the same storage; the global scale is shared by every nested
    slice, so a slice needs no requantization.
    """

    __slots__ = ("data", "scales", "global_scale")
    format = "nvfp4"
    BLOCK = BLOCK
    PARTS = {"": torch.uint8, "_scale": torch.float8_e4m3fn, "_scale_2": torch.float32}

    def __init__(self, data: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor) -> None:
        op = "NVFP4Tensor"
        check_tensor(op, "data", data, dtypes=(torch.uint8,))
        check_tensor(op, "scales", scales, dtypes=(torch.float8_e4m3fn,), device=data.device)
        check_tensor(op, "global_scale", global_scale, dtypes=(torch.float32,), device=data.device)
        if data.dim() not in (2, 3):
            raise ValueError(f"{op}: data must have shape (N, K/2) or (E, N, K/2), got {tuple(data.shape)}")
        *lead, n, half = data.shape
        want = (*lead, n, (2 * half) // BLOCK)
        if (2 * half) % BLOCK or tuple(scales.shape) != want:
            raise ValueError(f"{op}: scales has shape {tuple(scales.shape)}, expected {want} for data of "
                             f"shape {tuple(data.shape)} (one scale per 16 elements, K = 2 * {half})")
        if tuple(global_scale.shape) not in (tuple(lead), ()):
            raise ValueError(f"{op}: global_scale has shape {tuple(global_scale.shape)}, expected "
                             f"{tuple(lead)} (one per stacked matrix) or () (shared)")
        if data.stride(-1) != 1 or scales.stride(-1) != 1:
            raise ValueError(f"{op}: data and scales must be contiguous along the last dimension")
        self.data, self.scales, self.global_scale = data, scales, global_scale

    # ---- protocol ----------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.data.shape[:-1], self.data.shape[-1] * 2))

    def parts(self) -> dict[str, torch.Tensor]:
        return {"": self.data, "_scale": self.scales, "_scale_2": self.global_scale}

    @classmethod
    def from_parts(cls, parts: Mapping[str, torch.Tensor]) -> "NVFP4Tensor":
        data, g = parts[""], parts["_scale_2"]
        if data.dim() == 2 and tuple(g.shape) == (1,):  # Model-Optimizer may store a 2-d g as (1,)
            g = g.reshape(())
        return cls(data, parts["_scale"], g)

    @classmethod
    def part_shapes(cls, shape: tuple) -> dict[str, tuple[tuple, torch.dtype]]:
        *rows, k = shape
        shapes = {"": (*rows, k // 2), "_scale": (*rows, k // BLOCK), "_scale_2": tuple(shape[:-2])}
        return {sfx: (shapes[sfx], dtype) for sfx, dtype in cls.PARTS.items()}

    def bad_part(self) -> tuple[str, str] | None:
        g = self.global_scale
        if can_read_values(g) and g.numel() and not bool(((g > 0) & torch.isfinite(g)).all()):
            return "_scale_2", "must be positive and finite"
        s = self.scales
        if can_read_values(s) and s.numel() and not bool((s.float() >= 0).all()):  # NaN compares False
            return "_scale", "holds NaN or negative block scales (corrupt checkpoint?)"
        return None

    @property
    def out_features(self) -> int:
        return self.data.shape[-2]

    @property
    def in_features(self) -> int:
        return self.data.shape[-1] * 2

    def matrix_scales(self) -> torch.Tensor:
        """The decode scale of every matrix, shape ``(...)`` (a shared scale broadcast)."""
        lead = self.data.shape[:-2]
        g = self.global_scale
        return g if g.shape == lead else g.expand(lead).contiguous()

    # ---- decode ------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """``e2m1(code) * s * g`` as ``dtype`` (computed in float32, or exactly in float64)."""
        if dtype not in (*WEIGHT_DTYPES, torch.float64):
            raise TypeError(f"NVFP4Tensor.dequantize: dtype must be a float dtype, got {dtype}")
        return dequantize(self.data, self.scales, self.global_scale, dtype)

    # ---- nested slicing ----------------------------------------------------------------------
    def narrow_nested(self, out_features: int | None = None, in_features: int | None = None) -> "NVFP4Tensor":
        """The nested submodel's weight ``q[..., :out_features, :in_features]`` (a view).

        ``in_features`` must be a multiple of 16; the global scale is shared, nothing is requantized.
        """
        op = "NVFP4Tensor.narrow_nested"
        n = self.out_features if out_features is None else check_int(
            op, "out_features", out_features, min_value=0, max_value=self.out_features)
        k = self.in_features if in_features is None else check_int(
            op, "in_features", in_features, min_value=0, max_value=self.in_features)
        if k % BLOCK:
            raise ValueError(f"{op}: in_features ({k}) must be a multiple of the block size (16)")
        return NVFP4Tensor(self.data[..., :n, : k // 2], self.scales[..., :n, : k // BLOCK],
                           self.global_scale)

    def __getitem__(self, key) -> "NVFP4Tensor":
        """``q[..., rows, cols]``: unit-step slices; ints or slices on the leading dimension;
        column bounds must be multiples of 16. Always a view."""
        op = "NVFP4Tensor.__getitem__"
        key = key if isinstance(key, tuple) else (key,)
        if sum(k is Ellipsis for k in key) > 1:
            raise IndexError(f"{op}: at most one Ellipsis, got {key!r}")
        if Ellipsis in key:
            i = key.index(Ellipsis)
            fill = self.ndim - (len(key) - 1)
            if fill < 0:
                raise IndexError(f"{op}: too many indices for a {self.ndim}-d NVFP4Tensor: {key!r}")
            key = key[:i] + (slice(None),) * fill + key[i + 1:]
        if len(key) > self.ndim:
            raise IndexError(f"{op}: too many indices for a {self.ndim}-d NVFP4Tensor: {key!r}")
        key = key + (slice(None),) * (self.ndim - len(key))
        lead, rows, cols = key[:-2], key[-2], key[-1]
        for k in lead:
            if not isinstance(k, (int, slice)) or isinstance(k, bool) or (isinstance(k, slice) and k.step not in (None, 1)):
                raise TypeError(f"{op}: expert indices must be ints or unit-step slices, got {k!r}")
        for name, k in (("row", rows), ("column", cols)):
            if not isinstance(k, slice) or k.step not in (None, 1):
                raise TypeError(f"{op}: {name} index must be a unit-step slice (the result stays 2-d), got {k!r}")
        k0, k1, _ = cols.indices(self.in_features)
        k1 = max(k0, k1)
        if k0 % BLOCK or k1 % BLOCK:
            raise ValueError(f"{op}: column slice [{k0}:{k1}] must start and stop at multiples of 16")
        data = self.data[(*lead, rows, slice(k0 // 2, k1 // 2))]
        scales = self.scales[(*lead, rows, slice(k0 // BLOCK, k1 // BLOCK))]
        g = self.global_scale
        return NVFP4Tensor(data, scales, g[lead] if lead and g.dim() else g)

    def reshape(self, *shape) -> "NVFP4Tensor":
        op = "NVFP4Tensor.reshape"
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        if len(shape) not in (2, 3) or shape[-1] != self.in_features:
            raise ValueError(f"{op}: shape must be (N, K) or (E, N, K) with K = {self.in_features} (the "
                             f"input features stay whole), got {shape}")
        g = self.global_scale
        if g.dim() and tuple(shape[:-2]) != tuple(g.shape):
            raise ValueError(f"{op}: a weight with one global scale per matrix {tuple(g.shape)} keeps its "
                             f"leading dimensions, got shape {shape}")
        rows = shape[:-1]
        return NVFP4Tensor(self.data.reshape(*rows, self.data.shape[-1]),
                           self.scales.reshape(*rows, self.scales.shape[-1]), g)
