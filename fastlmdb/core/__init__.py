"""What both sides (converter and loaders) need and nothing else: errors, the on-disk format,
the one module that opens LMDB (store.py), the catalog of a database path (one file or
shards), JPEG decoding and the C extensions, file helpers, and fsspec access (remote.py)."""
