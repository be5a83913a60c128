#!/usr/bin/env bash
# Run every scheduling policy on one workload against the same simulated pool and write
# results/<scenario>/<timestamp>/ (report.md, summary.json, per-request and timeline CSVs,
# PNG plots); with --seeds 0,1,2 one experiment per seed in seed-<n>/ and their mean and
# worst on top.
#
#   ./run_experiment.sh [scenario] [--workload FILE] [--policies fcfs,priority,fair,driftsched]
#                       [--duration S] [--seed N | --seeds A,B,C] [--out DIR] [...]
#                       (--help for all options)
#
# Uses .venv/bin/python when present (make install creates it), else python3.
# The orchestration is experiments/runner.py; docs/experiments.md explains the report.
set -euo pipefail
cd "$(dirname "$0")"
PY=python3
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
exec "$PY" -m experiments.runner "$@"
