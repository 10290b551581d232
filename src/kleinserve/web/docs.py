"""GET /docs (Swagger UI) over /openapi.json, with every script, stylesheet and icon served by this server.

FastAPI's own pages load Swagger UI and ReDoc from a CDN (and ReDoc its fonts from Google): a self-hosted
server must not make its users' browsers call out. The files come from the `fastapi-offline` package (its
static folder only; its app factory is not used), and a Content-Security-Policy keeps the page to this
origin. There is no /redoc: even served locally, ReDoc loads its logo from its CDN. Guarded by
tests/web/test_docs.py.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from kleinserve.errors import NotFound

STATIC_DIR = files("fastapi_offline") / "static"
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}
# The pages' inline start-up scripts and styles are FastAPI's; everything they load is same-origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY}


def build_router(title: str, openapi_url: str) -> APIRouter:
    """The documentation page for the app whose schema is at `openapi_url`; no API key needed."""
    router = APIRouter(include_in_schema=False)

    @router.get("/docs")
    async def swagger_ui() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title} API",
            swagger_js_url="/docs/static/swagger-ui-bundle.js",
            swagger_css_url="/docs/static/swagger-ui.css",
            swagger_favicon_url="/docs/static/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # its badge asks validator.swagger.io otherwise
        )
        page.headers.update(_HEADERS)
        return page

    @router.get("/docs/static/{name}")
    async def asset(name: str) -> FileResponse:
        media_type = ASSETS.get(name)
        if media_type is None:  # a fixed list: no path from the URL reaches the file system
            raise NotFound(f"no documentation asset {name!r}")
        return FileResponse(str(STATIC_DIR / name), media_type=media_type)

    return router
