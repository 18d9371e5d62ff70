"""The stores' time stamps (``created``, ``completed``, ``exported``): UTC to the second, one format,
written and read back here."""

from __future__ import annotations

import calendar
import time

FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_stamp() -> str:
    """Now, as a store records it."""
    return time.strftime(FORMAT, time.gmtime())


def stamp_seconds(stamp: object) -> int | None:
    """The Unix time of a stamp; None when it is not one (absent, garbled, edited by hand)."""
    if not isinstance(stamp, str):
        return None
    try:
        return calendar.timegm(time.strptime(stamp, FORMAT))
    except ValueError:
        return None
