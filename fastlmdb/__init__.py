"""fastlmdb: ImageNet-scale image loading for PyTorch from one LMDB file per split.

The layout is the architecture: ``core`` (errors, the on-disk format, LMDB access, JPEG
decoding, the ImageFolder scan) under ``converter`` (making databases), ``loading`` (the
PyTorch side, the only part that imports torch), ``tools`` (verify, stage, merge) and ``cli``.
"""

__version__ = "0.1.0"

from fastlmdb.core.errors import (  # noqa: E402
    ConversionError,
    DatabaseError,
    DecodeError,
    FastLMDBError,
    ImageError,
    IncompleteDatabaseError,
)

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
    "RandomResizedCrop",
    "ResizeCenterCrop",
    "__version__",
    "collate",
]

# The names that import torch, and where they live: `import fastlmdb` (and the converter)
# stays torch-free.
_LAZY = {
    "LMDBDataset": "fastlmdb.loading.dataset",
    "LMDBIterDataset": "fastlmdb.loading.dataset",
    "EpochSampler": "fastlmdb.loading.sampler",
    "RandomResizedCrop": "fastlmdb.loading.crops",
    "ResizeCenterCrop": "fastlmdb.loading.crops",
    "collate": "fastlmdb.loading.batch",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastlmdb' has no attribute {name!r}")
