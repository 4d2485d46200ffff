"""Which files `--from-archive` names: a file, a folder of shards, a glob or a brace pattern
(``train-{0000..1023}.tar``, ``{train,extra}-*.parquet``), always sorted by name, so the
source order (and with it each image's index) does not depend on the filesystem."""

import glob
import os
import re

from fastlmdb.core.errors import ConversionError

SHARD_SUFFIXES = (".parquet", ".tar", ".tar.gz", ".tgz")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand(pattern):
    """The files `pattern` names, sorted; ConversionError if none."""
    pattern = os.fspath(pattern)
    if os.path.isfile(pattern):
        return [os.path.abspath(pattern)]
    if os.path.isdir(pattern):
        found = [entry.path for entry in os.scandir(pattern)
                 if entry.is_file() and entry.name.lower().endswith(SHARD_SUFFIXES)]
        where = f"the folder {pattern} holds no {', '.join(SHARD_SUFFIXES)} files"
    else:
        found = {path for each in braces(pattern) for path in glob.glob(each)
                 if os.path.isfile(path)}
        where = (f"no file matches {pattern!r} (quote a pattern so that the shell leaves it "
                 "to fastlmdb)")
    if not found:
        raise ConversionError(f"--from-archive: {where}")
    return sorted(os.path.abspath(path) for path in found)


def is_pattern(text):
    return bool(set(os.fspath(text)) & set("*?[{"))


def braces(pattern):
    """Every expansion of the first ``{a..b}`` range or ``{x,y}`` choice, recursively."""
    for regex, options in ((_RANGE, _range), (_CHOICE, lambda m: m.group(1).split(","))):
        match = regex.search(pattern)
        if match:
            return [expanded for option in options(match)
                    for expanded in braces(pattern[:match.start()] + option
                                           + pattern[match.end():])]
    return [pattern]


def _range(match):
    first, last = match.group(1), match.group(2)
    width = len(first) if first.startswith("0") or len(first) == len(last) else 0
    step = 1 if int(last) >= int(first) else -1
    return [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
