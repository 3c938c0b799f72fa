"""Golden reports: each sample group validated, dry-run and loaded, its report normalised.

The files under ``tests/golden/`` were written by this module from the code as it stood before
the whole-file plan was deleted, so a refactor of the plan is proven not to change a report.
What differs from run to run is normalised away: run ids, times, rates, folder paths, the day a
message names as today, and the ids a sandbox draws at random (kept as their prefix).
Regenerate (after a deliberate change of a report, reviewed in the diff) with::

    .venv/bin/python -m tests.golden
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from etl.pipeline import load_files, validate_files
from etl.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
GOLDEN = Path(__file__).resolve().parent / "golden"

CLINIC = ["registry.csv", "providers.csv", "visits.csv", "documents.csv", "tasks.csv"]
GROUPS: dict[str, tuple[list[Path], str | None]] = {
    "registry": ([SAMPLE / "registry.csv"], None),
    "registry-xlsx": ([SAMPLE / "registry.xlsx"], None),
    "clinic": ([SAMPLE / n for n in CLINIC], None),
    "clinic-children-first": ([SAMPLE / n for n in reversed(CLINIC)], None),
    "synthea": (sorted((SAMPLE / "synthea").glob("*.csv")), "synthea"),
    "cvrs": ([SAMPLE / "cvrs" / "cvrs_extract.tsv", SAMPLE / "cvrs" / "cvrs_redacted.tsv"], "cvrs"),
}
#: (mode, the groups it runs on): Redox takes immunization files only.
MODES: dict[str, list[str]] = {
    "validate": list(GROUPS),
    "dry-run": list(GROUPS),
    "load": list(GROUPS),
    "redox-dry-run": ["registry", "cvrs"],
    "redox-load": ["registry", "cvrs"],
}
CASES = [(mode, group) for mode, groups in MODES.items() for group in groups]

# Summary keys that differ from run to run, or say how the run was cut (not what it decided).
_VOLATILE = {"run_id", "timings", "achieved_rate", "report_dir", "batch_rows"}
# An id a sandbox drew at random: a prefix and hex digits (ClinikAPI's pat_…, Redox's ack-…).
_RANDOM_ID = re.compile(r"\b([a-z]{2,5}[_-])[0-9a-f]{16}\b")
_TIMESTAMP = re.compile(r'"timestamp": ?"[^"]*"')
# The future-date rule names the run's day ("not after 2026-12-01"): the golden files hold <today>.
_TODAY = re.compile(r"(not after )\d{4}-\d{2}-\d{2}\b")


def run(mode: str, group: str, folder: Path, **overrides: Any) -> None:
    """Run one case, its report written to ``folder / "report"`` (state stores beside it)."""
    paths, profile = GROUPS[group]
    values: dict[str, Any] = {"profile": profile, "report_dir": folder / "report", "state": folder / "state.sqlite"}
    if mode.startswith("redox"):
        values["target"] = "redox"
    if mode.endswith("dry-run"):
        values["dry_run"] = True
    values.update(overrides)
    settings = Settings(**values)
    if mode == "validate":
        validate_files(paths, settings)
    else:
        load_files(paths, settings)


def _text(text: str, folder: Path) -> str:
    text = text.replace(str(folder), "<tmp>").replace(str(ROOT), "<root>")
    text = _TODAY.sub(r"\1<today>", text)
    return _RANDOM_ID.sub(lambda m: m.group(1) + "<id>", text)


def _summary(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _summary(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_summary(v) for v in value]
    return value


def normalised(folder: Path) -> dict[str, str]:
    """The report in ``folder / "report"``, file name -> normalised text."""
    report = folder / "report"
    out = {
        "rows.csv": _text((report / "rows.csv").read_text(encoding="utf-8"), folder),
        "rejects.csv": _text((report / "rejects.csv").read_text(encoding="utf-8"), folder),
    }
    summary = _summary(json.loads(_text((report / "summary.json").read_text(encoding="utf-8"), folder)))
    out["summary.json"] = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    payloads = report / "payloads.ndjson"
    if payloads.is_file():  # a dry run's plan: the lines, whatever their spacing and order
        text = payloads.read_text(encoding="utf-8")
        lines = [json.dumps(json.loads(line), sort_keys=True) for line in text.splitlines()]
        out["payloads.ndjson"] = _TIMESTAMP.sub('"timestamp": "<time>"', "\n".join(sorted(lines)) + "\n")
    return out


def expected(mode: str, group: str) -> dict[str, str]:
    """The committed golden files of one case."""
    folder = GOLDEN / mode / group
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir())}


def write_all(scratch: Path) -> None:
    for mode, group in CASES:
        here = scratch / mode / group
        run(mode, group, here)
        target = GOLDEN / mode / group
        target.mkdir(parents=True, exist_ok=True)
        for old in target.iterdir():
            old.unlink()
        for name, text in normalised(here).items():
            (target / name).write_text(text, encoding="utf-8")
        print(f"{mode} {group}", file=sys.stderr)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_all(Path(tmp))
