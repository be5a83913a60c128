"""Train the gateway's output-token estimator on a workload file, for warm-started runs.

A gateway in service restores its estimator from ``scheduler.estimator.path`` (saved every
few minutes and at stop), so it rarely meets its tenants cold. ``./run_experiment.sh
--estimator FILE`` gives every policy its own copy of such a file. This module makes one from
another realisation of the traffic, e.g. the same tenants' ``steady`` workload with a
different seed::

    python prompts_dataset.py synthetic experiments/scenarios/steady.yaml --seed 1 -o s1.jsonl
    python -m experiments.warm_estimator s1.jsonl -o results/warm-steady-s1.pkl

Each request is learnt once, in arrival order, with its true output length and the features
the gateway builds (:meth:`proxy.scheduler.Scheduler.features_of`: the last user message,
prompt tokens, tenant, model, message count, ``max_tokens``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from experiments.gwconfig import MODEL
from experiments.workload_file import Request, load_workload
from policies.estimator import OutputTokenEstimator
from policies.features import RequestFeatures, prompt_text


def features(fx: RequestFeatures, r: Request, model: str = MODEL) -> dict[str, Any]:
    """The estimator's features of ``r``, as the gateway computes them."""
    text = prompt_text(r.messages) if r.messages is not None else (r.prompt or "")
    return fx.transform_one(
        {
            "prompt": text,
            "prompt_tokens": r.prompt_tokens,
            "tenant": r.tenant,
            "model": model,
            "n_messages": len(r.messages or []) or 1,
            "max_tokens": r.max_tokens,
        }
    )


def train(workload: Path, model: str = MODEL) -> OutputTokenEstimator:
    w = load_workload(workload)
    fx, est = RequestFeatures(), OutputTokenEstimator()
    for r in w.requests:
        y = min(r.output_tokens, r.max_tokens) if r.max_tokens else r.output_tokens
        est.learn_one(features(fx, r, model), float(y))
    return est


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.warm_estimator",
        description="Train the gateway's estimator on a workload file (true lengths).",
    )
    p.add_argument("workload")
    p.add_argument("-o", "--out", required=True, help="estimator file (pickle)")
    p.add_argument("--model", default=MODEL)
    a = p.parse_args(argv)
    est = train(Path(a.workload), a.model)
    est.dump(a.out)
    print(f"estimator trained on {a.workload} ({', '.join(est.tenants())}) -> {a.out}",
          file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
