"""Two ablation variants through ``run_experiment.sh`` end to end (the real gateway, two
simulator engines, the load generator) on the mini scenario: runs are labelled by the
variant's name, each gateway ran its variant's configuration, and the oracle's predictions
in the access log are the requests' true output lengths, sent by the load generator."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("driftsched-oracle", "driftsched-no-drift")


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ablation_variants_end_to_end(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [str(ROOT / "run_experiment.sh"), "mini", "--policies", ",".join(VARIANTS),
         "--time-scale", "6", "--tokens-per-event", "16", "--drain-timeout", "40",
         "--out", str(out), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (out / "mini").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["policies"] == list(VARIANTS)
    assert "| driftsched-oracle | premium |" in (run / "report.md").read_text()
    exp = json.loads((run / "experiment.json").read_text())
    assert exp["variants"]["driftsched-no-drift"] == {
        "policy": "driftsched", "settings": {"scheduler.policy.parameters.drift.enabled": False}}

    cfg = {v: yaml.safe_load((run / v / "gateway.yaml").read_text()) for v in VARIANTS}
    assert cfg["driftsched-oracle"]["scheduler"]["estimator"] == {"kind": "oracle"}
    assert cfg["driftsched-no-drift"]["scheduler"]["policy"]["parameters"]["drift"] == {
        "enabled": False, "attainment_hold_s": pytest.approx(5.0),
        "warmup_s": pytest.approx(5.0), "cooldown_s": pytest.approx(5.0 / 6)}
    assert cfg["driftsched-oracle"]["pool"] == {
        **cfg["driftsched-no-drift"]["pool"], "log_dir": str(run / "driftsched-oracle" / "engines")}

    truth = {}
    for line in (run / "workload.jsonl").read_text().splitlines()[1:]:
        r = json.loads(line)
        truth[r["id"]] = min(r["output_tokens"], r["max_tokens"] or r["output_tokens"])
    for variant, oracle in (("driftsched-oracle", True), ("driftsched-no-drift", False)):
        predicted = {}
        for line in (run / variant / "gateway.log").read_text().splitlines():
            rec = json.loads(line)
            if rec.get("logger") == "driftsched.access" and rec.get("predicted_p50") is not None:
                predicted[rec["request_id"]] = (rec["predicted_p50"], rec["predicted_p90"])
        assert len(predicted) > 50, variant
        exact = sum(p50 == p90 == truth[rid] for rid, (p50, p90) in predicted.items())
        if oracle:
            assert exact == len(predicted), variant
        else:  # River's p50 < p90, unless both are clipped to a max_tokens the truth reached
            assert exact < len(predicted) / 4, variant
