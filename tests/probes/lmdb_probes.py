"""Picklable transforms for the DataLoader tests in test_dataset.py.

Kept out of the test module so that spawned / forkserver workers import only numpy and zlib
to unpickle them, not pytest and torchvision.
"""

import zlib

import numpy as np


def checksum(image):
    """CRC32 of an image's RGB pixels (PIL image or uint8 HxWx3 array): identifies a sample."""
    pixels = np.ascontiguousarray(np.asarray(image), dtype=np.uint8)
    assert pixels.ndim == 3 and pixels.shape[2] == 3, pixels.shape
    return zlib.crc32(pixels.tobytes())


def plus_hundred(label):
    return label + 100


class EnvOwner:
    """Transform: (checksum, this process's pid, pid of the process that opened the LMDB
    environment this process reads `path` through)."""

    def __init__(self, path):
        self.path = path

    def __call__(self, image):
        import os

        from fastlmdb.core import store

        return checksum(image), os.getpid(), store.opened_by(self.path)


def pooled_and_checksum(image):
    """(mean of each RGB channel, float32; checksum): a tiny model's input and the sample's
    identity, for the training-client tests (test_clients.py)."""
    pixels = np.ascontiguousarray(np.asarray(image), dtype=np.uint8)
    return pixels.reshape(-1, 3).mean(0).astype(np.float32), checksum(pixels)
