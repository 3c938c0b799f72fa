"""The exception tree (etl.errors): one base, transient or terminal, and how the CLI shows an error."""

from __future__ import annotations

import inspect
from pathlib import Path

from click.testing import CliRunner

from etl import errors
from etl.cli import main
from etl.errors import BulkRefused, EtlError, ExitCode, InputError, LoadSignal, LookupFailed


def test_every_exception_the_toolkit_defines_is_in_one_tree_and_drawn_in_the_docstring() -> None:
    defined = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, BaseException)]
    assert {c.__name__ for c in defined} >= {"EtlError", "LookupFailed", "BulkRefused", "NoAnswerError"}
    for cls in defined:
        assert issubclass(cls, EtlError), cls
        assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} is not drawn in etl.errors' tree"


def test_lookups_and_bulk_refusals_are_load_signals_with_their_own_transience() -> None:
    assert issubclass(LookupFailed, LoadSignal) and LookupFailed("GET /v1/patients: no answer").retryable
    assert BulkRefused(0, "NOT_SENT", "connection refused").retryable  # never sent
    assert BulkRefused(429, "RATE_LIMITED", "slow down", retry_after=3.0).retryable
    assert BulkRefused(503, "UNAVAILABLE", "later").retryable
    refused = BulkRefused(422, "VALIDATION_ERROR", "bad line")
    assert not refused.retryable and str(refused) == "HTTP 422 VALIDATION_ERROR: bad line"
    assert not InputError("a.csv", "bad").retryable  # a file must change first: terminal


def test_a_terminal_error_is_one_line_without_the_transient_note_and_markup_is_shown_as_written(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "[bold]registry[/bold].csv"  # rich markup in a file name is text, not style
    result = CliRunner().invoke(main, ["validate", str(missing), "--report-dir", str(tmp_path / "r")])
    assert result.exit_code == ExitCode.USAGE
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "[bold]registry[/bold].csv" in lines[0], result.output
    assert "transient" not in lines[0]

