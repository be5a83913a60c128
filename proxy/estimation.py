"""The estimator's life cycle: build or restore at start-up, save periodically and at stop."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from policies.estimator import OutputTokenEstimator, write_atomic
from proxy.config import EstimatorConfig

log = logging.getLogger("driftsched.estimator")


def load_estimator(cfg: EstimatorConfig) -> OutputTokenEstimator:
    """Restore from ``cfg.path`` when it exists (a restart does not start cold)."""
    if cfg.path and Path(cfg.path).exists():
        try:
            est = OutputTokenEstimator.load(cfg.path)
            log.info("estimator restored", extra={"path": cfg.path, "tenants": len(est.tenants())})
            return est
        except Exception:
            log.exception("could not restore the estimator from %s; starting cold", cfg.path)
    return OutputTokenEstimator(prior_tokens=cfg.prior_tokens, quantile=cfg.quantile)


def save_estimator(est: OutputTokenEstimator, cfg: EstimatorConfig) -> None:
    if not cfg.path:
        return
    try:
        Path(cfg.path).parent.mkdir(parents=True, exist_ok=True)
        est.dump(cfg.path)
    except Exception:
        log.exception("could not save the estimator to %s", cfg.path)


async def save_estimator_periodically(est: OutputTokenEstimator, cfg: EstimatorConfig) -> None:
    """Snapshot on the event loop (learning also runs there, so the model is consistent),
    write the file in a thread."""
    if not cfg.path:
        return
    path = Path(cfg.path)
    while True:
        await asyncio.sleep(cfg.save_interval_s)
        try:
            blob = est.dumps()
            await asyncio.to_thread(write_atomic, path, blob)
        except Exception:
            log.exception("could not save the estimator to %s", path)
