"""Measure the Redis commands DriftSched sends per request, and per replica when idle.

    .venv/bin/python deploy/tools/redis_round_trips.py [--replicas 3] [--requests 300]

Starts a throw-away ``redis-server`` (needs the binary on PATH), a stub engine and N gateway
processes sharing that Redis, then records every command with ``MONITOR``:

1. idle for ``--idle-s`` seconds: the background load of each replica (capacity
   publication, dispatch ticks, lease renewal, the completion bus's blocking read);
2. ``--requests`` non-streaming chat requests from ``--concurrency`` clients, round
   robin over the replicas, for a tenant with RPM, TPM and concurrency limits (every
   limit is checked);

3. the same requests again without MONITOR, for redis-server's CPU time per request
   (its idle CPU over the same time subtracted);

and prints commands per request (background subtracted) by command, with each EVALSHA named
after its Lua script. docs/deployment.md ("Redis load per request") quotes its output.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
KEY = "dsk-redisrt0-" + "r" * 40
ADMIN = "adm-redis-rt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready in {timeout}s")


def drive(urls: list[str], n: int, concurrency: int) -> float:
    """Send ``n`` requests round robin over ``urls`` from ``concurrency`` threads; seconds."""
    body = {
        "model": "stub",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 16,
    }
    rr = itertools.cycle(urls)
    lock = threading.Lock()
    left = [n]

    def worker() -> None:
        with httpx.Client(headers={"authorization": f"Bearer {KEY}"}, timeout=30) as c:
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                    url = next(rr)
                c.post(url + "/v1/chat/completions", json=body).raise_for_status()

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - t0


def redis_cpu_s(port: int) -> float:
    """CPU seconds (user + system) the redis-server has used so far."""
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "info", "cpu"], capture_output=True, text=True, check=True
    ).stdout
    fields = dict(ln.split(":", 1) for ln in out.splitlines() if ":" in ln)
    return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


def script_names() -> dict[str, str]:
    """sha1 -> script name, for every Lua script the store and the queue load."""
    from proxy.admission import redis as queue_redis
    from proxy.store import redis

    out = {}
    for name in redis._SCRIPTS:
        out[hashlib.sha1(redis._load_script(name).encode()).hexdigest()] = name
    for name in queue_redis._SCRIPTS:
        src = queue_redis._load_script(name)
        out[hashlib.sha1(src.encode()).hexdigest()] = f"queue_{name}"
    return out


class Monitor:
    """``redis-cli monitor`` in the background; counts commands between marks."""

    def __init__(self, port: int, names: dict[str, str]) -> None:
        self._names = names
        self._proc = subprocess.Popen(
            ["redis-cli", "-p", str(port), "monitor"], stdout=subprocess.PIPE, text=True
        )
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            parts = line.split('"')
            if len(parts) < 2:
                continue
            cmd = parts[1].lower()
            if "[0 lua]" in parts[0] or " lua]" in parts[0]:
                cmd = "(inside scripts) " + cmd  # run by a Lua script: no round trip
            elif cmd == "evalsha" and len(parts) > 3:
                cmd = "evalsha " + self._names.get(parts[3], parts[3][:8])
            with self._lock:
                self.counts[cmd] += 1

    def take(self) -> collections.Counter[str]:
        time.sleep(0.3)  # let the monitor catch up
        with self._lock:
            out, self.counts = self.counts, collections.Counter()
        return out

    def stop(self) -> None:
        self._proc.terminate()


def main() -> int:
    p = argparse.ArgumentParser(description="Redis commands per request and per idle replica")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--idle-s", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=1, help="client threads")
    args = p.parse_args()
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        raise SystemExit("redis-server and redis-cli must be on PATH")
    tmp = Path(tempfile.mkdtemp(prefix="redis-rt-"))
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], name: str) -> subprocess.Popen[bytes]:
        with (tmp / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        procs.append(proc)
        return proc

    rport, sport = free_port(), free_port()
    monitor: Monitor | None = None
    try:
        start(["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"], "redis")
        stub = start(
            [
                sys.executable,
                "-m",
                "adapters.stub_engine",
                "--port",
                str(sport),
                "--model",
                "stub",
                "--chunks",
                "16",
            ],
            "stub",
        )
        wait(f"http://127.0.0.1:{sport}/health", stub)
        cfg = {
            "server": {"access_log": False, "log_level": "warning"},
            "admin": {"api_key": ADMIN},
            "store": {"type": "redis", "url": f"redis://127.0.0.1:{rport}/0"},
            "upstreams": [
                {
                    "name": "stub-0",
                    "url": f"http://127.0.0.1:{sport}",
                    "models": ["stub"],
                    "max_num_seqs": 64,
                }
            ],
            "scheduler": {"policy": {"type": "driftsched"}},
            "tenants": [
                {
                    "name": "acme",
                    "rpm": 100000,
                    "tpm": 100000000,
                    "max_concurrency": 64,
                    "api_keys": [KEY],
                }
            ],
        }
        (tmp / "gw.yaml").write_text(yaml.safe_dump(cfg))
        urls = []
        for i in range(args.replicas):
            port = free_port()
            urls.append(f"http://127.0.0.1:{port}")
            gw = start(
                [
                    sys.executable,
                    "-m",
                    "proxy.cli",
                    "serve",
                    "-c",
                    str(tmp / "gw.yaml"),
                    "--port",
                    str(port),
                ],
                f"gw{i}",
            )
            wait(urls[-1] + "/readyz", gw)
        monitor = Monitor(rport, script_names())
        time.sleep(2)
        monitor.take()
        t0 = time.monotonic()
        time.sleep(args.idle_s)
        idle = monitor.take()
        idle_s = time.monotonic() - t0
        load_s = drive(urls, args.requests, args.concurrency)
        load = monitor.take()
        monitor.stop()  # MONITOR itself costs Redis CPU: measure CPU without it
        monitor = None
        time.sleep(0.5)
        cpu0 = redis_cpu_s(rport)
        time.sleep(args.idle_s)
        idle_cpu_rate = (redis_cpu_s(rport) - cpu0) / args.idle_s
        cpu0 = redis_cpu_s(rport)
        cpu_window = drive(urls, args.requests, args.concurrency)
        cpu_s = redis_cpu_s(rport) - cpu0 - idle_cpu_rate * cpu_window
    finally:
        if monitor is not None:
            monitor.stop()
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(15)
    n = args.requests
    print(
        f"{args.replicas} replica(s); idle {idle_s:.1f} s; {n} requests in {load_s:.1f} s "
        f"({n / load_s:.0f} req/s, {args.concurrency} concurrent clients)\n"
    )
    print(f"{'command sent by a gateway':40} {'per request':>12} {'idle, per replica/s':>20}")
    totals = {True: [0.0, 0.0], False: [0.0, 0.0]}
    for cmd in sorted(set(idle) | set(load), key=lambda c: (c.startswith("("), c)):
        bg = idle[cmd] / idle_s
        per_req = max(0.0, (load[cmd] - bg * load_s) / n)
        per_rep = bg / args.replicas
        inside = cmd.startswith("(")
        totals[inside][0] += per_req
        totals[inside][1] += per_rep
        if not inside:
            print(f"{cmd:40} {per_req:12.2f} {per_rep:20.2f}")
    print(f"{'total commands sent':40} {totals[False][0]:12.2f} {totals[False][1]:20.2f}")
    print(f"{'commands run inside Lua scripts':40} {totals[True][0]:12.2f} {totals[True][1]:20.2f}")
    print(
        f"\nredis-server CPU: {cpu_s / n * 1000:.3f} ms per request ({n / cpu_window:.0f} "
        f"req/s, without MONITOR); idle: {idle_cpu_rate * 1000:.1f} ms/s for all replicas"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
