"""Which part of a transform runs native: planned once, from the transform's types.

``plan(transform, output=, exact=)`` reads a transform the way users write it (torchvision v1
or v2, timm's ``create_transform``) and returns a frozen `Recipe`:

- the **head**, a decode-aware crop (fastlmdb.crops) standing for torchvision's
  RandomResizedCrop, Resize + CenterCrop, CenterCrop or timm's RandomResizedCropAndInterpolation:
  the same random draws, the box decoded from the stored bytes and resized in C;
- the **flips** right after it (the same flip objects, so the same draws);
- the **tail**, the per-pixel steps after them (ToTensor, PILToTensor, ToImage, ToDtype,
  ConvertImageDtype, Normalize, timm's MaybeToTensor / MaybePILToTensor), as a **table**
  ``[3, 256]``: torchvision's own code run once on an image holding the values 0..255 in each
  channel, so ``table[c, v]`` is bitwise what the tail makes of value v in channel c;
- the **rest**, the steps from the first one that is none of those (ColorJitter, RandAugment,
  a user's function, ...), run per sample on what the original pipeline had at that point: a
  PIL image, a uint8 tensor or a float tensor (`rest_input`).

Types are recognised exactly (a subclass may do anything), from the modules already imported
(crops.torchvision_types), never by private names or the caller's frame. ``exact=True`` plans
nothing: the whole image is decoded and the transform runs as written, as with ImageFolder.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fastlmdb.loading import crops

PIL, NUMPY, UINT8, FLOAT = "pil", "numpy", "uint8 tensor", "float tensor"
KINDS = {"pil": PIL, "tensor": UINT8, "numpy": NUMPY}  # what each dataset output reaches it as
SHOWN = {PIL: "PIL images", NUMPY: "numpy arrays", UINT8: "uint8 tensors", FLOAT: "float tensors"}
FLIPS = ("RandomHorizontalFlip", "RandomVerticalFlip")
TO_UINT8 = ("PILToTensor", "ToImage")  # may come before the crop: they keep uint8 values
TAIL = ("ToTensor", "PILToTensor", "ToImage", "ToDtype", "ConvertImageDtype", "Normalize")
TIMM_TAIL = ("MaybeToTensor", "MaybePILToTensor")
TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Transform = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A transform split into what runs native and what runs per sample (module docstring)."""

    head: crops.DecodeCrop | None  # None: whole images are decoded
    flips: Any  # a Compose of the recognised flips, or None
    tail: tuple[Any, ...]  # the recognised per-pixel steps (their effect is `table`)
    table: torch.Tensor | None  # [3, 256] of `dtype`; None: the prefix stays uint8
    dtype: torch.dtype
    prefix: str  # what the native part yields: PIL, NUMPY, UINT8 or FLOAT
    rest: Transform | None  # the steps run per sample on `prefix`; None: all native
    why: str = ""  # why the rest is not native, for describe()
    exact: bool = False

    @property
    def in_place(self) -> bool:
        """Whether whole batches decode into one tensor (a crop head, all native, tensors)."""
        return self.head is not None and self.rest is None and self.prefix in (UINT8, FLOAT)

    @property
    def rest_input(self) -> str | None:
        """What the rest receives: PIL, NUMPY, UINT8 or FLOAT; None when there is no rest."""
        return None if self.rest is None else self.prefix

    def describe(self, *, native: bool, fused: bool) -> str:
        """The one-line path description (dataset.pipeline() and the INFO log line)."""
        if self.head is None:
            text = f"per sample: whole-image decode, then the transform as written ({self.why})"
        else:
            steps = " + ".join(["decode-aware " + _name(self.head), *_flip_words(self.flips),
                                *(_tail_word(step) for step in self.tail)])
            if self.in_place:
                how = "fused" if fused else "table applied after"
                text = f"native: {steps}, {_dtype_name(self.dtype)}"
                text += f", {how}" if self.table is not None else ""
                text += "" if native else " (slot by slot, not the native batch decoder)"
            elif self.rest is None:
                text = f"native head: {steps}, per sample to {SHOWN[self.prefix]}"
            else:
                text = (f"native head: {steps}, then {_names(self.rest)} per sample on "
                        f"{SHOWN[self.prefix]} ({self.why})")
        return text


def plan(transform: Transform | None, *, output: str, exact: bool = False) -> Recipe:
    """The Recipe of `transform` for a dataset whose records reach it as `output` ("pil",
    "tensor" or "numpy")."""
    kind = KINDS[output]
    if exact or transform is None:
        return _as_written(transform, output, "exact=True" if exact else "no transform", exact)
    steps = _steps(transform) or [transform]  # a Compose's steps, or one step
    lead, ramp = _leading(steps, kind)
    kind = UINT8 if lead else kind
    head, taken = _head(steps[lead:], kind)
    if head is None:
        return _as_written(transform, output, _why_not(steps[lead] if len(steps) > lead
                                                       else transform))
    i = lead + taken
    flips = []
    while kind != NUMPY and i < len(steps) and type(steps[i]) in crops.torchvision_types(*FLIPS):
        flips.append(steps[i])
        i += 1
    tail, image = _tail(steps[i:], ramp) if kind != NUMPY else ([], ramp)
    i += len(tail)
    table, dtype, prefix = _table(image, kind)
    rest = _compose(transform, steps[i:]) if i < len(steps) else None
    return Recipe(head, _compose(transform, flips) if flips else None, tuple(tail), table,
                  dtype, prefix, rest, "" if rest is None else _why_rest(steps[i], prefix))


def _leading(steps: Sequence[Any], kind: str) -> tuple[int, Any]:
    """(how many uint8 conversions, ToImage or PILToTensor, come before the crop; the ramp
    image after them)."""
    ramp, lead = _ramp(kind), 0
    while lead < len(steps) and kind != NUMPY and _is(steps[lead], TO_UINT8, TIMM_TAIL[1:]):
        converted = _run(steps[lead], ramp)
        if not _is_uint8_ramp(converted):
            break
        ramp, lead = converted, lead + 1
    return lead, ramp


def _as_written(transform: Transform | None, output: str, why: str,
                exact: bool = False) -> Recipe:
    """Today's path: a fastlmdb crop at the head still runs on the bytes (it is fastlmdb's own
    op, asked for by name); with tensor output, then only flips, batches decode in place."""
    head, rest = crops.split_pipeline(transform, decode_aware=False)
    kind = KINDS[output]
    flips = None
    if head is not None and kind == UINT8 and rest is not None and _only_flips(rest):
        flips, rest = rest, None
    return Recipe(head, flips, (), None, torch.uint8, kind, rest, why, exact=exact)


def _steps(transform: Any) -> list[Any] | None:
    """The steps of a torchvision Compose (timm's create_transform makes those), else None."""
    if type(transform) in crops.torchvision_types("Compose"):
        return list(transform.transforms)
    return None


def _compose(transform: Any, steps: Sequence[Any]) -> Any:
    """`steps` as `transform` was: in its own Compose type, or the one step it was."""
    return type(transform)(list(steps)) if _steps(transform) is not None else steps[0]


def _why_rest(step: Any, prefix: str) -> str:
    if _is(step, TAIL + FLIPS, TIMM_TAIL):
        return f"{type(step).__name__} does not take {SHOWN[prefix]} here"
    return f"{type(step).__name__} is not recognised"


def _why_not(step: Any) -> str:
    if step is None:
        return "no transform"
    if _steps(getattr(step, "transforms", None)) is not None and _steps(step) is None:
        # torchvision's reference presets keep their Compose as `.transforms`.
        return (f"{type(step).__name__} is not a torchvision Compose: pass "
                f"transform=<it>.transforms to run its steps native")
    return f"{type(step).__name__} at the head is not a recognised crop"


def _is(step: Any, torchvision_names: Sequence[str], timm_names: Sequence[str] = ()) -> bool:
    return type(step) in crops.torchvision_types(*torchvision_names) + timm_types(*timm_names)


def timm_types(*names: str) -> tuple[type[Any], ...]:
    """timm's public transform classes of those `names`, when timm is already imported."""
    module = sys.modules.get("timm.data.transforms")
    return tuple(getattr(module, name) for name in names if hasattr(module, name))


def _head(steps: Sequence[Any], kind: str) -> tuple[crops.DecodeCrop | None, int]:
    """(the decode-aware op, steps it replaces) at the head of `steps`, else (None, 0)."""
    if not steps:
        return None, 0
    first = steps[0]
    if isinstance(first, crops.DecodeCrop):
        return first, 1
    if type(first) in timm_types("RandomResizedCropAndInterpolation"):
        if getattr(first.interpolation, "value", None) != "bilinear":
            return None, 0  # timm's "random" interpolation is a list
        return crops.DrawnBy(type(first).get_params, first.size, first.scale, first.ratio), 1
    if type(first) in crops.torchvision_types("CenterCrop"):
        return crops.CenterCrop(tuple(first.size)), 1
    return crops.torchvision_head(list(steps), pil_input=kind == PIL)


def _ramp(kind: str) -> Any:
    """An image holding the values 0..255 in every channel, as the pipeline would get it."""
    values = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # HWC 1x256
    if kind == PIL:
        from PIL import Image

        return Image.fromarray(values, "RGB")
    return torch.from_numpy(values).permute(2, 0, 1) if kind == UINT8 else values


def _run(step: Any, image: Any) -> Any:
    try:
        return step(image)
    except Exception:  # noqa: BLE001 - the step does not take this input: not recognised
        return None


def _is_uint8_ramp(image: Any) -> bool:
    return (isinstance(image, torch.Tensor) and image.dtype == torch.uint8
            and tuple(image.shape) == (3, 1, 256))


def _tail(steps: Sequence[Any], ramp: Any) -> tuple[list[Any], Any]:
    """(the per-pixel steps at the head of `steps` that take the ramp, the ramp after them)."""
    taken: list[Any] = []
    image = ramp
    for step in steps:
        if not _is(step, TAIL, TIMM_TAIL):
            break
        out = _run(step, image)
        if not (isinstance(out, torch.Tensor) and tuple(out.shape) == (3, 1, 256)
                and out.dtype in (torch.uint8, *TABLE_DTYPES)):
            break
        taken.append(step)
        image = out
    return taken, image


def _table(image: Any, kind: str) -> tuple[torch.Tensor | None, torch.dtype, str]:
    """(table or None, dtype, prefix kind) of the ramp after the tail."""
    if not isinstance(image, torch.Tensor):
        return None, torch.uint8, kind  # no conversion: the prefix is what the records are
    if image.dtype == torch.uint8:
        return None, torch.uint8, UINT8
    table = image.as_subclass(torch.Tensor).reshape(3, 256).contiguous()
    return table, image.dtype, FLOAT


def _only_flips(transform: Any) -> bool:
    steps = _steps(transform) or [transform]
    return all(type(step) in crops.torchvision_types(*FLIPS) for step in steps)


def _name(head: crops.DecodeCrop) -> str:
    size = head.size[0] if head.size[0] == head.size[1] else head.size
    if isinstance(head, crops.ResizeCenterCrop):
        return f"Resize({head.resize}) + CenterCrop({size})"
    if isinstance(head, crops.DrawnBy):
        return f"RandomResizedCropAndInterpolation({size}) (its own draws)"
    return f"{type(head).__name__}({size})"


def _flip_words(flips: Any) -> list[str]:
    return [] if flips is None else [
        "flip" if type(step).__name__ == "RandomHorizontalFlip" else "vertical flip"
        for step in (_steps(flips) or [flips])]


def _tail_word(step: Any) -> str:
    return "normalise" if type(step).__name__ == "Normalize" else type(step).__name__


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _names(transform: Any) -> str:
    return ", ".join(type(step).__name__ for step in (_steps(transform) or [transform]))
