"""Experiments: replayable workloads and the open-loop load generator.

- :mod:`experiments.workload_file` -- the JSONL workload format, its validation and loader;
- :mod:`experiments.traces` -- readers of the real traces in ``../shared/data``;
- :mod:`experiments.generators` -- seeded arrival processes, length profiles, prompt text;
- :mod:`experiments.assemble` -- drafts to requests, and the Azure/Mooncake/ShareGPT builders;
- :mod:`experiments.scenario` -- synthetic multi-tenant mixes from a YAML spec
  (``experiments/scenarios/*.yaml``);
- :mod:`experiments.describe` -- per-tenant statistics and a simulated pool's capacity;
- :mod:`experiments.loadgen` (with :mod:`~experiments.clients` and
  :mod:`~experiments.record`) -- open-loop streaming replay, one CSV row per request;
- :mod:`experiments.runner` -- ``run_experiment.sh``: every policy on one workload (each
  run: :mod:`~experiments.policy_run`), with :mod:`~experiments.gwconfig` (the gateway
  configuration), :mod:`~experiments.stack` (the
  gateway process, its timeline sampler) and :mod:`~experiments.provenance` (versions);
- :mod:`experiments.report` -- ``report.md`` and plots from a result directory, with
  :mod:`~experiments.rundata` (reading it back), :mod:`~experiments.metrics`,
  :mod:`~experiments.fairness`, :mod:`~experiments.plots`, :mod:`~experiments.targets`
  (PASS/MISS) and :mod:`~experiments.summary` (``summary.json``);
- :mod:`experiments.seeds` -- several seeds of one scenario: their mean and worst;
- :mod:`experiments.warm_estimator` -- an estimator trained on a workload, for warm starts.

``prompts_dataset.py`` at the repository root is the command line for the workload side.
"""
