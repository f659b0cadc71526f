"""CSV as the API writes and reads it: one rule against formula injection.

A spreadsheet runs a cell that starts with ``=``, ``+``, ``-`` or ``@`` (and, in some,
TAB or CR) as a formula: ``=HYPERLINK(...)`` in a suppression's note would be a link
in the operator's spreadsheet. OWASP's rule: such a cell is written with a single
quote in front. A cell that starts with a quote gets one more, so that reading undoes
exactly what writing did (an export imports back as it was).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import Any, Protocol

FORMULA_START = frozenset("=+-@\t\r")
QUOTE = "'"


class _Writable(Protocol):
    def write(self, s: str, /) -> Any: ...


def escape_cell(value: str) -> str:
    if value and (value[0] in FORMULA_START or value[0] == QUOTE):
        return QUOTE + value
    return value


def unescape_cell(value: str) -> str:
    if len(value) > 1 and value[0] == QUOTE and (value[1] in FORMULA_START or value[1] == QUOTE):
        return value[1:]
    return value


class SafeWriter:
    """``csv.writer`` whose every cell goes through escape_cell (CRLF line ends)."""

    def __init__(self, out: _Writable) -> None:
        self._w = csv.writer(out, lineterminator="\r\n")

    def writerow(self, row: Iterable[Any]) -> None:
        self._w.writerow([escape_cell("" if v is None else str(v)) for v in row])
