"""The engine pool: launches, supervises, health-checks and scrapes engine processes.

:class:`EnginePool` implements :class:`~adapters.base.BackendPool` for a ``pool:`` section:
``instances`` engines of one kind (``sim`` or ``vllm``, see :mod:`adapters.engines`), each a
subprocess on a loopback port, plus external endpoints (``pool.external``, the top-level
``upstreams:`` and those added at runtime) kept by an inner :class:`StaticPool`.

Lifecycle of a launched engine (``Backend.state``)::

    starting --/health OK--> healthy --3 failed checks--> unhealthy --OK--> healthy
        |                       |  drain()                  |
        |                       v                           |
        |                   draining --undrain()--> healthy |
        +--------- process exits (any state) ---------------+--> restarting --backoff--> starting
                                                                   | too many crashes
                                                                   v
                                                                 failed      (stop() -> stopped)

A start that does not pass ``/health`` within ``startup_timeout_s`` is killed and counts as
a crash. Crashes are counted over a sliding ``restart.window_s``; the backoff before the
n-th relaunch in the window is ``backoff_initial_s * 2**(n-1)`` capped at ``backoff_max_s``;
the crash after ``restart.max_restarts`` relaunches in the window leaves the engine
``failed`` (its last error and log path stay in the snapshot).

Everything runs on the gateway's event loop: ``asyncio.create_subprocess_exec``, one
supervisor task per engine, one health loop and one scrape loop for the pool. No orphan
processes: see :mod:`adapters.procutil`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import sys
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from adapters.base import Backend, BackendPool
from adapters.clock import Clock, SystemClock
from adapters.config import PoolConfig, UpstreamConfig
from adapters.engines import EngineSpec, engine_spec
from adapters.errors import ConfigError, InvalidRequest
from adapters.model_len import probe_model_len
from adapters.procutil import (
    append_line,
    free_ports,
    open_log,
    pdeathsig_preexec,
    signal_group,
    stamp,
)
from adapters.scrape import MetricsNotExported, scrape
from adapters.static import (
    UNHEALTHY_AFTER,
    HealthTracker,
    StaticPool,
    backend_snapshot,
    every,
    models_of,
    probe,
    probe_timeout,
    wait_in_flight_zero,
)

log = logging.getLogger("driftsched.pool")


class _Engine:
    """One launched instance: its spec, process and crash history."""

    def __init__(self, index: int, spec: EngineSpec, log_path: Path) -> None:
        self.index = index
        self.spec = spec
        self.log_path = log_path
        self.backend = Backend(
            name=spec.name,
            url=spec.url,
            models=(spec.served_model,),
            kind=spec.kind,  # type: ignore[arg-type]
            kv_capacity_tokens=spec.kv_capacity_tokens,
            max_num_seqs=spec.max_num_seqs,
            supports_priority=spec.supports_priority,
            log_path=str(log_path),
        )
        self.proc: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task[None] | None = None
        self.crashes: deque[float] = deque()
        self.started_at = 0.0
        self.timed_out = False
        self.ever_healthy = False


class EnginePool:
    """Launched engines plus external endpoints; one :class:`BackendPool`."""

    def __init__(
        self, cfg: PoolConfig, upstreams: Sequence[UpstreamConfig] = (), *,
        clock: Clock | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock: Clock = clock or SystemClock()
        self._client = httpx.AsyncClient(trust_env=False)
        self.health = HealthTracker(UNHEALTHY_AFTER)
        externals = [*cfg.external, *upstreams]
        names = [u.name for u in externals]
        if len(set(names)) != len(names):
            raise ConfigError(f"pool.external + upstreams: duplicate names in {names}")
        self.external = StaticPool(
            externals,
            kind="external",
            health_interval_s=cfg.health_interval_s,
            scrape_interval_s=cfg.scrape_interval_s,
            client=self._client,
            clock=self.clock,
        )
        n = 0 if cfg.engine == "external" else cfg.instances
        if cfg.base_port:
            if cfg.base_port + n - 1 > 65535:
                raise ConfigError("pool.base_port: base_port + instances exceeds 65535")
            ports = [cfg.base_port + i for i in range(n)]
        else:
            ports = free_ports(n, cfg.host)
        log_dir = Path(cfg.log_dir).resolve()
        self._engines: list[_Engine] = []
        for i, port in enumerate(ports):
            spec = engine_spec(cfg, i, port)
            self._engines.append(_Engine(i, spec, log_dir / f"{spec.name}.log"))
        clash = {e.spec.name for e in self._engines} & {b.name for b in self.external.backends()}
        if clash:
            raise ConfigError(f"pool: backend name(s) {sorted(clash)} used twice")
        self._preexec = pdeathsig_preexec()
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._watchdog: asyncio.subprocess.Process | None = None

    # -- BackendPool -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the watchdog and every engine; returns without waiting for ``/health``."""
        self._watchdog = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "adapters.procutil", "--grace", str(self.cfg.stop_grace_s),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        for e in self._engines:
            e.task = asyncio.create_task(self._supervise(e), name=f"supervise-{e.spec.name}")
        await self.external.start()
        self._loops = [
            asyncio.create_task(every(self.cfg.health_interval_s, self.check_health)),
            asyncio.create_task(every(self.cfg.scrape_interval_s, self.scrape)),
        ]

    async def stop(self) -> None:
        """SIGTERM every engine's process group, SIGKILL after ``stop_grace_s``; idempotent."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_event.set()
        for t in self._loops:
            t.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await asyncio.gather(*(self._terminate(e) for e in self._engines))
        tasks = [e.task for e in self._engines if e.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.cfg.stop_grace_s + 5)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for e in self._engines:  # a supervisor cancelled mid-launch may have left one
            await self._terminate(e)
            self.health.reset(e.backend, "stopped")
            e.backend.pid = None
        await self.external.stop()
        if self._watchdog is not None:
            if self._watchdog.stdin is not None:
                self._watchdog.stdin.close()
            try:
                await asyncio.wait_for(self._watchdog.wait(), 5)
            except TimeoutError:
                self._watchdog.kill()
                await self._watchdog.wait()
        await self._client.aclose()

    def backends(self) -> list[Backend]:
        return [e.backend for e in self._engines] + self.external.backends()

    def models(self) -> list[str]:
        return models_of(self.backends())

    def candidates(self, model: str) -> list[Backend]:
        return [b for b in self.backends() if b.routable and b.serves(model)]

    # -- admin ---------------------------------------------------------------------------------
    def snapshot(self) -> list[dict[str, Any]]:
        """JSON-able state of every backend, for ``GET /admin/backends``."""
        now = self.clock.monotonic()
        return [backend_snapshot(b, now=now) for b in self.backends()]

    def get(self, name: str) -> Backend:
        e = self._engine(name)
        return e.backend if e is not None else self.external.get(name)

    async def drain(self, name: str) -> None:
        """Route nothing new to ``name``; return once its in-flight count reaches 0.

        The backend stays ``draining`` (also across a restart) until :meth:`undrain`.
        Cancelling the wait does not undo the drain.
        """
        e = self._engine(name)
        if e is None:
            await self.external.drain(name)
            return
        self.health.drain(e.backend)
        await wait_in_flight_zero(e.backend)

    def undrain(self, name: str) -> None:
        e = self._engine(name)
        if e is None:
            self.external.undrain(name)
        else:
            self.health.undrain(e.backend)

    async def add_external(self, upstream: UpstreamConfig) -> Backend:
        """Register an endpoint the gateway does not launch; checks its health once."""
        if self._engine(upstream.name) is not None:
            raise InvalidRequest(f"backend {upstream.name!r} already exists", code="backend_exists")
        return await self.external.add(upstream)

    def remove(self, name: str) -> Backend:
        """Unregister an external endpoint (launched engines can only be drained)."""
        if self._engine(name) is not None:
            raise InvalidRequest(
                f"backend {name!r} is a launched engine; drain it instead",
                code="backend_not_removable",
            )
        return self.external.remove(name)

    def _engine(self, name: str) -> _Engine | None:
        return next((e for e in self._engines if e.spec.name == name), None)

    # -- supervision ----------------------------------------------------------------------------
    async def _supervise(self, e: _Engine) -> None:
        b, policy = e.backend, self.cfg.restart
        while not self._stopping:
            rc: int | None = None
            try:
                await self._launch(e)
            except (OSError, ValueError) as err:  # missing/unexecutable binary, bad argv
                b.last_error = f"cannot start {e.spec.argv[0]}: {err}"
            else:
                assert e.proc is not None
                rc = await e.proc.wait()
                await self._reap(e, rc)
            if self._stopping:
                break
            now = self.clock.monotonic()
            e.crashes.append(now)
            while e.crashes and e.crashes[0] < now - policy.window_s:
                e.crashes.popleft()
            if rc is not None and not e.timed_out:
                b.last_error = f"exited with code {rc}; see {e.log_path}"
            b.pid = None
            if len(e.crashes) > policy.max_restarts:
                self.health.reset(b, "failed")
                log.error(
                    "engine %s failed after %d crashes: %s", b.name, len(e.crashes), b.last_error
                )
                return
            self.health.reset(b, "restarting")
            delay = min(policy.backoff_initial_s * 2 ** (len(e.crashes) - 1), policy.backoff_max_s)
            log.warning("engine %s: %s; restarting in %.2fs", b.name, b.last_error, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), delay)
            if not self._stopping:
                b.restarts += 1
        self.health.reset(b, "stopped")

    async def _launch(self, e: _Engine) -> None:
        if not self.cfg.base_port and e.crashes and not e.ever_healthy:
            # a free port picked earlier may have been taken meanwhile
            e.spec = engine_spec(self.cfg, e.index, free_ports(1, self.cfg.host)[0])
            e.backend.url = e.spec.url
        header = f"==== {stamp()} start #{e.backend.restarts} of {e.spec.name}: {shlex.join(e.spec.argv)}\n"
        fd = await asyncio.to_thread(open_log, e.log_path, header)
        try:
            e.proc = await asyncio.create_subprocess_exec(
                *e.spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(e.spec.env),
                start_new_session=True,
                preexec_fn=self._preexec,
            )
        finally:
            os.close(fd)
        e.started_at = self.clock.monotonic()
        e.timed_out = False
        e.ever_healthy = False
        e.backend.pid = e.proc.pid
        self.health.reset(e.backend, "starting")
        self._watch(f"+{e.proc.pid}")
        log.info("engine %s started: pid %d on %s", e.spec.name, e.proc.pid, e.spec.url)
        if self._stopping:
            await self._terminate(e)

    async def _reap(self, e: _Engine, rc: int) -> None:
        """After the main process exited: kill what is left of its group, note it in the log."""
        assert e.proc is not None
        signal_group(e.proc.pid, signal.SIGKILL)
        self._watch(f"-{e.proc.pid}")
        line = f"==== {stamp()} {e.spec.name} pid {e.proc.pid} exited with code {rc}\n"
        await asyncio.to_thread(append_line, e.log_path, line)

    async def _terminate(self, e: _Engine) -> None:
        proc = e.proc
        if proc is None or proc.returncode is not None:
            return
        signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.cfg.stop_grace_s)
        except TimeoutError:
            log.warning(
                "engine %s ignored SIGTERM for %ss; SIGKILL", e.spec.name, self.cfg.stop_grace_s
            )
            signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
        signal_group(proc.pid, signal.SIGKILL)

    def _watch(self, line: str) -> None:
        w = self._watchdog
        if w is None or w.stdin is None or w.stdin.is_closing():
            return
        try:
            w.stdin.write(line.encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            log.warning("engine watchdog is gone; parent-death signals still apply")

    # -- loops -----------------------------------------------------------------------------------
    def _live(self, *states: str) -> list[tuple[_Engine, asyncio.subprocess.Process]]:
        return [
            (e, e.proc)
            for e in self._engines
            if e.proc is not None and e.proc.returncode is None and e.backend.state in states
        ]

    async def _check(self, e: _Engine, proc: asyncio.subprocess.Process) -> None:
        b = e.backend
        ok, err = await probe(self._client, b, probe_timeout(self.cfg.health_interval_s))
        if e.proc is not proc or proc.returncode is not None:
            return  # exited or relaunched meanwhile
        self.health.record(b, ok, err, launched=True)
        if ok:
            e.ever_healthy = True
        elif b.state == "starting" and self.clock.monotonic() - e.started_at > self.cfg.startup_timeout_s:
            e.timed_out = True
            b.last_error = (
                f"no healthy /health within {self.cfg.startup_timeout_s}s; see {e.log_path}"
            )
            signal_group(proc.pid, signal.SIGKILL)

    async def check_health(self) -> None:
        """One round of health checks over launched engines (externals have their own)."""
        live = self._live("starting", "healthy", "unhealthy", "draining")
        await asyncio.gather(*(self._check(e, p) for e, p in live))

    async def _scrape(self, e: _Engine, proc: asyncio.subprocess.Process) -> None:
        try:
            s = await scrape(self._client, e.backend.url, now=self.clock.monotonic())
        except (httpx.HTTPError, MetricsNotExported) as err:  # advisory; keep the last metrics
            log.debug("scrape of %s failed: %s", e.spec.name, err)
            return
        if e.proc is not proc:
            return
        e.backend.metrics = s.metrics
        if e.spec.kv_capacity_tokens is None and s.kv_capacity_tokens is not None:
            e.backend.kv_capacity_tokens = s.kv_capacity_tokens
        await probe_model_len(self._client, e.backend)

    async def scrape(self) -> None:
        """One round of ``/metrics`` scrapes over launched engines."""
        live = self._live("healthy", "unhealthy", "draining")
        await asyncio.gather(*(self._scrape(e, p) for e, p in live))


def build_pool(
    pool: PoolConfig | None, upstreams: Sequence[UpstreamConfig], clock: Clock | None = None
) -> BackendPool:
    """An :class:`EnginePool` when a ``pool:`` section is present (its engines,
    ``pool.external`` and the top-level ``upstreams:``), else a :class:`StaticPool` over
    ``upstreams:``."""
    if pool is None:
        return StaticPool(upstreams, clock=clock)
    return EnginePool(pool, upstreams, clock=clock)
