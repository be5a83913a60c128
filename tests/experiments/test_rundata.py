"""experiments.rundata: the gateway's access-log lines as the estimator evaluation reads them."""

from __future__ import annotations

import json

import pytest

from experiments.rundata import read_gateway_log

T0 = 1_800_000_000.0


def _line(**kw: object) -> str:
    return json.dumps({"logger": "driftsched.access", "msg": "request", "request_id": "r1",
                       "status": 200, "completion_tokens": 7, **kw})  # fmt: skip


def test_arrival_and_finish_in_simulated_seconds() -> None:
    line = _line(arrival_unix=T0 + 2.0, duration_ms=500.0, max_tokens=64, predicted_p50=9.0,
                 ts="2027-01-15T08:00:00.000Z")  # fmt: skip
    (a,), _ = read_gateway_log([line], T0, 3.0)
    assert a.arrival_s == pytest.approx(6.0) and a.finish_s == pytest.approx(7.5)
    assert a.max_tokens == 64 and a.predicted_p50 == 9.0


def test_older_lines_arrive_at_their_time_minus_their_duration() -> None:
    line = _line(ts="2027-01-15T08:00:10.250Z", duration_ms=250.0)
    (a,), _ = read_gateway_log([line], T0, 1.0)  # T0 is 2027-01-15T08:00:00Z
    assert a.arrival_s == pytest.approx(10.0) and a.finish_s == pytest.approx(10.25)
    assert a.max_tokens is None


def test_no_times_no_arrival() -> None:
    (a,), _ = read_gateway_log([_line()], T0, 1.0)
    assert a.arrival_s is None and a.finish_s is None
