"""The CLI: help everywhere, README in step with --help, clear errors and exit codes."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import etl
from etl.cli import main

from .conftest import ROOT, SAMPLE


def test_public_namespace_is_complete() -> None:
    for name in etl.__all__:
        assert getattr(etl, name) is not None
    public = {n for n in vars(etl) if not n.startswith("_") and (n[0].isupper() or n.endswith("_files"))}
    assert public <= set(etl.__all__)


def test_every_command_has_help() -> None:
    assert main.help
    for name, command in _commands():
        assert command.help, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts}"


def _commands() -> list[tuple[str, click.Command]]:
    out: list[tuple[str, click.Command]] = []
    for name, command in main.commands.items():
        if isinstance(command, click.Group):
            out += [(f"{name} {sub}", c) for sub, c in command.commands.items()]
        else:
            out.append((name, command))
    return out


def test_readme_options_exist_in_help() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    # Only the Commands section's synopses: a run's printed table title starts with "clinik-etl load" too.
    synopses = readme.split("## Commands", 1)[1].split("```text", 1)[1].split("\n```", 1)[0] + "\n```"
    runner = CliRunner()
    for name, command in _commands():
        block = re.search(rf"^clinik-etl {name}\b(.*?)(?=\nclinik-etl |\n```)", synopses, re.S | re.M)
        assert block, f"README shows no synopsis for {name}"
        documented = set(re.findall(r"--[a-z][a-z-]+", block.group(1)))
        result = runner.invoke(main, [*name.split(), "--help"])
        assert result.exit_code == 0
        offered = {o for p in command.params for o in [*p.opts, *p.secondary_opts] if o.startswith("--")}
        assert all(o in result.output for o in offered)
        assert documented == offered, (name, documented ^ offered)


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2,3\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["validate", str(bad), "--report-dir", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert str(bad) in result.output
    missing = CliRunner().invoke(main, ["validate", str(tmp_path / "nope.csv")])
    assert missing.exit_code == 2 and "no such file" in missing.output


def test_a_file_without_required_columns_names_them(tmp_path: Path) -> None:
    path = tmp_path / "odd.csv"
    path.write_text("foo,bar\n1,2\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert "cannot tell what kind" in result.output and "--kind" in result.output
    result = CliRunner().invoke(main, ["validate", str(path), "--kind", "immunization"])
    assert result.exit_code == 2
    assert "patient_id" in result.output and "vaccine_code" in result.output


@pytest.mark.parametrize(("args", "code"), [(["validate"], 1), (["load", "--dry-run"], 1)])
def test_sample_exit_codes(tmp_path: Path, args: list[str], code: int) -> None:
    result = CliRunner().invoke(
        main, [*args, str(SAMPLE / "registry.csv"), "--report-dir", str(tmp_path / "r")], catch_exceptions=False
    )
    assert result.exit_code == code, result.output
    assert "report:" in result.output and "26 rejected" in result.output


def test_profile_maps_odd_headers(tmp_path: Path) -> None:
    data = tmp_path / "odd.csv"
    data.write_text("Vax Event,Pt MRN,Given,Family,Vx,When\nE1,M1,Ann,Lee,08,2021-03-04\n", encoding="utf-8")
    profile = tmp_path / "odd.toml"
    profile.write_text(
        '[columns]\n"Vax Event" = "record_id"\n"Pt MRN" = "patient_id"\n"Given" = "patient_first_name"\n'
        '"Family" = "patient_last_name"\n"Vx" = "vaccine_code"\n"When" = "occurrence"\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(
        main, ["validate", str(data), "--profile", str(profile), "--report-dir", str(tmp_path / "r")]
    )
    assert result.exit_code == 0, result.output
    bad = tmp_path / "bad.toml"
    bad.write_text('[columns]\n"Vx" = "vaccine_kode"\n', encoding="utf-8")
    result = CliRunner().invoke(main, ["validate", str(data), "--profile", str(bad)])
    assert result.exit_code == 2 and "vaccine_kode" in result.output


def test_load_leaves_concurrency_and_state_to_the_environment_when_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A click default would override CLINIK_ETL_*: an impossible concurrency there must be refused ...
    monkeypatch.setenv("CLINIK_ETL_CONCURRENCY", "65")
    args = ["load", str(SAMPLE / "registry.csv"), "--dry-run", "-q", "--report-dir", str(tmp_path / "r")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "concurrency" in result.output, result.output
    # ... and the state store named there is the one a run uses.
    monkeypatch.setenv("CLINIK_ETL_CONCURRENCY", "4")
    monkeypatch.setenv("CLINIK_ETL_STATE", str(tmp_path / "from-env.sqlite"))
    load = ["load", str(SAMPLE / "registry.csv"), "-q", "--report-dir", str(tmp_path / "l")]
    assert CliRunner().invoke(main, load).exit_code == 1  # the sample's planted rejects
    assert (tmp_path / "from-env.sqlite").is_file()



def test_the_console_script_freezes_the_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    """``clinik-etl`` is :func:`etl.cli.command_line`: the imported modules' objects, and the run's once it ends
    (its exit code raised), are left out of the collector's walks, so the interpreter's exit walks none of them."""
    import gc
    import tomllib

    from etl.cli import command_line

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["clinik-etl"] == "etl.cli:command_line"
    frozen: list[int] = []
    made: list[list[object]] = []

    def command() -> None:
        frozen.append(gc.get_freeze_count())
        made.extend([object()] for _ in range(1_000))  # the run's objects
        sys.exit(3)

    gc.unfreeze()
    monkeypatch.setattr("etl.cli.main", command)
    try:
        with pytest.raises(SystemExit) as exited:
            command_line()
        after = gc.get_freeze_count()
    finally:
        gc.unfreeze()
    assert exited.value.code == 3
    assert frozen[0] > 0  # the modules' objects, before the command
    assert after >= frozen[0] + 1_000  # and the run's, once it ended


def test_rejects_and_warnings_by_code_name_their_rows_alike_for_one_file(tmp_path: Path) -> None:
    # A newcomer read "rows 236, 263" under the rejects and "registry.csv:92" under the warnings of one run.
    result = CliRunner().invoke(main, ["validate", "--report-dir", str(tmp_path / "r"), str(SAMPLE / "registry.csv")])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    rejects = lines[lines.index("rejects by code:") + 1 : lines.index("warnings by code:")]
    warnings = lines[lines.index("warnings by code:") + 1 :]
    by_code = {line.split()[0]: line.split("rows ", 1)[1] for line in rejects}
    assert by_code["date-format"] == "registry.csv:236, registry.csv:263, registry.csv:292"
    assert by_code["max-length"].endswith(" ...") and by_code["max-length"].count("registry.csv:") == 3
    assert "rows registry.csv:92, registry.csv:458" in warnings[0]


def test_a_load_says_how_many_practitioners_its_rows_performers_made(tmp_path: Path) -> None:
    # A newcomer's load created a practitioner from the performer's name; the terminal said nothing of it.
    doses = tmp_path / "doses.csv"
    doses.write_text("Record ID,Patient ID,First Name,Last Name,DOB,CVX,Admin Date,Vaccinator Name\n"
                     "R1,P1,Ann,Lee,2015-03-04,08,2024-03-01,Priya Shah\n"
                     "R2,P2,Bo,Ray,2015-03-04,08,2024-03-01,Priya Shah\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["load", str(doses), "--report-dir", str(tmp_path / "r"),
                                       "--state", str(tmp_path / "s.sqlite")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "patients: created 2" in lines
    assert "practitioners (from the rows' columns): created 1" in lines
    # A kind the rows are of has its column in the table, not a line of its own.
    assert not any(line.startswith("immunizations") for line in lines)
    # Each summary line whole, though the output is a pipe of 80 columns (a newcomer saw "...; 0 \nrequests").
    (matching,) = [line for line in lines if line.startswith("matching (")]
    assert len(matching) > 80 and matching.endswith(" requests")
