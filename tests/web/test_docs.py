"""/docs in a real Chromium: it renders the API from /openapi.json and every request the page makes goes to
this server (FastAPI's own pages load Swagger UI from a CDN; a self-hosted server must not make its users'
browsers call out). There is no /redoc: ReDoc loads its logo from its CDN even when served locally."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
from playwright.sync_api import Page, Request, expect

from tests.api.conftest import RunningServer


def test_documentation_page_loads_everything_from_this_server(page: Page, server: RunningServer) -> None:
    requested: list[str] = []

    def record(request: Request) -> None:
        requested.append(request.url)

    page.on("request", record)
    page.goto(server.base_url + "/docs")
    expect(page.get_by_text("/v1/images/generations").first).to_be_visible()
    origin = urlsplit(server.base_url).netloc
    assert len(requested) >= 3  # the page, its script, the schema
    assert [
        url
        for url in requested
        if urlsplit(url).scheme in ("http", "https") and urlsplit(url).netloc != origin
    ] == []
    assert server.base_url + "/openapi.json" in requested


def test_documentation_assets_are_a_fixed_list(server: RunningServer) -> None:
    with httpx.Client(base_url=server.base_url) as http:
        page = http.get("/docs")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "cdn" not in page.text and "https://" not in page.text
        script = http.get("/docs/static/swagger-ui-bundle.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        assert http.get("/docs/static/..%2Fcore.py").status_code == 404
        assert http.get("/docs/static/core.py").status_code == 404
        assert http.get("/redoc").status_code == 404
