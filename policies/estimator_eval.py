"""Prequential evaluation of the output-token estimator against simple baselines.

Every model sees the rows in order and, for each, predicts and then learns (River's
``progressive_val_score`` protocol). Two workloads:

``sharegpt``  the ShareGPT first-turn file as is: one tenant, one user message per request.
              The file's ``n_messages`` (the length of the *whole* conversation, known only
              afterwards) is deliberately not used.
``tenants``   the same rows as a multi-tenant stream: each row goes to one of five tenants
              by a hash of its id; each tenant has its own length profile (a multiplier on
              the real response length, as an app's system prompt would impose, and a
              ``max_tokens`` cap). Halfway through, the ``assistant`` tenant's lengths jump
              4x. Reported: MAE and tau over all rows, mean within-tenant tau, and
              re-convergence: completions of the shifted tenant after the shift until the
              relative MAE of its next 25 completions is within 10% of its pre-shift level.

Latency: the table's µs columns are CPU time (``thread_time``) per ``estimate_one`` /
``predict_one`` inside the run, cache-cold and on a shared machine. ``request_path_cost``
measures what the gateway pays per request (feature extraction + ``estimate_one``) as the
best of 5 repeats per prompt, so that preemption by other processes does not count.

Run ``python -m policies.estimator_eval --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from river import dummy, linear_model, optim, stats
from tqdm import tqdm

from policies import baselines
from policies.estimator import OutputTokenEstimator
from policies.features import RequestFeatures

DEFAULT_DATA = (
    Path(__file__).resolve().parents[2] / "shared/data/sharegpt/sharegpt_first_turn_dev.jsonl"
)
BUCKETS = (58, 147, 280, 499)
# name -> (length multiplier, max_tokens); the first tenant's lengths shift 4x mid-stream.
TENANTS: dict[str, tuple[float, int | None]] = {
    "assistant": (1.0, None),
    "support": (0.3, 256),
    "summarizer": (0.5, 512),
    "coder": (1.5, 2048),
    "writer": (2.5, 4096),
}
SHIFTED, SHIFT = "assistant", 4.0
UNCAPPED = 4096  # the longest answer of a tenant without a cap
WINDOW, BAND = 25, 0.10


class Model(Protocol):
    def predict_one(self, x: dict[str, Any]) -> float: ...
    def learn_one(self, x: dict[str, Any], y: float) -> None: ...


class Prior:
    """``model``'s prediction, or ``prior`` while it has none (River statistics start at None)."""

    def __init__(self, model: Any, prior: float = 256.0) -> None:
        self.model, self.prior = model, prior

    def predict_one(self, x: dict[str, Any]) -> float:
        p = self.model.predict_one(x)
        return self.prior if p is None else float(p)

    def learn_one(self, x: dict[str, Any], y: float) -> None:
        self.model.learn_one(x, y)


class QuantileHeads:
    """The alternative design: River quantile-loss linear heads, tenant as a one-hot feature."""

    def __init__(self, quantile: float = 0.9, prior: float = 256.0) -> None:
        def head(q: float) -> linear_model.LinearRegression:
            return linear_model.LinearRegression(
                optimizer=optim.AdaGrad(0.1),
                loss=optim.losses.Quantile(q),
                intercept_init=math.log1p(prior),
                intercept_lr=0.05,
            )

        self._p50, self._p90 = head(0.5), head(quantile)

    @staticmethod
    def _x(x: dict[str, Any]) -> dict[str, float]:
        xs = {k: v for k, v in x.items() if not isinstance(v, str) and k != "max_tokens"}
        xs[f"tenant={x.get('tenant', '')}"] = 1.0
        return xs

    def estimate_one(self, x: dict[str, Any]) -> tuple[float, float]:
        xs, cap = self._x(x), float(x.get("max_tokens") or math.inf)
        p50 = math.expm1(max(0.0, self._p50.predict_one(xs)))  # type: ignore[no-untyped-call]
        p90 = math.expm1(max(0.0, self._p90.predict_one(xs)))  # type: ignore[no-untyped-call]
        return min(p50, cap), min(max(p50, p90), cap)

    def predict_one(self, x: dict[str, Any]) -> float:
        return self.estimate_one(x)[0]

    def learn_one(self, x: dict[str, Any], y: float) -> None:
        xs, target = self._x(x), math.log1p(y)
        self._p50.learn_one(xs, target)
        self._p90.learn_one(xs, target)


def models(warm: Path | None = None) -> dict[str, Model]:
    """The learned models, each run prequentially (timed, drift alarms recorded); the
    baselines of :mod:`policies.baselines` run beside them (:func:`evaluate`)."""
    return {
        "driftsched estimator": OutputTokenEstimator.load(warm) if warm else OutputTokenEstimator(),
        "River quantile heads": QuantileHeads(),
        "StatisticRegressor(Quantile(.5))": Prior(dummy.StatisticRegressor(stats.Quantile(0.5))),
    }


@dataclass(slots=True)
class Row:
    x: dict[str, Any]
    y: float
    tenant: str
    shifted: bool


def load_rows(path: Path, limit: int | None, shuffle: int | None) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if shuffle is not None:
        random.Random(shuffle).shuffle(rows)
    return rows[:limit] if limit else rows


def make_stream(rows: list[dict[str, Any]], mode: str) -> tuple[list[Row], float]:
    """Feature dicts and targets for ``mode``; also the mean feature extraction µs."""
    fx = RequestFeatures()
    out: list[Row] = []
    spent = 0.0
    half = len(rows) // 2
    for i, r in enumerate(rows):
        y, tenant, cap, shifted = float(r["response_tokens"]), "", None, False
        if mode == "tenants":
            tenant = list(TENANTS)[zlib.crc32(r["id"].encode()) % len(TENANTS)]
            mult, cap = TENANTS[tenant]
            shifted = tenant == SHIFTED and i >= half
            y = max(1.0, round(y * mult * (SHIFT if shifted else 1.0)))
            y = min(y, cap or UNCAPPED)
        req = {
            "prompt": r["prompt"],
            "prompt_tokens": r["prompt_tokens"],
            "tenant": tenant,
            "model": "m",
            "n_messages": 1,
            "max_tokens": cap,
        }
        t0 = time.thread_time()
        x = fx.transform_one(req)
        spent += time.thread_time() - t0
        out.append(Row(x, y, tenant, shifted))
    return out, spent / max(1, len(rows)) * 1e6


def bucket(v: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.array(BUCKETS), v, side="left")


def tau(p: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b (:func:`policies.baselines.tau_b`); NaN where undefined."""
    v = baselines.tau_b(p, y)
    return float("nan") if v is None else v


def reconvergence(err: np.ndarray, y: np.ndarray, shift_at: int) -> int | None:
    """Completions after the shift before the model is back to its pre-shift accuracy.

    The smallest ``k`` such that the relative MAE (sum |error| / sum actual) of the ``WINDOW``
    completions after the first ``k`` post-shift ones is within ``BAND`` of the relative MAE
    of the 200 completions before the shift. ``None``: never (or too few rows to tell).
    """
    if shift_at < WINDOW or len(y) - shift_at < WINDOW:
        return None
    lo = max(0, shift_at - 200)
    target = (1 + BAND) * err[lo:shift_at].sum() / y[lo:shift_at].sum()
    for k in range(0, len(y) - shift_at - WINDOW + 1):
        a, b = shift_at + k, shift_at + k + WINDOW
        if err[a:b].sum() / y[a:b].sum() <= target:
            return k
    return None


@dataclass(slots=True)
class Run:
    """One model's prequential pass: predictions, CPU ns per predict, drift alarms."""

    p50: np.ndarray
    p90: np.ndarray  # NaN for models without a quantile
    ns: np.ndarray
    alarms: list[tuple[str, int, bool]]  # detections: tenant, its completion no., shifted


def prequential(model: Model, stream: list[Row], desc: str, progress: bool) -> Run:
    """Predict, then learn, each row in order."""
    n = len(stream)
    run = Run(np.empty(n), np.full(n, np.nan), np.empty(n), [])
    estimate: Callable[[dict[str, Any]], Any] | None = getattr(model, "estimate_one", None)
    seen: dict[str, int] = {}
    rows = tqdm(stream, desc=desc, disable=not progress, leave=False, file=sys.stderr)
    for i, r in enumerate(rows):
        t0 = time.thread_time_ns()
        if estimate is not None:
            e = estimate(r.x)
            run.ns[i] = time.thread_time_ns() - t0
            run.p50[i], run.p90[i] = (e.p50, e.p90) if hasattr(e, "p50") else e
        else:
            run.p50[i] = model.predict_one(r.x)
            run.ns[i] = time.thread_time_ns() - t0
        model.learn_one(r.x, r.y)
        seen[r.tenant] = seen.get(r.tenant, 0) + 1
        if isinstance(model, OutputTokenEstimator) and model.drift_detected(r.tenant):
            if model.drift_state(r.tenant).detections > sum(a[0] == r.tenant for a in run.alarms):
                run.alarms.append((r.tenant, seen[r.tenant], r.shifted))
    return run


def evaluate(
    stream: list[Row], mode: str, progress: bool, warm: Path | None = None
) -> tuple[list[dict[str, Any]], dict[str, Model]]:
    """Every model of ``models()``, then every baseline of :mod:`policies.baselines`, over
    ``stream`` (prequential, arrival order); one result dict per model. The baselines are
    the live report's (:func:`policies.baselines.prequential`); the ``max_tokens`` one is
    scored only on the rows with a cap (``n``)."""
    ys = np.array([r.y for r in stream])
    results = []
    trained = models(warm)
    for name, model in trained.items():
        run = prequential(model, stream, f"{mode}: {name}", progress)
        res = result(name, list(run.p50), stream, mode)
        has_q = not np.isnan(run.p90).all()
        res["p90_cover"] = float(np.mean(ys <= run.p90)) if has_q else None
        res["reserve"] = float(run.p90.sum() / ys.sum()) if has_q else None
        res["us_p50"] = float(np.percentile(run.ns, 50) / 1e3)
        res["us_p99"] = float(np.percentile(run.ns, 99) / 1e3)
        if isinstance(model, OutputTokenEstimator):
            res["alarms"] = run.alarms
        results.append(res)
    preds = baselines.prequential([r.x for r in stream], list(ys))
    for name, pred in preds.items():
        res = result(name, pred, stream, mode)
        if name == baselines.MAX_TOKENS and res["n"]:
            capped = [(p, r.y) for p, r in zip(pred, stream, strict=True) if p is not None]
            res["reserve"] = sum(p for p, _ in capped) / sum(y for _, y in capped)
        results.append(res)
    return results, trained


def result(name: str, pred: Sequence[float | None], stream: list[Row], mode: str) -> dict[str, Any]:
    """Scores of one model's predictions (None: no prediction, the row is not scored):
    :func:`policies.baselines.score`'s n / MAE / tau / within-tenant tau, bucket accuracy
    and, for ``tenants``, the shifted tenant's re-convergence."""
    ys = [r.y for r in stream]
    sc = baselines.score(pred, ys, [r.tenant for r in stream])
    keep = [i for i, p in enumerate(pred) if p is not None]
    p, y = np.array([pred[i] for i in keep], dtype=float), np.array([ys[i] for i in keep])
    res: dict[str, Any] = {
        "model": name,
        "n": sc["n"],
        "mae": sc["mae"],
        "tau": sc["tau"],
        "tau_tenant": sc["tau_within"],
        "tenants": sc["tenants"],
        "bucket": float(np.mean(bucket(p) == bucket(y))) if keep else None,
        "within1": float(np.mean(np.abs(bucket(p) - bucket(y)) <= 1)) if keep else None,
        "p90_cover": None,
        "reserve": None,
        "us_p50": None,
        "us_p99": None,
    }
    if mode == "tenants":
        res.update(reconverge_of(stream, pred))
    return res


def reconverge_of(stream: list[Row], pred: Sequence[float | None]) -> dict[str, Any]:
    """The shifted tenant's re-convergence (None where the model does not predict it)."""
    idx = [i for i, r in enumerate(stream) if r.tenant == SHIFTED]
    shifted = np.array([stream[i].shifted for i in idx])
    shift_at = int(np.argmax(shifted)) if shifted.any() else len(idx)
    if not idx or any(pred[i] is None for i in idx):
        return {"reconverge": None, "shift_at": shift_at}
    p = np.array([pred[i] for i in idx], dtype=float)
    y = np.array([stream[i].y for i in idx])
    return {"reconverge": reconvergence(np.abs(p - y), y, shift_at), "shift_at": shift_at}


def fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def table(results: list[dict[str, Any]], mode: str, feat_us: float, n: int) -> str:
    tenants = mode == "tenants"
    head = ["model", "n", "MAE", "tau-b", "bucket", "±1 bkt", "p90 cover", "reserve", "µs p50",
            "µs p99"]  # fmt: skip
    if tenants:
        head[4:4] = ["tau/tenant", "reconv"]
    lines = [
        f"\n## {mode}: {n} rows, prequential; feature extraction {feat_us:.1f} µs/request "
        "(mean CPU)\n\nMAE, tau and buckets score the median (p50); reserve = sum of p90 "
        "(or of max_tokens) / sum of actual tokens; µs = CPU time per predict in the run. "
        "The baselines (policies/baselines.py, the live report's) predict each row before "
        "learning it; max_tokens only where a row has a cap (n). tau/tenant = within-tenant "
        "tau: the per-tenant taus' mean weighted by n.\n",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in results:
        if not r["n"]:
            continue
        cells = [r["model"], str(r["n"]), fmt(r["mae"], ".1f"), fmt(r["tau"], ".3f")]
        if tenants:
            cells += [fmt(r["tau_tenant"], ".3f"), fmt(r["reconverge"], "d")]
        cells += [
            fmt(r["bucket"], ".3f"),
            fmt(r["within1"], ".3f"),
            fmt(r["p90_cover"], ".3f"),
            fmt(r["reserve"], ".2f"),
            fmt(r["us_p50"], ".1f"),
            fmt(r["us_p99"], ".1f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if tenants:
        lines += tenant_table(results)
    for r in results:
        if "alarms" not in r:
            continue
        if tenants:
            late = [n - r["shift_at"] for t, n, s in r["alarms"] if t == SHIFTED and s]
            false = [f"{t}@{n}" for t, n, s in r["alarms"] if not s]
            lines.append(
                f"\n{r['model']}: {SHIFTED} shifts {SHIFT:g}x after its completion "
                f"{r['shift_at']}; drift detected {late} completions after the shift; "
                f"other detections (tenant@completion): {false or 'none'}. reconv = "
                f"completions after the shift before the next {WINDOW} are back within "
                f"{BAND:.0%} of the pre-shift relative MAE."
            )
        else:
            lines.append(
                f"\n{r['model']}: drift detections (completion): "
                f"{[n for _, n, _ in r['alarms']] or 'none'}"
            )
    return "\n".join(lines)


def tenant_table(results: list[dict[str, Any]]) -> list[str]:
    """Per tenant: every model's MAE / tau (n where it is not every row of the tenant)."""
    shown = [r for r in results if r["n"]]
    names = sorted({t for r in shown for t in r["tenants"]})
    lines = ["", "Per tenant, MAE / tau-b:", "",
             "| tenant | n | " + " | ".join(r["model"] for r in shown) + " |",
             "|" + "---|" * (len(shown) + 2)]  # fmt: skip
    for t in names:
        n = max(r["tenants"].get(t, {}).get("n", 0) for r in shown)
        cells = []
        for r in shown:
            s = r["tenants"].get(t)
            if not s or not s["n"]:
                cells.append("-")
                continue
            cell = f"{fmt(s['mae'], '.1f')} / {fmt(s['tau'], '.3f')}"
            cells.append(cell if s["n"] == n else f"{cell} ({s['n']})")
        lines.append(f"| {t} | {n} | " + " | ".join(cells) + " |")
    return lines


def request_path_cost(
    rows: list[dict[str, Any]], est: OutputTokenEstimator, n: int = 1000, repeats: int = 5
) -> dict[str, float]:
    """µs per request for features + ``estimate_one``: best of ``repeats`` per prompt."""
    fx = RequestFeatures()
    feat, pred, total = [], [], []
    for r in rows[:n]:
        req = {
            "prompt": r["prompt"],
            "prompt_tokens": r["prompt_tokens"],
            "tenant": "",
            "model": "m",
            "n_messages": 1,
            "max_tokens": None,
        }
        f = p = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            x = fx.transform_one(req)
            t1 = time.perf_counter_ns()
            est.estimate_one(x)
            t2 = time.perf_counter_ns()
            f, p = min(f, t1 - t0), min(p, t2 - t1)
        feat.append(f / 1e3)
        pred.append(p / 1e3)
        total.append((f + p) / 1e3)
    pct = {"p50": 50, "p99": 99}
    return {
        f"{name}_{k}": float(np.percentile(v, q))
        for name, v in (("features", feat), ("estimate", pred), ("total", total))
        for k, q in pct.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="driftsched estimator-eval",
        description="Prequential evaluation (predict, then learn, in order) of the "
        "output-token estimator against baselines: MAE, Kendall's tau-b, 5-bucket "
        f"accuracy (thresholds {'/'.join(map(str, BUCKETS))}), p90 coverage, µs/predict.",
    )
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ShareGPT first-turn JSONL")
    ap.add_argument("--mode", choices=["sharegpt", "tenants", "both"], default="both")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    ap.add_argument(
        "--shuffle",
        type=int,
        default=None,
        metavar="SEED",
        help="evaluate on a seeded permutation instead of file order",
    )
    ap.add_argument(
        "--load", type=Path, default=None, help="start the estimator from this dump instead of cold"
    )
    ap.add_argument(
        "--save",
        type=Path,
        default=None,
        help="dump the ShareGPT-trained estimator here (warm start)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = ap.parse_args(argv)
    rows = load_rows(args.data, args.limit, args.shuffle)
    out: dict[str, Any] = {}
    for mode in ["sharegpt", "tenants"] if args.mode == "both" else [args.mode]:
        stream, feat_us = make_stream(rows, mode)
        results, trained = evaluate(stream, mode, not args.no_progress, args.load)
        out[mode] = results
        print(table(results, mode, feat_us, len(stream)), flush=True)
        est = trained["driftsched estimator"]
        assert isinstance(est, OutputTokenEstimator)
        if mode == "sharegpt":
            cost = request_path_cost(rows, est)
            out["request_path_us"] = cost
            print(
                "\nrequest path, trained estimator, best of 5 per prompt over "
                f"{min(len(rows), 1000)} prompts (µs): features p50 {cost['features_p50']:.1f} "
                f"p99 {cost['features_p99']:.1f}; estimate_one p50 {cost['estimate_p50']:.1f} "
                f"p99 {cost['estimate_p99']:.1f}; total p50 {cost['total_p50']:.1f} "
                f"p99 {cost['total_p99']:.1f}",
                flush=True,
            )
            if args.save:
                est.dump(args.save)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
