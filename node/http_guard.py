"""Who may drive the HTTP API: the Host a request names and the web page it comes from.

An API on 127.0.0.1 without a key is reachable by every web page the user opens: a page may POST
to it (a `text/plain` body needs no preflight), and through DNS rebinding (a name the attacker
controls that resolves to 127.0.0.1) may even read the answers. `OriginGuard` closes both:

- the `Host` header must be a name this server answers to (loopback names for a loopback bind;
  the bound address or loopback names for a specific address; any name for a wildcard bind, which
  needs an API key anyway), so a rebound name gets 403;
- a request that a browser marks as coming from another origin (`Origin` other than this server's,
  `Sec-Fetch-Site` other than same-origin or none) gets 403 on every route but the static pages
  (a link from elsewhere may open the chat page; only the page's own requests use the API);
- a POST must say `Content-Type: application/json`, which a cross-site form or a no-preflight
  fetch cannot send (415 otherwise).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection

from starlette.responses import JSONResponse

from node.openai_format import ApiError

WILDCARDS = ("0.0.0.0", "::", "")


def host_name(header: str) -> str:
    """The name of a `Host` header value, without its port: `[::1]:8000` -> `::1`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header[1:]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_loopback_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(name: str, bind_host: str) -> bool:
    """Whether a request naming `name` in its Host header may reach a server bound to `bind_host`."""
    bind = bind_host.strip("[]").lower()
    if bind in WILDCARDS:
        return True
    return name == bind or is_loopback_name(name)


class OriginGuard:
    """ASGI middleware applying the rules above; `pages` are the paths any origin may GET."""

    def __init__(self, app, bind_host: str, pages: Collection[str] = (),
                 on_error: Callable[[ApiError], None] = lambda error: None):
        self.app, self.bind_host, self.pages, self.on_error = app, bind_host, frozenset(pages), on_error

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            error = self.check(scope)
            if error is not None:
                self.on_error(error)
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope) -> ApiError | None:
        headers = {}
        for key, value in scope.get("headers", []):
            headers.setdefault(key, value.decode("latin-1"))
        host = headers.get(b"host", "")
        if not host_allowed(host_name(host), self.bind_host):
            return ApiError(403, f"this server does not answer to the host name {host!r}", code="host_not_allowed")
        if scope["method"] == "GET" and scope["path"] in self.pages:
            return None
        origin = headers.get(b"origin")
        if origin is not None and origin.lower() not in (f"http://{host.lower()}", f"https://{host.lower()}"):
            return ApiError(403, f"requests from the web page at {origin!r} may not use this server",
                            code="origin_not_allowed")
        site = headers.get(b"sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return ApiError(403, f"a {site} request from a web page may not use this server", code="origin_not_allowed")
        if scope["method"] == "POST":
            media = headers.get(b"content-type", "").split(";")[0].strip().lower()
            if media != "application/json":
                return ApiError(415, f"the request body must be JSON, sent as 'Content-Type: application/json' "
                                f"(got {media or 'no content type'!r})", code="unsupported_media_type")
        return None
