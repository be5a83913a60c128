"""The core install (``pip install driftsched``) runs without its extras.

The core is the gateway and the simulator engine; LiteLLM, the OpenAI SDK, tqdm and
matplotlib are extras (pyproject.toml). These tests make the extras' packages unimportable,
as on a core-only install, and check that every core module still imports and that a
``provider: litellm`` backend says which extra to install.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from adapters.litellm_transport import (
    INSTALL_HINT,
    LiteLLMMissing,
    LiteLLMTransport,
    litellm_ready,
    load_litellm,
)
from tests.harness import GatewayThread, make_settings, start_stub

ROOT = Path(__file__).resolve().parents[2]

#: top-level packages that only extras install (litellm, demo, experiments, vllm)
EXTRAS_ONLY = ("litellm", "openai", "tqdm", "matplotlib", "vllm")
#: core-tree modules that belong to an extra: ``driftsched estimator-eval`` ([experiments])
EXTRA_MODULES = ("policies.estimator_eval",)


def test_every_core_module_imports_without_the_extras() -> None:
    script = textwrap.dedent(f"""
        import importlib, pkgutil, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {EXTRAS_ONLY!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, Block())
        done = []
        for pkg in ("proxy", "adapters", "policies"):
            importlib.import_module(pkg)
            for m in pkgutil.walk_packages(sys.modules[pkg].__path__, pkg + "."):
                if m.name in {EXTRA_MODULES!r}:
                    continue
                importlib.import_module(m.name)
                done.append(m.name)
        from proxy.app import create_app
        from proxy.config import settings_from_dict
        create_app(settings_from_dict({{"store": {{"type": "memory"}}}}))
        print(len(done))
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.strip()) > 50  # the walk found the tree


def test_the_blocker_catches_an_extra_imported_by_a_core_module() -> None:
    # the check above can fail: an extra's package imported from the core is an error
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {EXTRAS_ONLY!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None
        sys.meta_path.insert(0, Block())
        import policies.estimator_eval  # imports tqdm ([experiments])
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "No module named 'tqdm'" in r.stderr


def test_litellm_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "litellm", None)  # import litellm -> ModuleNotFoundError
    with pytest.raises(LiteLLMMissing) as ei:
        load_litellm()
    assert "not installed" in str(ei.value) and INSTALL_HINT in str(ei.value)


async def test_litellm_missing_fails_health_and_requests_as_connect_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "litellm", None)
    ok, err = await litellm_ready()
    assert not ok and err is not None and INSTALL_HINT in err
    transport = LiteLLMTransport("anthropic/claude-haiku-4-5", name="claude")
    async with httpx.AsyncClient(transport=transport, base_url="http://litellm") as c:
        with pytest.raises(httpx.ConnectError, match=r"driftsched\[litellm\]"):
            await c.post("/v1/chat/completions", json={"messages": []})


def test_gateway_shows_the_install_hint_for_a_litellm_backend(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "litellm", None)
    key = "dsk-leancore-" + "l" * 40
    stub, stub_url = start_stub(tmp_path)  # a healthy engine, so that /readyz answers 200
    settings = make_settings(
        upstreams=[{"name": "claude", "provider": "litellm", "models": ["claude"],
                    "litellm_model": "anthropic/claude-haiku-4-5"},
                   {"name": "stub0", "url": stub_url, "models": ["stub"]}],
        tenants=[{"name": "a", "api_keys": [key], "queue_timeout_s": 1}],
    )
    try:
        g = GatewayThread(settings)
    except BaseException:
        stub.stop()
        raise
    try:
        deadline = time.monotonic() + 10
        while True:
            (b,) = [b for b in g.admin("GET", "/admin/backends").json() if b["name"] == "claude"]
            if b["state"] == "unhealthy" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert b["state"] == "unhealthy", b
        assert INSTALL_HINT in str(b), b
        r = httpx.post(g.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": "claude", "messages": [{"role": "user", "content": "hi"}]},
                       timeout=30)
        assert r.status_code == 503, r.text  # no healthy engine for the model: queue_timeout
        assert r.json()["error"]["message"]
    finally:
        g.stop()
        stub.stop()
