"""``run_experiment.sh`` end to end on the miniature scenario (the metrics' arithmetic:
``test_metrics.py``, ``test_fairness.py``).

The end-to-end test drives the real processes (gateway, two simulator engines through the
pool manager, the load generator) on ``experiments/scenarios/mini.yaml`` (15 s of arrivals)
at time scale 4 for two policies, then checks that the report, the CSVs and the plots exist
and that the numbers are sane. It asserts nothing about performance.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_mini_experiment_end_to_end(tmp_path: Path, shared_data: Path) -> None:
    # the mini scenario samples real ShareGPT prompts from ../shared/data (skips without it)
    out = tmp_path / "results"
    proc = subprocess.run(
        [str(ROOT / "run_experiment.sh"), "mini", "--policies", "fcfs,driftsched",
         "--time-scale", "4", "--drain-timeout", "40", "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=380,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (out / "mini").iterdir()
    n_workload = sum(1 for _ in (run / "workload.jsonl").open()) - 1
    assert n_workload > 50

    report = (run / "report.md").read_text()
    for needle in ("## Targets", "| fcfs | premium |", "| driftsched | premium |",
                   "## Definitions", "## Versions", "git commit", "plots/timeline.png"):  # fmt: skip
        assert needle in report, needle
    assert "api_keys:\n  - <redacted>" in (run / "fcfs" / "gateway.yaml").read_text()
    assert "dsk-" not in report
    for name in ("attainment", "ttft_cdf", "tpot_cdf", "timeline"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000, name

    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"fcfs", "driftsched"}
    for policy, m in metrics.items():
        rows = list(csv.DictReader((run / policy / "requests.csv").open()))
        assert len(rows) == n_workload == m["all"]["n"]
        assert m["all"]["ok"] >= 0.9 * n_workload, m["all"]["errors"]
        assert 0.0 <= m["all"]["attainment"] <= 1.0
        assert m["all"]["throughput_tok_s"] > 0 and m["all"]["goodput_req_s"] > 0
        assert m["classes"]["premium"]["ttft_p50"] > 0
        assert m["estimator"]["all"]["n"] > 0.9 * n_workload
        assert len(m["drift"]) == 1 and m["drift"][0]["tenant"] == "globex"
        timeline = list(csv.DictReader((run / policy / "timeline.csv").open()))
        assert len(timeline) >= 3 and "limit.globex" in timeline[0]
        info = json.loads((run / policy / "run.json").read_text())
        assert info["killed_orphans"] == 0 and info["loadgen_rc"] == 0
    assert metrics["fcfs"]["drift"][0]["actions"] == 0  # fcfs has no drift controller
    experiment = json.loads((run / "experiment.json").read_text())
    assert experiment["versions"]["python"] and experiment["pool"]["time_scale"] == 4.0
