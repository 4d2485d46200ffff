"""Region decoding with libjpeg-turbo (_jpegcrop.c)."""

from typing_extensions import Buffer

def decode_region(data: Buffer, top: int, left: int, height: int, width: int,
                  denom: int, strict: bool = False) -> tuple[bytearray, int, int, int]:
    """RGB rows of the box (top, left, height, width) of JPEG `data` at scale 1/`denom` (1, 2,
    4 or 8), widened to iMCU boundaries: (rgb bytes, rows, cols, column offset of the box).
    strict=True makes every libjpeg warning an error (else only a truncated file is one)."""
