"""Builders for the experiments' unit tests: requests and runs as the report reads them."""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.record import COLUMNS, Record, csv_row
from experiments.rundata import Access, Req, RunData

_ids = itertools.count()

#: premium and standard with the gateway's default SLOs, batch without (simulated seconds)
SLOS: dict[str, dict[str, Any]] = {
    "premium": {"qos_class": "premium", "level": 0, "ttft_slo_s": 1.0, "tpot_slo_s": 0.1},
    "standard": {"qos_class": "standard", "level": 1, "ttft_slo_s": 3.0, "tpot_slo_s": 0.2},
    "batch": {"qos_class": "batch", "level": 2, "ttft_slo_s": None, "tpot_slo_s": None},
}


def make_req(
    tenant: str = "acme",
    qos_class: str = "premium",
    *,
    at: float = 0.0,
    lag: float = 0.0,
    ttft: float | None = 0.1,
    decode: float = 1.0,
    prompt: int = 10,
    out: int = 11,
    status: int = 200,
    error: str = "",
    dispatched: bool = True,
    expected_prompt: int | None = None,
    expected_out: int | None = None,
) -> Req:
    """A request arriving at ``at``, dispatched ``lag`` later, first token ``ttft`` after
    dispatch, ``out`` tokens over ``decode`` seconds. ``ttft=None`` or an error status: a
    failure at dispatch time (no token). Expected lengths default to the actual ones."""
    d = at + lag if dispatched else None
    ok = status == 200 and not error
    first = None if (ttft is None or not ok or d is None) else d + ttft
    done = (first + decode) if first is not None else (d if d is not None else at)
    return Req(
        request_id=f"r{next(_ids)}",
        tenant=tenant,
        qos_class=qos_class,
        intended_s=at,
        dispatched_s=d,
        first_token_s=first,
        done_s=done,
        status=status,
        error=error,
        prompt_tokens=prompt if ok else None,
        completion_tokens=out if ok else None,
        expected_prompt_tokens=prompt if expected_prompt is None else expected_prompt,
        expected_output_tokens=out if expected_out is None else expected_out,
    )


def failed(tenant: str = "acme", qos_class: str = "premium", *, at: float = 0.0,
           error: str = "queue_timeout", status: int = 503, **kw: Any) -> Req:  # fmt: skip
    return make_req(tenant, qos_class, at=at, status=status, error=error, **kw)


def slos_for(tenant_class: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """tenant -> its class's SLO row (:data:`SLOS`)."""
    return {t: dict(SLOS[c]) for t, c in tenant_class.items()}


def make_run(
    reqs: Sequence[Req],
    *,
    policy: str = "fcfs",
    weights: Mapping[str, float] | None = None,
    engines: Sequence[Mapping[str, float]] = (),
    access: Sequence[Access] = (),
) -> RunData:
    """A :class:`RunData` of ``reqs``; SLOs from each request's class."""
    return RunData(
        policy=policy,
        time_scale=1.0,
        requests=list(reqs),
        access=list(access),
        actions=[],
        timeline=[],
        summary={},
        info={"engines": [dict(e) for e in engines]},
        slos=slos_for({r.tenant: r.qos_class for r in reqs}),
        weights=dict(weights or {}),
    )


def write_run_dir(
    pdir: Path,
    reqs: Sequence[Req],
    *,
    policy: str,
    slos: Mapping[str, Mapping[str, Any]],
    weights: Mapping[str, float],
    engines: Sequence[Mapping[str, float]] = (),
) -> dict[str, Any]:
    """What one policy's run leaves on disk (:mod:`experiments.rundata`'s module doc), at
    time scale 1, for ``reqs``; returns the run's info (``run.json``)."""
    pdir.mkdir(parents=True, exist_ok=True)
    with (pdir / "requests.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in reqs:
            rec = Record(r.request_id, r.tenant, r.qos_class, r.intended_s,
                         dispatched_s=r.dispatched_s, sent_s=r.dispatched_s,
                         first_token_s=r.first_token_s, done_s=r.done_s, status=r.status,
                         error=r.error, prompt_tokens=r.prompt_tokens,
                         completion_tokens=r.completion_tokens,
                         expected_prompt_tokens=r.expected_prompt_tokens,
                         expected_output_tokens=r.expected_output_tokens)  # fmt: skip
            w.writerow(csv_row(rec))
    (pdir / "requests.summary.json").write_text(json.dumps({"t0_unix": 1.0e9, "wall_s": 1.0}))
    info = {"policy": policy, "time_scale": 1.0, "slos": dict(slos), "weights": dict(weights),
            "engines": [dict(e) for e in engines], "resources": {}, "wall_s": 1.0,
            "loadgen_rc": 0, "killed_orphans": 0, "cpu_count": 2}  # fmt: skip
    (pdir / "run.json").write_text(json.dumps(info))
    return info
