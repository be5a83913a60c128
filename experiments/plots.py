"""The report's PNG plots (matplotlib, Agg backend: no display needed).

- :func:`attainment_bars` -- SLO attainment per class (groups) and policy (bars);
- :func:`latency_cdfs` -- CDF of TTFT (or TPOT) per class (panels) and policy (lines), the
  class's SLO as a dashed line; failed requests are off the right edge (the CDF ends below 1);
- :func:`timeline` -- one row per policy: every class's rolling attainment, each tenant's
  concurrency limit, drift ratio, and queue depth / preemptions over time; drift onsets are
  vertical dotted lines, the drifting tenant is drawn bold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

from experiments.rundata import RunData

COLORS = {"fcfs": "#7f7f7f", "priority": "#1f77b4", "fair": "#2ca02c", "driftsched": "#d62728"}


def _color(policy: str, i: int) -> str:
    return COLORS.get(policy, f"C{i % 10}")


def attainment_bars(
    metrics: Mapping[str, Mapping[str, Any]], classes: Sequence[str], path: Path
) -> None:
    policies = list(metrics)
    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(classes), 3.8))
    width = 0.8 / max(1, len(policies))
    x = np.arange(len(classes))
    for i, p in enumerate(policies):
        vals = [metrics[p]["classes"].get(c, {}).get("attainment") or 0.0 for c in classes]
        bars = ax.bar(x + (i - (len(policies) - 1) / 2) * width, vals, width, label=p,
                      color=_color(p, i))  # fmt: skip
        for b, v in zip(bars, vals, strict=True):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center",
                    va="bottom", fontsize=7)  # fmt: skip
    ax.axhline(0.95, ls="--", lw=0.8, color="k")
    ax.set_xticks(x, list(classes))
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("SLO attainment")
    ax.set_title("SLO attainment per class (batch: completed share)")
    ax.legend(fontsize=8, ncols=len(policies), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_cdfs(
    runs: Mapping[str, RunData], classes: Sequence[str], path: Path, metric: str = "ttft"
) -> None:
    fig, axes = plt.subplots(1, len(classes), figsize=(4.2 * len(classes), 3.4), squeeze=False)
    for ax, cls in zip(axes[0], classes, strict=True):
        slo = None
        for i, (p, run) in enumerate(runs.items()):
            rs = [r for r in run.requests if r.qos_class == cls]
            vals = sorted(
                v for r in rs if (v := (r.ttft_s if metric == "ttft" else r.tpot_s)) is not None
            )
            if rs and slo is None:
                slo = run.slos[rs[0].tenant].get(f"{metric}_slo_s")
            if not vals:
                continue
            ys = np.arange(1, len(vals) + 1) / len(rs)
            ax.step(np.maximum(vals, 1e-3), ys, where="post", label=p, color=_color(p, i))
        if slo is not None:
            ax.axvline(slo, ls="--", lw=0.8, color="k", label="SLO")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{metric.upper()} CDF: {cls}")
        ax.set_xlabel(f"{metric.upper()} (s, simulated)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of requests sent")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(rows: Sequence[Mapping[str, Any]], col: str) -> tuple[list[float], list[float]]:
    ts, vs = [], []
    for r in rows:
        if r.get("t_s") is not None and r.get(col) is not None:
            ts.append(float(r["t_s"]))
            vs.append(float(r[col]))
    return ts, vs


def _limit_series(
    rows: Sequence[Mapping[str, Any]], tenant: str, unlimited: float
) -> tuple[list[float], list[float]]:
    """The tenant's limit over time; an untouched unlimited tenant (limit None while the
    controller tracks it) is drawn at ``unlimited``."""
    ts, vs = [], []
    for r in rows:
        if r.get("t_s") is None or r.get(f"state.{tenant}") is None:
            continue
        lim = r.get(f"limit.{tenant}")
        ts.append(float(r["t_s"]))
        vs.append(unlimited if lim is None else float(lim))
    return ts, vs


def timeline(
    runs: Mapping[str, RunData],
    metrics: Mapping[str, Mapping[str, Any]],
    classes: Sequence[str],
    drift: Sequence[Mapping[str, Any]],
    path: Path,
) -> None:
    policies = list(runs)
    fig, axes = plt.subplots(
        len(policies), 4, figsize=(17, 2.7 * len(policies)), squeeze=False, sharex=True
    )
    drifting = {str(d["tenant"]) for d in drift}
    onsets = [float(d["at_s"]) for d in drift]
    for row, p in zip(axes, policies, strict=True):
        run, m = runs[p], metrics[p]
        a_att, a_lim, a_ratio, a_q = row
        for j, c in enumerate(classes):
            roll = m["rolling"].get(c)
            if roll:
                pts = [
                    (t, v)
                    for t, v in zip(roll["t"], roll["attainment"], strict=True)
                    if v is not None
                ]
                a_att.plot([t for t, _ in pts], [v for _, v in pts], label=c, color=f"C{j}")
        a_att.axhline(0.95, ls="--", lw=0.7, color="k")
        a_att.set_ylim(-0.02, 1.05)
        a_att.set_ylabel(f"{p}\nrolling 10 s attainment", fontsize=8)
        tenants = sorted(run.weights)
        unlimited = float(run.info.get("drift_unlimited_as") or 64)
        for j, t in enumerate(tenants):
            lw = 2.2 if t in drifting else 1.0
            ts, lim = _limit_series(run.timeline, t, unlimited)
            if ts:
                a_lim.step(ts, lim, where="post", label=t, lw=lw, color=f"C{j}")
            ts, ratio = _series(run.timeline, f"ratio.{t}")
            if ts:
                a_ratio.plot(ts, ratio, label=t, lw=lw, color=f"C{j}")
        if not any(_limit_series(run.timeline, t, unlimited)[0] for t in tenants):
            a_lim.text(0.5, 0.5, "no drift controller", ha="center", va="center",
                       transform=a_lim.transAxes, fontsize=9, color="0.4")  # fmt: skip
        a_lim.set_ylabel(f"concurrency limit\n(unlimited drawn at {unlimited:g})", fontsize=8)
        a_ratio.axhline(1.5, ls=":", lw=0.7, color="k")
        a_ratio.set_ylabel("drift ratio (actual / predicted)", fontsize=8)
        ts, q = _series(run.timeline, "queue_depth")
        a_q.plot(ts, q, color="C0", label="queue depth")
        a_q.set_ylabel("queue depth", fontsize=8, color="C0")
        twin = a_q.twinx()
        ts, pre = _series(run.timeline, "preemptions")
        twin.plot(ts, pre, color="C3", label="preemptions")
        twin.set_ylabel("preemptions (cum.)", fontsize=8, color="C3")
        for ax in (a_att, a_lim, a_ratio, a_q):
            for o in onsets:
                ax.axvline(o, ls=":", color="m", lw=1.2)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    for k in (1, 2):
        with_lines = [r[k] for r in axes if r[k].get_legend_handles_labels()[0]]
        if with_lines:
            with_lines[0].legend(fontsize=7, loc="upper left")
    titles = ("attainment per class", "limit per tenant", "drift ratio per tenant",
              "gateway queue / engine preemptions")  # fmt: skip
    for ax, title in zip(axes[0], titles, strict=True):
        ax.set_title(title + (" (dotted: drift onset)" if onsets and ax is axes[0][0] else ""))
    for ax in axes[-1]:
        ax.set_xlabel("time since replay start (s, simulated)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
