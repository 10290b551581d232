"""GET / (the playground page) and GET /web/<asset> (its script modules and stylesheet).

The page itself needs no API key: it holds no data, and every API call it makes carries the key the user
typed. Only the files listed in ASSETS are served, read from this package (installed as package data).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from kleinserve.errors import NotFound

WEB_DIR = Path(__file__).resolve().parent
ASSETS = {
    "playground.js": "text/javascript",
    "api.js": "text/javascript",
    "snippets.js": "text/javascript",
    "gallery.js": "text/javascript",
    "loras.js": "text/javascript",
    "mask.js": "text/javascript",
    "playground.css": "text/css",
}
# The page runs only its own scripts and talks only to this server; images may also be data: and blob: URLs
# (previews, reference thumbnails). Result URLs are absolute and built from the request's own base URL.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
# Revalidate every time (a 304 is cheap) so that a server upgrade never runs an old script with a new page.
_HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": CONTENT_SECURITY_POLICY}


def build_router() -> APIRouter:
    """The playground's routes; none of them authenticates (see the module docstring)."""
    router = APIRouter(include_in_schema=False)

    @router.api_route("/", methods=["GET", "HEAD"])  # HEAD for uptime checks
    async def playground() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=_HEADERS)

    @router.get("/web/{name}")
    async def asset(name: str) -> FileResponse:
        media_type = ASSETS.get(name)
        if media_type is None:  # a fixed list: no path from the URL ever reaches the file system
            raise NotFound(f"no playground asset {name!r}")
        return FileResponse(WEB_DIR / name, media_type=media_type, headers=_HEADERS)

    return router
