"""``run_experiment.sh`` end to end on the miniature scenario (the metrics' arithmetic:
``test_metrics.py``, ``test_fairness.py``).

The end-to-end test drives the real processes (gateway, two simulator engines through the
pool manager, the load generator) on ``experiments/scenarios/mini.yaml`` (15 s of arrivals)
at time scale 6 for two policies and two seeds, then checks that each seed's report, CSVs,
plots and summary exist, that the numbers are sane and that the top report and summary.json
hold the mean over the seeds. It asserts nothing about performance.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from experiments.summary import read_table

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_mini_experiment_end_to_end(tmp_path: Path, shared_data: Path) -> None:
    # the mini scenario samples real ShareGPT prompts from ../shared/data (skips without it);
    # two seeds: each one is a whole single-seed experiment in seed-<n>/ (the flat layout of
    # one seed is the same code: test_runner_seeds.py), the top has their mean and worst.
    # Time scale 6 and 16 tokens per SSE event keep it at ~50 s on the 2-core machine (at 4
    # and 8 tokens per event: ~63 s)
    out = tmp_path / "results"
    proc = subprocess.run(
        [str(ROOT / "run_experiment.sh"), "mini", "--policies", "fcfs,driftsched",
         "--seeds", "0,1", "--time-scale", "6", "--tokens-per-event", "16",
         "--drain-timeout", "40", "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=380,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (top,) = (out / "mini").iterdir()
    workloads = []
    for seed in (0, 1):
        run = top / f"seed-{seed}"
        workloads.append((run / "workload.jsonl").read_text())
        _check_one_seed(run, seed)
    assert workloads[0] != workloads[1]

    report = (top / "report.md").read_text()
    for needle in ("## Targets (on the mean over seeds)", "| driftsched | premium |",
                   "[seed 1](seed-1/report.md)", "engine busy share", "attainment Jain",
                   "## Per seed", "git commit"):  # fmt: skip
        assert needle in report, needle
    assert "dsk-" not in report
    raw = (top / "summary.json").read_text()
    assert len(raw) < 8000 and "dsk-" not in raw
    doc = json.loads(raw)
    assert doc["seeds"] == [0, 1] and doc["pool"]["time_scale"] == 6.0
    mean = read_table(doc, "mean")
    per = [json.loads((top / f"seed-{s}" / "metrics.json").read_text()) for s in (0, 1)]
    for policy in ("fcfs", "driftsched"):
        tokens = [m[policy]["all"]["output_tokens"] for m in per]
        assert mean[policy]["all"]["output_tokens"] == pytest.approx(sum(tokens) / 2, rel=1e-3)
        assert 0.0 < mean[policy]["all"]["engine_busy_share"] <= 1.0
    assert {t["target"] for t in doc["targets"]} >= {"premium attainment, driftsched"}
    assert all(t["seeds_passed"].endswith("/2") for t in doc["targets"])


def _check_one_seed(run: Path, seed: int) -> None:
    n_workload = sum(1 for _ in (run / "workload.jsonl").open()) - 1
    assert n_workload > 50

    report = (run / "report.md").read_text()
    for needle in ("## Targets", "| fcfs | premium |", "| driftsched | premium |",
                   "## What the capacity allows", "| premium |", "(share of bound)",
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
        # the simulator reports its busy time: a share of the pool's time
        assert 0.0 < m["engine_busy_share"] <= 1.0
        timeline = list(csv.DictReader((run / policy / "timeline.csv").open()))
        assert len(timeline) >= 3 and "limit.globex" in timeline[0]
        info = json.loads((run / policy / "run.json").read_text())
        assert info["killed_orphans"] == 0 and info["loadgen_rc"] == 0
    assert metrics["fcfs"]["drift"][0]["actions"] == 0  # fcfs has no drift controller
    experiment = json.loads((run / "experiment.json").read_text())
    assert experiment["versions"]["python"] and experiment["pool"]["time_scale"] == 6.0
    assert experiment["pool"]["seed"] == seed and experiment["workload"]["seed"] == seed
    summary = json.loads((run / "summary.json").read_text())
    assert summary["seeds"] == [seed] and read_table(summary)["fcfs"]["all"]["n"] == n_workload


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.timeout(300)
def test_mini_experiment_on_two_replicas(tmp_path: Path, shared_data: Path) -> None:
    """``--replicas 2``: a fresh Redis, the engines launched by the experiment and shared,
    two gateways with the load spread round-robin, one of them leading; nothing left running."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [str(ROOT / "run_experiment.sh"), "mini", "--policies", "driftsched", "--replicas", "2",
         "--time-scale", "6", "--tokens-per-event", "16", "--drain-timeout", "40",
         "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (top,) = (out / "mini").iterdir()
    run = top / "driftsched"
    info = json.loads((run / "run.json").read_text())
    assert (info["replicas"], info["store"], info["killed_orphans"]) == (2, "redis", 0)
    assert {"gateway", "gateway-1", "engines", "redis"} <= set(info["resources"])
    sched = info["final_scheduler"]
    assert sched["leader"] is not None  # one of the two publishes the shared decisions
    cfg = (run / "gateway.yaml").read_text()
    assert "engine: external" in cfg and "type: redis" in cfg
    with (run / "requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    ok = sum(1 for r in rows if r["status"] == "200")
    assert ok >= 0.9 * len(rows), (ok, len(rows))
    # both replicas served (round-robin): each access log holds about half the requests
    served = [sum(1 for line in (run / log).open() if '"driftsched.access"' in line)
              for log in ("gateway.log", "gateway-1.log")]  # fmt: skip
    assert min(served) >= 0.4 * len(rows), served
