"""``python -m adapters.sim``: run one simulated vLLM engine (see docs/simulator.md).

Exits 0 after SIGTERM/SIGINT (uvicorn's graceful shutdown: stop accepting, let in-flight
requests finish for up to ``GRACEFUL_S`` seconds, stop the step loop), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import signal
from types import FrameType

import uvicorn

from adapters.sim.profiles import DEFAULT_PROFILE, PROFILES
from adapters.sim.settings import DEFAULT_MAX_MODEL_LEN, SimSettings

GRACEFUL_S = 5


class _Server(uvicorn.Server):
    """uvicorn re-raises a captured SIGTERM after its graceful shutdown (exit -15); exit 0."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m adapters.sim",
        description="A vLLM-behaviour simulator: vLLM's OpenAI API and /metrics over a "
        "continuous-batching model of one GPU. No GPU needed.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", required=True, help="model name (reported as root)")
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="name(s) the API answers to (default: --model)",
    )
    p.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        help=f"step-time profile (model/GPU pair): {', '.join(sorted(PROFILES))} or one from "
        "--profile-file; default %(default)s",
    )
    p.add_argument(
        "--profile-file",
        default=None,
        metavar="FILE.json",
        help="JSON with more profiles (one object with the Profile fields, or a list)",
    )
    p.add_argument(
        "--workload",
        default=None,
        metavar="FILE.jsonl",
        help="JSONL with messages|prompt and output_tokens: true output lengths",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="simulated time runs this many times faster than wall time",
    )
    p.add_argument(
        "--kv-capacity-tokens",
        type=int,
        default=None,
        help="KV cache size in tokens (default: the profile's, from GPU memory)",
    )
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: the profile's")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="token budget per step (default: the profile's)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help=f"default: min({DEFAULT_MAX_MODEL_LEN}, KV capacity)",
    )
    p.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs")
    p.add_argument(
        "--tokens-per-event",
        type=int,
        default=1,
        help="stream this many tokens per SSE event (first and last: at once)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of drawn output lengths")
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="count prompt tokens with this tokenizer.json (or a directory with one, or "
        "tiktoken:cl100k_base), as the gateway does; default: the heuristic",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = SimSettings(
            model=args.model,
            served_model_names=tuple(args.served_model_name or ()),
            profile=args.profile,
            profile_file=args.profile_file,
            workload=args.workload,
            time_scale=args.time_scale,
            kv_capacity_tokens=args.kv_capacity_tokens,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            scheduling_policy=args.scheduling_policy,
            tokens_per_event=args.tokens_per_event,
            seed=args.seed,
            tokenizer=args.tokenizer,
        )
    except ValueError as e:
        parser.error(str(e))
    level = "DEBUG" if args.log_level == "trace" else args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from adapters.sim.server import create_app  # heavy imports after argument errors

    app = create_app(settings)
    p = settings.profile_obj
    logging.getLogger("adapters.sim").info(
        "sim engine %s on %s:%d: profile %s, KV %d tokens, max_model_len %d, max_num_seqs %d, "
        "max_num_batched_tokens %d, policy %s, time_scale %g",
        settings.names[0],
        args.host,
        args.port,
        p.name,
        settings.kv_tokens,
        settings.model_len,
        settings.max_num_seqs or p.max_num_seqs,
        settings.max_num_batched_tokens or p.max_num_batched_tokens,
        settings.scheduling_policy,
        settings.time_scale,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_S,
        timeout_keep_alive=30,
    )
    server = _Server(config)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
