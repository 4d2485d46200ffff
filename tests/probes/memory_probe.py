"""A picklable transform for the worker-memory test: what the worker process has copied.

Kept out of the test module so that spawned / forkserver workers import only this file.
"""


def private_dirty(image):
    """This process's Private_Dirty bytes (anonymous and copied-on-write memory it wrote):
    pages of a file it maps, such as an LMDB map, are clean and never counted."""
    with open("/proc/self/smaps_rollup", encoding="ascii") as file:
        for line in file:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Private_Dirty line in /proc/self/smaps_rollup")
