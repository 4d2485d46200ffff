"""What does a float recipe's tail cost: the uint8 batch, then normalised by torch, against the
tail fused into the native batch decoder's store (a 3 x 256 table, fastlmdb.loading.tail)?

One process, one thread, records in memory: the sample JPEGs re-encoded at quality 90 (as
FFCV stores them), RandomResizedCrop(224) boxes and horizontal flips drawn beforehand, batches
of 64 into one reused output tensor:

- uint8 `_jpegcrop.decode_batch` (the baseline: what normalising on the GPU costs here);
- the same, then ``x.float().sub_(mean).div_(std)`` (three passes over the float batch);
- fused: `decode_batch(..., table=)` into float32, float16, bfloat16.

`tail us/img` is a row's CPU time per image minus the uint8 row's: the tail's own cost.

    .venv/bin/python bench/tail.py               # the 1,000 sample JPEGs, ~2 min
    .venv/bin/python bench/tail.py --quick
"""

import os

import harness

BASELINE = "uint8 decode_batch"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main(argv=None):
    p = harness.parser(__doc__.split("\n")[0], repeats=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--quality", type=int, default=90, help="re-encode at this JPEG quality")
    p.add_argument("--work-dir", help="where the re-encoded JPEGs go (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    args = harness.parse(p, argv, quick_limit=128)
    import torch

    torch.set_num_threads(1)
    with harness.work_dir(args) as work:
        sources = harness.sample_files(args.images_dir, args.limit)
        files = harness.prepared(sources, os.path.join(work, "prepared"), args.quality)
        values = [harness.read_bytes(path) for path in files]
        info = [*harness.machine_info(), f"input: {len(values)} sample JPEGs re-encoded at "
                f"quality {args.quality}, {sum(map(len, values)) / 1e6:.0f} MB; batch "
                f"{args.batch_size}, {args.size} x {args.size} out, 1 thread"]
        results = harness.measure(_candidates(values, args), repeats=args.repeats,
                                  warmup=args.warmup)
    base = next(r for r in results if r.candidate.label == BASELINE).per_cpu_second
    columns = [harness.Column("CPU us/img", lambda r: f"{1e6 / r.per_cpu_second:,.0f}"),
               harness.Column("x uint8 (CPU)", lambda r: f"{base / r.per_cpu_second:.2f}x"),
               harness.Column("tail us/img",
                              lambda r: f"{1e6 * (1 / r.per_cpu_second - 1 / base):,.0f}")]
    harness.report(harness.result_name(args, "tail"), results, baseline=BASELINE,
                   title="The float tail: torch after the uint8 batch vs fused into its store",
                   info=info, columns=columns,
                   notes=["x uint8 (CPU): CPU time per image over the uint8 row's (target: "
                          "fused float32 within ~1.1x).",
                          "tail us/img: CPU time per image minus the uint8 row's."])


def _candidates(values, args):
    import numpy as np
    import simplejpeg
    import torch

    import fastlmdb
    from fastlmdb.loading import crops, tail

    size = (args.size, args.size)
    torch.manual_seed(0)
    crop = fastlmdb.RandomResizedCrop(size)
    boxes = np.array([crop.box(*simplejpeg.decode_jpeg_header(v)[:2]) for v in values],
                     np.int64)
    flips = (np.arange(len(values)) % 2).astype(np.uint8)
    step = args.batch_size
    chunks = [(values[i:i + step], boxes[i:i + step], flips[i:i + step])
              for i in range(0, len(values), step)]
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    base = ((torch.arange(256, dtype=torch.float32) / 255).expand(3, 256)
            - torch.tensor(MEAN).view(3, 1)) / torch.tensor(STD).view(3, 1)

    def run(dtype, then=None):
        out = torch.empty((step, 3, *size), dtype=dtype)
        table = None if dtype == torch.uint8 else tail.raw(base.to(dtype).contiguous())

        def once():
            for batch_values, batch_boxes, batch_flips in chunks:
                images = out[:len(batch_values)]
                crops._jpegcrop.decode_batch(batch_values, batch_boxes, batch_flips,
                                             tail.raw(images), *size, table=table)
                if then is not None:
                    then(images)
            return len(values)
        return once

    return [harness.Candidate(BASELINE, run(torch.uint8)),
            harness.Candidate("uint8, then x.float().sub_(mean).div_(std)",
                              run(torch.uint8, lambda x: x.float().sub_(mean).div_(std))),
            harness.Candidate("fused float32", run(torch.float32)),
            harness.Candidate("fused float16", run(torch.float16)),
            harness.Candidate("fused bfloat16", run(torch.bfloat16))]


if __name__ == "__main__":
    main()
