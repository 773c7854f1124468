"""NVFP4 in one place for users: :func:`quantize` (dispatching to the reference, Triton or CUDA
kernel), the :class:`NVFP4Tensor` container with zero-copy nested slices, and safetensors I/O
with Model-Optimizer's names (``N``, ``N_scale``, ``N_scale_2``).

A face: the format lives in :mod:`elastic_kernels.formats` (container, decode, serialization),
the ops in :mod:`elastic_kernels.ops.nvfp4`.

Example::

    q = quantize(w)                         # w: (N, K), K % 16 == 0
    q_small = q.narrow_nested(out_features=n, in_features=k)   # == q[:n, :k], zero-copy
    y = elastic_kernels.nvfp4_linear(x, q_small)
"""
from .formats.nvfp4 import BLOCK, NVFP4Tensor
from .formats.state_dict import from_state_dict, load_file, pack_state_dict, save_file, to_state_dict, unpack_state_dict
from .ops.nvfp4 import quantize

__all__ = ["BLOCK", "NVFP4Tensor", "quantize", "to_state_dict", "from_state_dict", "pack_state_dict",
           "unpack_state_dict", "save_file", "load_file"]
