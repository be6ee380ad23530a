"""Untrusted text (file names, URLs, ids, failCodes, messages) inside the markdown of Prefect
artifacts: shown as written, never as markup. No Prefect.

A name such as ``night|x ![p](http://evil.example/p.png)`` or a failCode with a newline and
``# heading`` would otherwise break a table's shape, load a remote image, add a link or a
heading. Each value becomes one line, with every character markdown (or the HTML inside it)
acts on escaped, and characters that act instead of showing written as their escapes.
"""

from __future__ import annotations

import re
from typing import Any

from hailuo_batch.apixo.models import provider_text

#: the longest value shown in an artifact (the results file keeps every value whole)
MAX_SHOWN = 500
# "." (a line's "12345." starts a list; "www." and "a@b.c" become GFM autolinks) and "@" too
_MARKUP = re.compile(r"([\\`*_{}\[\]()<>#+!|~&:.@-])")


def _line(value: Any) -> str:
    return provider_text(" ".join(str(value).split()), MAX_SHOWN)


def _escaped(line: str) -> str:
    return _MARKUP.sub(r"\\\1", line)


def text(value: Any) -> str:
    """`value` as plain text on one line of markdown, a table cell included."""
    return _escaped(_line(value))


def code(value: Any) -> str:
    """`value` as an inline code span when one can hold it (no backtick or pipe), else as
    `text` (the line is made, and cut, once)."""
    line = _line(value)
    if not line or "`" in line or "|" in line:
        return _escaped(line)
    return f"`{line}`"
