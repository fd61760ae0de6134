"""User text in the report's markdown: one rule for every section (study tables, summary,
signal propagation), so a ``--set label=`` or a model spec is literal text in report.md and
report.html, never a heading, a table row or markup; and one rule for control characters, in
the report and on the console alike (:func:`visible`): an escape sequence stored in a label
is shown as ``\\x1b``, never sent to a terminal.

>>> md_cell("GN\\n| x | **y**")
'GN \\\\| x \\\\| \\\\*\\\\*y\\\\*\\\\*'
>>> visible("a\\x1b[31mb\\x07")
'a\\\\x1b[31mb\\\\x07'
"""

from __future__ import annotations

import re

__all__ = ["md_cell", "visible"]

# C0 controls but tab, DEL, C1 controls (0x9b is a terminal's one-byte CSI)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def visible(text: object) -> str:
    """``text`` with each control character written as its escape (``\\x1b``, ``\\n``), so
    that a stored string cannot move a terminal's cursor, recolour it or ring it, and a line
    of output stays one line (a newline in a label cannot fake an ``error:`` or ``hint:``)."""
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], str(text))


def md_cell(text: object) -> str:
    """User text as inert markdown inside a table cell: line breaks become spaces, control
    characters their escapes (:func:`visible`), and markdown's punctuation (entities' ``&``
    and strikethrough's ``~`` included) is backslash-escaped
    (the report's HTML writer undoes the escapes)."""
    # & and ~ too: "&lt;" is an entity markdown shows as "<", "~~x~~" is struck through
    return re.sub(r"([\\`*_\[\]<>|#!&~])", r"\\\1", visible(" ".join(str(text).split())))
