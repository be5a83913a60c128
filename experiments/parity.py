"""Replica parity: do N gateway replicas schedule like one?

Compares two experiments of the same scenario and seeds, typically ``run_experiment.sh
--store redis`` (one replica) and ``--replicas 3``: for every policy in both and every
class, the SLO attainment and the fair-share Jain index (service within the class) per seed,
their means and the largest per-seed gap. The issue's target: a 3-replica run matches the
1-replica run within 0.02 on every class's attainment and on fair-share Jain (means over the
seeds); a gap is PASS when within ``--tolerance``.

    python -m experiments.parity results/overload/<one> results/overload/<three> [--out F]

Each argument is an experiment directory (one with ``seed-<n>/`` subdirectories, or a single
seed's) or a ``summary.json`` (such as the copies under docs/runs/). Only seeds present in
both are compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: metric -> its column in summary.json's ``groups`` rows
METRICS = ("attainment", "service_jain")


def seed_groups(path: Path) -> dict[int, dict[tuple[str, str], dict[str, Any]]]:
    """seed -> (policy, group) -> {metric: value}, from an experiment directory (its
    ``seed-<n>/summary.json``, or its own ``summary.json``) or a ``summary.json`` file (a
    multi-seed one holds every seed's rows, e.g. a copy under docs/runs/)."""
    docs: list[dict[str, Any]] = []
    if path.is_file():
        docs = [json.loads(path.read_text())]
    else:
        docs = [json.loads((d / "summary.json").read_text())
                for d in sorted(path.glob("seed-*")) if (d / "summary.json").exists()]
        if not docs and (path / "summary.json").exists():
            docs = [json.loads((path / "summary.json").read_text())]
    if not docs:
        raise ValueError(f"{path}: no summary.json (is it an experiment directory?)")
    out: dict[int, dict[tuple[str, str], dict[str, Any]]] = {}
    for doc in docs:
        for seed, tables in doc["per_seed"].items():
            # one seed's summary: its full tables; a multi-seed one: each seed's headline row
            if isinstance(tables, dict):
                cols, rows = doc["columns"]["groups"], tables["groups"]
            else:
                cols, rows = doc["columns"]["per_seed"], tables
            out[int(seed)] = {(row[0], row[1]): dict(zip(cols, row, strict=True))
                              for row in rows}  # fmt: skip
    return out


def compare(a: Path, b: Path, tolerance: float = 0.02) -> tuple[list[dict[str, Any]], list[int]]:
    """One row per (policy, group, metric): the means over the common seeds, their gap, the
    largest per-seed gap and the verdict; and the seeds compared."""
    ga, gb = seed_groups(a), seed_groups(b)
    seeds = sorted(ga.keys() & gb.keys())
    if not seeds:
        raise ValueError(f"no seed in common: {sorted(ga)} vs {sorted(gb)}")
    keys = sorted(set.intersection(*(set(ga[s]) & set(gb[s]) for s in seeds)),
                  key=lambda k: (k[0], _group_order(k[1])))
    rows = []
    for policy, group in keys:
        for metric in METRICS:
            va = [ga[s][(policy, group)][metric] for s in seeds]
            vb = [gb[s][(policy, group)][metric] for s in seeds]
            if any(v is None for v in va + vb):
                continue
            ma, mb = sum(va) / len(va), sum(vb) / len(vb)
            worst = max(abs(x - y) for x, y in zip(va, vb, strict=True))
            gap = mb - ma
            rows.append({"policy": policy, "group": group, "metric": metric, "a": ma, "b": mb,
                         "gap": gap, "worst_seed_gap": worst,
                         "verdict": "PASS" if abs(gap) <= tolerance else "MISS",
                         "margin": tolerance - abs(gap)})  # fmt: skip
    return rows, seeds


def _group_order(group: str) -> tuple[int, str]:
    order = {"premium": 0, "standard": 1, "batch": 2, "all": 9}
    return order.get(group, 5), group


def markdown(rows: Sequence[Mapping[str, Any]], seeds: Sequence[int], a: str, b: str,
             tolerance: float) -> str:  # fmt: skip
    lines = [f"Seeds {', '.join(map(str, seeds))}; A = `{a}`, B = `{b}`; PASS when the means "
             f"differ by at most {tolerance:g}.", "",
             "| policy | class | metric | A (mean) | B (mean) | B - A | worst seed gap | verdict |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['policy']} | {r['group']} | {r['metric']} | {r['a']:.3f} | "
                     f"{r['b']:.3f} | {r['gap']:+.3f} | {r['worst_seed_gap']:.3f} | "
                     f"{r['verdict']} ({r['margin']:+.3f}) |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="the reference experiment (e.g. one replica)")
    p.add_argument("b", help="the experiment compared with it (e.g. three replicas)")
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = p.parse_args(argv)
    try:
        rows, seeds = compare(Path(args.a), Path(args.b), args.tolerance)
    except (ValueError, OSError, KeyError) as e:
        print(f"parity: {e}", file=sys.stderr)
        return 2
    text = markdown(rows, seeds, args.a, args.b, args.tolerance)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0 if all(r["verdict"] == "PASS" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
