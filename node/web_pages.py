"""The chat and swarm pages: static files from the package (no build step, no CDN; they work
offline), served with a content security policy that lets them load nothing but this server's own
scripts, styles and API."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

WEB_DIR = Path(__file__).with_name("web")
PAGES = {"/": "index.html", "/swarm": "swarm.html"}
ASSETS = {"hearth.css": "text/css", "api.js": "text/javascript", "chat.js": "text/javascript", "swarm.js": "text/javascript"}
CSP = ("default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache", "X-Frame-Options": "DENY"}
STATIC_PREFIX = "/static/"


def public_paths() -> frozenset[str]:
    """Paths anyone may GET (they carry no data: the pages ask the API for it, with the key)."""
    return frozenset(PAGES) | {STATIC_PREFIX + name for name in ASSETS}


def page_routes() -> list[Route]:
    """Routes for the pages and their assets, read once from the package."""
    def serve(body: bytes, media_type: str):
        async def endpoint(request: Request) -> Response:
            return Response(body, media_type=media_type, headers=HEADERS)
        return endpoint

    routes = [Route(path, serve((WEB_DIR / name).read_bytes(), "text/html; charset=utf-8"), methods=["GET"])
              for path, name in PAGES.items()]
    routes += [Route(STATIC_PREFIX + name, serve((WEB_DIR / name).read_bytes(), f"{media}; charset=utf-8"),
                     methods=["GET"]) for name, media in ASSETS.items()]
    return routes
