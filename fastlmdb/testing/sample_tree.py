"""A small ImageNet-like tree of real JPEGs, generated, for demos, tests and benchmarks.

Images are smooth colour fields with edges and noise (so they compress like photos, not like
flat colour), ImageNet-like sizes around 500x375 with varied aspect ratios, quality 90.
"""

import os

import numpy as np

SPLITS = {"train": 8, "val": 2}  # images per class


def make_tree(root, *, classes=10, per_class=None, size=(375, 500), seed=0):
    """Write root/<split>/<class>/<image>.JPEG; returns root."""
    import simplejpeg

    rng = np.random.default_rng(seed)
    for split, count in (per_class or SPLITS).items():
        for c in range(classes):
            folder = os.path.join(root, split, f"n{c:08d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = synthetic_photo(rng, *_jitter(rng, size))
                with open(os.path.join(folder, f"{split}_{c}_{i}.JPEG"), "wb") as file:
                    file.write(simplejpeg.encode_jpeg(pixels, quality=90))
    return root


def _jitter(rng, size):
    height, width = size
    scale = rng.uniform(0.6, 1.3)
    aspect = rng.uniform(0.75, 1.33)
    return max(16, int(height * scale)), max(16, int(width * scale * aspect))


def synthetic_photo(rng, height, width):
    """An HxWx3 uint8 image with gradients, a few shapes and sensor-like noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-0.4, 0.4, (2, 3))
    image = base + y[..., None] * slope[0] + x[..., None] * slope[1]
    for _ in range(4):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(0.05, 0.3) * min(height, width)
        mask = (y - cy) ** 2 + (x - cx) ** 2 < radius ** 2
        image[mask] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)
