"""The playground's own routes: the page and its assets are served by the app, without an API key."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx

from kleinserve.api.auth import DATABASE_NAME, SqliteKeyStore
from kleinserve.web.routes import ASSETS, WEB_DIR
from tests.api.conftest import RunningServer


def test_page_and_assets_need_no_key(start_server: Callable[..., RunningServer], tmp_path: Path) -> None:
    keys = SqliteKeyStore(tmp_path / "data-0" / DATABASE_NAME)
    keys.create("alice")
    keys.close()
    running = start_server()
    with httpx.Client(base_url=running.base_url) as http:
        page = http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert http.head("/").status_code == 200
        for name, media_type in ASSETS.items():
            asset = http.get(f"/web/{name}")
            assert asset.status_code == 200, name
            assert asset.headers["content-type"].startswith(media_type)
            assert asset.content == (WEB_DIR / name).read_bytes()
        assert http.get("/v1/models").status_code == 401  # the API itself still wants the key


def test_only_listed_assets_are_served(server: RunningServer) -> None:
    with httpx.Client(base_url=server.base_url) as http:
        for path in ("/web/index.html", "/web/routes.py", "/web/..%2Froutes.py", "/web/%2e%2e%2fapp.py"):
            answer = http.get(path)
            assert answer.status_code == 404, path
            assert "error" in answer.json()


def test_the_page_loads_every_asset_it_names() -> None:
    """index.html and the modules refer only to files that ASSETS serves (and ASSETS lists nothing unused)."""
    html = (WEB_DIR / "index.html").read_text()
    named = set(re.findall(r'"/web/([\w.-]+)"', html))
    for module in [name for name in ASSETS if name.endswith(".js")]:
        named |= set(re.findall(r'from "\./([\w.-]+)"', (WEB_DIR / module).read_text()))
    assert named == set(ASSETS)
