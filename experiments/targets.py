"""The issue's targets, each with its value, threshold, margin and PASS/MISS verdict.

:func:`targets` reads :func:`experiments.summary.summarize`'s shape (``{policy: {group:
{metric: value}}}``), so the same rules check one seed and the mean over seeds;
:func:`over_seeds` puts the verdict on the mean beside each seed's margin. A margin >= 0
passes; a target whose inputs are missing (no ``fcfs`` run, one tenant in a class, no drift
samples) is ``n/a``, never a pass. Targets named ``(context)`` are reported beside the
product's targets (issue 11) to explain them: that the problem exists (fcfs misses premium),
the throughput rates beside the tokens served, drift recovery, fair-share Jain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: issue 11's targets: the top class's attainment; goodput against the best equally tuned
#: baseline (and on an overloaded scenario, ``GOODPUT_OVERLOAD`` times it); output tokens
#: served against fcfs; every tenant's attainment against its class's mean
PREMIUM_MIN, GOODPUT_MIN, GOODPUT_OVERLOAD, TOKENS_MIN, TENANT_MIN = 0.99, 1.0, 1.15, 0.97, 0.5
#: context, not the product's targets: fcfs's top-class attainment (the problem exists), the
#: throughput rates beside the tokens served, drift recovery, fair-share Jain
FCFS_MAX, THROUGHPUT_MIN, RECOVERY_MAX_S, JAIN_MIN = 0.70, 0.97, 30.0, 0.95
#: a run is *overloaded* when fcfs, work-conserving, fails more than this share of requests
#: (queue timeouts: more offered than the pool serves)
OVERLOAD_FAILED = 0.05
#: policies that are DriftSched itself or its ablations (not baselines)
OURS = "driftsched"

Target = dict[str, Any]


def top_class(classes: Sequence[str]) -> str:
    """``premium`` when there is one, else the first (highest) class; '' without classes."""
    return "premium" if "premium" in classes else (classes[0] if classes else "")


def verdict(margin: float | None) -> str:
    return "n/a" if margin is None else ("PASS" if margin >= 0 else "MISS")


def baselines(policies: Sequence[str]) -> list[str]:
    """The runs DriftSched is compared with: every policy or variant that is not
    ``driftsched`` or one of its ablations (``driftsched-...``)."""
    return [p for p in policies if p != OURS and not p.startswith(OURS + "-")]


def targets(
    s: Mapping[str, Mapping[str, Mapping[str, Any]]], classes: Sequence[str], drift: bool
) -> list[Target]:
    """Each target on ``s`` (``classes`` in level order; ``drift``: the scenario has one)."""
    top = top_class(classes)
    ds, fc = s.get(OURS), s.get("fcfs")
    out: list[Target] = []

    def get(p: Mapping[str, Mapping[str, Any]] | None, group: str, key: str) -> Any:
        return None if p is None else (p.get(group) or {}).get(key)

    def add(name: str, value: float | None, threshold: str, margin: float | None) -> None:
        out.append({"target": name, "value": value, "threshold": threshold, "margin": margin,
                    "verdict": verdict(margin)})  # fmt: skip

    def ratio(key: str, base: Mapping[str, Mapping[str, Any]] | None) -> float | None:
        a, b = get(ds, "all", key), get(base, "all", key)
        return a / b if a is not None and b else None

    att = get(ds, top, "attainment")
    add(f"{top} attainment, driftsched", att, f">= {PREMIUM_MIN}",
        None if att is None else att - PREMIUM_MIN)  # fmt: skip

    # goodput against the best baseline present
    best, best_name = None, None
    for name in baselines(list(s)):
        g = get(s[name], "all", "goodput_req_s")
        if g is not None and (best is None or g > best):
            best, best_name = g, name
    mine = get(ds, "all", "goodput_req_s")
    g_ratio = mine / best if mine is not None and best else None
    n, failed = get(fc, "all", "n"), get(fc, "all", "failed")
    overloaded = bool(n) and failed is not None and failed / n > OVERLOAD_FAILED
    want = GOODPUT_OVERLOAD if overloaded else GOODPUT_MIN
    what = "overloaded: " if overloaded else ""
    fails = "-" if not n else f"{(failed or 0) / n:.0%}"
    add("goodput driftsched / best baseline", g_ratio,
        f">= {want:g} (best: {best_name or '-'}; {what}fcfs fails {fails})",
        None if g_ratio is None else g_ratio - want)  # fmt: skip

    r = ratio("output_tokens", fc)
    add("output tokens served driftsched / fcfs", r, f">= {TOKENS_MIN}",
        None if r is None else r - TOKENS_MIN)  # fmt: skip
    for c in classes:
        if (get(ds, c, "tenants") or 0) >= 2:
            mean, low = get(ds, c, "attainment"), get(ds, c, "attainment_min")
            share = low / mean if low is not None and mean else None
            add(f"lowest tenant's attainment / class mean within {c}, driftsched", share,
                f">= {TENANT_MIN}", None if share is None else share - TENANT_MIN)  # fmt: skip

    # context
    att = get(fc, top, "attainment")
    add(f"(context) {top} attainment, fcfs", att, f"<= {FCFS_MAX}",
        None if att is None else FCFS_MAX - att)  # fmt: skip
    for key, name in (("throughput_tok_s", "(context) throughput driftsched / fcfs"),
                      ("throughput_window_tok_s",
                       "(context) in-window throughput driftsched / fcfs")):  # fmt: skip
        r = ratio(key, fc)
        add(name, r, f">= {THROUGHPUT_MIN}", None if r is None else r - THROUGHPUT_MIN)
    if drift:
        name = f"(context) {top} back >= 0.95 after drift onset (s), driftsched"
        rec, recovered = get(ds, "all", "drift_recovery_s"), get(ds, "all", "drift_recovered")
        if recovered is None:  # no drift event in the run, or no rolling samples after it
            add(name, None, f"<= {RECOVERY_MAX_S:g} s", None)
        elif recovered < 1 or rec is None:  # never recovered (in some seed)
            add(name, None, f"<= {RECOVERY_MAX_S:g} s", -1.0)
        else:
            add(name, rec, f"<= {RECOVERY_MAX_S:g} s", RECOVERY_MAX_S - rec)
    for c in classes:
        if (get(ds, c, "tenants") or 0) >= 2:
            j = get(ds, c, "service_jain")
            add(f"(context) fair-share Jain within {c}, driftsched", j, f">= {JAIN_MIN}",
                None if j is None else j - JAIN_MIN)  # fmt: skip
    return out


def over_seeds(mean: Sequence[Target], per_seed: Mapping[int, Sequence[Target]]) -> list[Target]:
    """The targets on the mean, each with ``seed_margins`` (seed -> margin, None where n/a),
    ``worst_margin`` and ``seeds_passed`` ("2/3")."""
    out = []
    for t in mean:
        margins = {}
        for seed, ts in per_seed.items():
            mine = next((x for x in ts if x["target"] == t["target"]), None)
            margins[seed] = None if mine is None else mine["margin"]
        known = [m for m in margins.values() if m is not None]
        out.append({
            **t,
            "worst_margin": min(known) if known else None,
            "seeds_passed": f"{sum(m >= 0 for m in known)}/{len(margins)}",
            "seed_margins": margins,
        })  # fmt: skip
    return out
