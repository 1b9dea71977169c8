"""The comparison flags of the simulator-side benchmarks, without running them in full:
``two_tenant_sim.py --tenants`` and ``scheduler_overhead.py --variant``."""

from __future__ import annotations

import pytest
from repo_scripts import load_script

# Both scripts import their siblings by name.
load_script("benchmarks/provenance.py")
cli_json = load_script("benchmarks/cli_json.py")


@pytest.fixture(scope="module")
def two_tenant():
    return load_script("benchmarks/two_tenant_sim.py")


@pytest.fixture(scope="module")
def overhead():
    return load_script("benchmarks/scheduler_overhead.py")


def test_one_tenant_keeps_its_requests_at_the_same_instants(two_tenant):
    both = two_tenant.two_tenant_workload(two_tenant.parse_args(["--requests", "300"]))
    urgent = two_tenant.two_tenant_workload(
        two_tenant.parse_args(["--requests", "300", "--tenants", "urgent"])
    )
    expected = [(r.arrival_s, r.prompt_tokens) for r in both if r.slo_class == "urgent"]
    assert 0 < len(expected) < len(both)  # the first 300 hold both tenants
    assert [(r.arrival_s, r.prompt_tokens) for r in urgent] == expected
    assert {r.slo_class for r in urgent} == {"urgent"}
    assert "only urgent" in urgent.name


@pytest.mark.parametrize("tenants", ["urgnet", "urgent,batch", ","])
def test_unknown_tenants_are_refused(two_tenant, tenants, capsys):
    with pytest.raises(SystemExit) as stopped:
        two_tenant.parse_args(["--tenants", tenants])
    assert stopped.value.code == 2 and "--tenants takes some of" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("texts", "says"),
    [
        (['{"late_give_up_factor": 1.0}'], "NAME=JSON"),
        (["bare"], "NAME=JSON"),
        (["a={late"], "--variant a is not JSON"),
        (["a=[1]"], "--variant a must be a JSON object"),
        (["a={}", "a={}"], "a is given twice"),
    ],
)
def test_malformed_variants_stop_with_a_message_naming_them(texts, says):
    with pytest.raises(SystemExit, match=says):
        cli_json.parse_variants(texts)


def test_variants_merge_policy_fields_and_time_each_cell(overhead):
    assert cli_json.parse_variants(['give_up={"late_give_up_factor": 1.0}', "shipped={}"]) == {
        "give_up": {"late_give_up_factor": 1.0},
        "shipped": {},
    }
    driver = overhead.Driver("flowprefill", 2, 0, fields={"late_give_up_factor": 1.0})
    assert driver.policy.config.late_give_up_factor == 1.0
    driver.fill(50)
    for _ in range(20):
        driver.round(50, timed=True)
    assert len(driver.times_ns["arrival"]) == 20
    assert len(driver.times_ns["completion"]) == 20
