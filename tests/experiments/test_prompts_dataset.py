"""prompts_dataset: every source builds a valid, deterministic file the simulator can read."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import prompts_dataset as pd
from adapters.sim.workload import OutputLengths, count_prompt_tokens, prompt_key
from experiments.generators import Arrival, rng_for
from experiments.workload_file import check_lines

SCENARIOS = Path(__file__).resolve().parents[2] / "experiments" / "scenarios"


def make_spec(**over: Any) -> dict[str, Any]:
    """A small two-tenant spec; keyword arguments replace top-level keys."""
    spec: dict[str, Any] = {
        "name": "t",
        "duration_s": 20,
        "filler": "words",
        "tenants": [
            {
                "name": "acme",
                "qos_class": "premium",
                "rate": 3,
                "arrival": "poisson",
                "lengths": "sharegpt",
            },
            {
                "name": "batchco",
                "qos_class": "batch",
                "rate": 2,
                "arrival": {"process": "gamma", "cv": 2},
                "lengths": {"profile": "trace", "trace": "azure-conv"},
            },
        ],
    }
    spec.update(over)
    return spec


def build(spec: dict[str, Any], data: pd.Data, seed: int | None = None) -> str:
    opts = pd.Options()
    parsed = pd.parse_spec(spec, opts)
    if seed is not None:
        opts.seed = seed
    header, reqs = pd.build_synthetic(parsed, opts, data)
    out = io.StringIO()
    pd.write_workload(out, header, reqs)
    return out.getvalue()


def rows(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()[1:]]


def assert_simulator_finds_every_length(path: Path) -> None:
    lengths = OutputLengths.from_jsonl(path)
    reqs = pd.load_workload(path).requests
    assert len(lengths) == len(reqs)  # every prompt unique
    for r in reqs:
        assert lengths.lookup(prompt_key(r.messages or r.prompt)) == r.output_tokens
        assert r.prompt_tokens == count_prompt_tokens(r.messages or r.prompt)


@functools.cache
def _data(root: Path) -> pd.Data:
    return pd.Data(root)  # one reader per data dir: the traces are parsed once per session


@pytest.fixture
def data(shared_data: Path) -> pd.Data:
    return _data(shared_data)


# -- determinism ---------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_file(data: pd.Data) -> None:
    a, b = build(make_spec(), data), build(make_spec(), data)
    assert a == b
    c = build(make_spec(), data, seed=7)
    assert c != a
    assert rows(c)[0]["arrival_s"] != rows(a)[0]["arrival_s"]


def test_adding_a_tenant_leaves_the_others_unchanged(data: pd.Data) -> None:
    base = make_spec()
    more = make_spec(
        tenants=[
            *base["tenants"],
            {
                "name": "new",
                "qos_class": "standard",
                "rate": 5,
                "arrival": "poisson",
                "lengths": "sharegpt",
            },
        ]
    )
    acme = [
        (r["arrival_s"], r["output_tokens"])
        for r in rows(build(base, data))
        if r["tenant"] == "acme"
    ]
    acme2 = [
        (r["arrival_s"], r["output_tokens"])
        for r in rows(build(more, data))
        if r["tenant"] == "acme"
    ]
    assert acme == acme2


# -- each real source ----------------------------------------------------------------------


@pytest.mark.parametrize("trace", ["azure-conv", "azure-code", "mooncake"])
def test_trace_sources_build_valid_files(trace: str, data: pd.Data, tmp_path: Path) -> None:
    opts = pd.Options(seed=1, filler="words")
    tenants = pd.parse_tenants("acme:premium:1,globex:standard:3")
    header, reqs = pd.build_from_trace(
        trace,
        duration_s=30,
        rate_scale=2.0,
        start_s=480,
        tenants=tenants,
        opts=opts,
        data=data,
        limit=80,
    )
    path = tmp_path / "w.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        pd.write_workload(f, header, reqs)
    w = pd.check_file(path)
    assert not w.problems, [p.render(path) for p in w.problems]
    assert 0 < len(reqs) <= 80 and header["n_requests"] == len(reqs)
    assert {r.tenant for r in reqs} == {"acme", "globex"}
    assert all(0 <= r.arrival_s < 30 for r in reqs)
    tr = data.trace(trace)
    for r in reqs:  # the trace's own lengths, unless clipped to fit the context
        i = int((r.source or "").rsplit(":", 1)[1])
        assert r.output_tokens == min(int(tr.output[i]), 8192 - r.prompt_tokens)
        if tr.prompt[i] + tr.output[i] <= 8192 and tr.prompt[i] >= 8:
            assert r.prompt_tokens == tr.prompt[i]
        else:
            assert r.prompt_tokens <= 8192 - min(int(tr.output[i]), 4096)
    assert_simulator_finds_every_length(path)


def test_trace_window_compresses_time_by_rate_scale(data: pd.Data) -> None:
    opts = pd.Options(filler="words")
    one = pd.parse_tenants("a")
    _, slow = pd.build_from_trace("azure-conv", duration_s=40, tenants=one, opts=opts, data=data)
    _, fast = pd.build_from_trace(
        "azure-conv", duration_s=20, rate_scale=2.0, tenants=one, opts=opts, data=data
    )
    assert [r.source for r in slow] == [r.source for r in fast]
    assert np.allclose([r.arrival_s / 2 for r in slow], [r.arrival_s for r in fast], atol=2e-6)


def test_mooncake_jitters_buckets_and_shares_prefix_blocks(data: pd.Data) -> None:
    _, reqs = pd.build_from_trace(
        "mooncake",
        duration_s=12,
        tenants=pd.parse_tenants("a"),
        opts=pd.Options(filler="words", max_context=32768),
        data=data,
    )
    stamps = {round(r.arrival_s, 3) for r in reqs}
    assert len(stamps) == len(reqs)  # no two requests share a quantised timestamp
    tr = data.trace("mooncake")
    first = [
        r for r in reqs if tr.blocks and tr.blocks[int((r.source or "0").split(":")[1])][0] == 0
    ]
    assert len(first) >= 2  # block 0 (a shared system prompt) -> the same first 2048 chars
    texts = [str((r.messages or [{}])[0]["content"]) for r in first]
    assert len({t[:2048] for t in texts}) == 1 and len(set(texts)) == len(texts)


def test_sharegpt_source_keeps_real_prompts_and_lengths(data: pd.Data, tmp_path: Path) -> None:
    header, reqs = pd.build_sharegpt(
        duration_s=10,
        rate=8,
        tenants=pd.parse_tenants("a,b:batch"),
        opts=pd.Options(seed=3),
        data=data,
    )
    by_id = {r.id: r for r in data.sharegpt()}
    for r in reqs:
        real = by_id[(r.source or "").split(":", 1)[1]]
        assert (r.messages or [{}])[0]["content"] == real.prompt
        assert r.output_tokens == min(real.response_tokens, 8192 - r.prompt_tokens)
        assert r.max_tokens is None
    path = tmp_path / "sg.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        pd.write_workload(f, header, reqs)
    assert_simulator_finds_every_length(path)


def test_ignore_eos_mode_sets_max_tokens_to_the_true_length(data: pd.Data) -> None:
    _, reqs = pd.build_sharegpt(
        duration_s=5,
        rate=5,
        tenants=pd.parse_tenants("a"),
        opts=pd.Options(ignore_eos=True),
        data=data,
    )
    assert reqs and all(r.max_tokens == r.output_tokens and r.params["ignore_eos"] for r in reqs)


# -- drift ---------------------------------------------------------------------------------


def test_output_scale_drift_applies_from_t_on_only(data: pd.Data) -> None:
    spec = make_spec(
        tenants=[
            {
                "name": "a",
                "qos_class": "standard",
                "rate": 20,
                "arrival": "poisson",
                "lengths": {"profile": "fixed", "prompt": 50, "output": 100},
            },
            {
                "name": "b",
                "qos_class": "premium",
                "rate": 20,
                "arrival": "poisson",
                "lengths": {"profile": "fixed", "prompt": 50, "output": 100},
            },
        ],
        drift=[{"at_s": 10, "tenant": "a", "output_scale": 4}],
    )
    rs = rows(build(spec, data))
    a_before = {r["output_tokens"] for r in rs if r["tenant"] == "a" and r["arrival_s"] < 10}
    a_after = {r["output_tokens"] for r in rs if r["tenant"] == "a" and r["arrival_s"] >= 10}
    b_all = {r["output_tokens"] for r in rs if r["tenant"] == "b"}
    assert a_before == {100} and a_after == {400} and b_all == {100}


def test_drift_on_real_prompts_keeps_each_requests_own_length(
    data: pd.Data, tmp_path: Path
) -> None:
    # a handful of ShareGPT prompts (a narrow filter): they repeat before and after the drift
    lengths = {"profile": "sharegpt", "prompt_tokens": [30, 40], "output_tokens": [300, 310]}
    spec = make_spec(
        tenants=[
            {
                "name": "a",
                "qos_class": "standard",
                "rate": 5,
                "arrival": "poisson",
                "lengths": lengths,
            }
        ],
        drift=[{"at_s": 10, "tenant": "a", "output_scale": 3}],
    )
    path = tmp_path / "d.jsonl"
    path.write_text(build(spec, data), encoding="utf-8")
    reqs = pd.load_workload(path).requests
    real = {r.id: r.response_tokens for r in data.sharegpt()}
    sources: dict[bool, set[str]] = {True: set(), False: set()}
    for r in reqs:
        sid = (r.source or "").split(":", 1)[1]
        after = r.arrival_s >= 10
        assert r.output_tokens == real[sid] * (3 if after else 1)
        sources[after].add(sid)
    assert sources[True] & sources[False]  # the same prompt, before and after
    assert_simulator_finds_every_length(path)  # repeats were made unique


def test_lengths_drift_switches_population(data: pd.Data) -> None:
    spec = make_spec(
        tenants=[
            {
                "name": "a",
                "qos_class": "standard",
                "rate": 20,
                "arrival": "poisson",
                "lengths": "sharegpt",
            }
        ],
        drift=[
            {
                "at_s": 10,
                "tenant": "a",
                "lengths": {
                    "profile": "lognormal",
                    "prompt": {"median": 3000, "sigma": 0.1},
                    "output": {"median": 50, "sigma": 0.1},
                },
            }
        ],
    )
    rs = rows(build(spec, data))
    before = [r for r in rs if r["arrival_s"] < 10]
    after = [r for r in rs if r["arrival_s"] >= 10]
    assert all(r["source"].startswith("sharegpt:") for r in before)
    assert np.median([r["prompt_tokens"] for r in after]) == pytest.approx(3000, rel=0.05)
    assert np.median([r["output_tokens"] for r in after]) == pytest.approx(50, rel=0.1)
    w = pd.describe(pd.check_lines(build(spec, data).splitlines()))
    assert w["drift"][0]["output_mean_after"] < w["drift"][0]["output_mean_before"]


# -- arrival processes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrival", "rate", "cv"),
    [
        (Arrival("poisson", rate=20.0), 20.0, 1.0),
        (Arrival("gamma", rate=20.0, cv=3.0), 20.0, 3.0),
        (Arrival("constant", rate=20.0), 20.0, 0.0),
        (Arrival("gamma", rate=5.0, cv=0.5), 5.0, 0.5),
    ],
)
def test_renewal_processes_have_their_rate_and_cv(
    arrival: Arrival, rate: float, cv: float, data: pd.Data
) -> None:
    t, _ = arrival.times(rng_for(0, "test"), 0.0, 2000.0, data)
    gaps = np.diff(t)
    assert len(t) / 2000.0 == pytest.approx(rate, rel=0.08)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, abs=0.1 + 0.1 * cv)


def test_onoff_is_silent_when_off_and_keeps_the_mean_rate(data: pd.Data) -> None:
    arr = Arrival("onoff", rate=6.0, on_s=10.0, off_s=20.0)
    t, _ = arr.times(rng_for(0, "test"), 0.0, 3000.0, data)
    assert len(t) / 3000.0 == pytest.approx(6.0, rel=0.08)
    assert np.all(t % 30.0 < 10.0)


def test_trace_arrival_keeps_bursts(data: pd.Data) -> None:
    arr = Arrival("trace", trace="azure-code", offset_s=840.0, rate_scale=1.0)
    t, rows_ = arr.times(rng_for(0, "x"), 0.0, 60.0, data)
    assert rows_ is not None and len(rows_) == len(t)
    assert np.bincount(t.astype(int)).max() >= 50  # the 67 req/s burst at 862 s


# -- validation ----------------------------------------------------------------------------

GOOD = {
    "id": "r1",
    "arrival_s": 0.5,
    "tenant": "acme",
    "qos_class": "premium",
    "messages": [{"role": "user", "content": "hello there"}],
    "max_tokens": None,
    "output_tokens": 10,
    "prompt_tokens": 10,
}


def line(**over: Any) -> str:
    row = {**GOOD, **over}
    return json.dumps({k: v for k, v in row.items() if v != "DROP"})


@pytest.mark.parametrize(
    ("lines", "lineno", "field", "reason"),
    [
        (["{not json"], 1, "-", "not JSON"),
        ([line(output_tokens="DROP")], 1, "output_tokens", "missing"),
        ([line(prompt="hi")], 1, "messages|prompt", "exactly one"),
        ([line(colour="red")], 1, "colour", "unknown field"),
        ([line(prompt_tokens=99)], 1, "prompt_tokens", "counts 10 tokens"),
        ([line(), line(id="r2", arrival_s=0.1)], 2, "arrival_s", "sorted"),
        ([line(), line(arrival_s=1)], 2, "id", "already used on line 1"),
        ([line(), line(id="r2", output_tokens=11)], 2, "output_tokens", "same prompt as line 1"),
        ([line(tenant="no spaces")], 1, "tenant", "must match"),
        ([line(output_tokens=0)], 1, "output_tokens", "int >= 1"),
        ([line(temperature=True)], 1, "temperature", "must be int or float"),
        ([line(max_tokens=8190)], 1, "max_tokens", "> max_context 8192"),
        (
            [line(), '{"_workload": {"format": "driftsched-workload", "version": 1}}'],
            2,
            "_workload",
            "first line",
        ),
        (
            [
                '{"_workload": {"format": "driftsched-workload", "version": 1, "tenants": '
                '[{"name": "acme", "qos_class": "standard"}]}}',
                line(),
            ],
            2,
            "qos_class",
            "header gives",
        ),
    ],
)
def test_validate_names_line_field_and_reason(
    lines: list[str], lineno: int, field: str, reason: str
) -> None:
    w = check_lines(lines, max_context=8192)
    assert any(p.line == lineno and p.field == field and reason in p.reason for p in w.errors), (
        w.problems
    )


def test_a_good_headerless_file_is_accepted() -> None:
    w = check_lines(
        [
            line(),
            "",
            line(
                id="r2",
                arrival_s=1.0,
                messages=[{"role": "user", "content": "other"}],
                prompt_tokens=9,
            ),
        ]
    )
    assert not w.problems and len(w.requests) == 2


def test_validate_cli_reports_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line() + "\n" + line(id="r2", prompt_tokens=3) + "\n", encoding="utf-8")
    assert pd.main(["validate", str(bad)]) == 1
    err = capsys.readouterr()
    assert f"{bad}:2: error: prompt_tokens: 3 but the prompt counts 10 tokens" in err.err
    assert "INVALID" in err.out
    with pytest.raises(pd.WorkloadError, match=r"bad.jsonl:2: error: prompt_tokens"):
        pd.load_workload(bad)


def test_spec_errors_name_the_key() -> None:
    with pytest.raises(pd.SpecError, match=r"spec.tenants\[0\].colour: unknown key"):
        pd.parse_spec(make_spec(tenants=[{**make_spec()["tenants"][0], "colour": 1}]), pd.Options())
    with pytest.raises(pd.SpecError, match=r"spec.drift\[0\].tenant: 'nobody'"):
        pd.parse_spec(
            make_spec(drift=[{"at_s": 1, "tenant": "nobody", "output_scale": 2}]), pd.Options()
        )
    with pytest.raises(pd.SpecError, match=r"arrival.process: 'weibull'"):
        pd.parse_spec(
            make_spec(tenants=[{**make_spec()["tenants"][0], "arrival": "weibull"}]), pd.Options()
        )


# -- the shipped scenarios and the command line --------------------------------------------


@pytest.mark.parametrize("name", ["steady", "overload", "drift", "bursty"])
def test_shipped_scenarios_build_valid_files(name: str, data: pd.Data, tmp_path: Path) -> None:
    opts = pd.Options()
    spec = pd.parse_spec(pd.load_spec(SCENARIOS / f"{name}.yaml"), opts)
    assert spec.duration_s <= 180  # a run of 4 policies fits in 15 minutes
    header, reqs = pd.build_synthetic(dataclasses.replace(spec, duration_s=15), opts, data)
    out = tmp_path / f"{name}.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        pd.write_workload(f, header, reqs)
    w = pd.load_workload(out)
    assert not w.problems
    classes = {t["qos_class"] for t in w.header["tenants"]}
    assert {"premium", "standard", "batch"} <= classes and 3 <= len(w.header["tenants"]) <= 4
    assert_simulator_finds_every_length(out)


def test_overload_offers_about_one_and_a_half_times_capacity(data: pd.Data) -> None:
    opts = pd.Options()
    spec = pd.parse_spec(pd.load_spec(SCENARIOS / "overload.yaml"), opts)
    _, reqs = pd.build_synthetic(spec, opts, data)
    cap = pd.estimate_capacity(reqs, engines=2, n_requests=1500)
    offered = len(reqs) / spec.duration_s
    assert 1.3 <= offered / cap["req_s"] <= 1.7, (offered, cap)


def test_cli_help_build_validate_stats(
    tmp_path: Path, data: pd.Data, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        pd.main(["--help"])
    assert e.value.code == 0 and "synthetic" in capsys.readouterr().out
    out = tmp_path / "a.jsonl"
    assert (
        pd.main(
            [
                "azure",
                "--trace",
                "code",
                "--duration",
                "20",
                "--tenants",
                "x:batch",
                "--filler",
                "words",
                "--data",
                str(data.root),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert pd.main(["validate", str(out)]) == 0
    capsys.readouterr()
    assert pd.main(["stats", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tenants"]["x"]["qos_class"] == "batch"
    spec_out = tmp_path / "s.jsonl"
    assert (
        pd.main(
            [
                "synthetic",
                str(SCENARIOS / "drift.yaml"),
                "--duration",
                "8",
                "--seed",
                "3",
                "--data",
                str(data.root),
                "-o",
                str(spec_out),
            ]
        )
        == 0
    )
    w = pd.load_workload(spec_out)
    assert w.header["seed"] == 3 and w.header["duration_s"] == 8
    assert max(r.arrival_s for r in w.requests) < 8
