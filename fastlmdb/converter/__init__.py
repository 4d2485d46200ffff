"""The converter: an ImageFolder split into one database (or shards). Per file: prepare.py;
the processes: pipeline.py (producers, one writer.py process); shards as tasks: shards.py."""

from fastlmdb.converter.conversion import (Options, Stats, convert, convert_dataset,
                                           default_procs)

__all__ = ["Options", "Stats", "convert", "convert_dataset", "default_procs"]
