"""What the command line shows: progress bars and conversion summaries."""


class ProgressBar:
    """A tqdm bar whose `update(done, total[, bytes_in])` is a library on_progress callback."""

    def __init__(self, desc):
        self.desc = desc

    def __enter__(self):
        from tqdm import tqdm

        # delay: a run that fails before any progress prints its error line and nothing else.
        self.bar = tqdm(unit="img", desc=self.desc, dynamic_ncols=True, delay=0.5)
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def update(self, done, total, bytes_in=None):
        self.bar.total = total
        self.bar.update(done - self.bar.n)
        if bytes_in is None:
            return
        elapsed = self.bar.format_dict["elapsed"] or 1e-9
        self.bar.set_postfix_str(f"{bytes_in / elapsed / 1e6:.0f} MB/s in", refresh=False)


def print_summary(stats):
    rate = stats.images / max(stats.seconds, 1e-9)
    resumed = f", resumed after {stats.resumed_at} files" if stats.resumed_at else ""
    print(f"{stats.path}: {stats.images} images, {stats.bytes_in / 1e6:.1f} MB read, "
          f"{stats.bytes_out / 1e6:.1f} MB written, {stats.seconds:.1f} s "
          f"({rate:.0f} img/s){resumed}")
    for index, path, why in stats.transcoded:
        print(f"  changed  #{index} {path}: {why}")
    for path, why in stats.skipped:
        print(f"  skipped  {path}: {why}")
    for index, path, why in stats.warnings:
        print(f"  warning  #{index} {path}: {why}")
    print(f"  {len(stats.transcoded)} changed, {len(stats.skipped)} skipped, "
          f"{len(stats.warnings)} kept with warnings")
