"""The official Node SDK (the ``openai`` npm package) against a real gateway process.

``tests/e2e/node/sdk.test.mjs`` (run with ``node --test``) checks chat, streaming with and
without ``stream_options.include_usage``, errors as the SDK's own classes and retries that
wait what ``retry-after-ms`` says. This test starts a stub engine and ``driftsched serve``,
installs the pinned package into ``tests/e2e/node/node_modules`` on first use (``npm ci``,
from the committed lock file; .ci/run does it up front) and runs the file.

Without ``node`` (20 or newer) or ``npm`` it is skipped, except in CI (``CI`` set), where
.ci/run installs both and a skip would hide that the SDK was never run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Proc, start_gateways, start_stub

pytestmark = [pytest.mark.e2e]

NODE_DIR = Path(__file__).parent / "node"
KEY = "dsk-nodesdk0-" + "n" * 40
RL_KEY = "dsk-nodesdk1-" + "r" * 40
RL_RPM = 30  # one request refills every 2 s: the retry wait is far from the SDK's own backoff


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; .ci/run installs Node.js and npm")
    pytest.skip(reason)


def _node_version(node: str) -> tuple[int, ...]:
    out = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout
    return tuple(int(x) for x in out.strip().lstrip("v").split(".")[:2])


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the pinned ``openai`` package installed beside the test file."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _missing("node and npm are needed for the Node SDK test (apt-get install nodejs npm)")
    assert node is not None and npm is not None
    if _node_version(node) < (20, 0):  # openai 7 asks for 22; it runs on 20 (tested 20.20)
        _missing(f"Node.js {_node_version(node)} is too old for the openai package (20+)")
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    want = lock["packages"]["node_modules/openai"]["version"]
    installed = NODE_DIR / "node_modules" / "openai" / "package.json"
    if not installed.exists() or json.loads(installed.read_text())["version"] != want:
        r = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                           capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            pytest.fail(f"npm ci in {NODE_DIR} failed:\n{r.stdout}\n{r.stderr}")
    return node


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("node-sdk")
    stub, stub_url = start_stub(tmp, chunks=8)
    procs: list[Proc] = []
    try:
        procs, urls = start_gateways({
            "server": {"access_log": False},
            "store": {"type": "memory"},
            "upstreams": [{"name": "stub0", "url": stub_url, "models": ["stub"]}],
            "tenants": [
                {"name": "node", "rpm": 100_000, "api_keys": [KEY]},
                {"name": "node-rl", "rpm": RL_RPM, "api_keys": [RL_KEY]},
            ],
        }, tmp, 1)
        yield urls[0]
    finally:
        for p in procs:
            p.stop()
        stub.stop()


def test_official_node_sdk(node: str, gateway: str) -> None:
    env = {**os.environ, "GATEWAY_URL": gateway, "KEY": KEY, "RL_KEY": RL_KEY,
           "RL_RPM": str(RL_RPM), "MODEL": "stub"}
    r = subprocess.run([node, "--test", "--test-reporter=spec", "sdk.test.mjs"], cwd=NODE_DIR,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"node --test failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    print(r.stdout)
    assert "fail 0" in r.stdout, r.stdout[-3000:]
