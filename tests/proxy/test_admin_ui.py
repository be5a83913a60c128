"""The operator page's serving (``/admin/ui``): a shell without data, confined headers, and
package data that a wheel carries. The page's behaviour is tested in a browser
(tests/e2e/test_admin_ui.py)."""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from proxy.app import create_app
from proxy.config import settings_from_dict
from tests.harness import ADMIN_KEY, make_settings

ROOT = Path(__file__).resolve().parents[2]
UI = ROOT / "proxy" / "ui"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(tenants=[{"name": "secret-tenant",
                                             "api_keys": ["dsk-uitest00-" + "s" * 40]}]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gw") as c:
        yield c


async def test_page_is_served_without_the_key_and_holds_no_data(client: httpx.AsyncClient) -> None:
    r = await client.get("/admin/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.content == (UI / "index.html").read_bytes()
    for secret in ("secret-tenant", "uitest00", ADMIN_KEY):
        assert secret not in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"
    # the data is behind the key
    assert (await client.get("/admin/tenants")).status_code == 401


@pytest.mark.parametrize(("name", "media"), [("app.js", "text/javascript"),
                                              ("style.css", "text/css")])
async def test_assets(client: httpx.AsyncClient, name: str, media: str) -> None:
    r = await client.get(f"/admin/ui/{name}")
    assert r.status_code == 200 and r.headers["content-type"].startswith(media)
    assert r.content == (UI / name).read_bytes()
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["/admin/ui/nope.js", "/admin/ui/index.html",
                                  "/admin/ui/..%2Fadmin.py", "/admin/ui/app.js/x"])
async def test_nothing_else_is_served(client: httpx.AsyncClient, path: str) -> None:
    r = await client.get(path)
    assert r.status_code == 404 and "error" in r.json()


async def test_other_methods_answer_in_openai_shape(client: httpx.AsyncClient) -> None:
    r = await client.post("/admin/ui")
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_no_external_resource_in_the_page() -> None:
    """No CDN: the page loads offline (CSP would block it anyway)."""
    for f in UI.iterdir():
        text = f.read_text()
        assert "http://" not in text and "https://" not in text, f.name


def test_package_data_carries_every_ui_file() -> None:
    """A wheel install serves the page: pyproject's package data matches every file in
    proxy/ui/."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["proxy"]
    for f in UI.iterdir():
        rel = f"ui/{f.name}"
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} not in package data {globs}"


async def test_trailing_slash_redirects_to_the_page(client: httpx.AsyncClient) -> None:
    r = await client.get("/admin/ui/")
    assert r.status_code in (307, 308) and r.headers["location"].endswith("/admin/ui")


async def test_page_loads_with_the_admin_api_disabled() -> None:
    """Its sign-in then shows the API's 403 ``admin_disabled`` message."""
    app = create_app(settings_from_dict({"store": {"type": "memory"}}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gw") as c:
        assert (await c.get("/admin/ui")).status_code == 200
        r = await c.get("/admin/tenants", headers={"authorization": "Bearer x"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
