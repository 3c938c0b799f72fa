"""A local ClinikAPI: a real HTTP server on loopback that speaks the API's
contract (keys, scopes, envelope, errors, rate limits, validation, search,
bulk import) over a SQLite file, so the loader is tested over real sockets.

>>> with SandboxServer(SandboxConfig(rate_limit=500)) as server:  # doctest: +SKIP
...     httpx.post(server.base_url + "/v1/patients", headers={"x-api-key": server.api_key}, json=...)
"""

from etl.sandbox.app import SandboxConfig, create_app
from etl.sandbox.server import SandboxServer, serve_forever

__all__ = ["SandboxConfig", "SandboxServer", "create_app", "serve_forever"]
