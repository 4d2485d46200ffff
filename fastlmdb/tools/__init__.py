"""Tools that read and copy finished databases: verify, stage, merge. Their functions are
importable from the top: ``from fastlmdb import verify, stage, merge``."""
