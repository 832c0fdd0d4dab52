"""ChannelArbiter: one source per channel, by config order, with take-over on silence."""

from __future__ import annotations

from dynoai_daemon.channels import Sample
from dynoai_daemon.service.arbiter import ChannelArbiter


def s(t: float, channel: str, source: str, value: float = 1.0) -> Sample:
    return Sample(t, channel, value, source, None)


def test_first_listed_source_owns_a_shared_channel() -> None:
    arb = ChannelArbiter(["ecu", "dyno"], hold_s=0.5)
    assert arb.admit(s(0.00, "rpm", "ecu", 3000))
    assert not arb.admit(s(0.01, "rpm", "dyno", 3400))
    assert arb.admit(s(0.02, "rpm", "ecu", 3010))
    # A channel only the dyno reports is the dyno's.
    assert arb.admit(s(0.03, "torque_ftlb", "dyno", 80))
    assert arb.shadowed == 1


def test_higher_priority_takes_a_channel_from_a_lower_one_at_once() -> None:
    arb = ChannelArbiter(["ecu", "dyno"], hold_s=0.5)
    assert arb.admit(s(0.0, "rpm", "dyno"))  # the ECU is not up yet
    assert arb.admit(s(0.1, "rpm", "ecu"))
    assert not arb.admit(s(0.2, "rpm", "dyno"))
    assert arb.owner_of("rpm") == 0


def test_lower_priority_fills_in_after_the_owner_goes_silent_and_yields_back() -> None:
    arb = ChannelArbiter(["ecu", "dyno"], hold_s=0.5)
    assert arb.admit(s(1.0, "rpm", "ecu"))
    assert not arb.admit(s(1.5, "rpm", "dyno"))  # exactly hold_s: still the ECU's
    assert arb.admit(s(1.51, "rpm", "dyno"))  # ECU silent > hold_s: the dyno fills in
    assert arb.owner_of("rpm") == 1
    assert arb.admit(s(1.6, "rpm", "dyno"))
    assert arb.admit(s(1.7, "rpm", "ecu"))  # back: the ECU owns it again
    assert not arb.admit(s(1.8, "rpm", "dyno"))
    assert arb.shadowed == 2


def test_unlisted_source_ranks_last_and_silence_is_per_channel() -> None:
    arb = ChannelArbiter(["ecu"], hold_s=0.5)
    assert arb.admit(s(0.0, "map_kpa", "ecu"))
    assert arb.admit(s(0.0, "rpm", "ecu"))
    assert not arb.admit(s(0.1, "map_kpa", "probe"))
    # The ECU keeps sending MAP but stopped sending RPM: only RPM is taken over.
    assert arb.admit(s(0.9, "map_kpa", "ecu"))
    assert arb.admit(s(0.9, "rpm", "probe"))
    assert not arb.admit(s(0.95, "map_kpa", "probe"))
