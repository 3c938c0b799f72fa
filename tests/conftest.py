"""Shared fixtures: paths, the sample data and a real sandbox server."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
REFERENCE = ROOT.parent / "shared" / "reference"
OPENAPI = REFERENCE / "clinikapi-openapi.yaml"
#: Each sample file that holds one kind, and that kind.
SAMPLE_KINDS = [
    ("registry.csv", "immunization"),
    ("providers.csv", "practitioner"),
    ("visits.csv", "encounter"),
    ("documents.csv", "document"),
    ("tasks.csv", "task"),
]


@pytest.fixture(scope="session")
def openapi() -> dict:
    """The published OpenAPI description, or a skip when it is not beside the checkout."""
    if not OPENAPI.is_file():
        pytest.skip(f"{OPENAPI} is absent")
    import yaml

    return yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))


#: How many of the sample registry's records ``registry_head`` holds, and what they hold
#: (tests/golden/validate/registry/rows.csv, rows 2-281): 13 of the planted bad rows, 267 valid rows, 115 patients.
REGISTRY_HEAD_ROWS = 280
REGISTRY_HEAD_VALID = 267
REGISTRY_HEAD_PATIENTS = 115


def head_records(source: Path, rows: int, target: Path) -> Path:
    """``source``'s header and first ``rows`` CSV records written to ``target``, byte for byte (a record may
    span lines)."""
    text = source.read_text(encoding="utf-8")
    reader = csv.reader(io.StringIO(text, newline=""))
    for _ in range(rows + 1):
        next(reader)
    target.write_text("".join(text.splitlines(keepends=True)[: reader.line_num]), encoding="utf-8")
    return target


@pytest.fixture(scope="session")
def registry_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample registry's first ``REGISTRY_HEAD_ROWS`` records: for the tests that load it many times over
    (kill/resume, fault mixes), where the whole 560 rows cost twice the time and show nothing more."""
    return head_records(SAMPLE / "registry.csv", REGISTRY_HEAD_ROWS, tmp_path_factory.mktemp("head") / "registry.csv")


@pytest.fixture()
def sandbox() -> Iterator[object]:
    """A fresh sandbox server on loopback, over real sockets."""
    from etl.sandbox import SandboxConfig, SandboxServer

    with SandboxServer(SandboxConfig()) as server:
        yield server


@pytest.fixture()
def simple_sandbox() -> Iterator[object]:
    """A fresh sandbox that answers with the create bodies it got (``responses="simple"``): for tests that
    read back what the loader sent, not how the API shapes it."""
    from etl.sandbox import SandboxConfig, SandboxServer

    with SandboxServer(SandboxConfig(responses="simple")) as server:
        yield server


@pytest.fixture(params=["fhir", "simple"])
def shaped_sandbox(request: pytest.FixtureRequest) -> Iterator[object]:
    """A fresh sandbox server answering in each shape in turn (``etl.sandbox.shapes``): what must work
    whatever the API returns (lookups after an unknown outcome) is proven on both."""
    from etl.sandbox import SandboxConfig, SandboxServer

    with SandboxServer(SandboxConfig(responses=request.param)) as server:
        yield server


@pytest.fixture()
def open_umask() -> Iterator[None]:
    """umask 000 for the test: any file not created owner-only on purpose would be 0666."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)
