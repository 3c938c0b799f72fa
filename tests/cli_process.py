"""``clinik-etl`` in a real child process that starts with the toolkit already imported.

A kill/resume test needs the load in a process of its own, to SIGKILL it; it
does not need a fresh interpreter for every run. Starting one and importing
polars, pandera and httpx costs ~0.45 s, about half of a resumed run over the
sample file, and the resilience matrix starts ~140 of them. Here a
multiprocessing *forkserver* imports the toolkit once (it starts no work, so
no pool threads hold locks when it forks); each run is a fork of it that
calls the same ``main()`` as ``python -m etl.cli``, with its own environment,
working directory, stdout and stderr, and exits with the CLI's exit code.
:class:`CliProcess` has the part of ``subprocess.Popen``'s interface the
tests use.

Tests about what a freshly started process prints (the key-leak ones) keep
using ``subprocess``.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["CliProcess"]

_CONTEXT = multiprocessing.get_context("forkserver")
# Imported once in the fork server; every run forks from it. Ignored if the server already runs.
_CONTEXT.set_forkserver_preload(["etl.cli", "etl.pipeline", "etl.report_html", __name__])


def _run(args: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """The child: the CLI's ``main`` as ``python -m etl.cli`` would run it."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = ["-m", *args]
    from etl.cli import main

    main(args, prog_name="python -m etl.cli")  # click exits with the command's code


class CliProcess:
    """``clinik-etl ARGS`` in a forked child; output is captured to files and returned by :meth:`communicate`."""

    def __init__(self, args: Sequence[str], *, env: Mapping[str, str], cwd: str | Path, capture: bool = True) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="clinik-cli-")
        self._out = os.path.join(self._dir.name, "stdout") if capture else os.devnull
        self._err = os.path.join(self._dir.name, "stderr")
        self._proc = _CONTEXT.Process(
            target=_run, args=(list(args), dict(env), str(cwd), self._out, self._err), daemon=True
        )
        self._proc.start()
        assert self._proc.pid is not None
        self.pid: int = self._proc.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit code (negative: the signal that ended it), or None while it runs."""
        if self.returncode is None:
            self.returncode = self._proc.exitcode
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` unless the child has already been reaped."""
        if self.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to end; ``subprocess.TimeoutExpired`` (and the child killed) after ``timeout``."""
        self._proc.join(timeout)
        if self.poll() is None:
            self._proc.kill()
            self._proc.join()
            raise subprocess.TimeoutExpired(["clinik-etl"], timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait, then (stdout, stderr) as text; stdout is "" when it was not captured."""
        try:
            self.wait(timeout)
            out = "" if self._out == os.devnull else Path(self._out).read_text(encoding="utf-8")
            return out, Path(self._err).read_text(encoding="utf-8")
        finally:
            self._dir.cleanup()
