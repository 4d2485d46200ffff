"""A recipe's per-pixel tail as a table: what each uint8 value of each channel becomes.

ToTensor, ToDtype(scale=True), ConvertImageDtype, Normalize and the float16/bfloat16 casts
after a crop are each an elementwise function of a pixel's uint8 value and its channel, so
their composition is a 3 x 256 table: ``table[c, v]`` = the recipe's own ops applied to value
v of channel c (e.g. run on ``torch.arange(256)``). The native batch decoder stores
``table[c, v]`` instead of v as it writes a slot (``_jpegcrop.decode_batch(..., table=)``): the
float batch costs one store per value, bitwise what those ops give for the same uint8 pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

SHAPE = (3, 256)
# Integer dtypes of each item size: the C code copies items as bytes, whatever they mean.
_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def as_table(table: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`table` (a numpy array or tensor) as a contiguous 3 x 256 CPU tensor, checked; of
    `dtype` where given (a ValueError names both otherwise)."""
    tensor = torch.from_numpy(table) if isinstance(table, np.ndarray) else table
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"table must be a numpy array or a torch tensor, got "
                        f"{type(table).__name__}")
    if tuple(tensor.shape) != SHAPE:
        raise ValueError(f"table must have shape (3, 256), got {tuple(tensor.shape)}")
    if tensor.element_size() not in _RAW:
        raise ValueError(f"table must have 1-, 2- or 4-byte items (uint8, float16, bfloat16, "
                         f"float32), got {tensor.dtype}")
    if dtype is not None and tensor.dtype != dtype:
        raise ValueError(f"table is {tensor.dtype} but the images are {dtype}: build the table "
                         f"in the batch's dtype")
    return tensor.detach().cpu().contiguous()


def raw(tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    """A contiguous tensor's memory as integer items of its item size, for the C code, which
    copies items as bytes (numpy has no bfloat16)."""
    return tensor.view(_RAW[tensor.element_size()]).numpy()


def apply_table(images: torch.Tensor, table: Any) -> torch.Tensor:
    """uint8 [..., 3, H, W] `images` through `table`: a tensor of the table's dtype, what the
    native batch decoder stores for the same pixels (for the per-sample paths)."""
    if images.dtype != torch.uint8 or images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"apply_table needs uint8 [..., 3, H, W] images, got {images.dtype} "
                         f"{tuple(images.shape)}")
    table = as_table(table)
    channel = torch.arange(3).view(3, 1, 1)
    looked_up: torch.Tensor = table[channel, images.long()]
    return looked_up
