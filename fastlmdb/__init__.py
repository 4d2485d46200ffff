"""fastlmdb: ImageNet-scale image loading for PyTorch from one LMDB file per split."""

__version__ = "0.1.0"

from fastlmdb.errors import (  # noqa: E402
    ConversionError,
    DatabaseError,
    FastLMDBError,
    IncompleteDatabaseError,
)

__all__ = [
    "ConversionError",
    "DatabaseError",
    "EpochSampler",
    "FastLMDBError",
    "IncompleteDatabaseError",
    "LMDBDataset",
    "LMDBIterDataset",
    "RandomResizedCrop",
    "ResizeCenterCrop",
    "__version__",
    "collate",
]


def __getattr__(name):
    # The datasets import torch; keep `import fastlmdb` (and the converter) torch-free.
    if name in ("LMDBDataset", "LMDBIterDataset"):
        from fastlmdb import dataset

        return getattr(dataset, name)
    if name == "EpochSampler":
        from fastlmdb import sampler

        return sampler.EpochSampler
    if name in ("RandomResizedCrop", "ResizeCenterCrop"):
        from fastlmdb import crops

        return getattr(crops, name)
    if name == "collate":
        from fastlmdb import batch

        return batch.collate
    raise AttributeError(f"module 'fastlmdb' has no attribute {name!r}")
