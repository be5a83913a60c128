"""experiments.parity: per-class attainment and Jain of two experiments, seed by seed."""

from __future__ import annotations

import json
from pathlib import Path

from experiments.parity import compare, main

COLS = ["policy", "group", "n", "attainment", "service_jain"]


def _write(root: Path, seed: int, premium: float, jain: float) -> None:
    d = root / f"seed-{seed}"
    d.mkdir(parents=True)
    rows = [["driftsched", "premium", 10, premium, 1.0], ["driftsched", "all", 20, 0.5, jain]]
    doc = {"columns": {"groups": COLS}, "per_seed": {str(seed): {"groups": rows}}}
    (d / "summary.json").write_text(json.dumps(doc))


def test_means_gaps_and_verdicts(tmp_path: Path) -> None:
    a, b = tmp_path / "one", tmp_path / "three"
    for seed, (pa, pb) in enumerate([(0.99, 0.98), (0.97, 0.90), (1.0, 1.0)]):
        _write(a, seed, pa, 0.95)
        _write(b, seed, pb, 0.90 if seed == 0 else 0.95)
    _write(b, 7, 0.0, 0.0)  # a seed only one side has: not compared
    rows, seeds = compare(a, b, tolerance=0.02)
    assert seeds == [0, 1, 2]
    by = {(r["group"], r["metric"]): r for r in rows}
    prem = by[("premium", "attainment")]
    assert round(prem["gap"], 6) == round(-0.08 / 3, 6)
    assert round(prem["worst_seed_gap"], 6) == 0.07
    assert prem["verdict"] == "MISS"  # the means differ by 0.027 > 0.02
    jain = by[("all", "service_jain")]
    # one seed 0.05 apart, the mean only 0.017: PASS, with the worst seed reported
    assert jain["verdict"] == "PASS" and round(jain["worst_seed_gap"], 6) == 0.05
    assert main([str(a), str(b)]) == 1  # a MISS


def test_a_directory_without_summaries_is_an_error(tmp_path: Path) -> None:
    assert main([str(tmp_path), str(tmp_path)]) == 2


def test_a_multi_seed_summary_file_reads_like_its_seed_directories(tmp_path: Path) -> None:
    a = tmp_path / "one"
    for seed, p in enumerate([0.99, 0.97]):
        _write(a, seed, p, 0.95)
    cols = ["policy", "group", "attainment", "service_jain"]
    top = {"columns": {"groups": COLS, "per_seed": cols},
           "per_seed": {str(seed): [["driftsched", "premium", p, 1.0],
                                    ["driftsched", "all", 0.5, 0.95]]
                        for seed, p in enumerate([0.99, 0.97])}}  # fmt: skip
    (tmp_path / "top.json").write_text(json.dumps(top))
    rows, seeds = compare(a, tmp_path / "top.json")
    assert seeds == [0, 1] and all(r["gap"] == 0 for r in rows) and len(rows) == 4
