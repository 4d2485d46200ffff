"""fastlmdb against FFCV and NVIDIA DALI's CPU pipeline: float32 normalised batches of a random
resized crop to 224 + horizontal flip, batch 64, on the same pixels.

Every loader reads JPEGs of the same pixels: the sample tree (or its large-photo mosaics,
`--mosaic 3`), re-encoded at quality 90 by PIL (`--reencode`, default 90 here), and with
`--max-size 512` first shrunk to 512 pixels on the longer side (FFCV's recommended
max_resolution=512, jpeg_quality=90). Rows:

- ImageFolder + PIL, the torchvision v1 recipe (RandomResizedCrop(224), RandomHorizontalFlip,
  ToTensor, Normalize), 2 DataLoader workers: the baseline.
- LMDBDataset with the same recipe, unchanged (the one-line swap; default arguments), 2 workers.
- FFCV 1.0: RandomResizedCropRGBImageDecoder((224, 224)), RandomHorizontalFlip,
  NormalizeImage(float32), ToTensor, ToTorchImage; 2 threads (its workers).
- DALI's CPU pipeline (device_id=None): readers.file, decoders.image_random_crop (a
  libjpeg-turbo region decode), resize to 224 x 224, crop_mirror_normalize to float32 CHW;
  2 threads.

FFCV and DALI rows appear where `import ffcv` / `import nvidia.dali` work (optional venvs,
bench/README.md). Every loader's threads or worker processes are counted in img/CPU-s.

    .venv/bin/python bench/rivals.py --max-size 512
    .venv/bin/python bench/rivals.py --mosaic 3 --max-size 512
    .venv/bin/python bench/rivals.py --quick
"""

import os

import harness
import loaders

BASELINE = "ImageFolder + PIL, v1 recipe"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WORKERS = 2


def main(argv=None):
    p = harness.parser(__doc__.split("\n")[0], repeats=3)
    harness.add_tree_args(p, replicate=1)
    p.set_defaults(reencode=90)
    p.add_argument("--max-size", type=int, default=0, metavar="N",
                   help="shrink every photo to N pixels on its longer side first (quality 90), "
                        "for every loader (default 0: full resolution)")
    p.add_argument("--batch-size", type=int, default=64)
    args = harness.parse(p, argv, quick_limit=128)
    import torch

    torch.set_num_threads(1)
    with harness.work_dir(args) as work:
        src = os.path.join(work, "src")
        files = harness.tree_from_args(args, src)
        if args.max_size:
            _shrink(files, args.max_size)
        root = loaders._convert(work, "jpeg")
        info = [*harness.machine_info(work), f"input: {len(files)} images, "
                f"{harness.total_bytes(files) / 1e6:.0f} MB of JPEG files, "
                f"{_mean_pixels(files) / 1e6:.2f} Mpixel on average"]
        candidates = [_torch_row(BASELINE, _image_folder(src), args.batch_size),
                      _torch_row("LMDBDataset, v1 recipe unchanged",
                                 _lmdb_dataset(root), args.batch_size)]
        ffcv, ffcv_note = _ffcv_rows(work, src, args.batch_size)
        dali, dali_note = _dali_rows(src, args.batch_size)
        results = harness.measure(candidates + ffcv, repeats=args.repeats, warmup=args.warmup)
        # DALI alone, after the others: its threads refill its prefetch queue after an epoch
        # ends, work that belongs to its next run, not to another row's.
        results += harness.measure(dali, repeats=args.repeats, warmup=args.warmup)
        columns = [harness.Column("CPU ms/img", lambda r: f"{1e3 / r.per_cpu_second:.2f}")]
        size = f"{args.max_size} max" if args.max_size else "full resolution"
        tree = f"{args.mosaic}x{args.mosaic} mosaics" if args.mosaic else "ImageNet sample"
        harness.report(harness.result_name(args, "rivals"), results, baseline=BASELINE,
                       title=f"float32 normalised batches of {args.batch_size}, random resized "
                             f"crop 224 + flip, {tree}, {size}, quality {args.reencode}",
                       info=info, columns=columns,
                       notes=["Every row reads JPEGs of the same pixels (FFCV re-encodes them "
                              "into its .beton at quality 90). Warm page cache; workers and "
                              "loaders made once and kept over the runs, as in training.",
                              ffcv_note, dali_note])


def _shrink(files, max_size):
    """Each file shrunk in place to `max_size` on its longer side (quality 90), as
    `fastlmdb convert --max-size` and FFCV's max_resolution do."""
    from PIL import Image

    for path in files:
        with Image.open(path) as image:
            if max(image.size) <= max_size:
                continue
            scale = max_size / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            small = image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
        small.save(path, "JPEG", quality=90)


def _mean_pixels(files):
    from PIL import Image

    total = 0
    for path in files:
        with Image.open(path) as image:
            total += image.width * image.height
    return total / max(1, len(files))


def _v1_recipe():
    from torchvision import transforms as v1

    return v1.Compose([v1.RandomResizedCrop(224), v1.RandomHorizontalFlip(), v1.ToTensor(),
                       v1.Normalize(MEAN, STD)])


def _image_folder(src):
    from torchvision.datasets import ImageFolder

    return ImageFolder(os.path.join(src, "train"), _v1_recipe())


def _lmdb_dataset(root):
    from fastlmdb import LMDBDataset

    return LMDBDataset(root, "train", _v1_recipe())


def _torch_row(label, dataset, batch_size):
    return harness.Candidate(label, loaders._epoch(dataset, WORKERS, batch_size, persistent=True))


# --- FFCV ---------------------------------------------------------------------------------

def _ffcv_rows(work, src, batch_size):
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return [], ("FFCV: not importable here, no row (it builds from PyPI given `apt-get "
                    "install pkg-config libturbojpeg0-dev libopencv-dev`, numpy<2.3).")
    path = _ffcv_write(work, src)
    loader = _ffcv_loader(path, batch_size)

    def run():
        return sum(len(labels) for _, labels in loader)
    return ([harness.Candidate("FFCV, float32 normalised (NormalizeImage)", run)],
            "FFCV: RandomResizedCropRGBImageDecoder((224, 224)), RandomHorizontalFlip, "
            "NormalizeImage(mean, std, float32) (its fused numba pass), ToTensor, ToTorchImage; "
            f"{WORKERS} threads, OrderOption.RANDOM; .beton written with "
            "RGBImageField(write_mode='jpg', jpeg_quality=90).")


def _ffcv_write(work, src):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    path = os.path.join(work, "train.beton")
    field = RGBImageField(write_mode="jpg", jpeg_quality=90)
    DatasetWriter(path, {"image": field, "label": IntField()}, num_workers=WORKERS
                  ).from_indexed_dataset(ImageFolder(os.path.join(src, "train")))
    return path


def _ffcv_loader(path, batch_size):
    import numpy as np
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToTensor, ToTorchImage

    mean, std = np.array(MEAN) * 255, np.array(STD) * 255
    pipelines = {"image": [RandomResizedCropRGBImageDecoder((224, 224)), RandomHorizontalFlip(),
                           NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()],
                 "label": [IntDecoder(), ToTensor()]}
    return Loader(path, batch_size=batch_size, num_workers=WORKERS, order=OrderOption.RANDOM,
                  pipelines=pipelines)


# --- NVIDIA DALI --------------------------------------------------------------------------

def _dali_rows(src, batch_size):
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return [], ("DALI: not importable here, no row (`pip install nvidia-dali-cuda120` in "
                    "its own venv; the CPU pipeline needs no GPU).")
    iterator = _dali_iterator(os.path.join(src, "train"), batch_size)

    def run():
        return sum(len(batch[0]["label"]) for batch in iterator)
    return ([harness.Candidate("DALI CPU pipeline, float32 normalised", run)],
            "DALI: readers.file(random_shuffle=True), decoders.image_random_crop (area "
            "0.08-1, aspect 3/4-4/3), resize to 224 x 224 (linear, antialiased), "
            "crop_mirror_normalize(float32, CHW, mirror=coin_flip); device_id=None, "
            f"num_threads={WORKERS}, batches as CPU torch tensors (DALIGenericIterator), "
            "asynchronous and pipelined (its defaults). Its runs come after the other rows', "
            "not interleaved: its threads refill its prefetch queue after each epoch, work "
            "its next run uses, which would otherwise be charged to another row.")


def _dali_iterator(folder, batch_size):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    @pipeline_def(batch_size=batch_size, num_threads=WORKERS, device_id=None, seed=0)
    def pipe():
        jpegs, labels = fn.readers.file(file_root=folder, random_shuffle=True, name="reader")
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                               random_area=[0.08, 1.0],
                                               random_aspect_ratio=[3 / 4, 4 / 3])
        images = fn.resize(images, resize_x=224, resize_y=224, interp_type=types.INTERP_LINEAR)
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", mirror=fn.random.coin_flip(),
            mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD])
        return images, labels

    built = pipe()
    built.build()
    return DALIGenericIterator(built, ["image", "label"], reader_name="reader",
                               last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)


if __name__ == "__main__":
    main()
