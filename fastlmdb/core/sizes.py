"""Sizes in bytes as users write them ("500MB", "20GB", "1.5GiB"), for the streaming cache limit
and the converter's shard size. A few lines rather than a dependency: the units are fixed."""

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(value, name="cache_limit"):
    """Bytes of `value`: an int, or a string such as "500MB", "20GB", "1.5GiB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{name} must be a positive number of bytes or a string such as "
                         f"'500MB' or '20GB' (KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def has_unit(value):
    """Whether `value` is a string naming a unit ("512MB"), not a bare count ("4500")."""
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    return bool(match and match.group(2))
