"""CloudEvents 1.0 envelopes: encoding, decoding, topic names."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import BaseModel

from meshgate.errors import ConfigError
from meshgate.events import EnvelopeError, Event
from meshgate.events.envelope import check_topic, encode_data, new_event_id, stream_name


class Placed(BaseModel):
    order_id: int


def test_an_event_survives_the_trip_with_every_attribute() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    event = Event(
        id="abc",
        type="orders.placed",
        source="/orders",
        data={"order_id": 1},
        time=moment,
        subject="1",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    doc = json.loads(event.encode())
    assert doc == {
        "specversion": "1.0",
        "id": "abc",
        "source": "/orders",
        "type": "orders.placed",
        "time": "2026-01-02T03:04:05.678901Z",
        "datacontenttype": "application/json",
        "subject": "1",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "data": {"order_id": 1},
    }
    again = Event.decode(event.encode(), attempt=3)
    assert (again.id, again.type, again.source, again.data, again.time) == (
        "abc",
        "orders.placed",
        "/orders",
        {"order_id": 1},
        moment,
    )
    assert again.subject == again.key == "1"
    assert again.topic == "orders.placed"
    assert again.attempt == 3
    assert again.payload(Placed) == Placed(order_id=1)


def test_optional_attributes_are_left_out_when_absent() -> None:
    doc = json.loads(Event(id="x", type="a.b", source="/s", data=None).encode())
    assert "subject" not in doc
    assert "traceparent" not in doc


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"id": "x", "type": "t", "source": "/s"}', "specversion"),
        (b'{"specversion": "0.3", "id": "x", "type": "t", "source": "/s"}', "CloudEvents 1.0"),
        (
            b'{"specversion": "1.0", "id": "x", "type": "t", "source": "/s", "time": "soon"}',
            "time 'soon'",
        ),
    ],
)
def test_envelopes_meshgate_cannot_read_say_why(raw: bytes, message: str) -> None:
    with pytest.raises(EnvelopeError, match=message):
        Event.decode(raw)


def test_a_payload_that_does_not_fit_its_model_names_the_event() -> None:
    event = Event(id="e1", type="orders.placed", source="/o", data={"order_id": "x"})
    with pytest.raises(EnvelopeError, match=r"e1 \(orders.placed\) does not fit Placed"):
        event.payload(Placed)


def test_payloads_are_pydantic_models_or_json_values() -> None:
    assert encode_data(Placed(order_id=2)) == {"order_id": 2}
    assert encode_data([1, "a", None]) == [1, "a", None]
    with pytest.raises(EnvelopeError, match="set is not JSON"):
        encode_data({1, 2})


@pytest.mark.parametrize(
    "topic", ["orders.placed", "payments.charge-requested", "a", "users_v2.created", "a1.b2.c3"]
)
def test_valid_topics(topic: str) -> None:
    assert check_topic(topic) == topic


@pytest.mark.parametrize(
    "topic", ["", "orders..placed", ".a", "a.", "a b", "a.*", "a.>", "a__b", "_a", "a_", "é"]
)
def test_invalid_topics_are_refused_with_the_fix(topic: str) -> None:
    with pytest.raises(ConfigError, match="dot-separated words"):
        check_topic(topic)


def test_stream_names_of_two_topics_never_collide() -> None:
    assert stream_name("orders.placed") == "orders__placed"
    assert stream_name("a_b.c") != stream_name("a.b_c")


def test_event_ids_are_unique_and_sort_by_time() -> None:
    ids = [new_event_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 32 for i in ids)
    assert ids[0][:12] <= ids[-1][:12]
