"""Region decoding with libjpeg-turbo (_jpegcrop.c)."""

from typing import Any, Sequence

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

def decode_region(data: Buffer, top: int, left: int, height: int, width: int,
                  denom: int, strict: bool = False) -> tuple[bytearray, int, int, int]:
    """RGB rows of the box (top, left, height, width) of JPEG `data` at scale 1/`denom` (1, 2,
    4 or 8), widened to iMCU boundaries: (rgb bytes, rows, cols, column offset of the box).
    strict=True makes every libjpeg warning an error (else only a truncated file is one)."""

def decode_batch(values: Sequence[Buffer], boxes: npt.NDArray[np.int64],
                 flips: npt.NDArray[np.uint8], out: Buffer | npt.NDArray[Any], height: int,
                 width: int, threads: int = 1,
                 table: Buffer | npt.NDArray[Any] | None = None) -> list[str | None]:
    """Decode box k (int64 top, left, h, w) of each JPEG at the coarsest covering scale,
    resize it into slot k of `out` (C-contiguous [B, 3, height, width]) mirrored as flips[k]
    says (bit 0 horizontal, bit 1 vertical), GIL released, on `threads` threads: None per slot
    that decoded, else why it failed. Without `table`, `out` is uint8; with one (C-contiguous,
    3 * 256 items of out's item size: 1, 2 or 4 bytes), value v of channel c is stored as item
    c * 256 + v (bytes copied): a recipe's tail (float, normalise) in the same store."""

def resize_chw(pixels: npt.NDArray[np.uint8], out: Buffer | npt.NDArray[Any], /,
               table: Buffer | npt.NDArray[Any] | None = None) -> None:
    """Antialiased bilinear resize of uint8 H x W x 3 `pixels` (3 bytes apart, rows any
    distance) into `out`, a C-contiguous 3 x h x w buffer (uint8, or through `table` as
    decode_batch), GIL released."""

def _use_simd(enabled: bool, /) -> bool:
    """Whether the resize's x86 (AVX2) kernels ran before; False forces the portable ones, for
    tests: the bytes are the same either way."""
