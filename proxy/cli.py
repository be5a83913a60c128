"""The ``driftsched`` command line.

    driftsched serve        run the gateway (YAML config + env overrides)
    driftsched demo         gateway + simulator (or --engine vllm-cpu) engines + demo tenants
    driftsched sim-engine   run one simulator engine (what ``engine: sim`` launches)
    driftsched check-config validate a configuration file and print the result
    driftsched estimator-eval  output-token estimator accuracy (MAE, Kendall's tau) vs baselines
    driftsched tenants ...  manage tenants through the admin API
    driftsched keys ...     manage API keys through the admin API
    driftsched usage        per-tenant usage
    driftsched backends ... list, drain, undrain, add, remove engines

Admin commands talk to a running gateway: ``--url`` (``$DRIFTSCHED_URL``, default
http://127.0.0.1:8000) with ``--admin-key`` (``$DRIFTSCHED_ADMIN_KEY``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from adapters.errors import ConfigError
from proxy.demo import ENGINES as DEMO_ENGINES


def _add_admin_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("DRIFTSCHED_URL", "http://127.0.0.1:8000"),
                   help="gateway base URL (env DRIFTSCHED_URL)")
    p.add_argument("--admin-key", default=os.environ.get("DRIFTSCHED_ADMIN_KEY"),
                   help="admin key (env DRIFTSCHED_ADMIN_KEY)")


def _tenant_fields(p: argparse.ArgumentParser, create: bool) -> None:
    p.add_argument("--class", dest="qos_class", default="standard" if create else None,
                   help="QoS class (premium, standard, batch, or one from config)")
    p.add_argument("--weight", type=float)
    p.add_argument("--rpm", type=int, help="requests per minute")
    p.add_argument("--tpm", type=int, help="tokens per minute")
    p.add_argument("--max-concurrency", type=int)
    p.add_argument("--daily-token-quota", type=int)
    p.add_argument("--ttft-slo-ms", type=float)
    p.add_argument("--tpot-slo-ms", type=float)
    p.add_argument("--queue-timeout-s", type=float)
    p.add_argument("--allowed-model", dest="allowed_models", action="append",
                   help="repeat for each model the tenant may use (default: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="driftsched",
        description="DriftSched: multi-tenant, drift-aware scheduling gateway for LLM inference.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", "-c", help="YAML file (env DRIFTSCHED_CONFIG)")
    p.add_argument("--host", help="override server.host")
    p.add_argument("--port", type=int, help="override server.port")

    p = sub.add_parser("demo", help="gateway + simulator engines + demo tenants (no Redis, no GPU)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--engine", choices=DEMO_ENGINES, default="sim",
                   help="sim: simulator engines; vllm-cpu: real vLLM on the CPU with the tiny "
                        "local model of the vllm_cpu test tier (docs/vllm-cpu.md)")
    p.add_argument("--engines", type=int, help="engines to launch (default: 2 sim, 1 vllm-cpu)")
    p.add_argument("--time-scale", type=float, help="simulator engines' time scale (default 1)")
    p.add_argument("--install", action="store_true",
                   help="with --engine vllm-cpu: set up .vllm-venv first if it is missing "
                        "(scripts/setup_vllm_cpu.sh: 2-5 min, ~500 MB download, 2.5 GB)")
    p.add_argument("--exit-after-check", action="store_true",
                   help="run the self-check through the OpenAI SDK, then stop")

    p = sub.add_parser("sim-engine", help="run one vLLM-behaviour simulator engine",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("estimator-eval", add_help=False,
                       help="prequential accuracy of the output-token estimator vs baselines")
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("check-config",
                       help="validate a configuration and print it (secrets redacted)")
    p.add_argument("--config", "-c", help="YAML file (env DRIFTSCHED_CONFIG)")

    t = sub.add_parser("tenants", help="manage tenants").add_subparsers(dest="action", required=True)
    for name in ("list",):
        _add_admin_args(t.add_parser(name, help="list tenants"))
    p = t.add_parser("create", help="create a tenant")
    p.add_argument("name")
    _tenant_fields(p, create=True)
    _add_admin_args(p)
    p = t.add_parser("update", help="change a tenant's class, limits or SLOs")
    p.add_argument("name")
    _tenant_fields(p, create=False)
    _add_admin_args(p)
    for name, help_ in (("get", "show a tenant"), ("delete", "delete a tenant and revoke its keys")):
        p = t.add_parser(name, help=help_)
        p.add_argument("name")
        _add_admin_args(p)

    k = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    p = k.add_parser("create", help="create a key for a tenant (printed once)")
    p.add_argument("tenant")
    p.add_argument("--name", default="", help="a label for the key")
    _add_admin_args(p)
    p = k.add_parser("list", help="list keys (prefixes only)")
    p.add_argument("--tenant")
    p.add_argument("--prefix")
    _add_admin_args(p)
    p = k.add_parser("revoke", help="revoke a key")
    p.add_argument("key_id")
    _add_admin_args(p)
    p = k.add_parser("rotate", help="replace a key; the old one works for --grace-s more seconds")
    p.add_argument("key_id")
    p.add_argument("--grace-s", type=float, default=0.0)
    _add_admin_args(p)

    p = sub.add_parser("usage", help="per-tenant usage")
    p.add_argument("tenant", nargs="?")
    _add_admin_args(p)

    b = sub.add_parser("backends", help="engines behind the gateway").add_subparsers(
        dest="action", required=True)
    _add_admin_args(b.add_parser("list", help="engines and their live load"))
    for name, help_ in (("drain", "finish in-flight, admit nothing new"),
                        ("undrain", "take traffic again"), ("remove", "unregister an engine")):
        p = b.add_parser(name, help=help_)
        p.add_argument("name")
        _add_admin_args(p)
    p = b.add_parser("add", help="register an external OpenAI-compatible endpoint")
    p.add_argument("name")
    p.add_argument("endpoint_url", metavar="URL", help="the endpoint's base URL")
    p.add_argument("--model", dest="models", action="append", required=True)
    p.add_argument("--kv-capacity-tokens", type=int)
    p.add_argument("--max-num-seqs", type=int)
    _add_admin_args(p)
    return parser


# -- admin client ----------------------------------------------------------------------
def _admin(args: argparse.Namespace, method: str, path: str, body: Any = None,
           params: dict[str, Any] | None = None) -> Any:
    import httpx

    if not args.admin_key:
        raise SystemExit("error: admin key missing: pass --admin-key or set DRIFTSCHED_ADMIN_KEY")
    try:
        r = httpx.request(method, args.url.rstrip("/") + path, json=body,
                          params={k: v for k, v in (params or {}).items() if v is not None},
                          headers={"authorization": f"Bearer {args.admin_key}"}, timeout=30)
    except httpx.HTTPError as e:
        raise SystemExit(f"error: cannot reach the gateway at {args.url}: {e}") from None
    if r.status_code >= 400:
        try:
            msg = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = r.text
        raise SystemExit(f"error: HTTP {r.status_code}: {msg}")
    return r.json() if r.content else None


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def _tenant_body(args: argparse.Namespace) -> dict[str, Any]:
    fields = ("qos_class", "weight", "rpm", "tpm", "max_concurrency", "daily_token_quota",
              "ttft_slo_ms", "tpot_slo_ms", "queue_timeout_s", "allowed_models")
    return {f: getattr(args, f) for f in fields if getattr(args, f) is not None}


def _run_admin(args: argparse.Namespace) -> int:
    cmd, act = args.command, getattr(args, "action", None)
    if cmd == "tenants":
        if act == "list":
            _print(_admin(args, "GET", "/admin/tenants"))
        elif act == "create":
            _print(_admin(args, "POST", "/admin/tenants", {"name": args.name, **_tenant_body(args)}))
        elif act == "update":
            _print(_admin(args, "PATCH", f"/admin/tenants/{args.name}", _tenant_body(args)))
        elif act == "get":
            _print(_admin(args, "GET", f"/admin/tenants/{args.name}"))
        elif act == "delete":
            _admin(args, "DELETE", f"/admin/tenants/{args.name}")
            print(f"deleted tenant {args.name}")
    elif cmd == "keys":
        if act == "create":
            out = _admin(args, "POST", f"/admin/tenants/{args.tenant}/keys", {"name": args.name})
            _print(out)
            print("\nStore this key now: it is not shown again.", file=sys.stderr)
        elif act == "list":
            _print(_admin(args, "GET", "/admin/keys", params={"tenant": args.tenant,
                                                             "prefix": args.prefix}))
        elif act == "revoke":
            _print(_admin(args, "DELETE", f"/admin/keys/{args.key_id}"))
        elif act == "rotate":
            _print(_admin(args, "POST", f"/admin/keys/{args.key_id}/rotate",
                          {"grace_s": args.grace_s}))
            print("\nStore this key now: it is not shown again.", file=sys.stderr)
    elif cmd == "usage":
        path = f"/admin/tenants/{args.tenant}/usage" if args.tenant else "/admin/usage"
        _print(_admin(args, "GET", path))
    elif cmd == "backends":
        if act == "list":
            _print(_admin(args, "GET", "/admin/backends"))
        elif act in ("drain", "undrain"):
            _print(_admin(args, "POST", f"/admin/backends/{args.name}/{act}"))
        elif act == "remove":
            _admin(args, "DELETE", f"/admin/backends/{args.name}")
            print(f"removed backend {args.name}")
        elif act == "add":
            body = {"name": args.name, "url": args.endpoint_url, "models": args.models}
            if args.kv_capacity_tokens:
                body["kv_capacity_tokens"] = args.kv_capacity_tokens
            if args.max_num_seqs:
                body["max_num_seqs"] = args.max_num_seqs
            _print(_admin(args, "POST", "/admin/backends", body))
    return 0


def check_policy(settings: Any) -> None:
    """Build the scheduling policy once, so a bad ``scheduler.policy`` stops start-up with a
    message naming the key instead of a traceback from the lifespan."""
    from proxy.app import build_scheduling_policy

    try:
        build_scheduling_policy(settings)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _serve(args: argparse.Namespace) -> int:
    from proxy.app import create_app
    from proxy.config import load_settings, secret_values
    from proxy.logs import configure_logging
    from proxy.server import build_server

    overrides: dict[str, Any] = {}
    if args.host:
        overrides.setdefault("server", {})["host"] = args.host
    if args.port is not None:
        overrides.setdefault("server", {})["port"] = args.port
    settings = load_settings(args.config, overrides=overrides)
    check_policy(settings)
    configure_logging(settings.server.log_level, secret_values(settings))
    app = create_app(settings)
    build_server(app).run()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "sim-engine":
        from adapters.sim.__main__ import main as sim_main

        return sim_main(argv[1:])
    if argv and argv[0] == "estimator-eval":
        from policies.estimator_eval import main as eval_main

        return eval_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "demo":
            from proxy.demo import run_demo

            if args.engine != "sim" and args.time_scale is not None:
                parser.error("--time-scale applies to --engine sim only")
            if args.engine != "vllm-cpu" and args.install:
                parser.error("--install applies to --engine vllm-cpu only")
            return run_demo(port=args.port, engines=args.engines,
                            time_scale=args.time_scale if args.time_scale is not None else 1.0,
                            exit_after_check=args.exit_after_check, engine=args.engine,
                            install=args.install)
        if args.command == "check-config":
            from proxy.config import load_settings, redacted

            s = load_settings(args.config)
            check_policy(s)
            # secrets (admin key, tenant keys, upstream credentials) print as <redacted>
            print(json.dumps(redacted(s), indent=2))
            print("configuration OK", file=sys.stderr)
            return 0
        return _run_admin(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
