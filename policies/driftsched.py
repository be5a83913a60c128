"""``driftsched``: class level + aging + SLO slack + fairness debt, with the drift controller.

Key (seconds; lower first; computed once at enqueue, a sorted-set score)::

    key   = arrival + aging_s * (level - max_boost * boost) + slack + debt
    pred  = predicted_output_p50 * max(1, drift_ratio)          # drift-corrected length
    slack = clamp(min(ttft_slo - prefill,                        # latest start for TTFT
                      ttft_slo + tpot_slo * pred - prefill - decode_s_per_token * pred),
                  0, max_slack_s)            # max_slack_s without a TTFT SLO
    prefill = prefill_s_per_token * prompt_tokens
    debt  = min(max_debt_s, debt_s_per_ktoken * lead / 1000)
    lead  = max(0, virtual_counter + queued_charge - virtual_floor)   # weighted tokens

Why. *Level + aging* is ``priority`` (a request's effective level rises one level per
``aging_s`` of wait). *Slack* is least-laxity-first inside a level: the time a request can
still wait and meet its SLOs at its predicted length — its TTFT deadline less its prefill,
or, when the engine decodes slower than the TPOT SLO allows, the end-to-end budget
``ttft + tpot * pred`` less its expected service, which makes long requests more urgent.
Drift feeds in twice: ``pred`` is scaled up by the tenant's drift ratio (its queue
position is corrected) and the drift controller throttles drifting tenants' concurrency,
boosting drifting premium tenants (``boost``) instead. *Debt* is VTC's counter (the same
charges as ``fair``, kept by the admission queue's ledger; the scheduler passes the tenant's
counter, the floor and its queued charges, this request's included) turned into a delay: a tenant that
has taken or queued more weighted tokens than the laggard waits a little longer, so one
tenant's burst cannot crowd out its class; as the request's own charge is included, a long
predicted output also yields a little to short ones (shortest-first, within ``max_debt_s``).

Bound: each term is bounded, so ``key - arrival`` lies in
``[aging_s * (Lmin - max_boost), aging_s * Lmax + max_slack_s + max_debt_s]`` and a request
is never passed by one that arrived more than ``aging_s * (Lmax - Lmin + max_boost) +
max_slack_s + max_debt_s`` seconds after it (the proof in :mod:`policies.priority` applies
unchanged); defaults with levels 0..2: 180 + 10 + 5 = 195 s.

Why ``aging_s`` is 60 s: class precedence holds only while ``aging_s`` times the level gap
exceeds the longest wait in the queue. Under sustained overload that wait reaches the tenants'
``queue_timeout_s`` (30 s by default), so a smaller value lets queued lower-class requests
overtake every new premium one: with 5 s, premium waited 7 s at the median in the
``overload`` experiment (docs/experiments.md). At 60 s a lower class passes a higher one only
after a wait longer than the default queue timeout plus the slack and debt terms, so under
sustained overload the lowest classes are shed by their queue timeout rather than served
ahead of premium; below saturation every class is still served.

Parameters (defaults): ``aging_s`` 60.0, ``max_boost`` 1, ``prefill_s_per_token`` 0.0002,
``decode_s_per_token`` 0.03, ``max_slack_s`` 10.0, ``debt_s_per_ktoken`` 0.5,
``max_debt_s`` 5.0, ``input_weight`` 1.0, ``output_weight`` 2.0, ``feasibility``
``"shed"``, ``drift``: a mapping of :class:`policies.drift.DriftParams`, plus ``enabled``
(default true; false runs without the drift controller, an ablation), or just ``false``
(the same as ``enabled: false``).

Feasibility. A request still queued past ``arrival + ttft_slo - prefill`` can no longer meet
its TTFT SLO (:class:`TtftFeasibility`). Under overload, least-slack-first would otherwise
spend capacity on exactly those requests, each served just too late, while the ones behind
them go late in turn. ``"shed"`` (default) answers it at once with 503
``slo_unattainable``; ``"demote"`` moves it behind every request still on time, where it is
served when capacity is spare or dropped at its queue timeout; ``"none"`` keeps it in place.
Shed is the default because it measured best (``overload``, 3 seeds: goodput 1.03x
``"none"``'s and 1.01x ``"demote"``'s, standard attainment 0.990 against 0.939 and 0.963):
under sustained overload the spare capacity a demoted request waits for rarely comes, so it
meets its 30 s queue timeout instead of a quick answer. The aging bound above holds for
requests still on time; a demoted one may be passed by any of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from policies.base import Policy, QueuedRequest, TenantState
from policies.drift import DriftParams
from policies.fair import VirtualTokenCounter
from policies.registry import PolicyConfigError, check, parse_parameters

TYPE = "driftsched"
_MAX_RATIO = 16.0


@dataclass(frozen=True, slots=True)
class DriftschedParams:
    #: > queue_timeout_s (30 s default) + max_slack_s + max_debt_s: see "Why" in the module doc
    aging_s: float = 60.0
    max_boost: int = 1
    prefill_s_per_token: float = 0.0002
    decode_s_per_token: float = 0.03
    max_slack_s: float = 10.0
    debt_s_per_ktoken: float = 0.5
    max_debt_s: float = 5.0
    input_weight: float = 1.0
    output_weight: float = 2.0
    #: a request still queued when it can no longer meet its TTFT SLO: "demote", "shed" or
    #: "none" (not "off": YAML reads that as false)
    feasibility: str = "shed"

    def __post_init__(self) -> None:
        if self.feasibility not in ("demote", "shed", "none"):
            raise ValueError(
                f"feasibility: {self.feasibility!r} is not one of 'demote', 'shed', 'none'")
        check("aging_s", self.aging_s)
        check("output_weight", self.output_weight)
        for name in (
            "max_boost",
            "prefill_s_per_token",
            "decode_s_per_token",
            "max_slack_s",
            "debt_s_per_ktoken",
            "max_debt_s",
            "input_weight",
        ):
            check(name, getattr(self, name), strict=False)  # fmt: skip


class SlackOrder:
    """:class:`policies.base.OrderingPolicy` of ``driftsched`` (formula in the module doc)."""

    __slots__ = ("p",)

    def __init__(self, params: DriftschedParams) -> None:
        self.p = params

    def key(self, req: QueuedRequest, tenant: TenantState, now: float) -> float:
        p = self.p
        level = req.level - (p.max_boost if tenant.boost else 0)
        return req.arrival + p.aging_s * level + self.slack_s(req, tenant) + self.debt_s(tenant)

    def slack_s(self, req: QueuedRequest, tenant: TenantState) -> float:
        """Seconds ``req`` can wait and still meet its SLOs at its predicted length."""
        p = self.p
        if req.ttft_slo_s is None or not math.isfinite(req.ttft_slo_s):
            return p.max_slack_s
        ratio = tenant.drift_ratio if math.isfinite(tenant.drift_ratio) else _MAX_RATIO
        pred = req.predicted_output * min(max(1.0, ratio), _MAX_RATIO)
        prefill = p.prefill_s_per_token * req.prompt_tokens
        start_by = req.ttft_slo_s - prefill
        if req.tpot_slo_s is not None and math.isfinite(req.tpot_slo_s):
            start_by = min(start_by, start_by + (req.tpot_slo_s - p.decode_s_per_token) * pred)
        return min(max(start_by, 0.0), p.max_slack_s)

    def debt_s(self, tenant: TenantState) -> float:
        """Delay for the weighted tokens ``tenant`` has taken or queued beyond the floor."""
        lead = tenant.virtual_counter + tenant.queued_charge - tenant.virtual_floor
        if not lead > 0:
            return 0.0
        return min(self.p.max_debt_s, self.p.debt_s_per_ktoken * lead / 1000.0)

    def max_overtake_s(self, min_level: int, max_level: int) -> float:
        p = self.p
        spread = max(0, max_level - min_level) + p.max_boost
        return p.aging_s * spread + p.max_slack_s + p.max_debt_s


class TtftFeasibility:
    """:class:`~policies.base.Feasibility` of ``driftsched``: a request is late once it can
    no longer start in time for its TTFT SLO, ``arrival + ttft_slo - prefill`` (the same
    start-by as the slack term's)."""

    __slots__ = ("prefill_s_per_token", "rule")

    def __init__(self, prefill_s_per_token: float, rule: Literal["demote", "shed"]) -> None:
        self.prefill_s_per_token = prefill_s_per_token
        self.rule: Literal["demote", "shed"] = rule

    def late_at(self, req: QueuedRequest) -> float:
        if req.ttft_slo_s is None or not math.isfinite(req.ttft_slo_s):
            return math.inf
        return req.arrival + req.ttft_slo_s - self.prefill_s_per_token * req.prompt_tokens


def build(parameters: Mapping[str, Any]) -> Policy:
    own = {k: v for k, v in parameters.items() if k != "drift"}
    p = parse_parameters(TYPE, own, DriftschedParams)
    raw_drift = parameters.get("drift")
    if isinstance(raw_drift, bool):  # ``drift: false`` (off) or ``true`` (the defaults)
        raw_drift = {"enabled": raw_drift}
    if raw_drift is None:
        raw_drift = {}
    if not isinstance(raw_drift, Mapping):
        raise PolicyConfigError(
            "scheduler.policy.parameters.drift: must be a mapping, or true / false")
    raw_drift = dict(raw_drift)
    enabled = raw_drift.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise PolicyConfigError(
            f"scheduler.policy.parameters.drift.enabled: expected true or false, got {enabled!r}"
        )
    drift: DriftParams | None = parse_parameters(TYPE, raw_drift, DriftParams, prefix="drift.")
    if not enabled:
        drift = None  # an ablation: no throttling, no boost, drift ratio 1 in the slack
    vtc = VirtualTokenCounter(p.input_weight, p.output_weight)
    feasibility = None
    if p.feasibility != "none":
        rule: Literal["demote", "shed"] = "shed" if p.feasibility == "shed" else "demote"
        feasibility = TtftFeasibility(p.prefill_s_per_token, rule)
    return Policy(TYPE, SlackOrder(p), fair_share=vtc, drift=drift, feasibility=feasibility)
