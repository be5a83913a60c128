"""Replayable multi-tenant workloads for DriftSched experiments: build, check, describe.

Run ``python prompts_dataset.py --help``. Sources: the real traces in ``../shared/data``
(Azure 2023 ``conv``/``code`` and Mooncake for arrival times and token counts; ShareGPT for
real prompts with their real response lengths) and a synthetic multi-tenant generator driven
by a YAML/JSON spec (``experiments/scenarios/*.yaml``, format in
:mod:`experiments.scenario`). Every builder is deterministic under ``--seed``: the same
arguments and data give a byte-identical file.

The file format (a ``{"_workload": ...}`` header line, then one request per line with
``arrival_s``, ``tenant``, ``qos_class``, ``messages``/``prompt``, ``max_tokens``,
``output_tokens`` -- the true length the simulator generates -- and ``prompt_tokens``) is
documented and validated in :mod:`experiments.workload_file`; ``python -m adapters.sim
--workload FILE`` reads the same file. This module is the command line and re-exports the
API (the parts live in ``experiments/``):

- :func:`load_workload` / :func:`check_file` -- read or validate a file;
- :func:`build_from_trace`, :func:`build_sharegpt`, :func:`build_synthetic` -- builders;
- :func:`describe`, :func:`estimate_capacity` -- statistics, and a simulated pool's
  saturation throughput for a file's length mix.

Prompts known only by their token count (Azure, Mooncake) get text cut from ShareGPT (or
seeded words, ``--filler words``) with exactly that many tokens by the simulator's count, and
a request tag at the end that makes each prompt unique; Mooncake requests that share a 512-token
prefix block share that block's text.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from experiments.assemble import (
    Options,
    TenantShare,
    build_from_trace,
    build_sharegpt,
    parse_tenants,
    recount,
)
from experiments.describe import describe, estimate_capacity
from experiments.scenario import SpecError, build_synthetic, load_spec, parse_spec
from experiments.traces import TRACES, Data
from experiments.workload_file import (
    DEFAULT_MAX_CONTEXT,
    Problem,
    Request,
    Workload,
    WorkloadError,
    check_file,
    check_lines,
    load_workload,
    write_workload,
)

__all__ = [
    "Data",
    "Options",
    "Problem",
    "Request",
    "SpecError",
    "TenantShare",
    "Workload",
    "WorkloadError",
    "build_from_trace",
    "build_sharegpt",
    "build_synthetic",
    "check_file",
    "check_lines",
    "describe",
    "estimate_capacity",
    "load_spec",
    "load_workload",
    "main",
    "parse_spec",
    "parse_tenants",
    "write_workload",
]


def _max_tokens_arg(v: str) -> int | None:
    if v.lower() in ("none", "null", "0"):
        return None
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError("--max-tokens must be >= 1 or 'none'")
    return n


def _common(p: argparse.ArgumentParser, build: bool = True) -> None:
    p.add_argument(
        "--data",
        default=None,
        help="shared data dir (default: $DRIFTSCHED_SHARED_DATA "
        "or ../shared/data beside the checkout)",
    )
    if not build:
        return
    p.add_argument("-o", "--out", default="-", help="output JSONL (default: stdout)")
    p.add_argument("--seed", type=int, default=0, help="seed (default %(default)s)")
    p.add_argument(
        "--duration",
        type=float,
        default=120.0,
        help="seconds of arrivals to produce (default %(default)s)",
    )
    p.add_argument(
        "--max-context",
        type=int,
        default=DEFAULT_MAX_CONTEXT,
        help="engine max_model_len: prompt + output must fit (default %(default)s)",
    )
    p.add_argument(
        "--max-tokens",
        type=_max_tokens_arg,
        default=None,
        help="max_tokens each request sends (default none: no cap is sent)",
    )
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="for real engines: send ignore_eos and max_tokens = output_tokens",
    )
    p.add_argument("--limit", type=int, default=None, help="keep at most this many requests")
    p.add_argument("--name", default=None, help="workload name in the header")


def _trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rate-scale",
        type=float,
        default=1.0,
        help="compress time by this factor: 2 = twice the trace's rate",
    )
    p.add_argument(
        "--start-s",
        type=float,
        default=0.0,
        help="offset into the trace where the window starts (s)",
    )
    p.add_argument(
        "--tenants",
        default="default:standard",
        help="name[:class[:weight]],...: requests are shared out by weight (default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="prompts_dataset.py",
        description="Build, validate and describe replayable DriftSched workloads (JSONL). "
        "See the module docstring for the file format.",
        epilog="examples:\n"
        "  prompts_dataset.py azure --trace conv --duration 120 --rate-scale 2 \\\n"
        "      --tenants acme:premium:1,globex:standard:2 -o w.jsonl\n"
        "  prompts_dataset.py mooncake --duration 60 -o long.jsonl\n"
        "  prompts_dataset.py sharegpt --rate 5 --duration 60 -o sg.jsonl\n"
        "  prompts_dataset.py synthetic experiments/scenarios/drift.yaml -o drift.jsonl\n"
        "  prompts_dataset.py validate drift.jsonl\n"
        "  prompts_dataset.py stats drift.jsonl --capacity",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("azure", help="Azure 2023 conv/code arrivals and token counts")
    p.add_argument("--trace", choices=["conv", "code"], default="conv")
    _common(p)
    _trace_args(p)
    p.add_argument(
        "--filler",
        choices=["sharegpt", "words"],
        default="sharegpt",
        help="text the synthesized prompts are cut from",
    )
    p.add_argument(
        "--long-prompts",
        choices=["clip", "drop"],
        default="clip",
        help="prompt + output over --max-context: clip the prompt or drop it",
    )
    p = sub.add_parser(
        "mooncake",
        help="Mooncake conversation trace (long context; 3 s "
        "buckets jittered; shared 512-token prefix blocks share text)",
    )
    _common(p)
    _trace_args(p)
    p.add_argument("--filler", choices=["sharegpt", "words"], default="sharegpt")
    p.add_argument("--long-prompts", choices=["clip", "drop"], default="clip")
    p = sub.add_parser("sharegpt", help="real ShareGPT prompts with their real response lengths")
    _common(p)
    _trace_args(p)
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals at this req/s")
    p.add_argument(
        "--arrivals",
        choices=TRACES,
        default=None,
        help="use a trace's arrival times instead (with --rate-scale/--start-s)",
    )
    p.add_argument("--order", choices=["shuffle", "file"], default="shuffle")
    p = sub.add_parser("synthetic", help="multi-tenant mix from a YAML/JSON spec")
    p.add_argument("spec", help="spec file, e.g. experiments/scenarios/overload.yaml")
    _common(p)
    for a in p._actions:  # the spec's values win unless given on the command line
        if a.dest in ("seed", "duration", "max_context", "max_tokens"):
            a.default = None
    p.add_argument(
        "--rate-scale",
        type=float,
        default=1.0,
        help="multiply every tenant's rate (traces: their rate_scale)",
    )
    p = sub.add_parser("validate", help="check a workload file; exit 1 on errors")
    p.add_argument("file")
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="engine max_model_len to check against (default: the header's)",
    )
    p.add_argument("--strict", action="store_true", help="warnings are errors")
    p = sub.add_parser("stats", help="rates, burstiness, lengths per tenant; drift before/after")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--capacity",
        action="store_true",
        help="also estimate a simulated pool's saturation throughput for this mix",
    )
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--profile", default="llama3-8b-a100")
    p.add_argument("--kv-capacity-tokens", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--from-s", type=float, default=None, help="only requests from this time")
    p.add_argument("--to-s", type=float, default=None, help="only requests before this time")
    return ap


def _opts(a: argparse.Namespace) -> Options:
    return Options(
        seed=a.seed or 0,
        max_context=a.max_context or DEFAULT_MAX_CONTEXT,
        max_tokens=a.max_tokens,
        ignore_eos=a.ignore_eos,
        long_prompts=getattr(a, "long_prompts", "clip"),
        filler=getattr(a, "filler", "sharegpt"),
    )


def _emit(a: argparse.Namespace, header: dict[str, Any], reqs: list[Request]) -> None:
    if a.out == "-":
        write_workload(sys.stdout, header, reqs)
    else:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "w", encoding="utf-8") as f:
            write_workload(f, header, reqs)
    who = ", ".join(f"{t['name']}({t['qos_class']})={t['n']}" for t in header["tenants"])
    print(
        f"{header['name']}: {len(reqs)} requests over {header['duration_s']:g} s [{who}]; "
        f"clipped {header['clipped']}, dropped {header['dropped']}"
        + ("" if a.out == "-" else f" -> {a.out}"),
        file=sys.stderr,
    )


def _print_stats(s: dict[str, Any], cap: dict[str, float] | None) -> None:
    cols = (
        "n",
        "rate_req_s",
        "interarrival_cv",
        "max_req_in_1s",
        "prompt_p50_p90_p99",
        "output_mean",
        "output_p50_p90_p99",
        "output_tok_s",
    )
    print(f"workload {s['name']!r}, {s['duration_s']:g} s")
    print("| tenant | class | " + " | ".join(cols) + " |")
    print("|" + "---|" * (len(cols) + 2))
    rows = [(n, t["qos_class"], t) for n, t in s["tenants"].items()] + [("all", "", s["all"])]
    for name, cls, t in rows:
        print(f"| {name} | {cls} | " + " | ".join(str(t[c]) for c in cols) + " |")
    for d in s["drift"]:
        print(
            f"drift at {d['at_s']:g} s, tenant {d['tenant']}: output x{d['output_scale']:g}, "
            f"mean {d['output_mean_before']} -> {d['output_mean_after']}"
        )
    if cap:
        load = s["all"]["rate_req_s"] / cap["req_s"] if cap["req_s"] else float("nan")
        print(
            f"capacity ({cap['engines']} engines, saturated, this mix): {cap['req_s']} req/s, "
            f"{cap['output_tok_s']} output tok/s; offered load = {load:.2f} x capacity"
        )


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.cmd == "validate":
            w = check_file(a.file, a.max_context)
            bad = w.errors if not a.strict else w.problems
            for prob in w.problems[:50]:
                print(prob.render(a.file), file=sys.stderr)
            if len(w.problems) > 50:
                print(f"... and {len(w.problems) - 50} more", file=sys.stderr)
            n_err = len(bad)
            print(
                f"{a.file}: {len(w.requests)} valid requests, {len(w.errors)} error(s), "
                f"{len(w.problems) - len(w.errors)} warning(s)"
                + (" -- INVALID" if n_err else " -- OK")
            )
            return 1 if n_err else 0
        if a.cmd == "stats":
            w = load_workload(a.file)
            if a.from_s is not None or a.to_s is not None:
                lo, hi = a.from_s or 0.0, a.to_s if a.to_s is not None else float("inf")
                w.requests = [r for r in w.requests if lo <= r.arrival_s < hi]
                end = min(hi, float(w.header.get("duration_s") or hi))
                w.header = {**w.header, "duration_s": end - lo}
            s = describe(w)
            cap = (
                estimate_capacity(
                    w.requests,
                    engines=a.engines,
                    profile=a.profile,
                    kv_capacity_tokens=a.kv_capacity_tokens,
                    max_num_seqs=a.max_num_seqs,
                )
                if a.capacity
                else None
            )
            if a.json:
                print(json.dumps({**s, "capacity": cap}, indent=2))
            else:
                _print_stats(s, cap)
            return 0
        data = Data(a.data)
        if a.cmd == "synthetic":
            opts = Options()
            if a.seed is not None:
                opts.seed = a.seed
            spec = parse_spec(load_spec(a.spec), opts)
            if a.seed is not None:
                opts.seed = a.seed
            if a.max_context is not None:
                opts.max_context = a.max_context
            if a.max_tokens is not None:
                opts.max_tokens = a.max_tokens
                spec = replace(
                    spec, tenants=[replace(t, max_tokens=a.max_tokens) for t in spec.tenants]
                )
            opts.ignore_eos = opts.ignore_eos or a.ignore_eos
            if a.duration is not None:
                spec = replace(spec, duration_s=a.duration)
            header, reqs = build_synthetic(spec, opts, data, rate_scale=a.rate_scale)
            if a.limit is not None:
                reqs = reqs[: a.limit]
                header = recount(header, reqs)
            if a.name:
                header["name"] = a.name
        elif a.cmd in ("azure", "mooncake"):
            trace = f"azure-{a.trace}" if a.cmd == "azure" else "mooncake"
            header, reqs = build_from_trace(
                trace,
                duration_s=a.duration,
                rate_scale=a.rate_scale,
                start_s=a.start_s,
                tenants=parse_tenants(a.tenants),
                opts=_opts(a),
                data=data,
                limit=a.limit,
                name=a.name,
            )
        else:
            header, reqs = build_sharegpt(
                duration_s=a.duration,
                rate=a.rate,
                arrivals=a.arrivals,
                rate_scale=a.rate_scale,
                start_s=a.start_s,
                order=a.order,
                tenants=parse_tenants(a.tenants),
                opts=_opts(a),
                data=data,
                limit=a.limit,
                name=a.name,
            )
        _emit(a, header, reqs)
        return 0
    except (WorkloadError, SpecError, ValueError, FileNotFoundError) as e:
        print(f"prompts_dataset: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
