"""Setup shared by the converter's child processes."""

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def detach():
    """Leave Ctrl-C to the coordinator, and die with it if it is killed (no orphans)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the coordinator still terminates us
        pass
    if os.getppid() != parent:  # the coordinator died before prctl took effect
        os._exit(1)
