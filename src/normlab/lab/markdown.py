"""User text in the report's markdown: one rule for every section (study tables, summary,
signal propagation), so a ``--set label=`` or a model spec is literal text in report.md and
report.html, never a heading, a table row or markup.

>>> md_cell("GN\\n| x | **y**")
'GN \\\\| x \\\\| \\\\*\\\\*y\\\\*\\\\*'
"""

from __future__ import annotations

import re

__all__ = ["md_cell"]


def md_cell(text: object) -> str:
    """User text as inert markdown inside a table cell: line breaks become spaces and markdown's
    punctuation is backslash-escaped (the report's HTML writer undoes the escapes)."""
    return re.sub(r"([\\`*_\[\]<>|#!])", r"\\\1", " ".join(str(text).split()))
