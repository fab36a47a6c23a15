"""Reading the TOML files users write (graph files, plans): one error line for any mistake."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from .errors import UserError


def read_toml(path: Path, what: str) -> dict:
    """The tables of the TOML file ``path``; ``what`` names it in errors ("plan", "graph file")."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{what} {path} is not valid TOML ({exc})") from None


def toml_value(text: str):
    """``text`` read as the value of a TOML key (``0.05``, ``true``, ``["a", "b"]``, ``"quoted"``), or ``text``
    itself where it is not one (a bare path or name, as typed on a command line)."""
    try:
        parsed = tomllib.loads(f"value = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["value"] if len(parsed) == 1 else text  # "1\nother = 2" is text, not two keys
