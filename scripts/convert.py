#!/usr/bin/env python3
"""Same as `fastlmdb convert ...`: convert an ImageFolder tree into one LMDB file per split."""

import sys

from fastlmdb.cli.commands import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
