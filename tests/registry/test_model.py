"""The registry's models: validation messages name the field and the fix."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from meshgate.registry import Instance, InstanceSpec, InvalidNameError, Snapshot
from meshgate.registry.model import check_name, describe_validation_error


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"address": "10.0.0.5"}, ["address:", "is not host:port", "10.0.0.5:8080"]),
        ({"address": "10.0.0.5:0"}, ["address:", "no valid port (1-65535)"]),
        ({"address": "10.0.0.5:70000"}, ["address:", "no valid port"]),
        ({"address": "300.1.1.1:80"}, ["address:", "is not an IPv4 address"]),
        ({"address": "fd00::5:80"}, ["address:", "in brackets", "[fd00::5]:8080"]),
        ({"address": "[zz::1]:80"}, ["address:", "is not an IPv6 address"]),
        ({"address": "bad host:80"}, ["address:", "is not a host name or IP"]),
        ({"address": "a:1", "ttl": 0.5}, ["ttl:", "0.5 seconds is out of range", "between 1"]),
        ({"address": "a:1", "ttl": 301}, ["ttl:", "between 1 and 300 seconds"]),
        ({"address": "a:1", "version": "1 2"}, ["version:", "without spaces"]),
        ({"address": "a:1", "zone": "-eu"}, ["zone:", "not a valid zone", "starting with"]),
        ({"address": "a:1", "metadata": {"bad key": "x"}}, ["metadata:", "key 'bad key'"]),
        ({"address": "a:1", "metadata": {"k": "x" * 1025}}, ["metadata:", "keep it to 1024"]),
        (
            {"address": "a:1", "metadata": {f"k{n}": "v" for n in range(65)}},
            ["metadata:", "65 entries is too many"],
        ),
        (
            {"address": "a:1", "metadata": {f"k{n}": "v" * 1000 for n in range(20)}},
            ["metadata:", "bytes of metadata is too much"],
        ),
        ({"address": "a:1", "weight": 3}, ["weight:", "is not a field of an instance spec"]),
        ({}, ["address: is required"]),
    ],
)
def test_invalid_specs_name_the_field_and_the_fix(
    fields: dict[str, Any], expected: list[str]
) -> None:
    with pytest.raises(ValidationError) as caught:
        InstanceSpec.model_validate(fields)
    text = describe_validation_error(caught.value)
    for part in expected:
        assert part in text


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("10.0.0.5:8080", "10.0.0.5", 8080),
        ("users-1.internal:80", "users-1.internal", 80),
        ("[fd00::5]:8443", "fd00::5", 8443),
        ("localhost:1", "localhost", 1),
    ],
)
def test_valid_addresses(address: str, host: str, port: int) -> None:
    spec = InstanceSpec(address=address)
    assert (spec.host, spec.port) == (host, port)
    assert spec.ttl == 10.0


def test_metadata_is_kept_sorted_so_equal_specs_compare_equal() -> None:
    a = InstanceSpec(address="a:1", metadata={"b": "2", "a": "1"})
    b = InstanceSpec(address="a:1", metadata={"a": "1", "b": "2"})
    assert a == b
    assert list(a.metadata) == ["a", "b"]


@pytest.mark.parametrize("name", ["users", "u", "users-v2.eu_1", "9lives", "x" * 63])
def test_valid_names(name: str) -> None:
    assert check_name(name, "service") == name


@pytest.mark.parametrize("name", ["", "-users", "a/b", "a b", "x" * 64, "ünïcode"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidNameError) as caught:
        check_name(name, "instance id")
    assert caught.value.field == "instance id"
    assert str(caught.value).startswith("instance id: ")
    assert "use 1 to 63 letters, digits" in str(caught.value)


def _instance(service: str, instance_id: str, index: int) -> Instance:
    now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    spec = InstanceSpec(address="10.0.0.1:80", version="1.2", zone="eu", metadata={"k": "v"})
    return Instance.build(
        service, instance_id, spec, registered_at=now, last_heartbeat=now, index=index
    )


def test_snapshot_json_round_trips_for_one_service_and_for_all() -> None:
    one = Snapshot(
        index=7, instances=(_instance("users", "a", 5), _instance("users", "b", 7)), service="users"
    )
    body = one.to_json()
    assert body["service"] == "users"
    assert [i["id"] for i in body["instances"]] == ["a", "b"]
    assert Snapshot.from_json(body) == one

    every = Snapshot(index=9, instances=(_instance("orders", "x", 9), _instance("users", "a", 5)))
    body = every.to_json()
    assert set(body["services"]) == {"orders", "users"}
    assert Snapshot.from_json(body) == every
    assert every.by_service()["users"][0].spec == _instance("users", "a", 5).spec


def test_instance_rejects_bad_names_when_validated() -> None:
    body = _instance("users", "a", 1).model_dump(mode="json")
    body["service"] = "no/slash"
    with pytest.raises(ValidationError, match="not a valid service name"):
        Instance.model_validate(body)
