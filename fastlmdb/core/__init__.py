"""The small core both sides use: errors, the on-disk format, the one module that opens LMDB,
JPEG decoding and header reading, the ImageFolder scan, file locks, and reading any database
path (one file or shards) as one catalog."""
