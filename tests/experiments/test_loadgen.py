"""The load generator against real engines on loopback: a stub engine and the simulator."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import prompts_dataset as pd
from adapters.sim.workload import count_prompt_tokens
from experiments import loadgen
from experiments.record import COLUMNS, Record
from tests.conftest import free_port
from tests.harness import Proc, start_stub

pytestmark = pytest.mark.e2e

KEYS = {"acme": "sk-acme-0001", "batchco": "sk-batch-0002"}


def make_workload(
    n: int,
    rate: float,
    *,
    params: dict[str, Any] | None = None,
    faults: dict[int, dict[str, Any]] | None = None,
) -> pd.Workload:
    """``n`` chat requests at ``rate`` req/s alternating between two tenants; ``faults`` maps
    a request index to extra body fields (the stub engine's ``stub_fault`` and friends)."""
    reqs = []
    for i in range(n):
        tenant = "acme" if i % 2 == 0 else "batchco"
        messages = [{"role": "user", "content": f"question number {i}"}]
        extra = {**(params or {}), **((faults or {}).get(i, {}))}
        reqs.append(
            pd.Request(
                id=f"r{i:04d}",
                arrival_s=i / rate,
                tenant=tenant,
                qos_class="premium" if tenant == "acme" else "batch",
                messages=messages,
                prompt=None,
                max_tokens=None,
                output_tokens=8,
                prompt_tokens=count_prompt_tokens(messages),
                params={"extra_body": extra} if extra else {},
            )
        )
    return pd.Workload({"name": "test"}, reqs)


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_stub(tmp_path_factory.mktemp("stub"), chunks=8)
    yield url
    proc.stop()


async def run(w: pd.Workload, url: str, **kw: Any) -> tuple[list[Record], dict[str, Any]]:
    return await loadgen.replay(w, base_url=url, keys=KEYS, model="stub", progress=False, **kw)


async def test_records_every_request_and_reports_lag(stub: str) -> None:
    w = make_workload(60, 60.0, params={"stub_chunk_delay_ms": 5})
    records, summary = await run(w, stub)
    assert [r.request_id for r in records] == [r.id for r in w.requests]
    for rec, req in zip(records, w.requests, strict=True):
        assert rec.ok, rec
        assert (rec.tenant, rec.qos_class) == (req.tenant, req.qos_class)
        assert rec.status == 200 and rec.completion_tokens == 8 and rec.prompt_tokens
        assert rec.finish_reason == "length" and rec.n_events >= 10
        assert rec.dispatched_s is not None and rec.sent_s is not None
        assert rec.first_token_s is not None and rec.done_s is not None
        assert rec.intended_s <= rec.dispatched_s <= rec.sent_s < rec.first_token_s <= rec.done_s
        assert rec.done_s - rec.first_token_s >= 6 * 0.005  # 8 tokens, 5 ms apart
    assert summary["ok"] == summary["sent"] == 60 and summary["errors"] == {}
    lag = summary["lag_s"]
    assert 0 <= lag["p50"] <= lag["p99"] <= lag["max"] < 0.5
    assert summary["output_tokens"] == 480 and summary["max_inflight"] >= 1


async def test_open_loop_sends_on_schedule_while_the_server_stalls(stub: str) -> None:
    w = make_workload(20, 80.0, params={"stub_delay_ms": 800})  # all due within 0.25 s
    records, summary = await run(w, stub)
    sent = [r.sent_s or 0.0 for r in records]
    first = [r.first_token_s or 0.0 for r in records]
    assert max(sent) < 0.6 < 0.8 <= min(first)
    assert summary["max_inflight"] == 20 and summary["ok"] == 20


async def test_errors_are_recorded_not_raised(stub: str) -> None:
    faults = {
        0: {"stub_fault": "429"},
        1: {"stub_fault": "break"},
        2: {"stub_fault": "truncate"},
        3: {"stub_fault": "hang"},
    }
    w = make_workload(5, 50.0, faults=faults)
    records, summary = await run(w, stub, request_timeout_s=1.0)
    errors = [r.error for r in records]
    assert errors == ["429", "stream_broken", "incomplete", "timeout", ""]
    assert records[0].status == 429 and records[4].ok
    assert summary["errors"] == {"429": 1, "stream_broken": 1, "incomplete": 1, "timeout": 1}


async def test_the_drain_timeout_cancels_what_is_left(stub: str) -> None:
    w = make_workload(2, 50.0, faults={1: {"stub_fault": "hang"}})
    records, summary = await run(w, stub, drain_timeout_s=0.5)
    assert records[0].ok and records[1].error == "cancelled"
    assert summary["wall_s"] < 5


@pytest.mark.parametrize("client", ["httpx", "openai"])
async def test_other_clients_record_the_same(stub: str, client: str) -> None:
    w = make_workload(6, 30.0, faults={5: {"stub_fault": "429"}})
    records, _ = await run(w, stub, client=client)
    assert [r.completion_tokens for r in records[:5]] == [8] * 5
    assert all(r.ok and r.first_token_s and r.done_s for r in records[:5])
    assert records[5].status == 429 and records[5].error == "429"


def test_cli_writes_csv_and_summary(stub: str, tmp_path: Path) -> None:
    wfile = tmp_path / "w.jsonl"
    with open(wfile, "w", encoding="utf-8") as f:
        w = make_workload(10, 50.0)
        pd.write_workload(
            f, {"format": "driftsched-workload", "version": 1, "name": "cli"}, w.requests
        )
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS), encoding="utf-8")
    out = tmp_path / "out" / "requests.csv"
    assert (
        loadgen.main(
            [
                str(wfile),
                "--base-url",
                stub,
                "--keys-file",
                str(keys),
                "--model",
                "stub",
                "--out",
                str(out),
                "--no-progress",
                "--max-requests",
                "8",
            ]
        )
        == 0
    )
    rows = list(csv.reader(out.open(encoding="utf-8")))
    assert rows[0] == COLUMNS and len(rows) == 9
    by = dict(zip(COLUMNS, rows[1], strict=True))
    assert by["status"] == "200" and by["error"] == "" and float(by["ttft_s"]) > 0
    # asyncio fires a timer up to one clock tick early (its loop runs what is due within
    # the clock's resolution), so a dispatch may come a fraction of a millisecond "early"
    assert float(by["lag_s"]) >= -0.001 and float(by["connect_s"]) >= 0
    summary = json.loads((tmp_path / "out" / "requests.summary.json").read_text())
    assert summary["sent"] == 8 and set(summary["lag_s"]) == {"p50", "p99", "max"}
    assert summary["model"] == "stub" and summary["t0_unix"] > 0


def test_guards() -> None:
    with pytest.raises(ValueError, match="loopback only"):
        loadgen.check_loopback("http://10.1.2.3:8000")
    loadgen.check_loopback("http://localhost:1")
    loadgen.check_loopback("http://[::1]:1")
    assert loadgen.load_keys("a=k1", None, "kk", ["a", "b"]) == {"a": "k1", "b": "kk"}
    with pytest.raises(ValueError, match="use tenant=key"):
        loadgen.load_keys("a", None, None, ["a"])


async def test_a_tenant_without_a_key_is_refused(stub: str) -> None:
    with pytest.raises(ValueError, match="no API key for tenant"):
        await loadgen.replay(
            make_workload(2, 10.0), base_url=stub, keys={"acme": "k"}, model="stub", progress=False
        )


def test_record_parses_stream_events_and_retry_after() -> None:
    r = Record("r", "t", "c", 0.0)
    r.on_headers(429, {"retry-after": "2", "retry-after-ms": "1500"})
    assert r.retry_after_s == 1.5
    r = Record("r", "t", "c", 0.0)
    r.on_headers(200, {})
    r.on_line(b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}', 1.0)
    assert r.first_token_s is None  # vLLM's role-only first event is not a token
    r.on_line(b'data: {"choices":[{"index":0,"delta":{"content":"Hi \\"usage\\":{"}}]}', 2.0)
    r.on_line(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}', 3.0)
    r.on_line(b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}', 3.0)
    r.on_line(b"data: [DONE]", 3.0)
    r.finish(3.0)
    assert r.first_token_s == 2.0
    assert (r.finish_reason, r.completion_tokens, r.ok) == ("stop", 1, True)


def test_the_simulator_generates_each_requests_true_length(
    shared_data: Path, tmp_path: Path
) -> None:
    """The simulator reads the workload file and generates exactly ``output_tokens``."""
    data = pd.Data(shared_data)
    header, reqs = pd.build_sharegpt(
        duration_s=2, rate=10, tenants=pd.parse_tenants("acme"), opts=pd.Options(seed=5), data=data
    )
    h2, more = pd.build_from_trace(
        "azure-conv",
        duration_s=2,
        rate_scale=4,
        tenants=pd.parse_tenants("batchco:batch"),
        opts=pd.Options(filler="words"),
        data=data,
    )
    allreqs = sorted(
        [*reqs, *(dataclasses.replace(r, id="b" + r.id) for r in more)], key=lambda r: r.arrival_s
    )
    wfile = tmp_path / "w.jsonl"
    header["tenants"] += h2["tenants"]
    with open(wfile, "w", encoding="utf-8") as f:
        pd.write_workload(f, header, allreqs)
    assert not pd.check_file(wfile).problems
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sim = Proc(
        [
            sys.executable,
            "-m",
            "adapters.sim",
            "--port",
            str(port),
            "--model",
            "sim",
            "--workload",
            str(wfile),
            "--time-scale",
            "50",
            "--tokens-per-event",
            "16",
            "--log-level",
            "warning",
        ],
        url + "/health",
        tmp_path / "sim.log",
    )
    try:
        out = tmp_path / "r.csv"
        assert (
            loadgen.main(
                [
                    str(wfile),
                    "--base-url",
                    url,
                    "--key",
                    "none",
                    "--model",
                    "sim",
                    "--out",
                    str(out),
                    "--no-progress",
                ]
            )
            == 0
        )
    finally:
        sim.stop()
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == len(allreqs) > 10
    for row in rows:
        assert row["error"] == "", row
        assert row["completion_tokens"] == row["expected_output_tokens"]
        assert row["prompt_tokens"] == row["expected_prompt_tokens"]
