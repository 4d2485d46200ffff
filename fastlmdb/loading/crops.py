"""Decode-aware crops: plan the crop box from the stored size, then decode only what it needs.

Put one at the head of an ordinary torchvision pipeline::

    train_tf = v2.Compose([fastlmdb.RandomResizedCrop(224), v2.RandomHorizontalFlip(), ...])
    val_tf = v2.Compose([fastlmdb.ResizeCenterCrop(256, 224), ...])
    LMDBDataset(root, "train", train_tf, output="tensor")

The dataset draws the box from the record table's height/width (no decode), then decodes only
the box's rows and iMCU columns at the smallest libjpeg-turbo scale (1/8 .. 1) that still
covers the output size, and resizes it with antialiasing (torch's filter, in C where the
extension is built: within ~1 of ``interpolate(antialias=True)`` per value).
`RandomResizedCrop` draws boxes exactly as torchvision's does, from torch's global random
generator, so seeds behave the same.
Without the compiled region decoder (``fastlmdb.core._jpegcrop``) the whole image is decoded at
that scale and cropped. The region decoder reads leniently, as PIL does: a JPEG that decodes
only with libjpeg warnings, or whose sampling the fast decoders cannot read, crops like any.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, Callable, Sequence, cast

import numpy as np
import torch
import torch.nn.functional

from fastlmdb.loading import tail

try:
    from fastlmdb.core import _jpegcrop as _jpegcrop  # batch.py uses it too
except ImportError:  # no compiler or libjpeg headers at install time
    _jpegcrop = None  # type: ignore[assignment]

if TYPE_CHECKING:
    Pixels = np.ndarray[Any, np.dtype[np.uint8]]  # HWC uint8
    Transform = Callable[[Any], Any]

SCALES = (8, 4, 2, 1)


class DecodeCrop:
    """Base of the decode-aware ops: `box(height, width)` -> (top, left, h, w), and `size`."""

    size: tuple[int, int] = (0, 0)

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        raise NotImplementedError


class RandomResizedCrop(DecodeCrop):
    """torchvision's RandomResizedCrop, run on the stored bytes; output `size` (h, w)."""

    def __init__(self, size: int | Sequence[int], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3)) -> None:
        self.size = _height_width(size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        # torchvision takes the log in float32 on every call; the same values, once.
        self._log_ratio = tuple(float(x) for x in torch.log(torch.tensor(self.ratio)))

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        area = height * width
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(*self.scale).item()
            aspect = torch.empty(1).uniform_(*self._log_ratio).exp_().item()  # float32 exp
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = cast(int, torch.randint(0, height - h + 1, size=(1,)).item())
                left = cast(int, torch.randint(0, width - w + 1, size=(1,)).item())
                return top, left, h, w
        return _central_box(height, width, self.ratio)

    def __repr__(self) -> str:
        return (f"fastlmdb.RandomResizedCrop(size={self.size}, scale={self.scale}, "
                f"ratio={self.ratio})")


class ResizeCenterCrop(DecodeCrop):
    """Resize(resize) then CenterCrop(crop), the usual validation transform, in one step."""

    def __init__(self, resize: int = 256, crop: int | Sequence[int] = 224) -> None:
        self.resize, self.size = resize, _height_width(crop)

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        # torchvision's geometry: the shorter side to `resize`, the longer to
        # int(resize * longer / shorter), the crop at round((side - crop) / 2) of that.
        longer = int(self.resize * max(height, width) / min(height, width))
        resized = (self.resize, longer) if height <= width else (longer, self.resize)
        top, h = _source_span(height, resized[0], self.size[0])
        left, w = _source_span(width, resized[1], self.size[1])
        return top, left, h, w

    def __repr__(self) -> str:
        return f"fastlmdb.ResizeCenterCrop(resize={self.resize}, crop={self.size})"


def _source_span(length: int, resized: int, crop: int) -> tuple[int, int]:
    """(start, size) in whole source pixels, the nearest, of the central `crop` of a side of
    `length` resized to `resized` (a crop wider than the side: the whole side)."""
    scale = length / resized
    first = int(round((resized - crop) / 2.0)) * scale
    start, end = max(0, round(first)), min(length, round(first + crop * scale))
    return start, end - start


class CenterCrop(DecodeCrop):
    """torchvision's CenterCrop(size) alone: the central `size` box, no resize. An image
    smaller than the box is padded with zeros first, as torchvision does (`pads`)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _height_width(size)

    def pads(self, height: int, width: int) -> bool:
        return height < self.size[0] or width < self.size[1]

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        h, w = self.size
        (top, _), (left, _) = _centred(height, h), _centred(width, w)
        return top, left, min(h, height), min(w, width)

    def __repr__(self) -> str:
        return f"fastlmdb.CenterCrop(size={self.size})"


def _centred(length: int, crop: int) -> tuple[int, int]:
    """(first source index, first output index) of torchvision's center crop along one axis:
    zeros padded around a shorter image ((crop - length) // 2 before), then the crop starts at
    round((padded - crop) / 2), Python's round as torchvision's."""
    before = (crop - length) // 2 if crop > length else 0
    start = int(round((max(length, crop) - crop) / 2.0)) - before
    return max(start, 0), max(-start, 0)


def center_crop_padded(pixels: Pixels, size: Sequence[int]) -> Pixels:
    """torchvision's CenterCrop(size) of HWC pixels smaller than it: zeros around."""
    out = np.zeros((*size, 3), np.uint8)
    (top, y), (left, x) = _centred(pixels.shape[0], size[0]), _centred(pixels.shape[1], size[1])
    h, w = min(pixels.shape[0] - top, size[0] - y), min(pixels.shape[1] - left, size[1] - x)
    out[y:y + h, x:x + w] = pixels[top:top + h, left:left + w]
    return out


class DrawnBy(DecodeCrop):
    """A random crop whose boxes a third party's public static ``get_params(img, scale, ratio)``
    draws (timm's RandomResizedCropAndInterpolation: Python's `random`); `img` is a tensor of
    the image's shape that holds no memory, which is all such a get_params reads."""

    def __init__(self, get_params: Callable[..., Any], size: Sequence[int],
                 scale: Sequence[float], ratio: Sequence[float]) -> None:
        self.get_params, self.size = get_params, _height_width(tuple(size))
        self.scale, self.ratio = scale, ratio

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        shape_only = torch.empty(()).expand(3, height, width)
        top, left, h, w = self.get_params(shape_only, self.scale, self.ratio)
        return int(top), int(left), int(h), int(w)

    def __repr__(self) -> str:
        return f"fastlmdb.DrawnBy({self.get_params.__qualname__}, size={self.size})"


def _central_box(height: int, width: int,
                 ratio: Sequence[float]) -> tuple[int, int, int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _height_width(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of an output size: one int for both, or a pair."""
    return (size, size) if isinstance(size, int) else cast("tuple[int, int]", tuple(size))


def split_pipeline(transform: Transform | None,
                   decode_aware: bool = False) -> tuple[DecodeCrop | None, Transform | None]:
    """(decode-aware head or None, the rest of the pipeline) of a transform. With
    `decode_aware`, torchvision's own crops at the head of a Compose count too."""
    if isinstance(transform, DecodeCrop):
        return transform, None
    steps: Any = getattr(transform, "transforms", None)
    steps = steps if isinstance(steps, (list, tuple)) else None  # a preset's is a Compose
    if steps and isinstance(steps[0], DecodeCrop):
        return steps[0], _rest(transform, steps, 1)
    if not decode_aware or transform is None:
        return None, transform
    # Only a Compose: RandomChoice and RandomApply have `transforms` too, and mean otherwise.
    steps = list(steps) if type(transform) in torchvision_types("Compose") else [transform]
    head, taken = torchvision_head(steps)
    if head is None:
        return None, transform
    return head, _rest(transform, steps, taken)


def _rest(transform: Any, steps: Sequence[Any], taken: int) -> Any:
    return type(transform)(list(steps[taken:])) if len(steps) > taken else None


def torchvision_head(steps: Sequence[Any],
                     pil_input: bool = False) -> tuple[DecodeCrop | None, int]:
    """(the decode-aware op, steps it replaces) for torchvision's RandomResizedCrop, or Resize(s)
    then CenterCrop, at the head of `steps` (v1 or v2, bilinear, antialiased: on a PIL image,
    `pil_input`, always); else (None, 0).
    The same random draws; pixels from a crop-then-resize at a reduced decode scale, within a
    few dB of torchvision's (tests/test_crops.py pins the PSNR)."""
    first = steps[0]
    if not _bilinear_antialiased(first, pil_input):
        return None, 0
    if type(first) in torchvision_types("RandomResizedCrop"):
        return RandomResizedCrop(tuple(first.size), first.scale, first.ratio), 1
    if (type(first) in torchvision_types("Resize") and len(steps) > 1
            and type(steps[1]) in torchvision_types("CenterCrop") and first.max_size is None
            and _side(first.size) is not None
            and max(steps[1].size) <= cast(int, _side(first.size))):  # else it pads
        return ResizeCenterCrop(cast(int, _side(first.size)), tuple(steps[1].size)), 2
    return None, 0


def torchvision_types(*names: str) -> tuple[type[Any], ...]:
    """Those classes of torchvision.transforms and .v2, of the modules already imported (a
    transform of theirs exists only once they are). Exact types: a subclass may do anything."""
    modules = [sys.modules.get(name) for name in ("torchvision.transforms",
                                                  "torchvision.transforms.v2")]
    return tuple(getattr(m, name) for m in modules if m is not None for name in names
                 if hasattr(m, name))  # v1 has no ToImage, v2 no ToTensor in later versions


def _bilinear_antialiased(step: Any, pil_input: bool = False) -> bool:
    mode = getattr(step, "interpolation", None)  # PIL's resize always antialiases
    return (getattr(mode, "value", mode) == "bilinear"
            and (pil_input or getattr(step, "antialias", True) in (True, None)))


def _side(size: Any) -> int | None:
    """The shorter-side target of a Resize's `size` (an int or a one-element list), or None."""
    if isinstance(size, int):
        return size
    return size[0] if isinstance(size, (list, tuple)) and len(size) == 1 else None


def scale_for(box_h: int, box_w: int, size: Sequence[int]) -> int:
    """The largest denominator whose scaled box still covers the output size."""
    for denom in SCALES:
        if -(-box_h // denom) >= size[0] and -(-box_w // denom) >= size[1]:
            return denom
    return 1


def decode_box(data: Any, box: tuple[int, int, int, int], size: Sequence[int], height: int,
               width: int, decode: Callable[..., Pixels]) -> Pixels:
    """HWC uint8 pixels of `box` of a JPEG, decoded at the coarsest sufficient scale."""
    top, left, h, w = box
    denom = scale_for(h, w, size)
    if _jpegcrop is not None:
        raw, rows, cols, offset = _jpegcrop.decode_region(data, top, left, h, w, denom,
                                                          strict=False)
        pixels = np.frombuffer(raw, np.uint8).reshape(rows, cols, 3)
        return pixels[:, offset:offset + -(-w // denom)]
    pixels = decode(data, min_height=-(-height // denom), min_width=-(-width // denom))
    fy, fx = pixels.shape[0] / height, pixels.shape[1] / width
    y0, x0 = int(top * fy), int(left * fx)
    return pixels[y0:y0 + max(1, round(h * fy)), x0:x0 + max(1, round(w * fx))]


def resize(pixels: Pixels, size: Sequence[int], out: torch.Tensor | None = None,
           table: Any = None) -> Any:
    """Antialiased bilinear resize of HWC uint8 pixels to `size` (h, w); HWC uint8 out, or
    written into `out`, a 3xHxW tensor (then returns None). With `table` (a recipe's tail,
    fastlmdb.loading.tail) each value v of channel c is stored as table[c, v]: into `out` of
    the table's dtype, or a new 3xHxW tensor returned. The C kernel where built (the native
    batches' own, so both paths give the same pixels), else torch's."""
    if table is not None:
        table = tail.as_table(table, None if out is None else out.dtype)
        if out is None:
            out = torch.empty((3, *size), dtype=table.dtype)
            resize(pixels, size, out, table)
            return out
    if _jpegcrop is not None and hasattr(_jpegcrop, "resize_chw"):
        target = np.empty((3, *size), np.uint8) if out is None else tail.raw(out)
        _jpegcrop.resize_chw(pixels, target, table=None if table is None else tail.raw(table))
        return target.transpose(1, 2, 0) if out is None else None
    if out is not None and table is not None:
        out.copy_(tail.apply_table(torch.from_numpy(_resized_hwc(pixels, size)).permute(2, 0, 1),
                                   table))
        return None
    resized = _resized_hwc(pixels, size)
    if out is None:
        return resized
    np.copyto(out.numpy(), resized.transpose(2, 0, 1))
    return None


def _resized_hwc(pixels: Pixels, size: Sequence[int]) -> Pixels:
    """torch's antialiased bilinear resize of HWC uint8 pixels (a new HWC array)."""
    if pixels.shape[:2] == tuple(size):
        return pixels.copy()
    # A contiguous HWC array is a channels-last CHW tensor: the fast uint8 antialias path.
    chw = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0)
    resized = torch.nn.functional.interpolate(chw, size=size, mode="bilinear", antialias=True)
    return resized[0].permute(1, 2, 0).numpy()
