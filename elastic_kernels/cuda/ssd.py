"""SSD launcher of ``csrc/ssd_state_update.cu`` (the decode step); the math is in
:mod:`elastic_kernels.reference.ssd` (``ssd_state_update_reference``, same arguments)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def ssd_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *,
                     D: Tensor | None, z: Tensor | None, dt_bias: Tensor | None, dt_softplus: bool,
                     interleaved: bool, active_int: int, active_t: Tensor | None) -> Tensor:
    """One decode step, ``state`` (batch, nheads, headdim, dstate) float32 updated in place;
    x: (batch, nheads, headdim) fp32/fp16/bf16 -> y like x. Arguments as the reference's."""
    ext = _ext.require_cuda_ext("ssd_state_update")
    dt, A = dt.float(), A.float().contiguous()  # the kernel reads A and dt_bias unit-strided
    D = D.float() if D is not None else None
    dt_bias = dt_bias.float().contiguous() if dt_bias is not None else None
    B, C = B.to(x.dtype), C.to(x.dtype)
    z = z.to(x.dtype) if z is not None else None
    y = torch.empty_like(x)
    a = ext.SsdStateUpdateArgs()
    b, h, p = x.shape
    a.batch, a.nheads, a.headdim, a.dstate, a.ngroups = b, h, p, B.shape[-1], B.shape[1]
    a.state, a.x, a.dt, a.A, a.B, a.C, a.y = map(_ptr, (state, x, dt, A, B, C, y))
    a.D, a.z, a.dt_bias, a.active_heads = map(_ptr, (D, z, dt_bias, active_t))
    a.s_state, a.s_x, a.s_dt = list(state.stride()), list(x.stride()), list(dt.stride())
    a.s_B, a.s_C, a.s_y = list(B.stride()), list(C.stride()), list(y.stride())
    a.s_z = list(z.stride()) if z is not None else [0, 0, 0]
    a.s_D = ([D.stride(0), 0] if D.dim() == 1 else list(D.stride())) if D is not None else [0, 0]
    a.dtype = _ext.DTYPE_CODES[x.dtype]
    a.interleaved, a.dt_softplus, a.active_heads_int = int(interleaved), int(dt_softplus), active_int
    a.stream = _ext.stream_handle(x.device)
    ext.ssd_state_update(a)
    return y
