"""The `fastlmdb` command (commands.py) and `fastlmdb demo` on a generated sample tree."""

from fastlmdb.cli.commands import main

__all__ = ["main"]
