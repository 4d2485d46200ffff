"""Setup shared by the converter's child processes."""

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def detach(coordinator):
    """Leave Ctrl-C to the coordinator (pid `coordinator`), and die with it (no orphans)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the coordinator still terminates us
        pass
    if os.getppid() != coordinator:  # it died before prctl took effect (we were starting)
        os._exit(1)
