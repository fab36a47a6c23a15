"""Markdown as the reports write it (report.md, tune.md): tables and escaped cell text."""

from __future__ import annotations


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the header, a separator of dashes as wide as each header cell plus two, the rows."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("-" * (len(h) + 2) for h in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def escape(text: str) -> str:
    """Text for a table cell or a title: a ``|`` would end the cell."""
    return text.replace("|", "\\|")
