"""Run every policy on the same workload and the same simulated pool, then write the report.

``./run_experiment.sh [scenario] [options]`` (or ``python -m experiments.runner``):

1. build the workload once (``prompts_dataset.py synthetic experiments/scenarios/<name>.yaml
   --seed S [--duration D]``) or take ``--workload FILE``; it is copied into the result;
2. for each policy (:func:`experiments.policy_run.run_policy`): write the gateway
   configuration (:mod:`experiments.gwconfig`), start the gateway (its pool manager
   launches the simulator engines, fed the same workload file),
   wait for ``/readyz`` and every engine, replay the workload with the load generator
   (``python -m experiments.loadgen``, open loop) while sampling ``/admin/scheduler`` and
   ``/metrics`` every second into ``timeline.csv``, read the engines' counters, and stop
   everything (no process outlives the run; leftovers are killed and counted);
3. compute the metrics and write ``report.md``, ``metrics.json``, ``summary.json`` and the
   plots (:mod:`experiments.report`).

With ``--seeds 0,1,2`` steps 1-3 run once per seed, each in ``seed-<n>/`` (the workload
and the pool built with that seed), and :mod:`experiments.seeds` writes the mean and the
worst over the seeds to the top directory's ``report.md`` and ``summary.json``.

Results go to ``<out>/<scenario>/<UTC timestamp>/``: ``workload.jsonl``,
``experiment.json`` (options, versions, timings), one directory per policy
(``requests.csv``, ``requests.summary.json``, ``timeline.csv``, ``gateway.log``,
``gateway.yaml`` without secrets, ``loadgen.log``, ``engines/``, ``run.json``), the report
and ``plots/`` (with several seeds, each of these in ``seed-<n>/``; the top directory has
``experiment.json``, ``report.md`` and ``summary.json``). Tenant keys live in a private temporary directory, deleted at the end.

Times given on the command line (``--duration``, ``--drain-timeout``) are simulated seconds;
with ``--time-scale X`` the wall clock runs X times faster (see :mod:`experiments.gwconfig`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from experiments.gwconfig import Override, PoolOptions, Tenants
from experiments.policy_run import run_policy
from experiments.provenance import versions
from experiments.variants import VARIANTS, resolve
from experiments.workload_file import Workload, load_workload

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "experiments" / "scenarios"
POLICIES = ("fcfs", "priority", "fair", "driftsched")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_experiment.sh",
        description="Run each scheduling policy on the same workload against the same "
        "simulated pool and write results/<scenario>/<timestamp>/ (report.md, CSVs, plots).",
        epilog="examples:\n  ./run_experiment.sh overload\n"
        "  ./run_experiment.sh drift --policies fcfs,driftsched --seed 1\n"
        "  ./run_experiment.sh overload --seeds 0,1,2\n"
        "  ./run_experiment.sh --workload w.jsonl --duration 60\n"
        "  ./run_experiment.sh overload --policies driftsched --replicas 3\n"
        "  ./run_experiment.sh overload --policies priority,priority+governor,driftsched,"
        "driftsched-no-feasibility\n"
        "  ./run_experiment.sh overload --set driftsched:scheduler.kv_budget_fraction=0.6\n\n"
        'policies and variants (docs/experiments.md, "Variants"):\n'
        + "\n".join(f"  {v.name:<26} {v.what}" for v in VARIANTS.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "scenario",
        nargs="?",
        default=None,
        help="scenario name in experiments/scenarios (steady, overload, drift, bursty, mini) "
        "or a spec file; default overload (or the workload's name with --workload)",
    )
    p.add_argument("--workload", default=None, help="replay this workload file instead")
    p.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help="comma-separated policies or variants (listed below), in order",
    )
    p.add_argument(
        "--duration", type=float, default=None, help="seconds of arrivals (default: the spec's)"
    )
    p.add_argument("--seed", type=int, default=None, help="workload seed (default 0)")
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated workload seeds, e.g. 0,1,2: one experiment per seed in "
        "seed-<n>/, then the mean and worst over them (not with --seed or --workload)",
    )
    p.add_argument("--out", default=str(ROOT / "results"), help="results root")
    p.add_argument("--instances", type=int, default=2, help="simulator engines")
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="gateway replicas on one Redis, sharing the engines, the load round-robin over "
        "them (default 1; more implies --store redis)",
    )
    p.add_argument(
        "--store",
        choices=["memory", "redis"],
        default="memory",
        help="the gateways' store: memory (one process, the default) or a fresh Redis (the "
        "engines are then launched by the experiment and shared, as with --replicas)",
    )
    p.add_argument("--profile", default="llama3-8b-a100", help="simulator profile")
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="simulated seconds per wall second (the load generator's speedup follows)",
    )
    p.add_argument("--tokens-per-event", type=int, default=8, help="simulator SSE coalescing")
    p.add_argument("--max-num-seqs", type=int, default=256, help="per engine (sim default)")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="after the last arrival, wait this long for answers, then cancel (default 60)",
    )
    p.add_argument(
        "--estimator",
        default=None,
        help="start every policy from a copy of this saved estimator (default: cold; "
        "see experiments/warm_estimator.py)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="[POLICY:]KEY=VALUE",
        help="override a gateway setting (dotted path, YAML value), for every run or the one "
        "of that policy or variant name",
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_seeds(a: argparse.Namespace) -> list[int]:
    """The seeds to run, in order: ``--seeds``, else ``[--seed]`` (default ``[0]``)."""
    if a.seeds is None:
        return [0 if a.seed is None else a.seed]
    if a.seed is not None:
        raise SystemExit("run_experiment: give --seed or --seeds, not both")
    try:
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(
            f"run_experiment: --seeds {a.seeds!r}: integers, comma-separated"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SystemExit(f"run_experiment: --seeds {a.seeds!r}: distinct integers >= 0")
    if a.workload and len(seeds) > 1:
        raise SystemExit("run_experiment: --seeds builds a workload per seed; --workload "
                         "replays one file (run it with --seed)")  # fmt: skip
    return seeds


def prepare_workload(a: argparse.Namespace, seed: int, out: Path) -> tuple[str, Path, Workload]:
    """Build (or copy) the workload into ``out``; returns its name, path and contents."""
    dest = out / "workload.jsonl"
    if a.workload:
        shutil.copyfile(a.workload, dest)
        w = load_workload(dest)
        return str(a.scenario or w.header.get("name") or Path(a.workload).stem), dest, w
    scenario = a.scenario or "overload"
    spec = Path(scenario)
    if not spec.suffix:
        spec = SCENARIOS / f"{scenario}.yaml"
    if not spec.exists():
        known = ", ".join(sorted(p.stem for p in SCENARIOS.glob("*.yaml")))
        raise SystemExit(f"run_experiment: no scenario {scenario!r} (known: {known})")
    import prompts_dataset

    argv = ["synthetic", str(spec), "--seed", str(seed), "-o", str(dest)]
    if a.duration is not None:
        argv += ["--duration", str(a.duration)]
    if prompts_dataset.main(argv) != 0:
        raise SystemExit("run_experiment: building the workload failed")
    w = load_workload(dest)
    return str(w.header.get("name") or spec.stem), dest, w


def run_seed(
    a: argparse.Namespace,
    *,
    seed: int,
    out: Path,
    name: str,
    w: Workload,
    policies: Sequence[str],
    overrides: Sequence[Override],
) -> list[str] | None:
    """Every policy on ``out``'s workload (built with ``seed``), then the report; returns
    the report's target lines, None when interrupted (partial results stay in ``out``)."""
    t_begin = time.monotonic()
    started = datetime.now(UTC)
    workload = out / "workload.jsonl"
    tenants = Tenants.from_header(w.header, {r.tenant: r.qos_class for r in w.requests})
    pool = PoolOptions(
        instances=a.instances,
        profile=a.profile,
        time_scale=a.time_scale,
        tokens_per_event=a.tokens_per_event,
        max_num_seqs=a.max_num_seqs,
        seed=seed,
    )
    experiment: dict[str, Any] = {
        "scenario": name,
        "started_utc": started.isoformat(timespec="seconds"),
        "workload": {k: w.header.get(k) for k in ("name", "source", "seed", "duration_s",
                                                   "n_requests", "tenants", "drift", "assumes")},
        "options": {**{k: v for k, v in vars(a).items() if k != "overrides"}, "seed": seed},
        "overrides": [o.render() for o in overrides],
        "pool": {f: getattr(pool, f) for f in pool.__slots__},
        "policies": list(policies),
        "variants": {n: {"policy": resolve(n).policy, "settings": resolve(n).settings_map()}
                     for n in policies},
        "versions": versions(),
        "runs": {},
    }  # fmt: skip
    if a.workload and a.duration is not None:  # the load generator replays only this much
        experiment["workload"]["duration_s"] = a.duration
    print(f"run_experiment: {name} seed {seed}, {len(w.requests)} requests, policies "
          f"{list(policies)} -> {out}", file=sys.stderr)  # fmt: skip
    secret_dir = Path(tempfile.mkdtemp(prefix="driftsched-exp-"))
    try:
        keys_file = secret_dir / "keys.json"
        keys_file.write_text(json.dumps(tenants.keys), encoding="utf-8")
        outer = tqdm(policies, desc="policies", position=0, disable=a.no_progress, leave=True)
        for policy in outer:
            outer.set_postfix(policy=policy)
            info = run_policy(
                policy, a=a, out=out, workload=workload, w=w, tenants=tenants,
                keys_file=keys_file, secret_dir=secret_dir, pool=pool, overrides=overrides,
                position=1,
            )  # fmt: skip
            experiment["runs"][policy] = {
                k: info.get(k) for k in ("wall_s", "ready_s", "replay_wall_s", "stop_s",
                                         "killed_orphans")
            }  # fmt: skip
            tqdm.write(f"{policy}: done in {info['wall_s']:.0f} s", file=sys.stderr)
        outer.close()
    except KeyboardInterrupt:
        print(f"run_experiment: interrupted; partial results in {out}", file=sys.stderr)
        return None
    finally:
        shutil.rmtree(secret_dir, ignore_errors=True)
        experiment["wall_s"] = round(time.monotonic() - t_begin, 1)
        (out / "experiment.json").write_text(json.dumps(experiment, indent=2) + "\n", "utf-8")
    from experiments.report import write_report

    t_report = time.monotonic()
    verdicts = write_report(out)
    experiment["report_s"] = round(time.monotonic() - t_report, 1)
    experiment["wall_s"] = round(time.monotonic() - t_begin, 1)
    (out / "experiment.json").write_text(json.dumps(experiment, indent=2) + "\n", "utf-8")
    return verdicts


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    if not policies:
        raise SystemExit("run_experiment: --policies is empty")
    if len(set(policies)) != len(policies):
        raise SystemExit(f"run_experiment: --policies {a.policies!r} names one twice")
    try:
        variants = {name: resolve(name) for name in policies}
    except ValueError as e:
        raise SystemExit(f"run_experiment: --policies: {e}") from None
    try:
        overrides = [Override.parse(s) for s in a.overrides]
    except ValueError as e:
        raise SystemExit(f"run_experiment: {e}") from None
    if a.time_scale <= 0:
        raise SystemExit("run_experiment: --time-scale must be > 0")
    if a.replicas < 1:
        raise SystemExit("run_experiment: --replicas must be >= 1")
    seeds = parse_seeds(a)
    multi = len(seeds) > 1
    t_begin = time.monotonic()
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    tmp_out = Path(a.out) / ".building" / stamp
    first = tmp_out / f"seed-{seeds[0]}" if multi else tmp_out
    first.mkdir(parents=True, exist_ok=True)
    name, _, w = prepare_workload(a, seeds[0], first)
    out = Path(a.out) / name / stamp
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out.rename(out)
    with contextlib.suppress(OSError):
        (Path(a.out) / ".building").rmdir()
    top: dict[str, Any] = {
        "scenario": name,
        "started_utc": started.isoformat(timespec="seconds"),
        "seeds": seeds,
        "options": {k: v for k, v in vars(a).items() if k != "overrides"},
        "overrides": list(a.overrides),
        "policies": policies,
        "variants": {n: {"policy": v.policy, "settings": v.settings_map()}
                     for n, v in variants.items()},
        "versions": versions(),
    }  # fmt: skip
    verdicts: list[str] = []
    for i, seed in enumerate(seeds):
        sdir = out / f"seed-{seed}" if multi else out
        if i > 0:
            sdir.mkdir()
            _, _, w = prepare_workload(a, seed, sdir)
        done = run_seed(a, seed=seed, out=sdir, name=name, w=w, policies=policies,
                        overrides=overrides)  # fmt: skip
        if done is None:
            return 130
        verdicts = done
        if multi:
            exp = json.loads((sdir / "experiment.json").read_text("utf-8"))
            top["pool"] = {k: v for k, v in exp["pool"].items() if k != "seed"}
            top["workload"] = {"name": name, "duration_s": exp["workload"]["duration_s"],
                               "n_requests": [*top.get("workload", {}).get("n_requests", []),
                                              exp["workload"]["n_requests"]]}  # fmt: skip
            top["wall_s"] = round(time.monotonic() - t_begin, 1)
            (out / "experiment.json").write_text(json.dumps(top, indent=2) + "\n", "utf-8")
            passed = sum(v.lstrip().startswith("PASS") for v in verdicts)
            print(f"run_experiment: seed {seed} done, {passed} of {len(verdicts)} targets "
                  f"pass on it ({sdir / 'report.md'})", file=sys.stderr)  # fmt: skip
    if multi:
        from experiments.seeds import write_seeds_report

        verdicts = write_seeds_report(out)
        top["wall_s"] = round(time.monotonic() - t_begin, 1)
        (out / "experiment.json").write_text(json.dumps(top, indent=2) + "\n", "utf-8")
    for line in verdicts:
        print(line)
    wall = time.monotonic() - t_begin
    print(f"report: {out / 'report.md'} (total {wall:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
