"""Progress for long work: a tqdm bar on a terminal, or plain lines (``--no-progress``: logs, CI, nohup) so a long
command never sits silent, or nothing."""

from __future__ import annotations

import sys
import time

MODES = ("bar", "lines", "none")


class LineProgress:
    """tqdm's update/close as plain lines: one after the first update, then one every ``every_s`` seconds, and a
    last one at the end, each with the count, the share done and the rate."""

    def __init__(self, total: int | None, initial: int = 0, desc: str = "", unit: str = "it", every_s: float = 30.0,
                 stream=None):
        self.total, self.n, self.desc, self.unit, self.every_s = total, initial, desc, unit, every_s
        self.stream = stream or sys.stdout
        self.start_n, self.t0 = initial, time.time()
        self.last = None  # time of the last line
        self.printed_n = None  # the count the last line showed

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.time()
        if self.last is None or now - self.last >= self.every_s:
            self._line(now)

    def _line(self, now: float) -> None:
        self.last, self.printed_n = now, self.n
        rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        of = f"/{self.total}" if self.total is not None else ""
        print(f"{self.desc}: {self.n}{of} {self.unit}{share}, {rate:.3g} {self.unit}/s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.printed_n != self.n:  # a last line, unless the last one already showed the final count
            self._line(time.time())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress_bar(total: int | None, mode: str | bool = "bar", initial: int = 0, desc: str = "", unit: str = "it",
                 every_s: float = 30.0, **tqdm_kwargs):
    """A tqdm bar (``mode`` "bar" or True), plain lines ("lines") or a silent counter ("none" or False)."""
    mode = {True: "bar", False: "none"}.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"progress must be one of {MODES}, got {mode!r}")
    if mode == "lines":
        return LineProgress(total, initial, desc, unit, every_s)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=mode == "none", **tqdm_kwargs)
