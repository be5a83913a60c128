"""What one policy's run left on disk, read back in simulated seconds from the replay's start.

A run directory (``results/<scenario>/<stamp>/<policy>/``) holds:

- ``requests.csv`` -- the load generator's rows (:data:`experiments.record.COLUMNS`) and
  ``requests.summary.json`` (its lag, CPU, ``t0_unix``);
- ``gateway.log`` -- the gateway's JSON log lines: the access log (``logger``
  ``driftsched.access``: ``request_id``, ``status``, ``completion_tokens``,
  ``predicted_p50``/``predicted_p90``, ``max_tokens``, ``queue_ms``, ``duration_ms``,
  ``arrival_unix``) and the drift
  controller's actions (``driftsched.scheduler``, ``msg`` "drift controller acted");
- ``timeline.csv`` -- one row per second (:func:`experiments.stack.timeline_columns`);
- ``run.json`` -- what the runner knew: policy, time scale, SLOs and weights per tenant,
  final engine counters, process resources, timings.

Times are multiplied by the run's ``time_scale`` (wall seconds x X = simulated seconds), so
every number downstream compares directly with the SLOs and the simulator's profile.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Req:
    """One request as the client saw it (times: simulated seconds from the replay start)."""

    request_id: str
    tenant: str
    qos_class: str
    intended_s: float
    dispatched_s: float | None
    first_token_s: float | None
    done_s: float | None
    status: int
    error: str
    prompt_tokens: int | None
    completion_tokens: int | None
    expected_prompt_tokens: int
    expected_output_tokens: int

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error

    @property
    def ttft_s(self) -> float | None:
        if self.first_token_s is None or self.dispatched_s is None:
            return None
        return self.first_token_s - self.dispatched_s

    @property
    def e2e_s(self) -> float | None:
        if not self.ok or self.done_s is None or self.dispatched_s is None:
            return None
        return self.done_s - self.dispatched_s

    @property
    def tpot_s(self) -> float | None:
        """(done - first token) / (output tokens - 1); 0 for one token; None if unknown."""
        out = self.completion_tokens
        if not self.ok or self.first_token_s is None or self.done_s is None or out is None:
            return None
        return 0.0 if out <= 1 else (self.done_s - self.first_token_s) / (out - 1)


@dataclass(frozen=True, slots=True)
class Access:
    """The gateway's access-log line of one request (times in simulated seconds)."""

    request_id: str
    status: int
    completion_tokens: int | None
    predicted_p50: float | None
    predicted_p90: float | None
    queue_s: float | None
    duration_s: float | None
    #: arrival at the gateway (``arrival_unix``; in older logs the line's time minus its
    #: duration); None if unknown
    arrival_s: float | None = None
    max_tokens: int | None = None

    @property
    def finish_s(self) -> float | None:
        """When the gateway finished the request (arrival + duration)."""
        if self.arrival_s is None or self.duration_s is None:
            return None
        return self.arrival_s + self.duration_s


@dataclass(frozen=True, slots=True)
class DriftAction:
    t_s: float
    tenant: str
    action: str
    ratio: float | None
    limit: int | None


@dataclass(slots=True)
class RunData:
    policy: str
    time_scale: float
    requests: list[Req]
    access: list[Access]
    actions: list[DriftAction]
    timeline: list[dict[str, Any]]
    summary: dict[str, Any]
    info: dict[str, Any]
    #: tenant -> {qos_class, level, ttft_slo_s, tpot_slo_s}
    slos: dict[str, dict[str, Any]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


def _f(v: str) -> float | None:
    return float(v) if v not in ("", None) else None


def _i(v: str) -> int | None:
    return int(float(v)) if v not in ("", None) else None


def _scaled(v: float | None, x: float) -> float | None:
    return None if v is None else v * x


def read_requests(path: Path, x: float) -> list[Req]:
    out = []
    with path.open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            out.append(
                Req(
                    request_id=r["request_id"],
                    tenant=r["tenant"],
                    qos_class=r["qos_class"],
                    intended_s=float(r["intended_s"]) * x,
                    dispatched_s=_scaled(_f(r["dispatched_s"]), x),
                    first_token_s=_scaled(_f(r["first_token_s"]), x),
                    done_s=_scaled(_f(r["done_s"]), x),
                    status=int(r["status"] or 0),
                    error=r["error"],
                    prompt_tokens=_i(r["prompt_tokens"]),
                    completion_tokens=_i(r["completion_tokens"]),
                    expected_prompt_tokens=int(r["expected_prompt_tokens"] or 0),
                    expected_output_tokens=int(r["expected_output_tokens"] or 0),
                )
            )
    return out


def _iso_unix(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def read_gateway_log(
    lines: Iterable[str], t0_unix: float, x: float
) -> tuple[list[Access], list[DriftAction]]:
    """The access-log lines and the drift controller's actions from the gateway's log."""
    access: list[Access] = []
    actions: list[DriftAction] = []
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        logger = rec.get("logger")
        if logger == "driftsched.access" and rec.get("request_id"):
            q, d = rec.get("queue_ms"), rec.get("duration_ms")
            arrival = rec.get("arrival_unix")
            if arrival is None and d is not None and rec.get("ts"):
                arrival = _iso_unix(rec["ts"]) - d / 1000.0
            access.append(
                Access(
                    request_id=str(rec["request_id"]),
                    status=int(rec.get("status") or 0),
                    completion_tokens=rec.get("completion_tokens"),
                    predicted_p50=rec.get("predicted_p50"),
                    predicted_p90=rec.get("predicted_p90"),
                    queue_s=None if q is None else q * x / 1000.0,
                    duration_s=None if d is None else d * x / 1000.0,
                    arrival_s=None if arrival is None else (float(arrival) - t0_unix) * x,
                    max_tokens=rec.get("max_tokens"),
                )
            )
        elif logger == "driftsched.scheduler" and rec.get("msg") == "drift controller acted":
            actions.append(
                DriftAction(
                    t_s=(_iso_unix(rec["ts"]) - t0_unix) * x,
                    tenant=str(rec.get("tenant")),
                    action=str(rec.get("action")),
                    ratio=rec.get("ratio"),
                    limit=rec.get("limit"),
                )
            )
    return access, actions


def read_timeline(path: Path, t0_unix: float, x: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    with path.open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in r.items():
                if k.startswith("state."):
                    row[k] = v or None
                    continue
                try:
                    row[k] = float(v) if v not in ("", "None") else None
                except ValueError:
                    row[k] = v
            unix = row.get("unix_s")
            row["t_s"] = None if unix is None else (unix - t0_unix) * x
            rows.append(row)
    return rows


def load_run(run_dir: Path) -> RunData:
    """Read one policy's run directory (module doc)."""
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    summary = json.loads((run_dir / "requests.summary.json").read_text(encoding="utf-8"))
    x = float(info.get("time_scale", 1.0))
    t0 = float(summary["t0_unix"])
    log = run_dir / "gateway.log"
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.exists() else []
    access, actions = read_gateway_log(lines, t0, x)
    return RunData(
        policy=str(info["policy"]),
        time_scale=x,
        requests=read_requests(run_dir / "requests.csv", x),
        access=access,
        actions=actions,
        timeline=read_timeline(run_dir / "timeline.csv", t0, x),
        summary=summary,
        info=info,
        slos=info.get("slos", {}),
        weights={k: float(v) for k, v in info.get("weights", {}).items()},
    )
