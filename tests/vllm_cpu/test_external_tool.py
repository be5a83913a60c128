"""Smoke run of bench/external_tool.py (docs/load-tools.md): vLLM's own benchmark client,
``vllm bench serve`` from the tier's venv, drives a gateway fronting simulator engines, offline
(the tiny model's local tokenizer), and the script compares its figures with the gateway's
``/metrics``. 40 requests, ~30 s.

Counts must agree exactly (the two sides count the same requests and the same engine usage).
The timing figures are only held to the same order (0.5-2x: a wrong window, unit or bucket
sum would be far off): on 2 shared cores the 10% agreement is the recipe's measurement
(docs/load-tools.md), not something a test can promise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.vllm_cpu import REPO_ROOT

pytestmark = [pytest.mark.vllm_cpu, pytest.mark.slow]


@pytest.mark.timeout(300, func_only=True)
def test_vllm_bench_serve_against_the_gateway(vllm_python: str, tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "external_tool.py"), "--num-prompts", "40",
         "--input-len", "256", "--output-len", "32", "--json", str(out)],
        env={**os.environ, "DRIFTSCHED_VLLM_PYTHON": vllm_python}, cwd=tmp_path,
        capture_output=True, text=True, timeout=280, check=False)
    assert proc.returncode in (0, 1), f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "| TTFT p50 (ms) |" in proc.stdout  # the table
    figures = json.loads(out.read_text())
    tool, gw = figures["tool"], figures["gateway"]
    rows = {r["figure"]: r for r in figures["rows"]}
    assert tool["completed"] == gw["requests"] == 40 and tool["failed"] == gw["failed"] == 0
    assert tool["total_output_tokens"] == gw["output_tokens"] == 40 * 32  # ignore_eos
    assert tool["total_input_tokens"] == gw["prompt_tokens"]  # the same tokenizer on both sides
    for name in ("TTFT p50 (ms)", "TTFT p50 (ms), access log", "TTFT mean (ms)",
                 "throughput (req/s)", "output (tok/s)", "duration (s)"):
        assert 0.5 < rows[name]["ratio"] < 2, rows[name]
    assert (proc.returncode == 0) == all(r["verdict"] == "PASS" for r in rows.values())
