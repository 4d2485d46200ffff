"""The one-line swap, recipe by recipe: ImageFolder(...) -> LMDBDataset(...), the transform
unchanged (fastlmdb.cli.demo.recipes: v1 train, v2 train float, v2 train uint8, val), default
arguments, DataLoader epochs with `--workers` workers; with `--exact`, `exact=True` beside them
(today's path before recipes: it must not be slower). Per CPU-second of the whole process tree and wall.

    .venv/bin/python bench/recipes.py --repeats 3
    .venv/bin/python bench/recipes.py --quick
"""

import os

import harness

BASELINE = "ImageFolder + PIL"


def main(argv=None):
    p = harness.parser(__doc__.split("\n")[0], repeats=3)
    harness.add_tree_args(p, replicate=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--recipe", nargs="+", help="only these recipes (names as in the table)")
    p.add_argument("--exact", action="store_true", help="add LMDBDataset(exact=True) rows")
    args = harness.parse(p, argv, quick_limit=128)
    import loaders

    with harness.work_dir(args) as work:
        files = harness.tree_from_args(args, os.path.join(work, "src"))
        root = loaders._convert(work, "jpeg")
        candidates = _candidates(os.path.join(work, "src", "train"), root, args)
        results = harness.measure(candidates, repeats=args.repeats, warmup=args.warmup)
        info = [*harness.machine_info(work), f"input: {len(files)} images, "
                f"{harness.total_bytes(files) / 1e6:.0f} MB of JPEG files",
                f"batch {args.batch_size}, {args.workers} workers, shuffled"]
        harness.report(harness.result_name(args, "recipes"), results, baseline=BASELINE,
                       title="The one-line swap, recipe by recipe", info=info,
                       notes=_paths(root, args))


def _candidates(folder, root, args):
    import torchvision.datasets

    from fastlmdb import LMDBDataset
    from fastlmdb.cli.demo import recipes

    rows = []
    for recipe, transform in recipes().items():
        if args.recipe and recipe not in args.recipe:
            continue
        makers = [(BASELINE, lambda t=transform: torchvision.datasets.ImageFolder(folder, t)),
                  ("LMDBDataset", lambda t=transform: LMDBDataset(root, "train", t))]
        if args.exact:
            makers.append(("LMDBDataset exact=True",
                           lambda t=transform: LMDBDataset(root, "train", t, exact=True)))
        for label, make in makers:
            rows.append(harness.Candidate(label, _epoch(make(), args), group=recipe))
    return rows


def _epoch(dataset, args):
    import torch

    def run():
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size,
                                             shuffle=True, num_workers=args.workers)
        images = sum(len(labels) for _, labels in loader)
        del loader  # workers exit, so their CPU time is counted
        return images

    return run


def _paths(root, args):
    from fastlmdb import LMDBDataset
    from fastlmdb.cli.demo import recipes

    return [f"{name}: {LMDBDataset(root, 'train', transform).pipeline()}"
            for name, transform in recipes().items()
            if not args.recipe or name in args.recipe]


if __name__ == "__main__":
    main()
