"""Quantized weight formats and their one serialization (docs/design.md §2, §5).

- :class:`QuantizedTensor`: the protocol of a quantized weight (shape, zero-copy prefix slices,
  reshape, ``to``, ``dequantize``, named parts); layers use it as they use a dense weight.
- :class:`NVFP4Tensor` (:mod:`.nvfp4`: E2M1 tables, packing, decode, global scales) and
  :class:`FP8Tensor` (:mod:`.fp8`: the one FP8 encode, per-tensor scale).
- :mod:`.state_dict`: Model-Optimizer's Hugging Face names ``N``, ``N_scale``, ``N_scale_2``;
  safetensors files.
- :mod:`.dtypes`: the one table of dtype names.

This package imports no op and no backend: quantizing with a kernel is
:func:`elastic_kernels.nvfp4.quantize` (:mod:`elastic_kernels.ops.nvfp4`).
"""
from .base import QuantizedTensor
from .fp8 import FP8Tensor, quantize_fp8
from .nvfp4 import NVFP4Tensor
from .state_dict import FORMATS, from_state_dict, load_file, pack_state_dict, save_file, to_state_dict, unpack_state_dict

__all__ = ["QuantizedTensor", "NVFP4Tensor", "FP8Tensor", "quantize_fp8", "FORMATS", "to_state_dict",
           "from_state_dict", "pack_state_dict", "unpack_state_dict", "save_file", "load_file"]
