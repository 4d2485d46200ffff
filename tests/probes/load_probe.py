"""Load every record of a database, for test_hostile_files.py:
python -m probes.load_probe ROOT SPLIT.

Runs in a process of its own, so that a decoder crashing on a hostile record fails the test
with its exit status instead of killing pytest. Prints JSON: for each way of loading (every
usable decoder, and the decode-aware crop) the records loaded and those skipped
(``on_error="skip"``), and the problems and warnings `fastlmdb verify` finds.
"""

import json
import sys

from fastlmdb import LMDBIterDataset, ResizeCenterCrop
from fastlmdb.core import jpeg
from fastlmdb.tools import verify
from fastlmdb.core import format as fmt


def load(root, split, **kwargs):
    dataset = LMDBIterDataset(root, split, output="numpy", on_error="skip", **kwargs)
    loaded = sum(1 for _ in dataset)
    return [loaded, dataset.errors]


def usable(backend):
    try:
        jpeg.decoder(backend)
    except ImportError:
        return False
    return True


def main(root, split):
    ways = {backend: load(root, split, decoder=backend)
            for backend in jpeg.DECODERS if usable(backend)}
    ways["crop"] = load(root, split, transform=ResizeCenterCrop(48, 32))
    report = verify.verify(fmt.db_path(root, split))
    print(json.dumps({"ways": ways, "verify": report.problems,
                      "verify_warnings": report.warnings}))


if __name__ == "__main__":
    main(*sys.argv[1:])
