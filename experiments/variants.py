"""Named policy variants: what ``--policies`` accepts, defined once.

A variant is a base policy (``scheduler.policy.type``) plus gateway settings that differ
from that policy's experiment configuration (:func:`experiments.gwconfig.gateway_config`);
nothing else differs, engine flags included (``tests/experiments/test_variants.py`` checks
both). A run, its directory, the report and ``summary.json`` are labelled by the variant's
name. ``--set NAME:key=value`` applies to the run of that name only.

The four base policies are variants without settings. ``priority`` runs with
``driftsched``'s ``aging_s`` (:data:`experiments.gwconfig.BASELINE_PARAMETERS`), so that
the class-precedence baseline is tuned like the policy it is compared against; the
ablations each take one mechanism out of ``driftsched`` (or give ``priority`` one).
docs/experiments.md ("Variants") lists them with what each removes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Variant:
    """``policy`` with ``settings`` (dotted gateway key -> value) applied on top."""

    name: str
    policy: str
    settings: tuple[tuple[str, Any], ...]
    #: one line for the docs and ``--help``: what the variant removes or adds
    what: str

    def settings_map(self) -> dict[str, Any]:
        return dict(self.settings)


def _v(name: str, policy: str, what: str, settings: Mapping[str, Any] | None = None) -> Variant:
    return Variant(name, policy, tuple((settings or {}).items()), what)


_TABLE = (
    _v("fcfs", "fcfs", "arrival order, class-agnostic, plain admission"),
    _v("fair", "fair", "VTC fair share, class-agnostic, plain admission"),
    _v("priority", "priority", "class level + aging (driftsched's aging_s), plain admission"),
    _v("driftsched", "driftsched", "the full policy: level + aging + slack + debt, drift "
       "controller, TPOT governor, feasibility shed, River estimator"),
    _v("priority+governor", "priority", "priority with driftsched's TPOT governor",
       {"scheduler.governor.enabled": True}),
    _v("driftsched-no-drift", "driftsched", "no drift controller (no throttling or boost, "
       "drift ratio 1 in the slack)", {"scheduler.policy.parameters.drift.enabled": False}),
    _v("driftsched-no-governor", "driftsched", "no TPOT governor: engines' batches fill "
       "as with the baselines", {"scheduler.governor.enabled": False}),
    _v("driftsched-no-feasibility", "driftsched", "no feasibility rule: late requests stay "
       "queued in place", {"scheduler.policy.parameters.feasibility": "none"}),
    _v("driftsched-oracle", "driftsched", "the estimator's prediction replaced by the true "
       "output length (p50 = p90 = truth)", {"scheduler.estimator.kind": "oracle"}),
    _v("driftsched-tenant-mean", "driftsched", "the estimator replaced by the tenant's running "
       "mean of output lengths", {"scheduler.estimator.kind": "tenant-mean"}),
)  # fmt: skip
VARIANTS: dict[str, Variant] = {v.name: v for v in _TABLE}


def resolve(name: str) -> Variant:
    """The variant called ``name``; ``ValueError`` naming the known ones otherwise."""
    v = VARIANTS.get(name)
    if v is None:
        raise ValueError(f"unknown policy or variant {name!r}; known: {', '.join(VARIANTS)}")
    return v
