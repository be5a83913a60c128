"""What the pool's capacity allows: an upper bound on each class's SLO attainment.

Under overload no scheduler serves everything. How much *can* it serve within the SLOs? The
pool's saturation throughput on a class's mix of lengths, ``capacity_c`` requests per second
(:func:`experiments.describe.estimate_capacity`: the simulator's step model, the engines at
their full batch), turns the class's offered rate into the share of the pool's time it asks
for, ``load_c = offered_c / capacity_c``. A scheduler that served the classes strictly in
level order (premium first) and every served request within its SLOs would give class ``c``

    bound_c = min(1, max(0, 1 - sum of the loads of the classes above it) / load_c)

and no scheduler does better on the top class, or on the top two together, and so on: any
request of a class that this order does not serve would take pool time from a class above
it. The bound is generous: it ignores the TTFT and TPOT the SLOs demand (a full batch
decodes more slowly than a TPOT SLO may allow, which is why the TPOT governor caps batches),
the ramp-up and drain of a run, and the queue timeout after the arrivals end. A policy's
attainment well under the bound is capacity spent on requests that missed their SLO, or
left idle; at the bound it cannot gain by reordering, only by making the engines faster.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from experiments.describe import estimate_capacity
from experiments.workload_file import Request


@dataclass(frozen=True, slots=True)
class ClassLoad:
    """One class's demand on the pool over the arrival window."""

    name: str
    requests: int
    offered_req_s: float
    #: the pool's saturation throughput on this class's length mix (requests per second)
    capacity_req_s: float

    @property
    def load(self) -> float:
        """The share of the pool's time this class asks for."""
        return self.offered_req_s / self.capacity_req_s if self.capacity_req_s > 0 else 0.0


def bounds(loads: Sequence[ClassLoad], time: float = 1.0) -> dict[str, float]:
    """Each class's attainment bound, serving ``loads`` strictly in the given (level) order
    from ``time`` (the pool's time in units of the arrival window, ``(D + W) / D``; module
    doc); a class that asks for nothing is bounded by 1."""
    left, out = time, {}
    for c in loads:
        if c.load <= 0:
            out[c.name] = 1.0
            continue
        served = min(1.0, max(0.0, left) / c.load)
        out[c.name] = served
        left -= served * c.load
    return out


def class_loads(
    reqs: Sequence[Request], classes: Sequence[str], duration_s: float, *, engines: int,
    profile: str, max_num_seqs: int | None = None, n_requests: int = 3000,
) -> list[ClassLoad]:
    """Each class's (in ``classes`` order) offered rate over the arrival window
    ``duration_s`` and the pool's capacity on its mix; a class without requests is left out."""
    out = []
    for name in classes:
        mine = [r for r in reqs if r.qos_class == name and r.arrival_s < duration_s]
        if not mine:
            continue
        cap = estimate_capacity(mine, engines=engines, profile=profile,
                                max_num_seqs=max_num_seqs, n_requests=n_requests)
        out.append(ClassLoad(name, len(mine), len(mine) / duration_s, float(cap["req_s"])))
    return out


def bound_rows(
    loads: Sequence[ClassLoad], metrics: Mapping[str, Mapping[str, Any]], time: float = 1.0
) -> tuple[list[str], list[list[str]]]:
    """The report's table: per class its demand, its bound (:func:`bounds` with ``time``)
    and each policy's attainment as a share of the bound; then every class together
    (requests that can meet their SLO)."""
    b = bounds(loads, time)
    policies = list(metrics)
    head = ["class", "requests", "offered (req/s)", "pool capacity on its mix (req/s)",
            "share of the pool asked", "attainment bound",
            *(f"{p} (share of bound)" for p in policies)]  # fmt: skip
    rows = []
    for c in loads:
        cells = []
        for p in policies:
            att = (metrics[p].get("classes", {}).get(c.name) or {}).get("attainment")
            cells.append("-" if att is None else
                         f"{att:.3f} ({att / b[c.name]:.2f})" if b[c.name] > 0 else f"{att:.3f}")
        rows.append([c.name, str(c.requests), f"{c.offered_req_s:.2f}", f"{c.capacity_req_s:.2f}",
                     f"{c.load:.2f}", f"{b[c.name]:.3f}", *cells])  # fmt: skip
    total = sum(c.requests for c in loads)
    can = sum(b[c.name] * c.requests for c in loads)
    cells = []
    for p in policies:
        met = sum((metrics[p].get("classes", {}).get(c.name) or {}).get("met") or 0
                  for c in loads)  # fmt: skip
        cells.append(f"{met / total:.3f} ({met / can:.2f})" if total and can else "-")
    rows.append(["all", str(total), f"{sum(c.offered_req_s for c in loads):.2f}", "",
                 f"{sum(c.load for c in loads):.2f}", f"{can / total:.3f}" if total else "-",
                 *cells])  # fmt: skip
    return head, rows
