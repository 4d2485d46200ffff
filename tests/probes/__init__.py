"""What the tests run in other processes: functions that DataLoader workers started by spawn or
forkserver import by name (lmdb_probes, memory_probe, client_probes' modules), and programs
(the *_probe modules) that tests run with `command(name, ...)`.

The tests' folder is on the path of every process the tests start (pytest puts it on sys.path,
which spawn and forkserver children inherit; `env()` puts it on PYTHONPATH for programs), so
``probes.<module>`` names the same module everywhere.
"""

import os
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)  # this checkout, whose fastlmdb the programs import


def command(name, *args, python_options=()):
    """The command line that runs probe `name` (a module of this package) as a program."""
    return [sys.executable, *python_options, "-m", f"probes.{name}", *map(str, args)]


def env(*first, **extra):
    """os.environ with PYTHONPATH: the folders `first` (a shim, say), the tests' folder (for
    ``probes``) and this checkout, then what it was; `extra` variables set as strings."""
    path = [*first, TESTS, ROOT, os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path)),
            **{key: str(value) for key, value in extra.items()}}
