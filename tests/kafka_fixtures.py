"""Kafka fixtures: one Tansu broker per test session, unique topic names.

``tests/conftest.py`` imports them (``from tests.kafka_fixtures import *``);
another suite can list ``pytest_plugins = ["tests.kafka_fixtures"]`` instead.

* ``kafka_broker``: a running ``LocalBroker`` (``.bootstrap`` is host:port).
* ``kafka_topic``: a fresh topic name for this test (not created).
* ``make_topic(partitions=1)``: creates a fresh topic and returns its name.

Consumers in tests should pass ``LOCAL_GROUP_SETTINGS`` (or settings at least
as short) so that group joins take about a second against Tansu.
"""

from __future__ import annotations

import re
import secrets

import pytest

from tomd.alerts.broker import LocalBroker, create_topics, tansu_binary

__all__ = ["kafka_broker", "kafka_topic", "make_topic"]


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    try:
        tansu_binary()
    except FileNotFoundError as exc:
        pytest.fail(f"Kafka tests need the Tansu broker: {exc}")
    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    # The broker starts once per session, often while other tests load both cores: give it time.
    with LocalBroker(log_path=log_path, startup_timeout=90.0) as broker:
        yield broker


@pytest.fixture
def kafka_topic(request) -> str:
    """A topic name no other test uses: the test's name plus a random suffix."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:60].strip("-")
    return f"{stem}-{secrets.token_hex(3)}"


@pytest.fixture
def make_topic(kafka_broker, kafka_topic):
    """``make_topic(partitions=1, suffix="")`` creates a fresh topic; returns its name."""

    def make(partitions: int = 1, suffix: str = "") -> str:
        name = kafka_topic + suffix
        create_topics(kafka_broker.bootstrap, {name: partitions}, timeout=60.0)
        return name

    return make
