"""How fast does each JPEG decoder turn the real sample JPEGs, held in memory, into RGB pixels?

One process, one thread (torch.set_num_threads(1)): images/s and megapixels/s per core, for a
full-size decode and for libjpeg-turbo's reduced-size decodes (1/2, 1/4: the IDCT outputs fewer
pixels; entropy decoding is the same). A decoder that is not installed is a note, not a row.

    .venv/bin/python bench/decoders.py            # all 1,000 sample images, 5 repeats
    .venv/bin/python bench/decoders.py --quick    # seconds
"""

import io

import harness

BASELINE = "PIL"
OUTPUT_SAMPLE = 20  # images decoded once per row to check the size it decodes at


def main(argv=None):
    p = harness.parser(__doc__.split("\n")[0], repeats=5)
    p.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4],
                   help="reduction factors to decode at: 1 (full), 2, 4, 8 (default 1 2 4)")
    args = harness.parse(p, argv, quick_limit=40)
    import torch

    torch.set_num_threads(1)
    paths = harness.sample_files(args.images_dir, args.limit)
    images = [harness.read_bytes(path) for path in paths]
    shapes = [_shape(data) for data in images]
    candidates, notes = _candidates(images, shapes, args.scales)
    results = harness.measure(candidates, repeats=args.repeats, warmup=args.warmup)
    harness.report(
        harness.result_name(args, "decoders"), results, baseline=BASELINE,
        title="JPEG decode, one core, real ImageNet JPEGs in memory",
        info=[*harness.machine_info(), _describe(images, shapes)],
        columns=_columns(), notes=notes)


def _shape(data):
    import simplejpeg

    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    return height, width


def _describe(images, shapes):
    pixels = sum(h * w for h, w in shapes) / len(shapes)
    return (f"input: {len(images)} JPEGs, mean {sum(map(len, images)) / len(images) / 1e3:.0f} KB "
            f"and {pixels / 1e6:.3f} MP each")


def _columns():
    return [
        harness.Column("source MP/CPU-s",
                       lambda r: f"{r.per_cpu_second * r.candidate.info['mp']:.1f}"),
        harness.Column("output/source", lambda r: f"{r.candidate.info['out']:.2f}"),
    ]


# --- decoders: make(scale) -> decode(data, shape), or None when that scale is not offered ---

def _pil(scale):
    from PIL import Image

    if scale != 1:
        return None

    def decode(data, shape):
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")  # ImageFolder's loader
    return decode


def _pil_draft(scale):
    from PIL import Image

    if scale == 1:
        return None

    def decode(data, shape):
        with Image.open(io.BytesIO(data)) as image:
            # Ask for at most 1/scale of each side, rounded down: rounding up makes draft()
            # pick the next larger scale.
            image.draft("RGB", (shape[1] // scale, shape[0] // scale))
            return image.convert("RGB")
    return decode


def _simplejpeg(scale):
    import simplejpeg

    def decode(data, shape):
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=shape[0] // scale,
                                      min_width=shape[1] // scale)
    return decode


def _turbojpeg(scale):
    import turbojpeg

    jpeg = turbojpeg.TurboJPEG()
    factor = None if scale == 1 else (1, scale)

    def decode(data, shape):
        return jpeg.decode(data, pixel_format=turbojpeg.TJPF_RGB, scaling_factor=factor)
    return decode


def _opencv(scale):
    import cv2
    import numpy as np

    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[scale] | cv2.IMREAD_IGNORE_ORIENTATION

    def decode(data, shape):
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # the others give RGB: same work
    return decode


def _torchvision(scale):
    import warnings

    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if scale != 1:
        return None
    # Zero-copy view of the bytes; decode_jpeg only reads it.
    warnings.filterwarnings("ignore", message="The given buffer is not writable")

    def decode(data, shape):
        return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
    return decode


DECODERS = {  # label: (make, module it needs, how to install it)
    "PIL": (_pil, "PIL", "pip install Pillow"),
    "PIL + draft": (_pil_draft, "PIL", "pip install Pillow"),
    "simplejpeg": (_simplejpeg, "simplejpeg", "pip install simplejpeg"),
    "PyTurboJPEG": (_turbojpeg, "turbojpeg",
                    "apt-get install libturbojpeg0 && pip install 'PyTurboJPEG<2'"),
    "OpenCV (BGR->RGB)": (_opencv, "cv2", "pip install opencv-python-headless"),
    "torchvision.io.decode_jpeg": (_torchvision, "torchvision", "pip install torchvision"),
}


def _candidates(images, shapes, scales):
    """Rows grouped by scale, then decoder; notes for the decoders that are not here."""
    makers, notes = _usable()
    candidates = []
    mp = sum(h * w for h, w in shapes) / len(shapes) / 1e6
    for scale in scales:
        for label, make in makers.items():
            decode = make(scale)
            if decode is not None:
                info = {"mp": mp, "out": _output_fraction(decode, images, shapes)}
                candidates.append(harness.Candidate(
                    label, _runner(decode, images, shapes), group=_group(scale), info=info))
    candidates += _crop_rows(images, shapes, mp)
    notes.append("RandomResizedCrop(224) box: the decode step of a training sample, boxes drawn "
                 "once per image (seed 0) as torchvision draws them; `full + crop` decodes the "
                 "whole image then slices the box; `fastlmdb region` decodes only the box's rows "
                 "and iMCU columns at the coarsest scale covering 224x224 (fastlmdb._jpegcrop), "
                 "`fastlmdb without extension` the whole image at that scale.")
    notes.append("source MP/CPU-s: megapixels of the JPEGs (not of the reduced output) "
                 "decoded per CPU-second. output/source: pixels decoded over pixels in the "
                 "JPEG (on the first images), which shows that a reduced decode did reduce. "
                 "PIL has no reduced decode without draft(); torchvision.io.decode_jpeg has "
                 "none at all.")
    return candidates, notes


def _crop_rows(images, shapes, mp):
    import simplejpeg
    import torch

    from fastlmdb.core import jpeg
    from fastlmdb.loading import crops

    torch.manual_seed(0)
    op = crops.RandomResizedCrop(224)
    boxes = [op.box(h, w) for h, w in shapes]

    def full_then_crop(data, shape, box):
        top, left, h, w = box
        return simplejpeg.decode_jpeg(data, colorspace="RGB")[top:top + h, left:left + w]

    def region(data, shape, box):
        return crops.decode_box(data, box, (224, 224), *shape, jpeg.decode_simplejpeg)

    def no_extension(data, shape, box):
        saved, crops._jpegcrop = crops._jpegcrop, None
        try:
            return region(data, shape, box)
        finally:
            crops._jpegcrop = saved

    rows = [("simplejpeg full + crop", full_then_crop), ("fastlmdb region", region),
            ("fastlmdb without extension", no_extension)]
    triples = list(zip(images, shapes, boxes))

    def runner(decode):
        def run():
            for data, shape, box in triples:
                decode(data, shape, box)
            return len(triples)
        return run
    return [harness.Candidate(label, runner(decode), group="RandomResizedCrop(224) box",
                              info={"mp": mp, "out": float("nan")}) for label, decode in rows]


def _usable():
    """{label: make} of the decoders that work here, and a note for each that does not."""
    makers, notes = {}, []
    for label, (make, module, install) in DECODERS.items():
        if harness.module_version(module) is None:
            notes.append(f"{label}: skipped, `{module}` does not import here ({install})")
            continue
        try:
            make(1)
        except Exception as exc:  # noqa: BLE001 - e.g. libturbojpeg missing
            notes.append(f"{label}: skipped, not usable here ({exc}; {install})")
            continue
        makers[label] = make
    return makers, notes


def _group(scale):
    return "full size" if scale == 1 else f"1/{scale} scale"


def _output_fraction(decode, images, shapes):
    pairs = list(zip(images, shapes))[:OUTPUT_SAMPLE]
    decoded = sum(_pixel_count(decode(data, shape)) for data, shape in pairs)
    return decoded / sum(h * w for _, (h, w) in pairs)


def _pixel_count(out):
    """Pixels of a PIL image, an HxWx3 array or a 3xHxW tensor."""
    if hasattr(out, "width"):
        return out.width * out.height
    height, width = out.shape[-2:] if out.shape[0] == 3 else out.shape[:2]
    return height * width


def _runner(decode, images, shapes):
    pairs = list(zip(images, shapes))

    def run():
        for data, shape in pairs:
            decode(data, shape)
        return len(pairs)
    return run


if __name__ == "__main__":
    main()
