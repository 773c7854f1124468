"""The one table of dtype names: safetensors header codes and torch names (``"bfloat16"``)."""
from __future__ import annotations

import torch

#: safetensors header ``dtype`` codes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}

#: torch names (``str(dtype)`` without ``torch.``), as configs and checkpoints write them
DTYPE_NAMES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in SAFETENSORS_DTYPES.values()}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16 -> "bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype | None:
    """``"bfloat16" -> torch.bfloat16``; None for a name not in :data:`DTYPE_NAMES`."""
    return DTYPE_NAMES.get(name) if isinstance(name, str) else None
