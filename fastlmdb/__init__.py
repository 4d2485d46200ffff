"""fastlmdb: ImageNet-scale image loading for PyTorch from one LMDB file per split.

The layout is the architecture, each floor importing only from those below it:
``core`` (errors, the on-disk format, the one module that opens LMDB, the catalog, JPEG
decoding, file helpers, fsspec access); ``sources`` (the converter's inputs, one module per
kind); ``converter`` (making databases) and ``loading`` (the PyTorch side, the only part that
imports torch); ``tools`` (verify, stage, merge); ``cli``. ``testing`` makes sample trees for
tests, benchmarks and the demo.
"""

from typing import TYPE_CHECKING, Any

from fastlmdb.version import __version__  # noqa: E402
from fastlmdb.core.errors import (  # noqa: E402
    ConversionError,
    DatabaseError,
    DecodeError,
    FastLMDBError,
    ImageError,
    IncompleteDatabaseError,
)

if TYPE_CHECKING:  # what the lazy names are, for type checkers
    from fastlmdb.converter.conversion import Options, Stats, convert, convert_dataset
    from fastlmdb.loading.batch import collate
    from fastlmdb.loading.crops import RandomResizedCrop, ResizeCenterCrop
    from fastlmdb.loading.dataset import LMDBDataset, LMDBIterDataset
    from fastlmdb.loading.loader import loader
    from fastlmdb.loading.sampler import EpochSampler
    from fastlmdb.tools.merge import merge
    from fastlmdb.tools.stage import stage
    from fastlmdb.tools.verify import Report, verify

__all__ = [
    "ConversionError",
    "DatabaseError",
    "DecodeError",
    "EpochSampler",
    "FastLMDBError",
    "ImageError",
    "IncompleteDatabaseError",
    "LMDBDataset",
    "LMDBIterDataset",
    "Options",
    "RandomResizedCrop",
    "Report",
    "ResizeCenterCrop",
    "Stats",
    "__version__",
    "collate",
    "convert",
    "convert_dataset",
    "loader",
    "merge",
    "stage",
    "verify",
]

# Where the other names live, imported on first use: `import fastlmdb` stays light, and
# torch-free (only the loading names import torch).
_LAZY = {
    "convert": "fastlmdb.converter.conversion",
    "convert_dataset": "fastlmdb.converter.conversion",
    "Options": "fastlmdb.converter.conversion",
    "Stats": "fastlmdb.converter.conversion",
    "verify": "fastlmdb.tools.verify",
    "Report": "fastlmdb.tools.verify",
    "merge": "fastlmdb.tools.merge",
    "stage": "fastlmdb.tools.stage",
    "LMDBDataset": "fastlmdb.loading.dataset",
    "LMDBIterDataset": "fastlmdb.loading.dataset",
    "EpochSampler": "fastlmdb.loading.sampler",
    "loader": "fastlmdb.loading.loader",
    "RandomResizedCrop": "fastlmdb.loading.crops",
    "ResizeCenterCrop": "fastlmdb.loading.crops",
    "collate": "fastlmdb.loading.batch",
}


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastlmdb' has no attribute {name!r}")
