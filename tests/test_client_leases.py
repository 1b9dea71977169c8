"""The engine service's record of its ingress replicas' leases (serve/client_leases.py), on a
hand-driven clock, and the config that sizes them. The live behaviour - a killed replica's
requests released through it - is in tests/test_ingress_replicas.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flowprefill_ray.serve.client_leases import ClientLeases
from flowprefill_ray.serve.config import IngressConfig, ServeAppArgs


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_lease_not_renewed_in_time_expires_once():
    clock = Clock()
    leases = ClientLeases(lease_s=5.0, clock=clock)
    alive, dying = leases.register("replica-a", "handle-a"), leases.register("replica-b")
    assert alive != dying and alive.startswith("replica-a-")
    assert leases.renew(alive, 1) and leases.renew(dying, 2)
    clock.now += 4.0
    assert leases.renew(alive, 2)
    assert leases.lapsed() == {}  # both renewed within the lease
    clock.now += 2.0  # dying last renewed 6 s ago, alive 2 s ago
    assert leases.lapsed() == {dying: None}  # no holder to ask: the service takes it for dead
    assert leases.expire(dying)
    assert leases.lapsed() == {} and not leases.expire(dying)  # released once
    assert not leases.renew(dying, 0)  # it must register again
    leases.count_released(2)  # what cancelling its requests found (the service's call)
    stats = leases.export()
    assert set(stats["clients"]) == {alive} and stats["clients"][alive]["in_flight"] == 2
    assert (stats["expired_clients"], stats["released_requests"]) == (1, 2)


def test_a_lapsed_lease_whose_holder_answers_is_extended_not_released():
    clock = Clock()
    leases = ClientLeases(lease_s=5.0, clock=clock)
    late = leases.register("replica", "its-actor-handle")
    clock.now += 6.0
    assert leases.lapsed() == {late: "its-actor-handle"}
    leases.extend(late)  # the service asked the holder, and it answered
    assert leases.lapsed() == {} and leases.renew(late, 1)
    clock.now += 4.0
    assert leases.lapsed() == {}  # renewed 4 s ago
    assert leases.export()["lapsed_alive"] == 1 and leases.export()["expired_clients"] == 0


def test_a_renewal_during_the_probe_saves_the_lease():
    clock = Clock()
    leases = ClientLeases(lease_s=5.0, clock=clock)
    client = leases.register("replica", "handle")
    clock.now += 6.0
    assert client in leases.lapsed()
    assert leases.renew(client, 0)  # arrived while the service was asking after the holder
    assert not leases.expire(client) and leases.export()["expired_clients"] == 0


def test_an_ended_lease_releases_nothing():
    clock = Clock()
    leases = ClientLeases(lease_s=1.0, clock=clock)
    client = leases.register("replica")
    leases.renew(client, 1)
    leases.end(client)
    clock.now += 10.0
    assert leases.lapsed() == {} and not leases.expire(client)
    assert leases.export()["expired_clients"] == 0


@pytest.mark.parametrize(
    "ingress, field",
    [
        ({"lease_s": 0}, "lease_s"),
        ({"lease_s": 1.0, "renew_interval_s": 0.5}, "renew_interval_s"),
        ({"renew_interval_s": -1}, "renew_interval_s"),
        ({"leas_s": 5}, "leas_s"),
    ],
)
def test_bad_lease_settings_are_refused_naming_the_field(ingress, field):
    with pytest.raises(ValidationError) as info:
        ServeAppArgs.model_validate({"ingress": ingress})
    assert field in str(info.value)
    assert IngressConfig(lease_s=3.0, renew_interval_s=1.0).lease_s == 3.0
