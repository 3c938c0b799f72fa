"""polars' allocator is set up by ``import etl`` (etl._allocator), as jemalloc itself reports it.

Each case runs a fresh interpreter: jemalloc reads its options once per process. ``stats_print``
makes jemalloc print the options it took at exit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def _options(code: str, variable: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "_RJEM_MALLOC_CONF"}
    env["_RJEM_MALLOC_CONF"] = ",".join(filter(None, [variable, "stats_print:true"]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = dict(re.findall(r"^\s*opt\.(narenas|dirty_decay_ms|muzzy_decay_ms): (-?\d+)", done.stderr, re.M))
    if not found:
        pytest.skip("this polars build's allocator prints no jemalloc statistics")
    return found


SUM = "import polars as pl; pl.DataFrame({'a': [1, 2]}).sum()"


def test_import_etl_gives_polars_one_arena_and_slower_decay() -> None:
    assert _options(f"import etl; {SUM}", None) == {
        "narenas": "1", "dirty_decay_ms": "5000", "muzzy_decay_ms": "5000"
    }


def test_a_users_own_options_win() -> None:
    found = _options(f"import etl; {SUM}", "narenas:3,dirty_decay_ms:700")
    assert found == {"narenas": "3", "dirty_decay_ms": "700", "muzzy_decay_ms": "5000"}


def test_polars_imported_first_keeps_its_default() -> None:
    found = _options(f"import polars; import etl; {SUM}", None)
    assert int(found["narenas"]) > 1  # jemalloc's default: four per CPU
    assert found["dirty_decay_ms"] == "500"  # polars' own


def _threads(code: str, blas: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if blas is not None:
        env["OPENBLAS_NUM_THREADS"] = blas
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout)


TASKS = "print(len(os.listdir('/proc/self/task')))"


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_import_etl_keeps_openblas_from_starting_threads() -> None:
    # numpy's OpenBLAS starts (and spins) a thread per extra core; the key indexes never use BLAS.
    before = _threads(f"import os, etl; {TASKS}", None)
    assert _threads(f"import os, etl, numpy; {TASKS}", None) == before
    several = _threads(f"import os, etl, numpy; {TASKS}", "3")
    if several == before:
        pytest.skip("this numpy's BLAS starts no threads")
    assert several > before  # the user's own setting is kept (OpenBLAS starts up to a thread per core)
