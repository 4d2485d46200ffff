"""Run as a script by test_interrupt.py: convert, and stop this run in a chosen way at a point.

    python -m probes.interrupt_probe SRC DST HOW AT [SHARDS]

HOW is main-SIGKILL, main-SIGTERM, main-SIGINT (signals to this coordinator process) or
writer-SIGKILL (to a child); AT is how many source files must be done first.
Prints the pids of the children before stopping, so the test can check none outlive the run.
"""

import multiprocessing
import os
import signal
import sys

from fastlmdb import converter


def main(src, dst, how, at, shards=1):
    who, sig = how.split("-")
    sig = getattr(signal, sig)
    # As in a terminal: a shell may start background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stopped = []

    def stop(done, total, _bytes):
        if done < at or stopped:
            return
        stopped.append(done)
        children = multiprocessing.active_children()
        print(" ".join(str(c.pid) for c in children), flush=True)
        if who == "main":
            os.kill(os.getpid(), sig)
        else:
            victim = next(c for c in children if who in c.name)
            os.kill(victim.pid, sig)
            victim.join()

    options = converter.Options(src, dst, "train", procs=2, batch_bytes=20_000, shards=shards)
    converter.convert(options, on_progress=stop)
    return 0  # not reached when the stop works


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4], *map(int, sys.argv[4:])))
