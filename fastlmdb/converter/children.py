"""Setup shared by the converter's child processes."""

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def detach(coordinator: int) -> None:
    """Leave Ctrl-C to the coordinator (pid `coordinator`), and die with it (no orphans)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):  # elsewhere no prctl: the coordinator terminates us
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # a libc without prctl
            pass
    if os.getppid() != coordinator:  # it died before prctl took effect (we were starting)
        os._exit(1)
