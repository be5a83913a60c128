"""Policy variants (:mod:`experiments.variants`): each run's gateway configuration differs
from its base policy's by exactly the variant's settings, every run starts the same engines
with the same flags, and the baselines are tuned like ``driftsched``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from adapters.engines import engine_spec
from experiments import runner
from experiments.gwconfig import PoolOptions, Tenants, gateway_config
from experiments.variants import VARIANTS, resolve
from policies.driftsched import DriftschedParams
from policies.registry import build_policy
from proxy.config import Settings

TENANTS = Tenants(
    classes={"acme": "premium", "globex": "standard", "batchco": "batch"},
    weights={"acme": 2.0, "globex": 1.0, "batchco": 1.0},
    keys={"acme": "dsk-a", "globex": "dsk-g", "batchco": "dsk-b"},
)


def config(name: str, time_scale: float = 1.0) -> dict[str, Any]:
    return gateway_config(
        policy=name, tenants=TENANTS, workload_path="/w.jsonl", port=8100, admin_key="adm",
        log_dir="/logs", pool=PoolOptions(time_scale=time_scale),
    )  # fmt: skip


def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):  # an empty mapping adds no key
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("time_scale", [1.0, 4.0])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_a_variant_differs_from_its_base_by_exactly_its_settings(
    name: str, time_scale: float
) -> None:
    v = resolve(name)
    mine, base = flat(config(name, time_scale)), flat(config(v.policy, time_scale))
    changed = {k: mine.get(k) for k in mine.keys() | base.keys() if mine.get(k) != base.get(k)}
    assert changed == v.settings_map()
    assert mine["scheduler.policy.type"] == v.policy


def test_ablations_are_named_and_each_changes_one_thing() -> None:
    assert {"fcfs", "fair", "priority", "driftsched", "priority+governor", "driftsched-no-drift",
            "driftsched-no-governor", "driftsched-no-feasibility", "driftsched-oracle",
            "driftsched-tenant-mean"} <= set(VARIANTS)  # fmt: skip
    for v in VARIANTS.values():
        assert len(v.settings) == (0 if v.name == v.policy else 1), v.name
        assert v.what


def test_every_variant_is_a_valid_gateway_configuration_with_the_same_engine_flags() -> None:
    argvs = {}
    for name in VARIANTS:
        settings = Settings.model_validate(config(name))
        build_policy(settings.scheduler.policy.model_dump())
        argvs[name] = [engine_spec(settings.pool, i, 9000 + i).argv for i in range(2)]
    first = next(iter(argvs.values()))
    assert all(a == first for a in argvs.values()), argvs
    assert "--scheduling-policy" in first[0]


def test_priority_ages_like_driftsched_and_the_governor_is_where_the_table_says() -> None:
    aging = DriftschedParams().aging_s
    assert config("priority")["scheduler"]["policy"]["parameters"] == {"aging_s": aging}
    assert config("priority", 4.0)["scheduler"]["policy"]["parameters"] == {"aging_s": aging / 4}
    governor = {n: config(n)["scheduler"]["governor"]["enabled"] for n in VARIANTS}
    assert governor["priority+governor"] and governor["driftsched"]
    assert not governor["priority"] and not governor["driftsched-no-governor"]
    assert not governor["fcfs"] and not governor["fair"]


def test_driftsched_without_the_drift_controller_builds_no_controller() -> None:
    on = build_policy(config("driftsched")["scheduler"]["policy"])
    off = build_policy(config("driftsched-no-drift")["scheduler"]["policy"])
    assert on.drift is not None and off.drift is None
    assert on.feasibility is not None and off.feasibility is not None
    no_feas = build_policy(config("driftsched-no-feasibility")["scheduler"]["policy"])
    assert no_feas.feasibility is None and no_feas.drift is not None


def test_an_unknown_name_is_refused_with_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="driftsched-no-governor"):
        resolve("driftsched-nope")
    with pytest.raises(SystemExit, match="unknown policy or variant 'nope'"):
        runner.main(["mini", "--policies", "fcfs,nope"])
    with pytest.raises(SystemExit, match="names one twice"):
        runner.main(["mini", "--policies", "fcfs,fcfs"])


def test_a_set_override_applies_to_the_run_of_that_name_only() -> None:
    from experiments.gwconfig import Override

    o = Override.parse("driftsched:scheduler.kv_budget_fraction=0.5")
    cfgs = {n: gateway_config(
        policy=n, tenants=TENANTS, workload_path="/w", port=1, admin_key="a", log_dir="/l",
        pool=PoolOptions(), overrides=[o]) for n in ("driftsched", "driftsched-no-drift")}  # fmt: skip
    assert cfgs["driftsched"]["scheduler"]["kv_budget_fraction"] == 0.5
    assert "kv_budget_fraction" not in cfgs["driftsched-no-drift"]["scheduler"]
