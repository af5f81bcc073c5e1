"""Ask a running `selfhost serve` what it holds (`selfhost ps`): GET /v1/status, behind the API key."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from selfhost.errors import NotFoundError, UsageError


def server_status(host: str, port: int, api_key: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """The server's /v1/status. Raises NotFoundError (nothing listening) or UsageError (wrong key)."""
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/v1/status"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            hint = "pass --api-key or set SELFHOST_API_KEY"
            raise UsageError(f"the server at {url} needs its API key", hint=hint) from None
        raise NotFoundError(f"{url} answered {exc.code}: is this a selfhost server?") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NotFoundError(
            f"no selfhost server at {shown}:{port} ({reason})",
            hint="start one with `selfhost serve`, or pass its --host/--port",
        ) from None
