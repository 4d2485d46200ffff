"""Whole batches decoded in place: one image tensor per batch, handed over once.

When a map-style dataset's pipeline ends in a fixed-size uint8 image (a decode-aware crop head,
then at most flips), ``LMDBDataset.__getitems__`` decodes every sample of a batch straight into
its slot of one preallocated ``[B, 3, H, W]`` uint8 tensor, and the labels into one int64
tensor. Inside a DataLoader worker the images live in shared memory from the start, reused from
batch to batch (fastlmdb.handover), so handing them to the main process moves no pixels and
allocates nothing; torch's own collate would instead stack per-sample tensors into a new shared
tensor (a copy of every image, and an allocation per sample before that).

``__getitems__`` returns the samples as ``Sample`` tuples, ``(image view, label)``, so any
collate function works; ``default_collate`` (where torch lets us register the type) and
``collate`` below return the prebuilt ``[images, labels]`` without stacking. The images tensor
is a contiguous ``[B, 3, H, W]`` tensor, as ``default_collate`` would stack, and its pixels are
those of the per-sample path (same transform objects, same random draws, in the same order).

Where the C region decoder is built, a JPEG batch is filled by one native call
(``_jpegcrop.decode_batch``, GIL released, on ``threads`` threads): the boxes and flips are
drawn here first, from torch's generator in the per-sample order (box of sample 0, its flips,
box of sample 1, ...), then every record is region-decoded, resized (antialiased bilinear, in
C, within ~1 of torch's ``interpolate`` per value) and mirrored into its slot. A record the call
cannot decode goes through the per-sample path, from the random state it would have had there.

A batch may also hold what a recipe's per-pixel tail makes of the uint8 pixels (float32,
float16, bfloat16: fastlmdb.loading.tail): each call then takes the 3 x 256 `table` of that
tail, and the native decoder stores ``table[c, v]`` as it writes each slot, in the same pass.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Sequence, Tuple, cast

import numpy as np
import torch
import torch.utils.data

from fastlmdb.loading import crops, handover, tail
from fastlmdb.loading.tail import apply_table as apply_table  # for the per-sample paths

MAX_THREADS = 256  # _jpegcrop.c's MAX_THREADS

if TYPE_CHECKING:
    _Pair = Tuple[Any, int]  # what mypy sees of the tuple a Sample is: (image, label)
else:
    _Pair = tuple


class Sample(_Pair):
    """(image, label) of sample `position` of a batch decoded in place: the image a view of
    ``batch[0]``, the label an int, as the per-sample path gives it; `batch` is the whole
    (images, labels)."""

    batch: tuple[torch.Tensor, torch.Tensor]
    position: int

    def __new__(cls, image: torch.Tensor, label: int, batch: tuple[torch.Tensor, torch.Tensor],
                position: int) -> Sample:
        sample = super().__new__(cls, (image, label))
        sample.batch, sample.position = batch, position
        return sample

    def __reduce__(self) -> tuple[Any, ...]:
        return tuple, (tuple(self),)  # pickled, it is the plain (image, label) it stands for


def only_flips(transform: Any) -> bool:
    """Whether `transform` keeps a uint8 CHW tensor's size and type: None, a torchvision flip,
    or a torchvision Compose of flips. Exact types: a subclass may do anything."""
    composed = type(transform) in crops.torchvision_types("Compose")
    steps = list(transform.transforms) if composed else [transform]
    flips = crops.torchvision_types("RandomHorizontalFlip", "RandomVerticalFlip")
    return all(step is None or type(step) in flips for step in steps)


def native_built() -> bool:
    """Whether the native batch decoder (``_jpegcrop.decode_batch``) is here."""
    return crops._jpegcrop is not None and hasattr(crops._jpegcrop, "decode_batch")


def flip_plan(transform: Any) -> list[tuple[int, float]]:
    """[(mirror bit, probability)] of the flips `transform` is (only_flips is true of it):
    bit 1 horizontal, 2 vertical, as decode_batch reads them."""
    composed = type(transform) in crops.torchvision_types("Compose")
    steps = list(transform.transforms) if composed else [transform]
    horizontal = crops.torchvision_types("RandomHorizontalFlip")
    return [(1 if type(step) in horizontal else 2, step.p) for step in steps
            if step is not None]


def draw(crop: crops.DecodeCrop, plan: list[tuple[int, float]],
         shapes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(boxes int64 [n, 4], flips uint8 [n]) for records of `shapes` ([n, 2] heights, widths),
    drawn in the per-sample order. torchvision's flips, v1 and v2, each draw
    ``torch.rand(1) < p``: the same draw, compared the same way."""
    boxes = np.empty((len(shapes), 4), np.int64)
    flips = np.zeros(len(shapes), np.uint8)
    for k, (height, width) in enumerate(shapes.tolist()):
        boxes[k] = crop.box(height, width)
        for bit, p in plan:
            if torch.rand(1) < p:
                flips[k] ^= bit
    return boxes, flips


def decode_native(images: torch.Tensor, values: Sequence[Any], shapes: np.ndarray,
                  crop: crops.DecodeCrop, rest: Any, threads: int = 1, table: Any = None) -> int:
    """Fill the slots of `images` from JPEG `values` (as many) natively, through `table`
    (3 x 256 of the images' dtype) where the images are not uint8; returns the first slot it
    could not fill (len(values) if none), torch's generator then where the per-sample path
    would draw that slot's box. The slots before it are done."""
    if not len(values):
        return 0
    out, raw_table = _native_args(images, table)
    plan, state = flip_plan(rest), torch.get_rng_state()
    boxes, flips = draw(crop, plan, shapes)
    errors = crops._jpegcrop.decode_batch(values, boxes, flips, out, *crop.size,
                                          threads=threads, table=raw_table)
    failed = next((k for k, error in enumerate(errors) if error is not None), None)
    if failed is None:
        return len(values)
    torch.set_rng_state(state)
    draw(crop, plan, shapes[:failed])  # the draws of the slots before it, again
    return failed


def _native_args(images: torch.Tensor, table: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """(out, table) for decode_batch: the images and the table as unsigned items of their
    size (numpy has no bfloat16; the C code copies items as bytes)."""
    if table is None:
        if images.dtype != torch.uint8:
            raise ValueError(f"images are {images.dtype}: pass the table of the recipe's "
                             f"tail (table=), or uint8 images")
        return images.numpy(), None
    return tail.raw(images), tail.raw(tail.as_table(table, images.dtype))


def fill(images: torch.Tensor, values: Sequence[Any], rows: np.ndarray, crop: crops.DecodeCrop,
         rest: Any, threads: int, native: bool,
         one: Callable[[int, torch.Tensor], int | None],
         table: Any = None) -> tuple[list[int], list[int]]:
    """Decode records `values` (their table `rows`) into the first slots of `images`:
    natively where `native` and the call can (through `table`, the tail's 3 x 256 of the
    images' dtype, where they are not uint8), else record n through one(n, slot), which
    returns its label, or None where it was skipped (it then takes no slot). Returns (the
    labels kept, the records consumed up to each of them)."""
    shapes, labels = np.stack([rows["height"], rows["width"]], axis=1), rows["label"]
    kept: list[int] = []
    consumed: list[int] = []
    n = 0  # records consumed
    while n < len(values):
        if native:
            slots = images[len(kept):len(kept) + len(values) - n]
            done = decode_native(slots, values[n:], shapes[n:], crop, rest, threads, table)
            kept += labels[n:n + done].tolist()
            consumed += range(n + 1, n + done + 1)
            n += done
            if n == len(values):
                break
        label = one(n, images[len(kept)])  # the record the native call could not decode
        if label is not None:
            kept.append(label)
            consumed.append(n + 1)
        n += 1
    return kept, consumed


def empty(count: int, size: Sequence[int],
          dtype: torch.dtype = torch.uint8) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels): uninitialised [count, 3, h, w] images of `dtype` and [count] int64
    tensors; in a DataLoader worker the images are in shared memory, reused where it can be
    (handover)."""
    shape = (count, 3, *size)
    images = handover.images(shape, dtype)
    if images is None:
        images = _shared(shape, dtype) if torch.utils.data.get_worker_info() else torch.empty(
            shape, dtype=dtype)
    return images, torch.empty(count, dtype=torch.int64)


def _shared(shape: tuple[int, ...], dtype: torch.dtype) -> Any:  # a tensor (see set_ below)
    try:
        # What torch's collate does for the batches it stacks; share_memory_() on an ordinary
        # tensor would allocate it twice and copy.
        storage = torch.UntypedStorage._new_shared(
            math.prod(shape) * torch.empty(0, dtype=dtype).element_size())
    except AttributeError:  # not in this torch version
        return torch.empty(shape, dtype=dtype).share_memory_()
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)  # type: ignore[call-overload]


def samples(images: torch.Tensor, labels: torch.Tensor,
            label_list: Sequence[int]) -> list[Sample]:
    """The batch as a list of Sample views (labels as ints, as the per-sample path gives them),
    for any collate function."""
    batch = (images, labels)
    return [Sample(images[k], label, batch, k) for k, label in enumerate(label_list)]


def collate(batch: Sequence[Any]) -> Any:
    """`collate_fn` for a DataLoader over LMDBDataset: a batch decoded in place is returned as
    it is, ``[images, labels]``; anything else goes to torch's ``default_collate``.

    ``default_collate`` does the same where torch lets fastlmdb register its sample type (torch
    2.x); pass ``collate_fn=fastlmdb.collate`` not to depend on that.
    """
    whole = _whole_batch(batch)
    if whole is not None:
        return handover.batch(*whole)
    return torch.utils.data.default_collate(cast("list[Any]", batch))


def _whole_batch(batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (images, labels) that `batch` is, sample for sample, in order; else None."""
    first = batch[0] if len(batch) else None
    if not isinstance(first, Sample) or len(batch) != len(first.batch[1]):
        return None
    for k, sample in enumerate(batch):
        if not isinstance(sample, Sample) or sample.batch is not first.batch or \
                sample.position != k:
            return None
    return first.batch


def _collate_samples(batch: Sequence[Any], *, collate_fn_map: Any = None) -> Any:
    whole = _whole_batch(batch)
    if whole is not None:
        return handover.batch(*whole)
    # Part of a batch, or a mix: collate them as the plain tuples they are (stacking copies).
    return torch.utils.data.default_collate([tuple(sample) for sample in batch])


def _register_with_default_collate() -> None:
    try:
        from torch.utils.data._utils.collate import default_collate_fn_map
    except ImportError:  # then default_collate stacks the samples like any tuples: same values
        return
    default_collate_fn_map[Sample] = _collate_samples


_register_with_default_collate()
