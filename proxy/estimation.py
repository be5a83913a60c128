"""The estimator's life cycle: build or restore at start-up, save periodically and at stop.

``cfg.kind`` picks the estimator (:data:`KINDS`): ``river``, or one of the ablations of
:mod:`policies.estimator_variants`. With ``oracle`` the gateway reads each request's true
output length from the client's :data:`ORACLE_HEADER` (:func:`with_oracle_length`); with
any other kind the header is never read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

from adapters.errors import InvalidRequest
from policies.estimator import OutputTokenEstimator, write_atomic
from policies.estimator_variants import OracleEstimator, TenantMeanEstimator
from proxy.config import EstimatorConfig
from proxy.requests import MAX_TOKENS, ParsedRequest

log = logging.getLogger("driftsched.estimator")

KINDS: dict[str, type[OutputTokenEstimator]] = {
    "river": OutputTokenEstimator,
    OracleEstimator.TYPE: OracleEstimator,
    TenantMeanEstimator.TYPE: TenantMeanEstimator,
}
#: the request header an ``oracle`` gateway reads: the request's true output tokens
ORACLE_HEADER = b"x-oracle-output-tokens"


def load_estimator(cfg: EstimatorConfig) -> OutputTokenEstimator:
    """Restore from ``cfg.path`` when it exists (a restart does not start cold) and holds
    the configured kind; else a new one of ``cfg.kind``."""
    cls = KINDS[cfg.kind]
    if cfg.path and Path(cfg.path).exists():
        try:
            est = cls.load(cfg.path)
            log.info("estimator restored", extra={"path": cfg.path, "tenants": len(est.tenants())})
            return est
        except Exception:
            log.exception("could not restore the estimator from %s; starting cold", cfg.path)
    return cls(prior_tokens=cfg.prior_tokens, quantile=cfg.quantile)


def with_oracle_length(req: ParsedRequest, value: bytes | None) -> ParsedRequest:
    """``req`` carrying the claimed output length of :data:`ORACLE_HEADER` (``value``;
    None: the header is absent, ``req`` unchanged). Only for ``kind: oracle``. A value that
    is not an integer in ``[0, MAX_TOKENS]`` is a 400."""
    if value is None:
        return req
    text = value.decode("latin-1").strip()
    if not text.isdigit() or int(text) > MAX_TOKENS:
        raise InvalidRequest(
            f"{ORACLE_HEADER.decode()}: expected an integer from 0 to {MAX_TOKENS}, "
            f"got {text[:20]!r}"
        )
    return dataclasses.replace(req, oracle_output_tokens=int(text))


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
