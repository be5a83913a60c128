"""The operator page, ``/admin/ui``: three static files (``proxy/ui/``), no data.

The page is a client of the admin REST API (:mod:`proxy.admin`) and nothing else: tenants,
keys (prefixes), usage, the queue per class and tenant, engines, the drift controller and the
TPOT governor, with actions to create a key and to drain or undrain an engine. What it serves
is a sign-in shell: no tenant, key or engine data is in it, so it answers without the admin
key, as a login page does. Its script asks for the key, keeps it in the tab's
``sessionStorage`` (gone when the tab closes) and sends it as ``Authorization: Bearer`` on
each API call, where the key is checked. No build step and no external resource: the files
ship as package data and load offline.

The headers confine the page to its own origin (a Content-Security-Policy without inline
script, no framing, no referrer), so that script injected through a tenant or key name
could neither run nor reach the key.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from adapters.errors import NotFound

#: file name -> media type; nothing else under ``/admin/ui/`` is served
_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def build_ui_router() -> APIRouter:
    """Routes for ``GET /admin/ui`` (the page) and ``GET /admin/ui/{app.js,style.css}``.

    The files are read once, here, off the request path."""
    root = files("proxy") / "ui"
    content = {name: (root / name).read_bytes() for name in _ASSETS}
    router = APIRouter(prefix="/admin/ui", include_in_schema=False)

    def _file(name: str) -> Response:
        return Response(content[name], media_type=_ASSETS[name], headers=_HEADERS)

    @router.get("")
    async def page() -> Response:
        return _file("index.html")

    @router.get("/{name}")
    async def asset(name: str) -> Response:
        if name == "index.html" or name not in content:
            raise NotFound(f"no such file: /admin/ui/{name}", code="unknown_url")
        return _file(name)

    return router
