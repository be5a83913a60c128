"""One policy's run end to end (:mod:`experiments.runner`'s step 2): its gateway configuration,
the gateway with its pool of simulator engines, the load generator's replay with the
timeline sampled every second, the engines' counters, and everything stopped; what it
leaves in ``<out>/<policy>/`` is described in :mod:`experiments.rundata`.

With ``--store redis`` or ``--replicas N`` (N > 1) the run is a multi-replica deployment
(:mod:`experiments.stack`): a fresh Redis, the engines launched here and shared, N gateway
processes with the same configuration but their port, the load spread round-robin."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from experiments.gwconfig import (
    MODEL,
    UNLIMITED_AS,
    Override,
    PoolOptions,
    Tenants,
    gateway_config,
    redacted,
    slo_table,
)
from experiments.stack import (
    EngineFleet,
    GatewayProcess,
    RedisProcess,
    Sampler,
    free_port,
    scrape_engines,
    timeline_columns,
)
from experiments.variants import resolve
from experiments.workload_file import Workload

ROOT = Path(__file__).resolve().parent.parent


def _write_timeline(path: Path, rows: list[dict[str, Any]], cols: list[str], t0: float,
                    x: float) -> None:  # fmt: skip
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "t_s": round((r["unix_s"] - t0) * x, 3)})


def run_policy(
    policy: str,
    *,
    a: argparse.Namespace,
    out: Path,
    workload: Path,
    w: Workload,
    tenants: Tenants,
    keys_file: Path,
    secret_dir: Path,
    pool: PoolOptions,
    overrides: Sequence[Override],
    position: int,
) -> dict[str, Any]:
    """One policy end to end (module doc, step 2); returns its timings."""
    pdir = out / policy
    pdir.mkdir(parents=True)
    port, admin_key = free_port(), secrets.token_urlsafe(24)
    cfg = gateway_config(
        policy=policy,
        tenants=tenants,
        workload_path=str(workload),
        port=port,
        admin_key=admin_key,
        log_dir=str(pdir / "engines"),
        pool=pool,
        overrides=overrides,
    )
    if a.estimator:
        shutil.copyfile(a.estimator, pdir / "estimator.pkl")
        cfg["scheduler"].setdefault("estimator", {})["path"] = str(pdir / "estimator.pkl")
    x = pool.time_scale
    n_requests = sum(1 for r in w.requests if a.duration is None or r.arrival_s < a.duration)
    t_start = time.monotonic()
    replicas = a.replicas
    shared = replicas > 1 or a.store == "redis"
    redis: RedisProcess | None = None
    fleet: EngineFleet | None = None
    gws: list[GatewayProcess] = []
    cfg_paths: list[Path] = []
    loadgen: subprocess.Popen[bytes] | None = None
    sampler: Sampler | None = None
    variant = resolve(policy)
    info: dict[str, Any] = {"policy": policy, "time_scale": x, "port": port,
                            "replicas": replicas, "store": "redis" if shared else "memory",
                            "variant": {"policy": variant.policy,
                                        "settings": variant.settings_map()}}  # fmt: skip
    bar = tqdm(
        total=n_requests,
        desc=f"{policy:>10}",
        unit="req",
        position=position,
        leave=False,
        disable=a.no_progress,
        dynamic_ncols=True,
    )
    try:
        if shared:
            redis = RedisProcess(secret_dir / f"{policy}-redis")
            fleet = EngineFleet(cfg["pool"], pdir / "engines")
            cfg["store"] = {"type": "redis", "url": redis.url, "prefix": "exp"}
            cfg["pool"] = {**{k: v for k, v in cfg["pool"].items()
                              if k in ("health_interval_s", "scrape_interval_s", "stop_grace_s")},
                           "engine": "external", "external": fleet.external()}  # fmt: skip
        (pdir / "gateway.yaml").write_text(yaml.safe_dump(redacted(cfg), sort_keys=False), "utf-8")
        ports = [port] + [free_port() for _ in range(replicas - 1)]
        for i, p in enumerate(ports):
            cfg_i = {**cfg, "server": {**cfg["server"], "port": p}}
            cfg_path = secret_dir / f"{policy}-{i}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg_i, sort_keys=False), encoding="utf-8")
            cfg_paths.append(cfg_path)
        if fleet is not None:
            fleet.wait_healthy()
        for i, (p, cfg_path) in enumerate(zip(ports, cfg_paths, strict=True)):
            log = pdir / ("gateway.log" if i == 0 else f"gateway-{i}.log")
            gws.append(GatewayProcess(cfg_path, p, admin_key, log))
        for gw in gws:  # started together, then waited for: they boot in parallel
            gw.wait_ready(pool.instances)
        info["ready_s"] = round(time.monotonic() - t_start, 2)
        urls = gws[0].engine_urls()
        sampler = Sampler(gws, sorted(tenants.classes))
        sampler.sample()
        argv = [
            sys.executable, "-m", "experiments.loadgen", str(workload),
            "--base-url", ",".join(gw.url for gw in gws), "--keys-file", str(keys_file),
            "--model", MODEL,
            "--out", str(pdir / "requests.csv"), "--speedup", str(x),
            "--drain-timeout", str(a.drain_timeout / x), "--no-progress",
        ]  # fmt: skip
        if a.duration is not None and a.workload:
            argv += ["--duration", str(a.duration)]
        t_replay = time.monotonic()
        with (pdir / "loadgen.log").open("wb") as lg_log:
            loadgen = subprocess.Popen(argv, stdout=lg_log, stderr=subprocess.STDOUT, cwd=ROOT)
            tick = time.monotonic()
            while loadgen.poll() is None:
                if time.monotonic() >= tick:
                    tick += 1.0
                    row = sampler.sample()
                    if row is not None:
                        bar.n = min(n_requests, int(row["finished"]))
                        bar.set_postfix(
                            queue=row["queue_depth"],
                            inflight=int(row["in_flight"]),
                            preempt=int(row["preemptions"]),
                            load=row["loadavg_1m"],
                            refresh=True,
                        )
                time.sleep(0.05)
        info["replay_wall_s"] = round(time.monotonic() - t_replay, 2)
        info["loadgen_rc"] = loadgen.returncode
        sampler.sample()
        info["engines"] = scrape_engines(urls)
        info["resources"] = {}
        for i, gw in enumerate(gws):
            res = gw.resources()
            if i:
                res = {k.replace("gateway", f"gateway-{i}"): v for k, v in res.items()}
            info["resources"].update(res)
        if fleet is not None:
            info["resources"]["engines"] = {"cpu_s": fleet.cpu_s(), "runqueue_wait_s": None}
        if redis is not None:
            info["resources"]["redis"] = {"cpu_s": redis.cpu_s(), "runqueue_wait_s": None}
        info["gateway_rejections"] = {
            k.split(".", 1)[1]: v
            for k, v in sampler.last_metrics.items()
            if k.startswith("rejections.")
        }
        info["final_scheduler"] = sampler.last_scheduler
    finally:
        bar.close()
        if loadgen is not None and loadgen.poll() is None:
            loadgen.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                loadgen.wait(15)
            if loadgen.poll() is None:
                loadgen.kill()
        if sampler is not None:
            sampler.close()
        t_stop = time.monotonic()
        for gw in gws:
            gw.stop()
        if fleet is not None:
            fleet.stop()
        if redis is not None:
            redis.stop()
        info["stop_s"] = round(time.monotonic() - t_stop, 2)
        info["killed_orphans"] = sum(gw.killed_orphans for gw in gws)
        for cfg_path in cfg_paths:
            with contextlib.suppress(OSError):
                cfg_path.unlink()
    if info.get("loadgen_rc") != 0:
        raise RuntimeError(f"{policy}: the load generator failed; see {pdir / 'loadgen.log'}")
    summary = json.loads((pdir / "requests.summary.json").read_text(encoding="utf-8"))
    assert sampler is not None
    _write_timeline(
        pdir / "timeline.csv",
        sampler.rows,
        timeline_columns(sorted(tenants.classes)),
        float(summary["t0_unix"]),
        x,
    )
    params = cfg["scheduler"]["policy"].get("parameters") or {}
    info.update(
        drift_unlimited_as=(params.get("drift") or {}).get("unlimited_as", UNLIMITED_AS),
        slos=slo_table(cfg, x),
        weights=tenants.weights,
        cpu_count=os.cpu_count(),
        wall_s=round(time.monotonic() - t_start, 2),
        overrides=[o.render() for o in overrides if o.policy in (None, policy)],
    )
    (pdir / "run.json").write_text(json.dumps(info, indent=2, default=str) + "\n", "utf-8")
    return info
