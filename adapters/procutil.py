"""Process helpers for the engine pool: no engine outlives the gateway.

Two guards, because either alone has a hole:

1. **Parent-death signal** (Linux): every engine is started in its own session (so a
   terminal's Ctrl-C does not reach it and its whole process group can be signalled) with
   ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` set between ``fork`` and ``exec``. When the gateway
   dies — even by SIGKILL — the kernel kills the engine. The signal fires when the *thread*
   that forked the engine exits, which is the event-loop thread: run the pool on a loop
   that lives as long as the gateway. It covers the engine's main process only.
2. **Group watchdog** (:func:`main`, ``python -m adapters.procutil``): one tiny process per
   pool, in its own session, reading process-group ids from a pipe whose write end only the
   gateway holds. When the gateway dies the pipe reaches EOF and the watchdog sends SIGTERM,
   then (after the grace period) SIGKILL, to every group still registered — this also
   reaches an engine's own children (vLLM's engine-core and worker processes). On a clean
   shutdown the gateway unregisters every group and closes the pipe; the watchdog exits.

:func:`stop_process` is the plain SIGTERM-then-SIGKILL stop of one child process, for the
tests', benchmarks' and experiments' helper processes (Redis, stub and simulator engines).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1


def pdeathsig_preexec(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when its parent dies.

    ``None`` where ``prctl`` is unavailable (not Linux); the watchdog still covers those.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: no allocation-heavy work
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM ``proc`` (if it still runs), SIGKILL it after ``grace_s``, and reap it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False when the group is already gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _reap_groups(groups: set[int], grace_s: float) -> None:
    for g in groups:
        signal_group(g, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(group_alive(g) for g in groups):
        time.sleep(0.05)
    for g in groups:
        signal_group(g, signal.SIGKILL)


def free_ports(n: int, host: str) -> list[int]:
    """``n`` distinct free TCP ports on ``host`` (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def open_log(path: Path, header: str) -> int:
    """Open ``path`` for appending (creating its folder), write ``header``; return the fd."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, header.encode())
    return fd


def append_line(path: Path, line: str) -> None:
    with path.open("a") as f:
        f.write(line)


def stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def main(argv: list[str] | None = None) -> int:
    """Watchdog: read ``+PGID`` / ``-PGID`` lines on stdin; on EOF, kill what is left."""
    parser = argparse.ArgumentParser(prog="python -m adapters.procutil")
    parser.add_argument("--grace", type=float, default=10.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        with contextlib.suppress(ValueError):
            if line.startswith("+"):
                groups.add(int(line[1:]))
            elif line.startswith("-"):
                groups.discard(int(line[1:]))
    _reap_groups(groups, args.grace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
