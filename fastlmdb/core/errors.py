"""Domain errors. Each message names the file or argument and says what to do."""


class FastLMDBError(Exception):
    """Base class of every error fastlmdb raises on purpose."""


class DatabaseError(FastLMDBError):
    """A path is not a readable fastlmdb database (wrong program, newer format, damaged)."""


class IncompleteDatabaseError(DatabaseError):
    """A database whose final metadata was never written: a conversion did not finish."""


class ConversionError(FastLMDBError):
    """A conversion cannot start or cannot go on."""


class ImageError(FastLMDBError):
    """One source image cannot be read or decoded."""


class DecodeError(FastLMDBError):
    """A stored record could not be decoded."""


# What to do with a bad image (converter) or a record that does not decode (loaders).
ON_ERROR = ("raise", "skip")
