"""Markdown table rows whose cells cannot break the table or turn into HTML.

A store's label is the user's text: a ``|`` in it shifted every later cell of its row (the top-1
under "Wilson 95%"), and ``<b>`` became a tag that hid the label. Both are backslash-escaped
(CommonMark and GitHub tables honour ``\\|`` and ``\\<``); a ``<`` that starts no tag ("p < 0.001")
is left as it reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")


def cell(text: object) -> str:
    return _TAG_START.sub(r"\\<", str(text).replace("|", r"\|"))


def row(cells: Iterable[object]) -> str:
    """``| a | b |`` with every cell escaped."""
    return "| " + " | ".join(cell(c) for c in cells) + " |"
