"""Topic and consumer settings: safe defaults, and bad values refused where declared."""

from __future__ import annotations

from typing import Any

import pytest

from meshgate.errors import ConfigError
from meshgate.events import ConsumerSettings, TopicSettings


def test_defaults_are_safe() -> None:
    topic = TopicSettings()
    assert (topic.retention, topic.storage, topic.replicas) == ("limits", "file", 1)
    assert topic.duplicate_window == 120
    consumer = ConsumerSettings()
    assert consumer.max_deliver == 5
    assert [consumer.delay(n) for n in (1, 2, 3, 4, 5, 9)] == [0.5, 2, 10, 30, 30, 30]


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"max_age": 0}, "TopicSettings.max_age"),
        ({"replicas": 7}, "TopicSettings.replicas"),
        ({"retention": "forever"}, "TopicSettings.retention"),
        ({"duplicate_window": 0}, "TopicSettings.duplicate_window"),
        ({"max_age": 60, "duplicate_window": 120}, "TopicSettings.duplicate_window"),
        ({"max_bytes": -1}, "TopicSettings.max_bytes"),
    ],
)
def test_bad_topic_settings_name_the_field(fields: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        TopicSettings(**fields)


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"max_deliver": 0}, "max_deliver"),
        ({"ack_wait": 0.5}, "ack_wait"),
        ({"backoff": ()}, "backoff"),
        ({"backoff": [1.0]}, "backoff"),
        ({"batch": 0}, "batch"),
    ],
)
def test_bad_consumer_settings_name_the_field(fields: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError, match=f"ConsumerSettings.{where}"):
        ConsumerSettings(**fields)
