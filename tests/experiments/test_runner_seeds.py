"""The runner's seeds: one seed keeps the flat layout, several give ``seed-<n>/`` each and
the mean and worst over them in the top ``report.md`` and ``summary.json``.

No process is started: ``run_policy`` is replaced by one that writes what a run leaves on
disk for outcomes fixed by the policy and the seed (fcfs is late for premium; driftsched
loses the request numbered like the seed), so every number below is known. The real
processes run in ``test_experiment_mini.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from experiments import runner
from experiments.report import main as report_main
from experiments.summary import read_table
from tests.experiments.builders import failed, make_req, slos_for, write_run_dir

SPEC = """\
name: tiny
duration_s: 6
filler: words
tenants:
  - {name: acme, qos_class: premium, weight: 2, rate: 2.0, arrival: constant,
     lengths: {profile: fixed, prompt: 20, output: 11}}
  - {name: globex, qos_class: standard, rate: 1.0, arrival: poisson,
     lengths: {profile: fixed, prompt: 20, output: 11}}
  - {name: initech, qos_class: standard, rate: 1.0, arrival: poisson,
     lengths: {profile: fixed, prompt: 20, output: 11}}
"""


def fake_run_policy(policy: str, *, out: Path, w: Any, tenants: Any, pool: Any,
                    **_: Any) -> dict[str, Any]:  # fmt: skip
    reqs = []
    for i, r in enumerate(w.requests):
        kw = {"at": r.arrival_s, "prompt": r.prompt_tokens, "out": r.output_tokens}
        if policy == "driftsched" and i == pool.seed:
            reqs.append(failed(r.tenant, r.qos_class, **kw))
        else:
            late = policy == "fcfs" and r.qos_class == "premium"
            reqs.append(make_req(r.tenant, r.qos_class, ttft=2.0 if late else 0.1,
                                 decode=0.5, **kw))  # fmt: skip
    busy = [{"sim:busy_seconds_total": 1.0}] * pool.instances
    return write_run_dir(out / policy, reqs, policy=policy, slos=slos_for(tenants.classes),
                         weights=tenants.weights, engines=busy)  # fmt: skip


@pytest.fixture
def spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(runner, "run_policy", fake_run_policy)
    p = tmp_path / "tiny.yaml"
    p.write_text(SPEC)
    return p


def _run(spec: Path, out: Path, *args: str) -> Path:
    rc = runner.main([str(spec), "--policies", "fcfs,driftsched", "--out", str(out),
                      "--no-progress", *args])  # fmt: skip
    assert rc == 0
    (run,) = (out / "tiny").iterdir()
    return run


def test_one_seed_keeps_the_flat_layout(spec: Path, tmp_path: Path) -> None:
    run = _run(spec, tmp_path / "results", "--seed", "3")
    assert not list(run.glob("seed-*"))
    for name in ("workload.jsonl", "experiment.json", "report.md", "metrics.json",
                 "summary.json", "fcfs/run.json", "driftsched/requests.csv"):  # fmt: skip
        assert (run / name).exists(), name
    exp = json.loads((run / "experiment.json").read_text())
    assert exp["workload"]["seed"] == 3 and exp["pool"]["seed"] == 3
    raw = (run / "summary.json").read_text()
    assert len(raw) < 4000
    doc = json.loads(raw)
    assert doc["seeds"] == [3] and "mean" not in doc and doc["scenario"] == "tiny"
    assert doc["git_commit"] == exp["versions"]["git_commit"]
    s = read_table(doc)
    metrics = json.loads((run / "metrics.json").read_text())
    n = metrics["driftsched"]["all"]["n"]
    # driftsched lost request 3 (a standard or premium one): attainment (n - 1) / n
    assert s["driftsched"]["all"]["attainment"] == pytest.approx((n - 1) / n, rel=1e-3)
    assert s["fcfs"]["premium"]["attainment"] == 0.0
    assert s["fcfs"]["all"]["engine_busy_share"] == pytest.approx(
        2.0 / (2 * metrics["fcfs"]["makespan_s"]), rel=1e-3
    )
    verdicts = {t["target"]: t["verdict"] for t in doc["targets"]}
    assert verdicts["(context) premium attainment, fcfs"] == "PASS"
    assert verdicts["(context) fair-share Jain within standard, driftsched"] in ("PASS", "MISS")
    report = (run / "report.md").read_text()
    for needle in ("| output tokens |", "engine busy share", "attainment Jain"):
        assert needle in report, needle


def test_several_seeds_mean_and_worst(spec: Path, tmp_path: Path) -> None:
    run = _run(spec, tmp_path / "results", "--seeds", "0,1", "--time-scale", "2")
    seeds = {0: run / "seed-0", 1: run / "seed-1"}
    for d in seeds.values():
        for name in ("workload.jsonl", "report.md", "summary.json", "fcfs/run.json"):
            assert (d / name).exists(), d / name
    w0, w1 = ((d / "workload.jsonl").read_text() for d in seeds.values())
    assert w0 != w1  # each seed builds its own workload
    assert json.loads((seeds[1] / "experiment.json").read_text())["pool"]["seed"] == 1
    top = json.loads((run / "experiment.json").read_text())
    assert top["seeds"] == [0, 1] and top["policies"] == ["fcfs", "driftsched"]

    raw = (run / "summary.json").read_text()
    assert len(raw) < 8000
    doc = json.loads(raw)
    assert doc["seeds"] == [0, 1] and doc["pool"]["time_scale"] == 2.0
    per = {k: read_table(doc, str(k)) for k in seeds}
    mean, worst = read_table(doc, "mean"), read_table(doc, "worst")
    for p, g, k in (("driftsched", "all", "attainment"), ("driftsched", "standard",
                    "attainment"), ("fcfs", "all", "output_tokens"),
                    ("driftsched", "all", "goodput_req_s")):  # fmt: skip
        vals = [per[s][p][g][k] for s in seeds]
        assert mean[p][g][k] == pytest.approx(sum(vals) / 2, rel=1e-3), (p, g, k)
        assert worst[p][g][k] == pytest.approx(min(vals), rel=1e-3), (p, g, k)
    # every number of a seed is in its own summary; for latencies the worst is the highest
    own = {k: read_table(json.loads((d / "summary.json").read_text())) for k, d in seeds.items()}
    vals = [own[s]["driftsched"]["all"]["makespan_s"] for s in seeds]
    assert worst["driftsched"]["all"]["makespan_s"] == pytest.approx(max(vals), rel=1e-3)
    assert own[1]["driftsched"]["all"]["attainment"] == per[1]["driftsched"]["all"]["attainment"]
    assert "ttft_p99" not in per[0]["fcfs"]["premium"] and "n" in mean["fcfs"]["premium"]
    assert doc["n_requests"] == [own[s]["fcfs"]["all"]["n"] for s in seeds]
    assert "seed" not in doc["pool"]

    targets = {t["target"]: t for t in doc["targets"]}
    t = targets["(context) premium attainment, fcfs"]
    assert t["verdict"] == "PASS" and t["seeds_passed"] == "2/2"
    t = targets["premium attainment, driftsched"]
    assert t["value"] == pytest.approx(mean["driftsched"]["premium"]["attainment"], rel=1e-3)
    margins = [m for m in t["seed_margins"].values() if m is not None]
    assert t["worst_margin"] == pytest.approx(min(margins), rel=1e-3)
    report = (run / "report.md").read_text()
    for needle in ("## Targets (on the mean over seeds)", "[seed 0](seed-0/report.md)",
                   "| driftsched | standard |", "## Per seed", "engine busy share"):  # fmt: skip
        assert needle in report, needle

    # the rebuild from the raw files gives the same numbers
    (run / "summary.json").unlink()
    assert report_main([str(run)]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert again["mean"] == doc["mean"] and again["targets"] == doc["targets"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "1", "--seeds", "0,1"], "not both"),
        (["--seeds", "0,x"], "integers"),
        (["--seeds", "1,1"], "distinct"),
        (["--seeds", "0,1", "--workload", "w.jsonl"], "--workload"),
    ],
)
def test_bad_seeds_are_refused(args: list[str], message: str, capsys: Any) -> None:
    with pytest.raises(SystemExit, match=message):
        runner.main(["tiny", *args])
