"""``clinik-etl doctor``: is a target ready for a long migration? Checked before the first row is sent.

A handful of requests, each read for what the API says about itself (the public docs, ``clinikapi/docs``:
``errors.mdx`` for the rate limit and the quotas, ``data-consistency.mdx`` for search lag):

- **the key**: accepted (a search, ``GET /v1/patients?count=1``), and its scope: a create with an empty body
  (``POST /v1/patients {}``), which the API refuses as invalid (422/400: the key may write, nothing is
  stored) or as outside the key's scope (403);
- **the plan**: its rate limit (``X-RateLimit-*``: requests per window, what is left), and the monthly quota
  and the sandbox allowance where the API announces them (``X-Quota-*``, ``X-Sandbox-*``);
- **the response shape**: FHIR R4 resources (a ``resourceType``) or the simple echo of the create body,
  from a resource the search returned (or the probe's create);
- **clock skew** (the ``Date`` header against this machine's clock) and **TLS** (the version negotiated;
  plain http only to loopback, as for every command);
- with ``probe`` (test keys only): one create of a synthetic patient, search polled until it shows it (the
  search lag, at most ``etl.settings.MAX_SEARCH_LAG``), then the patient is deleted;
- with files: the requests a load of them needs (a dry run, in a temporary folder) and how long they take
  at the plan's rate, and whether the quota left covers them.

Exit codes: 0 healthy (warnings allowed), 2 an unusable target (no answer, a server error, not the API),
4 a key refused or without the scope, 5 a quota already used up. The key is never printed.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx

from etl.errors import ExitCode, UsageError
from etl.settings import MAX_SEARCH_LAG, Settings

__all__ = ["Check", "Diagnosis", "diagnose"]

Status = Literal["ok", "warn", "fail", "info"]

#: Clock skew past which a warning is given (quota resets and ``Date``-based reasoning drift).
SKEW_WARN_SECONDS = 60.0
#: A rate limit at least this large is the sandbox's "unlimited" (``etl.sandbox.app.NOMINAL_LIMIT``).
_UNLIMITED = 10_000_000
_PROBE_PATIENT = {"firstName": "Doctor", "lastName": "Probe", "birthDate": "2000-01-01"}


@dataclass(frozen=True)
class Check:
    """One finding: what was checked, how it went, and what was seen."""

    name: str
    status: Status
    text: str


@dataclass
class Diagnosis:
    """What ``doctor`` found, and the exit code it earns."""

    target: str
    checks: list[Check] = field(default_factory=list)
    exit_code: int = ExitCode.OK
    plan: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, status: Status, text: str) -> None:
        """Note a finding."""
        self.checks.append(Check(name, status, text))

    def fail(self, name: str, text: str, exit_code: int) -> Diagnosis:
        """Note a finding that makes the target unusable; the diagnosis ends here."""
        self.add(name, "fail", text)
        self.exit_code = exit_code
        return self

    def to_json(self) -> dict[str, Any]:
        """The diagnosis for ``--json``."""
        return {
            "target": self.target,
            "exit_code": self.exit_code,
            "plan": self.plan,
            "checks": [{"name": c.name, "status": c.status, "text": c.text} for c in self.checks],
        }


def diagnose(settings: Settings, files: Sequence[Path] = (), *, probe: bool = False) -> Diagnosis:
    """Check the target ``settings`` name (the embedded sandbox, a temporary one, when none); ``files``: what a
    load of them would need. Raises ``UsageError`` for a refused URL or key shape (exit 2)."""
    from etl.load.client import check_target

    if settings.base_url:
        if settings.api_key is None:
            raise UsageError("set CLINIKAPI_SECRET_KEY (or --api-key-file) to check " + settings.base_url)
        key = settings.api_key.get_secret_value()
        check_target(settings.base_url, key, live=settings.live)
        if probe and not key.startswith("clk_test_"):
            raise UsageError("--probe creates (then deletes) a resource: it is for test keys (clk_test_) only")
        return _diagnosed(settings, settings.base_url, key, files, probe=probe)
    from etl.sandbox import SandboxConfig, SandboxServer

    with SandboxServer(SandboxConfig()) as server:
        return _diagnosed(settings, server.base_url, server.api_key, files, probe=probe, name="embedded sandbox")


def _diagnosed(
    settings: Settings, base_url: str, key: str, files: Sequence[Path], *, probe: bool, name: str | None = None
) -> Diagnosis:
    found = asyncio.run(_check(settings, base_url, key, probe=probe, name=name or base_url))
    if files and found.exit_code == ExitCode.OK:
        _estimate(found, settings, files)
    return found


async def _check(settings: Settings, base_url: str, key: str, *, probe: bool, name: str) -> Diagnosis:
    from etl.load.client import exchange, http_client, quota_problem, refusal

    found = Diagnosis(name)
    headers = {"x-api-key": key, "accept": "application/json"}
    async with http_client(base_url, settings) as http:
        answer = await exchange(http.get("/v1/patients", params={"count": 1}, headers=headers))
        if not isinstance(answer, httpx.Response):
            return found.fail("target", f"no answer from {name}: {answer.reason}", ExitCode.USAGE)
        body = _json(answer)
        if answer.status_code in (401, 403):
            refused = refusal(answer)
            return found.fail("key", f"refused: HTTP {refused.status} {refused.code}: {refused.message}",
                              ExitCode.API)
        quota = quota_problem(answer)
        if quota is not None:
            _plan(found, answer.headers)
            return found.fail("quota", quota.message, ExitCode.QUOTA)
        if answer.status_code >= 500 or body is None or answer.status_code not in (200, 429):
            return found.fail("target", f"{name} answered HTTP {answer.status_code}"
                              f"{'' if body is not None else ', not JSON'}: not a usable ClinikAPI",
                              ExitCode.USAGE)
        kind = "live (real patient data)" if key.startswith("clk_live_") else "test"
        found.add("key", "ok", f"accepted: a {kind} key, allowed to read")
        _transport(found, answer, base_url)
        _clock(found, answer.headers)
        shape = _shape(body)
        write = await exchange(http.post("/v1/patients", content=b"{}",
                                         headers={**headers, "content-type": "application/json"}))
        if isinstance(write, httpx.Response):
            if write.status_code == 403:
                refused = refusal(write)
                return found.fail("scope", f"the key may not write: HTTP 403 {refused.code}", ExitCode.API)
            if (quota := quota_problem(write)) is not None:
                _plan(found, write.headers)
                return found.fail("quota", quota.message, ExitCode.QUOTA)
            if write.status_code in (400, 422):
                found.add("scope", "ok", "the key may write (an empty create was refused as invalid; nothing stored)")
            else:
                found.add("scope", "warn", f"an empty create was answered HTTP {write.status_code}: write scope "
                          "not confirmed")
            _plan(found, write.headers, first=answer.headers)
        else:
            found.add("scope", "warn", f"write scope not checked: {write.reason}")
            _plan(found, answer.headers)
        if probe:
            shape = await _probe(found, http, headers) or shape
        found.add("responses", "ok" if shape else "info",
                  f"resources come back {shape}" if shape else
                  "shape not seen (no resource to look at; --probe creates one)")
        found.plan["responses"] = shape
    return found


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _shape(body: Any) -> str | None:
    """``fhir`` or ``simple`` from a search page's first resource; None when there is none."""
    data = body.get("data") if isinstance(body, dict) else None
    items = data.get("data") if isinstance(data, dict) else data
    if isinstance(items, list) and items and isinstance(items[0], dict):
        return _shape_of(items[0])
    return None


def _shape_of(resource: dict[str, Any]) -> str:
    """A patient as the SDK's types describe it (FHIR R4: ``name`` a list of HumanNames) or the create body echoed
    (``firstName``/``lastName``); both carry ``id`` and may carry ``resourceType``."""
    if "firstName" in resource or "lastName" in resource:
        return "simple (the create body echoed)"
    return "fhir (FHIR R4 resources)"


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _plan(found: Diagnosis, headers: httpx.Headers, *, first: httpx.Headers | None = None) -> None:
    """The rate limit and the quotas the headers announce."""
    limit = _int(headers.get("x-ratelimit-limit"))
    remaining = _int(headers.get("x-ratelimit-remaining"))
    resets = [r for r in (_int(h.get("x-ratelimit-reset")) for h in (first, headers) if h is not None) if r]
    if limit is None or limit >= _UNLIMITED:
        found.add("rate limit", "info", "none announced (no X-RateLimit-Limit): paced by the answers")
    else:
        # The window is not announced; a fresh window's reset is its length (the docs: 60 s, rolling).
        window = max(resets) if resets else 60
        found.plan.update(rate_limit=limit, window_seconds=window, remaining=remaining)
        found.add("rate limit", "ok" if remaining else "warn",
                  f"{limit} requests per {window} s ({remaining} left in this window)")
    for prefix, name in (("x-quota", "monthly quota"), ("x-sandbox", "sandbox allowance")):
        size = _int(headers.get(f"{prefix}-limit"))
        if size is None:
            continue
        left = _int(headers.get(f"{prefix}-remaining"))
        reset = headers.get("x-quota-reset") if prefix == "x-quota" else None
        found.plan[name.replace(" ", "_")] = {"limit": size, "remaining": left, **({"reset": reset} if reset else {})}
        when = f", resets {reset}" if reset else ", resets on the 1st of the month (UTC)"
        found.add(name, "ok" if left else "warn", f"{left} of {size} requests left{when}")
    if not any(h in headers for h in ("x-quota-limit", "x-sandbox-limit")):
        found.add("quota", "info", "none announced (no X-Quota-* or X-Sandbox-* headers)")


def _transport(found: Diagnosis, response: httpx.Response, base_url: str) -> None:
    if httpx.URL(base_url).scheme == "http":
        found.add("tls", "info", "plain http: allowed only to this machine (loopback)")
        return
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    version = ssl_object.version() if ssl_object is not None else None
    found.add("tls", "ok", f"{version or 'TLS'}, certificate verified ({response.http_version})")


def _clock(found: Diagnosis, headers: httpx.Headers) -> None:
    date = headers.get("date")
    try:
        server = email.utils.parsedate_to_datetime(date) if date else None
    except (TypeError, ValueError):
        server = None
    if server is None:
        found.add("clock", "info", "no Date header: skew not checked")
        return
    skew = (datetime.now(UTC) - server).total_seconds()
    found.plan["clock_skew_seconds"] = round(skew, 1)
    status: Status = "warn" if abs(skew) > SKEW_WARN_SECONDS else "ok"
    found.add("clock", status, f"{abs(skew):.0f} s {'ahead of' if skew >= 0 else 'behind'} the server")


async def _probe(found: Diagnosis, http: httpx.AsyncClient, headers: dict[str, str]) -> str | None:
    """One create, search polled until it shows it (the lag), then a delete. The shape of what came back."""
    from etl.load.client import exchange

    answer = await exchange(http.post("/v1/patients", content=json.dumps(_PROBE_PATIENT).encode(),
                                      headers={**headers, "content-type": "application/json"}))
    if not isinstance(answer, httpx.Response) or answer.status_code not in (200, 201):
        status = answer.status_code if isinstance(answer, httpx.Response) else answer.reason
        found.add("search lag", "warn", f"probe create not made ({status})")
        return None
    created = time.monotonic()
    resource = (_json(answer) or {}).get("data") or {}
    rid = str(resource.get("id", ""))
    lag: float | None = None
    params: dict[str, str | int] = {"name": _PROBE_PATIENT["lastName"], "birthDate": _PROBE_PATIENT["birthDate"],
                                    "count": 100}
    while (waited := time.monotonic() - created) < MAX_SEARCH_LAG:
        page = await exchange(http.get("/v1/patients", params=params, headers=headers))
        if isinstance(page, httpx.Response) and page.status_code == 200:
            items = ((_json(page) or {}).get("data") or {}).get("data") or []
            if any(isinstance(i, dict) and str(i.get("id")) == rid for i in items):
                lag = time.monotonic() - created
                break
        await asyncio.sleep(max(0.25, waited / 4))
    await exchange(http.delete(f"/v1/patients/{rid}", headers=headers))
    if lag is None:
        found.add("search lag", "warn", f"search did not show the probe's create within {MAX_SEARCH_LAG:g} s: "
                  "unknown outcomes could not be settled in a run")
    else:
        found.plan["search_lag_seconds"] = round(lag, 2)
        found.add("search lag", "ok", f"search showed a create after {lag:.1f} s (a load waits at least this, "
                  "never less than --consistency-window)")
    return _shape_of(resource) if isinstance(resource, dict) and resource else None


def _estimate(found: Diagnosis, settings: Settings, files: Sequence[Path]) -> None:
    """The requests a load of ``files`` needs (a dry run) and how long they take at the plan's rate."""
    from etl.pipeline import load_files

    with tempfile.TemporaryDirectory(prefix="clinik-doctor-") as folder:
        planned = settings.model_copy(update={"dry_run": True, "report_dir": Path(folder) / "dry-run"})
        report = load_files(list(files), planned)
    per_kind = report.summary.get("requests_planned") or {}
    needed = sum(per_kind.values()) if isinstance(per_kind, dict) else int(per_kind)
    found.plan["requests_needed"] = needed
    text = f"{needed} requests to load {len(files)} file(s)"
    limit, window = found.plan.get("rate_limit"), found.plan.get("window_seconds")
    if limit and window:
        seconds = math.ceil(needed / (limit / window))
        found.plan["estimated_seconds"] = seconds
        text += f": about {_duration(seconds)} at {limit} per {window} s"
    found.add("files", "ok", text)
    for name in ("monthly_quota", "sandbox_allowance"):
        pool = found.plan.get(name)
        if isinstance(pool, dict) and pool.get("remaining") is not None and pool["remaining"] < needed:
            found.add("files", "warn", f"the {name.replace('_', ' ')} has {pool['remaining']} requests left, fewer "
                      f"than {needed}: a load would stop with exit 5 and finish after the reset")


def _duration(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
