"""Converting between torch ``state_dict`` objects and :class:`diffs.model.Tensor` models.

torch is imported lazily, inside the functions, so the rest of ``diffs`` (and every
service that imports it) never pays torch's import time. Conversions copy nothing they
do not have to: CPU tensors are shared with numpy; bfloat16 travels as its bit patterns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from diffs.dtypes import DType
from diffs.errors import ModelFormatError
from diffs.model import Model, Tensor

if TYPE_CHECKING:
    import torch


def _torch_dtypes() -> dict[Any, DType]:
    import torch

    return {
        torch.float64: DType.F64,
        torch.float32: DType.F32,
        torch.float16: DType.F16,
        torch.bfloat16: DType.BF16,
        torch.int64: DType.I64,
        torch.int32: DType.I32,
        torch.int16: DType.I16,
        torch.int8: DType.I8,
        torch.uint8: DType.U8,
        torch.bool: DType.BOOL,
    }


def from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Tensor]:
    """A model from a torch ``state_dict`` (tensors are detached and moved to the CPU)."""
    import torch

    table = _torch_dtypes()
    model: dict[str, Tensor] = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ModelFormatError(f"state_dict entry {name!r} is not a tensor")
        dtype = table.get(value.dtype)
        if dtype is None:
            raise ModelFormatError(f"tensor {name!r} has unsupported dtype {value.dtype}")
        cpu = value.detach().to("cpu").contiguous()
        if dtype is DType.BF16:
            array = cpu.view(torch.int16).numpy().view(np.uint16)
        else:
            array = cpu.numpy()
        model[name] = Tensor(dtype, array.reshape(tuple(cpu.shape)))
    return model


def to_state_dict(model: Model) -> dict[str, torch.Tensor]:
    """A torch ``state_dict`` (CPU tensors) holding exactly the model's bits."""
    import torch

    inverse = {dtype: tdtype for tdtype, dtype in _torch_dtypes().items()}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.items():
        if tensor.dtype not in inverse:
            raise ModelFormatError(f"tensor {name!r}: torch has no {tensor.dtype.value}")
        # reshape: np.ascontiguousarray turns a 0-d array into a 1-d one
        array = np.ascontiguousarray(tensor.array).reshape(tensor.shape)
        if tensor.dtype is DType.BF16:
            state[name] = torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
        else:
            state[name] = torch.from_numpy(array.copy())
    return state
