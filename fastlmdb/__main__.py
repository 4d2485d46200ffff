"""`python -m fastlmdb`: the `fastlmdb` command."""

import sys

from fastlmdb.cli import main

sys.exit(main())
