"""Progress of an extraction where people run long jobs: a bar on a terminal, and in logs (SLURM,
nohup, CI: stderr is not a terminal) a line every ``FEATSTORE_PROGRESS_SECONDS`` (30 by default)
with rows done / total, img/s, ETA and invalid rows so far."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from .errors import UsageError

PROGRESS_SECONDS_ENV = "FEATSTORE_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0
MODES = ("auto", "bar", "lines", "off")


def progress_interval() -> float:
    """Seconds between progress lines, from the environment."""
    raw = os.environ.get(PROGRESS_SECONDS_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UsageError(f"{PROGRESS_SECONDS_ENV}={raw!r} is not a number of seconds", f"e.g. {PROGRESS_SECONDS_ENV}=60")
    return value


def resolve_mode(progress: bool | str) -> str:
    """True/"auto": the bar on a terminal, lines otherwise; False: "off"."""
    mode = {True: "auto", False: "off"}.get(progress, progress) if isinstance(progress, bool) else progress
    if mode not in MODES:
        raise UsageError(f"unknown progress mode {mode!r}", f"use one of {', '.join(MODES)}")
    if mode == "auto":
        return "bar" if sys.stderr.isatty() else "lines"
    return mode


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts rows as batches finish and reports them as ``mode`` says ("bar", "lines" or "off")."""

    def __init__(
        self,
        total: int,
        label: str,
        mode: str,
        log: Callable[[str], None],
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.label, self.mode, self.log = total, label, mode, log
        self.interval = progress_interval() if interval is None else interval
        self.clock = clock
        self.start = self.last = clock()
        self.done = self.invalid = 0
        self.lines = self.reported = 0
        self.bar = None
        if mode == "bar":
            import shutil

            from tqdm import tqdm

            # the width is read now: while a loader runs, fd 2 may be a pipe (loaders/quiet.py)
            columns = shutil.get_terminal_size((100, 24)).columns
            self.bar = tqdm(total=total, unit="img", file=sys.stderr, ncols=columns if columns > 0 else 100, smoothing=0.1, desc=label)

    def update(self, rows: int, invalid: int = 0) -> None:
        self.done += rows
        self.invalid += invalid
        if self.bar is not None:
            self.bar.update(rows)
            if invalid:
                self.bar.set_postfix(invalid=self.invalid, refresh=False)
        elif self.mode == "lines":
            now = self.clock()
            if now - self.last >= self.interval:
                self._report(now)

    def _report(self, now: float) -> None:
        self.last, self.reported = now, self.done
        self.lines += 1
        self.log(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        if self.done >= self.total:
            when = f"done in {format_duration(elapsed)}"
        else:
            when = f"ETA {format_duration((self.total - self.done) / rate)}" if rate > 0 else "ETA unknown"
        return f"{self.label}: {self.done:,}/{self.total:,} rows ({pct:.1f}%), {rate:.1f} img/s, {when}, {self.invalid} invalid"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "lines" and self.lines and self.done >= self.total and self.reported < self.done:
            self._report(self.clock())  # logs that showed progress also show the end


def log_to_stderr(message: str) -> None:
    """The extraction's default log: one line on stderr, beside the progress output."""
    print(message, file=sys.stderr, flush=True)
