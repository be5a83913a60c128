"""Admin REST: tenants, keys (shown once, digests only, rotate, revoke), usage, backends, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.harness import ADMIN_KEY, GatewayThread, make_settings, start_stub

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    proc, url = start_stub(tmp_path_factory.mktemp("stub"))
    g = GatewayThread(make_settings(upstreams=[{"name": "stub0", "url": url, "models": ["stub"]}]))
    yield g
    g.stop()
    proc.stop()


def chat(gw: GatewayThread, key: str) -> openai.types.chat.ChatCompletion:
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    return c.chat.completions.create(model="stub", messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=2)


def test_admin_requires_admin_key(gw: GatewayThread) -> None:
    r = httpx.get(gw.url + "/admin/tenants")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key"
    r = httpx.get(gw.url + "/admin/tenants", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_tenant_crud_and_validation(gw: GatewayThread) -> None:
    r = gw.admin("POST", "/admin/tenants", json={"name": "t1", "qos_class": "premium", "rpm": 60})
    assert r.status_code == 201, r.text
    t = r.json()
    assert t["qos_class"] == "premium" and t["rpm"] == 60
    assert t["ttft_slo_ms"] == 1000  # the class default
    assert gw.admin("POST", "/admin/tenants", json={"name": "t1"}).status_code == 409
    bad = gw.admin("POST", "/admin/tenants", json={"name": "t2", "rpmm": 5})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rpmm"
    bad = gw.admin("POST", "/admin/tenants", json={"name": "t2", "qos_class": "gold"})
    assert bad.status_code == 400 and "gold" in bad.json()["error"]["message"]
    r = gw.admin("PATCH", "/admin/tenants/t1", json={"tpm": 1000, "allowed_models": ["stub"]})
    assert r.status_code == 200 and r.json()["tpm"] == 1000 and r.json()["rpm"] == 60
    assert [x["name"] for x in gw.admin("GET", "/admin/tenants").json()].count("t1") == 1
    assert gw.admin("GET", "/admin/tenants/nope").status_code == 404
    assert gw.admin("DELETE", "/admin/tenants/t1").status_code == 204
    assert gw.admin("GET", "/admin/tenants/t1").status_code == 404


def test_keys_shown_once_listed_by_prefix_revoked_and_rotated(gw: GatewayThread) -> None:
    gw.admin("POST", "/admin/tenants", json={"name": "k1"})
    r = gw.admin("POST", "/admin/tenants/k1/keys", json={"name": "ci"})
    assert r.status_code == 201
    created = r.json()
    key = created["key"]
    assert key.startswith(created["prefix"]) and len(key) > 40
    assert chat(gw, key).usage is not None

    listed = gw.admin("GET", "/admin/keys", params={"prefix": created["prefix"]}).json()
    assert [k["key_id"] for k in listed] == [created["key_id"]]
    assert "key" not in listed[0] and key not in httpx.get(
        gw.url + "/admin/keys", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text

    rot = gw.admin("POST", f"/admin/keys/{created['key_id']}/rotate", json={"grace_s": 0})
    assert rot.status_code == 201
    new_key = rot.json()["key"]
    assert new_key != key
    with pytest.raises(openai.AuthenticationError):
        chat(gw, key)
    assert chat(gw, new_key).usage is not None

    rev = gw.admin("DELETE", f"/admin/keys/{rot.json()['key_id']}")
    assert rev.status_code == 200 and rev.json()["active"] is False
    with pytest.raises(openai.AuthenticationError):
        chat(gw, new_key)


def test_rotation_grace_keeps_old_key_working(gw: GatewayThread) -> None:
    gw.admin("POST", "/admin/tenants", json={"name": "k2"})
    old = gw.admin("POST", "/admin/tenants/k2/keys").json()
    gw.admin("POST", f"/admin/keys/{old['key_id']}/rotate", json={"grace_s": 3600})
    assert chat(gw, old["key"]).usage is not None
    info = gw.admin("GET", f"/admin/keys/{old['key_id']}").json()
    assert info["active"] is True and info["expires_at"] is not None


def test_deleting_a_tenant_invalidates_its_keys(gw: GatewayThread) -> None:
    gw.admin("POST", "/admin/tenants", json={"name": "k3"})
    key = gw.admin("POST", "/admin/tenants/k3/keys").json()["key"]
    assert chat(gw, key).usage is not None
    gw.admin("DELETE", "/admin/tenants/k3")
    with pytest.raises(openai.AuthenticationError):
        chat(gw, key)


def test_usage_counts_requests_and_tokens(gw: GatewayThread) -> None:
    gw.admin("POST", "/admin/tenants", json={"name": "u1"})
    key = gw.admin("POST", "/admin/tenants/u1/keys").json()["key"]
    for _ in range(3):
        chat(gw, key)
    u = gw.admin("GET", "/admin/tenants/u1/usage").json()
    assert u["requests"] == 3 and u["tokens_out"] == 6 and u["tokens_in"] > 0
    assert u["tokens_today"] == u["tokens_in"] + u["tokens_out"]
    assert any(x["tenant"] == "u1" for x in gw.admin("GET", "/admin/usage").json())


def test_backends_listing_and_drain(gw: GatewayThread) -> None:
    b = gw.admin("GET", "/admin/backends").json()
    assert b[0]["name"] == "stub0" and b[0]["state"] == "healthy"
    r = gw.admin("POST", "/admin/backends/stub0/drain")
    assert r.status_code == 200
    gw.admin("POST", "/admin/tenants", json={"name": "d1"})
    key = gw.admin("POST", "/admin/tenants/d1/keys").json()["key"]
    with pytest.raises(openai.APIStatusError) as ei:
        chat(gw, key)
    assert ei.value.status_code == 503
    assert gw.admin("POST", "/admin/backends/stub0/undrain").status_code == 200
    assert chat(gw, key).usage is not None
    assert gw.admin("POST", "/admin/backends/nope/drain").status_code == 404


def test_openapi_docs(gw: GatewayThread) -> None:
    # behind the admin key (admin.public_docs is off by default)
    assert httpx.get(gw.url + "/admin/openapi.json").status_code == 401
    spec = gw.admin("GET", "/admin/openapi.json").json()
    assert "/admin/tenants" in spec["paths"] and "/admin/keys/{key_id}/rotate" in spec["paths"]
    assert gw.admin("GET", "/admin/docs").status_code == 200


def test_cli_wraps_the_admin_api(gw: GatewayThread) -> None:
    env = {**os.environ, "DRIFTSCHED_URL": gw.url, "DRIFTSCHED_ADMIN_KEY": ADMIN_KEY}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy.cli", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    r = cli("tenants", "create", "cli1", "--class", "batch", "--rpm", "30")
    assert r.returncode == 0, r.stderr
    r = cli("keys", "create", "cli1", "--name", "laptop")
    assert r.returncode == 0 and "not shown again" in r.stderr
    import json

    key = json.loads(r.stdout)["key"]
    assert chat(gw, key).usage is not None
    r = cli("keys", "list", "--tenant", "cli1")
    assert r.returncode == 0 and key not in r.stdout and '"prefix"' in r.stdout
    r = cli("tenants", "get", "nope")
    assert r.returncode != 0 and "404" in r.stderr
    assert cli("--help").returncode == 0
    assert "tenants" in cli("--help").stdout
