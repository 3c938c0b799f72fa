"""Refresh the shipped CVX and MVX tables from CDC's own downloads.

CDC publishes both code sets as pipe-delimited text (no header line):

- CVX, ``https://www2a.cdc.gov/vaccines/iis/iisstandards/downloads/cvx.txt``:
  ``code|short description|full vaccine name|note|status|internal id|nonvaccine|last updated``
- MVX, ``https://www2a.cdc.gov/vaccines/iis/iisstandards/downloads/mvx.txt``:
  ``code|manufacturer|notes|status|last updated``

Usage (writes ``schemas/data/<table>.csv`` of the installed package, or ``--output``)::

    python -m schemas.refresh_codes cvx cvx.txt
    python -m schemas.refresh_codes mvx mvx.txt --output my-mvx.csv

The table keeps every code with its status (``Active``, ``Inactive``, ``Non-US``, ``Never Active``,
``Pending``): validation rejects a code the table does not list and warns about one that is not
active (:mod:`schemas.codes`). The first line of the written file names the source and the date.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import sys
from importlib import resources
from pathlib import Path

__all__ = ["SOURCES", "convert", "main"]

#: Where CDC publishes each table.
SOURCES = {
    "cvx": "https://www2a.cdc.gov/vaccines/iis/iisstandards/downloads/cvx.txt",
    "mvx": "https://www2a.cdc.gov/vaccines/iis/iisstandards/downloads/mvx.txt",
}
# Which field of a CDC line holds the code, the display and the status.
_FIELDS = {"cvx": (0, 2, 4), "mvx": (0, 1, 3)}


def convert(table: str, text: str, *, source: str, today: dt.date | None = None) -> str:
    """CDC's pipe-delimited ``text`` of ``table`` as the package's CSV (``code,display,status``).

    Raises ValueError naming the first line that is not a row of that table.
    """
    if table not in _FIELDS:
        raise ValueError(f"unknown table {table!r}; tables: {', '.join(_FIELDS)}")
    code_at, display_at, status_at = _FIELDS[table]
    rows: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) <= status_at or not cells[code_at] or " " in cells[code_at]:
            raise ValueError(f"line {number}: not a {table.upper()} row (expected '|'-separated fields): {line[:60]!r}")
        rows[cells[code_at]] = (cells[display_at], cells[status_at])
    if not rows:
        raise ValueError(f"no {table.upper()} rows found")
    out = io.StringIO()
    out.write(f"# source: {source}; retrieved {(today or dt.date.today()).isoformat()}\n")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["code", "display", "status"])
    for code, (display, status) in rows.items():
        writer.writerow([code, display, status])
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Command line: convert a CDC download into the package's table."""
    parser = argparse.ArgumentParser(prog="python -m schemas.refresh_codes", description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=sorted(_FIELDS))
    parser.add_argument("file", type=Path, help="CDC's cvx.txt or mvx.txt, as downloaded")
    parser.add_argument("--source", help="where the file came from (default: CDC's download address)")
    parser.add_argument("--output", type=Path, help="where to write (default: the package's own table)")
    args = parser.parse_args(argv)
    try:
        # CDC serves the files in Windows-1252 (accented manufacturer names).
        raw = args.file.read_bytes()
        text = raw.decode("utf-8") if _is_utf8(raw) else raw.decode("cp1252")
        csv_text = convert(args.table, text, source=args.source or SOURCES[args.table])
    except (OSError, ValueError) as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 2
    target = args.output or Path(str(resources.files("schemas").joinpath("data", f"{args.table}.csv")))
    target.write_text(csv_text, encoding="utf-8")
    print(f"{target}: {csv_text.count(chr(10)) - 2} {args.table.upper()} codes")
    return 0


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
