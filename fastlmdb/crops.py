"""Decode-aware crops: plan the crop box from the stored size, then decode only what it needs.

Put one at the head of an ordinary torchvision pipeline::

    train_tf = v2.Compose([fastlmdb.RandomResizedCrop(224), v2.RandomHorizontalFlip(), ...])
    val_tf = v2.Compose([fastlmdb.ResizeCenterCrop(256, 224), ...])
    LMDBDataset(root, "train", train_tf, output="tensor")

The dataset draws the box from the record table's height/width (no decode), then decodes only
the box's rows and iMCU columns at the smallest libjpeg-turbo scale (1/8 .. 1) that still
covers the output size, and resizes it with antialiasing. `RandomResizedCrop` draws boxes
exactly as torchvision's does, from torch's global random generator, so seeds behave the same.
Without the compiled region decoder (``fastlmdb._jpegcrop``) the whole image is decoded at
that scale and cropped. The region decoder reads leniently, as PIL does: a JPEG that decodes
only with libjpeg warnings, or whose sampling the fast decoders cannot read, crops like any.
"""

import math

import numpy as np
import torch
import torch.nn.functional

try:
    from fastlmdb import _jpegcrop
except ImportError:  # no compiler or libjpeg headers at install time
    _jpegcrop = None

SCALES = (8, 4, 2, 1)


class DecodeCrop:
    """Base of the decode-aware ops: `box(height, width)` -> (top, left, h, w), and `size`."""

    size = (0, 0)

    def box(self, height, width):
        raise NotImplementedError


class RandomResizedCrop(DecodeCrop):
    """torchvision's RandomResizedCrop, run on the stored bytes; output `size` (h, w)."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size = _pair(size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        # torchvision takes the log in float32 on every call; the same values, once.
        self._log_ratio = tuple(float(x) for x in torch.log(torch.tensor(self.ratio)))

    def box(self, height, width):
        area = height * width
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(*self.scale).item()
            aspect = torch.empty(1).uniform_(*self._log_ratio).exp_().item()  # float32 exp
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, size=(1,)).item()
                left = torch.randint(0, width - w + 1, size=(1,)).item()
                return top, left, h, w
        return _central_box(height, width, self.ratio)

    def __repr__(self):
        return (f"fastlmdb.RandomResizedCrop(size={self.size}, scale={self.scale}, "
                f"ratio={self.ratio})")


class ResizeCenterCrop(DecodeCrop):
    """Resize(resize) then CenterCrop(crop), the usual validation transform, in one step."""

    def __init__(self, resize=256, crop=224):
        self.resize, self.size = resize, _pair(crop)

    def box(self, height, width):
        scale = self.resize / min(height, width)
        h = min(height, round(self.size[0] / scale))
        w = min(width, round(self.size[1] / scale))
        return (height - h) // 2, (width - w) // 2, h, w

    def __repr__(self):
        return f"fastlmdb.ResizeCenterCrop(resize={self.resize}, crop={self.size})"


def _central_box(height, width, ratio):
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def split_pipeline(transform):
    """(decode-aware head or None, the rest of the pipeline) of a transform."""
    if isinstance(transform, DecodeCrop):
        return transform, None
    steps = getattr(transform, "transforms", None)
    if steps and isinstance(steps[0], DecodeCrop):
        rest = type(transform)(list(steps[1:])) if len(steps) > 1 else None
        return steps[0], rest
    return None, transform


def scale_for(box_h, box_w, size):
    """The largest denominator whose scaled box still covers the output size."""
    for denom in SCALES:
        if -(-box_h // denom) >= size[0] and -(-box_w // denom) >= size[1]:
            return denom
    return 1


def decode_box(data, box, size, height, width, decode):
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


def resize(pixels, size, out=None):
    """Antialiased bilinear resize of HWC uint8 pixels to `size` (h, w); HWC uint8 out, or
    written into `out`, a 3xHxW uint8 tensor (then returns None)."""
    if pixels.shape[:2] == tuple(size):
        if out is None:
            return pixels.copy()
        np.copyto(out.numpy(), pixels.transpose(2, 0, 1))
        return None
    # A contiguous HWC array is a channels-last CHW tensor: the fast uint8 antialias path.
    chw = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0)
    resized = torch.nn.functional.interpolate(chw, size=size, mode="bilinear", antialias=True)
    if out is None:
        return resized[0].permute(1, 2, 0).numpy()
    out.copy_(resized[0])
    return None
