"""Fixtures shared by the CAN driver tests: a fresh python-can virtual channel and a
peer bus on it (the other end: an ECU, a wideband controller, a test sender)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import can
import pytest


@pytest.fixture
def channel() -> str:
    return f"dynoai-test-{uuid.uuid4().hex}"


@pytest.fixture
def peer(channel: str) -> Iterator[can.BusABC]:
    bus = can.Bus(interface="virtual", channel=channel)
    try:
        yield bus
    finally:
        bus.shutdown()
