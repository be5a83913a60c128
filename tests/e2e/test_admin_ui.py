"""The operator page (``/admin/ui``) in a real headless Chromium against ``driftsched serve``.

Playwright for Python drives the system's Chromium (Debian's ``chromium`` package; no browser
download). The gateway runs on one stub engine registered twice (``stub0``, ``stub1``) under
the ``driftsched`` policy, with a batch tenant held to one request at a time and three slow
requests of its own, so that one runs and two wait in the queue while the page is looked at.

Checked: without the admin key the page shows no data (and a wrong key is refused); with it
tenants, usage, engines, the queue per class and tenant and the drift table render from the
admin API; creating a key shows its prefix (and the key once) and the key works; draining an
engine and undraining it show in the page and in the API; signing out empties the page. A
full-page screenshot goes to the test's tmp dir and, if ``DRIFTSCHED_SCREENSHOT_DIR`` is set,
there too.

Without Chromium or Playwright the test is skipped, except in CI (``CI`` set), where .ci/run
installs Chromium and ``make install`` Playwright, and a skip would hide an untested page.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import ADMIN_KEY, Proc, start_gateways, start_stub

pytestmark = [pytest.mark.e2e]

ACME_KEY = "dsk-uiacme00-" + "a" * 40
BULK_KEY = "dsk-uibulk00-" + "b" * 40
SLOW_MS = 120_000  # the batch tenant's requests hold their slot for the whole test
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; .ci/run installs Chromium and make install installs Playwright")
    pytest.skip(reason)


def _chromium() -> str:
    for exe in (os.environ.get("DRIFTSCHED_CHROMIUM"), "chromium", "chromium-browser",
                "google-chrome"):
        if exe and (path := shutil.which(exe)):
            return path
    _missing("no Chromium for the operator-page test (apt-get install chromium)")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("admin-ui")
    stub, stub_url = start_stub(tmp, chunks=4)
    procs: list[Proc] = []
    load: list[socket.socket] = []
    try:
        procs, urls = start_gateways({
            "server": {"access_log": False, "auth_cache_ttl_s": 0},
            "admin": {"api_key": ADMIN_KEY},
            "store": {"type": "memory"},
            "scheduler": {"policy": {"type": "driftsched"}},
            "upstreams": [{"name": "stub0", "url": stub_url, "models": ["stub"]},
                          {"name": "stub1", "url": stub_url, "models": ["stub"]}],
            "tenants": [
                {"name": "acme", "qos_class": "premium", "api_keys": [ACME_KEY]},
                {"name": "bulk", "qos_class": "batch", "max_concurrency": 1,
                 "queue_timeout_s": 120, "api_keys": [BULK_KEY]},
            ],
        }, tmp, 1)
        url = urls[0]
        assert _chat(url, ACME_KEY).status_code == 200  # some usage to show
        load = [_slow_request(url, BULK_KEY) for _ in range(3)]
        _wait_for(lambda: httpx.get(url + "/admin/scheduler", headers=ADMIN)
                  .json()["queue_depth"].get("bulk") == 2, "two bulk requests queued")
        yield url
    finally:
        for sock in load:  # a disconnect cancels them: the gateway then stops at once
            sock.close()
        for p in procs:
            p.stop()
        stub.stop()


def _chat(url: str, key: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {key}"},
                      json={"model": "stub", "max_tokens": 4,
                            "messages": [{"role": "user", "content": "hi"}]})


def _slow_request(url: str, key: str) -> socket.socket:
    """A chat request the stub answers after ``SLOW_MS``, sent on a socket of its own and
    left unread: closing the socket is the client going away."""
    body = json.dumps({"model": "stub", "max_tokens": 4, "stub_delay_ms": SLOW_MS,
                       "messages": [{"role": "user", "content": "slow"}]}).encode()
    u = httpx.URL(url)
    sock = socket.create_connection((u.host, u.port or 80), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s\r\n"
                 b"authorization: Bearer %s\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s"
                 % (u.host.encode(), key.encode(), len(body), body))
    return sock


def _wait_for(cond: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_operator_page(gateway: str, tmp_path: Path) -> None:
    chromium = _chromium()
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _missing("Playwright is not installed (pip install -e '.[dev]')")
        raise

    # the page itself is a shell: no tenant, key or engine in it
    shell = httpx.get(gateway + "/admin/ui", timeout=10)
    assert shell.status_code == 200 and "DriftSched operator" in shell.text
    for secret in ("acme", "bulk", "stub0", "uiacme", ADMIN_KEY):
        assert secret not in shell.text
    assert "script-src 'self'" in shell.headers["content-security-policy"]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            _check_page(page, expect, gateway, tmp_path)
            # a wrong key's 401 is logged by Chromium as a failed resource load; nothing else
            assert [e for e in errors if "401" not in e] == [], errors
        finally:
            browser.close()


def _check_page(page: Any, expect: Any, gateway: str, tmp_path: Path) -> None:
    page.set_default_timeout(10_000)
    page.goto(gateway + "/admin/ui")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#dashboard")).to_be_hidden()

    # without the key: nothing; a wrong key is refused and not kept
    page.fill("#admin-key", "wrong-key")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("refused")
    expect(page.locator("#dashboard")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0
    for name in ("acme", "bulk", "stub0"):
        assert name not in page.locator("body").inner_text()

    page.fill("#admin-key", ADMIN_KEY)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#dashboard")).to_be_visible()

    # tenants with usage, engines, the queue per class and tenant, the drift table
    acme = page.locator("#tenants tr[data-key=acme]")
    expect(acme).to_contain_text("premium")
    expect(page.locator("#tenants tr[data-key=bulk]")).to_contain_text("batch")
    assert acme.locator("td").nth(8).inner_text() == "1"  # requests
    for engine in ("stub0", "stub1"):
        expect(page.locator(f"#engines tr[data-key={engine}]")).to_contain_text("healthy")
    bulk_q = page.locator("#queue-tenants tr[data-key=bulk] td")
    expect(bulk_q.nth(2)).to_have_text("2")  # queued
    expect(bulk_q.nth(3)).to_have_text("1")  # in flight
    expect(page.locator("#queue-classes tr[data-key=batch] td").nth(3)).to_have_text("2")
    expect(page.locator("#queue-classes tr[data-key=premium] td").nth(3)).to_have_text("0")
    expect(page.locator("#drift tr[data-key=bulk]")).to_be_visible()
    expect(page.locator("#summary")).to_contain_text("policy driftsched")
    expect(page.locator("#keys tr[data-key]")).to_have_count(2)  # the two from config

    # create a key: its prefix shows (and the key, once); the key works
    page.select_option("#key-tenant", "acme")
    page.fill("#key-name", "from-the-page")
    page.click("#key-form button[type=submit]")
    expect(page.locator("#new-key")).to_be_visible()
    prefix = page.locator("#new-key-prefix").inner_text()
    key = page.input_value("#new-key-value")
    assert key.startswith(prefix + "-") and prefix.startswith("dsk-")
    row = page.locator("#keys tbody tr", has_text="from-the-page")
    expect(row).to_contain_text(prefix)
    expect(row).to_contain_text("active")
    assert key not in page.locator("#keys").inner_text()
    listed = httpx.get(gateway + "/admin/keys", params={"prefix": prefix}, headers=ADMIN).json()
    assert [k["name"] for k in listed] == ["from-the-page"]
    models = httpx.get(gateway + "/v1/models", headers={"authorization": f"Bearer {key}"})
    assert models.status_code == 200

    page.click("#new-key-dismiss")  # the key leaves the page (and the screenshot)
    expect(page.locator("#new-key")).to_be_hidden()
    assert page.input_value("#new-key-value") == ""
    assert key not in page.content()

    # a label is text, never markup
    xss = '<img src=x onerror="window.__xss = 1">'
    page.fill("#key-name", xss)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#keys tbody tr", has_text=xss)).to_be_visible()
    assert page.evaluate("window.__xss") is None
    assert page.locator("#keys img").count() == 0
    page.click("#new-key-dismiss")

    # drain an engine, then take it back
    page.locator("#engines tr[data-key=stub1] button.drain").click()
    expect(page.locator("#engines tr[data-key=stub1]")).to_contain_text("draining")
    expect(page.locator("#engines tr[data-key=stub0]")).to_contain_text("healthy")
    states = {b["name"]: b["state"] for b in
              httpx.get(gateway + "/admin/backends", headers=ADMIN).json()}
    assert states == {"stub0": "healthy", "stub1": "draining"}
    _screenshot(page, tmp_path)
    page.locator("#engines tr[data-key=stub1] button.undrain").click()
    expect(page.locator("#engines tr[data-key=stub1]")).to_contain_text("healthy")

    # a reload keeps the session (this tab's sessionStorage); signing out ends it
    page.reload()
    expect(page.locator("#tenants tr[data-key=acme]")).to_be_visible()
    page.click("#signout")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    assert "acme" not in page.locator("body").inner_text()
    page.reload()
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#dashboard")).to_be_hidden()


def _screenshot(page: Any, tmp_path: Path) -> None:
    shot = tmp_path / "admin-ui.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if out := os.environ.get("DRIFTSCHED_SCREENSHOT_DIR"):
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(out) / shot.name)
