"""The gateway process(es) with their simulated pool: start, observe, stop -- leaving no process.

:class:`GatewayProcess` runs ``python -m proxy.cli serve -c FILE`` in its own session (a
Ctrl-C at the terminal reaches the runner, which then stops it); the gateway's pool manager
launches the engines. :meth:`~GatewayProcess.wait_ready` waits for ``/readyz`` and for every
engine to be healthy. :meth:`~GatewayProcess.stop` sends SIGTERM (the gateway stops its
engines), SIGKILL after a grace period, then checks every process that descended from the
gateway (engines, the pool's watchdog) and kills, by pid, any that is still alive: the
number it had to kill is reported (0 on a clean stop).

:class:`Sampler` reads ``/admin/scheduler`` and ``/metrics`` once per call and turns them into
one flat timeline row (:func:`timeline_columns`): queue depth, in flight, finished requests,
engine preemptions/running/waiting/KV use, and per tenant its queue depth and the drift
controller's limit, ratio, state and decrease count (empty when the policy has none).

Several replicas (``run_experiment.sh --replicas N``, :class:`Replicas`): a fresh
``redis-server`` (:class:`RedisProcess`, no persistence) as their store, and the engines
launched by the experiment (:class:`EngineFleet`, with the argv and environment the pool would
give them: :func:`adapters.engines.engine_spec`) and registered with every replica as
``engine: external``, as in a Kubernetes deployment; N gateway processes on one Redis. The
load generator spreads requests over them round-robin; the :class:`Sampler` sums the
replicas' counters and reads the shared queue from the first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from adapters.config import PoolConfig
from adapters.engines import engine_spec
from adapters.procutil import pid_alive, stop_process
from adapters.scrape import parse_samples

DRIFT_FIELDS = ("limit", "ratio", "state", "decreases", "boost")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(root: int) -> set[int]:
    """Every live process whose parent chain reaches ``root`` (Linux ``/proc``)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out: set[int] = set()
    frontier = {root}
    while frontier:
        kids = {p for p, pp in parents.items() if pp in frontier and p not in out}
        out |= kids
        frontier = kids
    return out


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (None if gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runqueue_wait_seconds(pid: int) -> float | None:
    """Seconds ``pid`` was runnable while another process held its CPU (None if unknown)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


class GatewayProcess:
    """The gateway (and, through its pool, the engines) for one run."""

    def __init__(self, config: Path, port: int, admin_key: str, log: Path) -> None:
        """``port``: the one ``config`` sets (``server.port``)."""
        self.url = f"http://127.0.0.1:{port}"
        self.admin_key = admin_key
        self.log = log
        self._fh: IO[bytes] = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "-c", str(config)],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.children: set[int] = set()
        self.killed_orphans = 0

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.admin_key}"}

    def wait_ready(self, instances: int, timeout_s: float = 180.0) -> None:
        """Until ``/readyz`` answers 200 and ``instances`` engines are healthy."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, timeout=2.0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"gateway exited with {self.proc.returncode} during start-up; "
                        f"last lines of {self.log}:\n{tail(self.log)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if c.get("/readyz").status_code == 200:
                        r = c.get("/admin/backends", headers=self.admin_headers)
                        healthy = [b for b in r.json() if b.get("state") == "healthy"]
                        if len(healthy) >= instances:
                            self.children = descendants(self.proc.pid)
                            return
                time.sleep(0.2)
        raise TimeoutError(f"gateway not ready within {timeout_s:g}s; see {self.log}")

    def engine_urls(self) -> list[str]:
        with httpx.Client(base_url=self.url, timeout=5.0) as c:
            r = c.get("/admin/backends", headers=self.admin_headers)
            r.raise_for_status()
            return [str(b["url"]) for b in r.json() if b.get("url")]

    def resources(self) -> dict[str, Any]:
        """CPU seconds and run-queue wait of the gateway and of each child process."""
        pids = {"gateway": self.proc.pid, **{f"child-{p}": p for p in sorted(self.children)}}
        return {
            name: {"cpu_s": cpu_seconds(pid), "runqueue_wait_s": runqueue_wait_seconds(pid)}
            for name, pid in pids.items()
        }

    def stop(self, grace_s: float = 25.0) -> None:
        """SIGTERM, SIGKILL after ``grace_s``; then kill any descendant left (by pid)."""
        self.children |= descendants(self.proc.pid) if self.proc.poll() is None else set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(pid_alive(p) for p in self.children):
            time.sleep(0.2)
        for pid in sorted(self.children):
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.killed_orphans += 1
        self._fh.close()


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def timeline_columns(tenants: Sequence[str]) -> list[str]:
    cols = [
        "t_s",
        "unix_s",
        "loadavg_1m",
        "queue_depth",
        "in_flight",
        "finished",
        "preemptions",
        "engine_running",
        "engine_waiting",
        "kv_usage",
        "held_tokens",
    ]
    for t in tenants:
        cols += [f"depth.{t}", *(f"{f}.{t}" for f in DRIFT_FIELDS)]
    return cols


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class Sampler:
    """One timeline row per :meth:`sample` call (see the module doc)."""

    def __init__(self, gws: Sequence[GatewayProcess], tenants: Sequence[str]) -> None:
        """``gws``: the replicas (one, or several on one store): their ``/metrics`` are
        summed, the (shared) queue and drift state are read from the first."""
        self.gws = list(gws)
        self.tenants = list(tenants)
        self.clients = [httpx.Client(base_url=gw.url, timeout=2.0, headers=gw.admin_headers)
                        for gw in self.gws]  # fmt: skip
        self.rows: list[dict[str, Any]] = []
        self.last_scheduler: dict[str, Any] = {}
        self.last_metrics: dict[str, float] = {}

    def close(self) -> None:
        for c in self.clients:
            c.close()

    def sample(self) -> dict[str, Any] | None:
        """Take one sample (None if a gateway did not answer)."""
        now = time.time()
        try:
            sched = self.clients[0].get("/admin/scheduler").json()
            texts = [c.get("/metrics").text for c in self.clients]
        except (httpx.HTTPError, ValueError):
            return None
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        engine_gauges = ("driftsched_backend_",)
        for i, text in enumerate(texts):
            for s in parse_samples(text):
                if i and s.name.startswith(engine_gauges):
                    continue  # the engines are shared: every replica reports the same ones
                self._add(s, sums, counts)
        self.last_scheduler, self.last_metrics = sched, sums
        return self._row(now, sched, sums, counts)

    @staticmethod
    def _add(s: Any, sums: dict[str, float], counts: dict[str, int]) -> None:
        sums[s.name] = sums.get(s.name, 0.0) + s.value
        counts[s.name] = counts.get(s.name, 0) + 1
        if s.name == "driftsched_rejections_total":
            key = f"rejections.{s.labels.get('reason', '?')}"
            sums[key] = sums.get(key, 0.0) + s.value

    def _row(self, now: float, sched: Mapping[str, Any], sums: Mapping[str, float],
             counts: Mapping[str, int]) -> dict[str, Any]:  # fmt: skip
        depth: Mapping[str, int] = sched.get("queue_depth") or {}
        drift: Mapping[str, Mapping[str, Any]] = sched.get("drift") or {}
        n_kv = counts.get("driftsched_backend_kv_cache_usage_perc", 0)
        row: dict[str, Any] = {
            "t_s": None,
            "unix_s": round(now, 3),
            "loadavg_1m": _loadavg(),
            "queue_depth": sum(depth.values()),
            "in_flight": sums.get("driftsched_in_flight_requests", 0.0),
            "finished": sums.get("driftsched_requests_total", 0.0),
            "preemptions": sums.get("driftsched_backend_num_preemptions", 0.0),
            "engine_running": sums.get("driftsched_backend_num_requests_running", 0.0),
            "engine_waiting": sums.get("driftsched_backend_num_requests_waiting", 0.0),
            "kv_usage": (
                round(sums["driftsched_backend_kv_cache_usage_perc"] / n_kv, 4) if n_kv else None
            ),
            "held_tokens": sums.get("driftsched_admission_held_tokens", 0.0),
        }
        for t in self.tenants:
            row[f"depth.{t}"] = depth.get(t, 0)
            st = drift.get(t)
            for f in DRIFT_FIELDS:
                v = st.get(f) if st else None
                row[f"{f}.{t}"] = round(v, 4) if isinstance(v, float) else v
        self.rows.append(row)
        return row


class RedisProcess:
    """A throwaway ``redis-server`` on a free loopback port (no persistence, ``workdir`` for
    its log): the replicas' store for one run, and the test session's (tests/conftest.py)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--logfile", str(workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.2
            ) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start; see {workdir / 'redis.log'}")

    def cpu_s(self) -> float | None:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)


class EngineFleet:
    """The pool's engines launched by the experiment for several replicas to share: each
    with the argv and environment the pool gives instance ``i``
    (:func:`adapters.engines.engine_spec`), its log in ``log_dir``."""

    def __init__(self, pool_cfg: Mapping[str, Any], log_dir: Path) -> None:
        cfg = PoolConfig.model_validate(dict(pool_cfg))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.specs = [engine_spec(cfg, i, free_port()) for i in range(cfg.instances)]
        self.models = [cfg.served_model_name or cfg.model]
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        for spec in self.specs:
            fh = (log_dir / f"{spec.name}.log").open("wb")
            self._logs.append(fh)
            self.procs.append(subprocess.Popen(
                list(spec.argv), env=dict(spec.env), stdout=fh, stderr=subprocess.STDOUT,
                start_new_session=True,
            ))  # fmt: skip

    def wait_healthy(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=1.0) as c:
            for spec, proc in zip(self.specs, self.procs, strict=True):
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"engine {spec.name} exited with {proc.returncode}")
                    with contextlib.suppress(httpx.HTTPError):
                        if c.get(spec.url + "/health").status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"engine {spec.name} not healthy in {timeout_s:g}s")
                    time.sleep(0.2)

    def external(self) -> list[dict[str, Any]]:
        """The engines as ``pool.external`` entries (what every replica is configured with)."""
        out = []
        for spec in self.specs:
            e: dict[str, Any] = {"name": spec.name, "url": spec.url, "models": self.models,
                                 "supports_priority": spec.supports_priority}  # fmt: skip
            if spec.kv_capacity_tokens is not None:
                e["kv_capacity_tokens"] = spec.kv_capacity_tokens
            if spec.max_num_seqs is not None:
                e["max_num_seqs"] = spec.max_num_seqs
            out.append(e)
        return out

    def cpu_s(self) -> float:
        return sum(cpu_seconds(p.pid) or 0.0 for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()  # all at once; each is then waited for (and killed if need be)
        for p in self.procs:
            stop_process(p, grace_s=15.0)
        for fh in self._logs:
            fh.close()


def scrape_engines(urls: Sequence[str]) -> list[dict[str, float]]:
    """Each engine's counters that a report needs (preemptions, simulator lag, steps)."""
    want = (
        "vllm:num_preemptions_total",
        "sim:lag_seconds_total",
        "sim:busy_seconds_total",
        "sim:steps_total",
        "vllm:generation_tokens_total",
        "vllm:prompt_tokens_total",
    )
    out = []
    with httpx.Client(timeout=5.0) as c:
        for url in urls:
            row: dict[str, float] = {}
            with contextlib.suppress(httpx.HTTPError):
                for s in parse_samples(c.get(url.rstrip("/") + "/metrics").text):
                    if s.name in want:
                        row[s.name] = row.get(s.name, 0.0) + s.value
            out.append(row)
    return out
