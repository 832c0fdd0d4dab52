"""Tests of the CAN acceptance filters (``CanDriver.can_filters`` and ``can.Bus(can_filters=...)``).

The core property, checked per driver configuration over the whole 11-bit id space in both
widths (and the 29-bit ids near the protocols' ids): a frame passes the driver's filters if
and only if its codec claims it (decodes values from it or calls it malformed). "If" means no
filter ever drops a frame the driver decodes; "only if" means the filters are exact. The
matcher below is written from python-can's documented rule, independent of the driver code,
and checked against python-can's own. Then a real ``virtual`` bus shared by several drivers
shows that each only receives its own frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import can
import pytest

from drivers import aemnet, haltech, megasquirt, obd2, rusefi, rusefi_wbo
from drivers.can_base import (
    EXT_ID_MASK,
    MAX_FILTERS,
    STD_ID_MASK,
    CanDriver,
    CanFrame,
    filters_match,
    frame_filters,
    frame_to_message,
    id_filters,
)
from drivers.dbc_driver import DbcDriver
from dynoai_daemon.channels import Sample
from dynoai_daemon.errors import ProtocolError

MS_DBC = str(Path(megasquirt.__file__).parent / "dbc" / "megasquirt.dbc")


def matches(filters: Sequence[Mapping[str, Any]] | None, arb: int, ext: bool) -> bool:
    """python-can's rule: ``(id & mask) == (can_id & mask)`` and the same id width."""
    if not filters:
        return True
    return any(
        f["extended"] == ext and (arb & f["can_mask"]) == (f["can_id"] & f["can_mask"])
        for f in filters
    )


def passes(drv: CanDriver, frame: CanFrame) -> bool:
    return matches(drv.can_filters(), frame[0], frame[2])


# --- id filters ----------------------------------------------------------------------------------


def test_id_filters_are_one_exact_filter_per_id() -> None:
    assert id_filters([0x191, 0x190, 0x190], extended=False) == [
        {"can_id": 0x190, "can_mask": STD_ID_MASK, "extended": False},
        {"can_id": 0x191, "can_mask": STD_ID_MASK, "extended": False},
    ]
    assert id_filters([0x180], extended=True) == [
        {"can_id": 0x180, "can_mask": EXT_ID_MASK, "extended": True}
    ]
    assert id_filters([], extended=False) == []
    with pytest.raises(ValueError):
        id_filters([0x800], extended=False)
    with pytest.raises(ValueError):
        id_filters([0x20000000], extended=True)


def test_frame_filters_split_widths_and_fall_back_to_everything() -> None:
    f = frame_filters([(0x123, False), (0x123, True)])
    assert f is not None and len(f) == 2
    assert matches(f, 0x123, False) and matches(f, 0x123, True)
    assert frame_filters([]) is None  # an empty list would mean "everything" to python-can
    ids = [(i, False) for i in range(MAX_FILTERS + 1)]
    assert frame_filters(ids) is None  # more than a socket takes: filter nothing
    assert len(frame_filters(ids[:MAX_FILTERS]) or []) == MAX_FILTERS


def test_filters_match_agrees_with_python_can() -> None:
    """Our matcher, the one in can_base and python-can's own BusABC filtering agree."""
    rng = random.Random(7)
    filters = id_filters([0x5F0, 0x5F1, 0x5F6, 0x624], extended=False)
    filters += id_filters([0x180, 0x181, 0x1F], extended=True)
    filters += obd2.Obd2Driver().can_filters()  # a hand-written mask filter
    bus = can.Bus(interface="virtual", channel=f"flt-{uuid.uuid4().hex}", can_filters=filters)
    try:
        cases = [(i, False) for i in range(0x800)] + [(i, True) for i in range(0x800)]
        cases += [(rng.randrange(EXT_ID_MASK + 1), True) for _ in range(500)]
        for arb, ext in cases:
            msg = can.Message(arbitration_id=arb, is_extended_id=ext, data=bytes(8))
            want = matches(filters, arb, ext)
            assert filters_match(filters, arb, ext) == want
            assert bus._matches_filters(msg) == want
    finally:
        bus.shutdown()


# --- per-driver property: pass <=> the codec claims the frame ------------------------------------

_WBO_PAYLOAD = bytes([rusefi_wbo.VERSION, 1, 0x10, 0x27, 0x0C, 0x03, 0, 0])
_OBD_PAYLOAD = obd2.encode_response(0x0C, 3000.0)[1]

# (name, factory, payloads that the driver's own frames decode with)
DriverCase = tuple[str, Callable[[], CanDriver], list[bytes]]
CASES: list[DriverCase] = [
    ("megasquirt", lambda: megasquirt.MegasquirtDriver(), [bytes(8)]),
    (
        "megasquirt_0x600_both",
        lambda: megasquirt.MegasquirtDriver(base_id="0x600", knock_cylinder="both"),
        [bytes(8)],
    ),
    ("megasquirt_passthrough", lambda: megasquirt.MegasquirtDriver(passthrough=True), [bytes(8)]),
    (
        "megasquirt_odd_base_map",
        lambda: megasquirt.MegasquirtDriver(
            base_id=0x3A5, channel_map={"rpm": "", "cold_adv_deg": "cold_adv", "afr_cyl8": "afr8"}
        ),
        [bytes(8)],
    ),
    ("rusefi", lambda: rusefi.RusefiDriver(), [bytes(8)]),
    ("rusefi_29bit", lambda: rusefi.RusefiDriver(base_id="0x700", extended=True), [bytes(8)]),
    ("haltech", lambda: haltech.HaltechDriver(), [bytes(8)]),
    (
        "dbc_two_groups",
        lambda: DbcDriver(dbc_file=MS_DBC, signals={"rpm": "rpm", "afr1": "afr_front"}),
        [bytes(8)],
    ),
    (
        "dbc_offset",
        lambda: DbcDriver(
            dbc_file=MS_DBC, signals={"MS_Group52.knock_retard": "k", "baro": "b"}, id_offset=-0x400
        ),
        [bytes(8)],
    ),
    ("aemnet", lambda: aemnet.AemNetDriver(), [bytes(8)]),
    (
        "aemnet_sparse",
        lambda: aemnet.AemNetDriver(channel_map={"1": "", "0x183": "a3", "9": "a9", "15": "a15"}),
        [bytes(8)],
    ),
    ("aemnet_four_channel", lambda: aemnet.AemNetDriver(four_channel=True), [bytes(8)]),
    (
        "aemnet_four_and_single",
        lambda: aemnet.AemNetDriver(four_channel=True, channel_map={"2": "afr_x"}),
        [bytes(8)],
    ),
    ("rusefi_wbo", lambda: rusefi_wbo.RusefiWboDriver(), [_WBO_PAYLOAD]),
    (
        "rusefi_wbo_nodiag_sparse",
        lambda: rusefi_wbo.RusefiWboDriver(
            diagnostics=False, channel_map={"3": "afr_3", "6": "afr_6"}
        ),
        [_WBO_PAYLOAD],
    ),
    (
        "rusefi_wbo_base",
        lambda: rusefi_wbo.RusefiWboDriver(base_id="0x6A1", channel_map={"4": "afr_4"}),
        [_WBO_PAYLOAD],
    ),
    ("obd2", lambda: obd2.Obd2Driver(), [_OBD_PAYLOAD]),
    ("obd2_29bit", lambda: obd2.Obd2Driver(extended=True), [_OBD_PAYLOAD]),
]

#: 29-bit ids near every protocol's ids (the whole 11-bit range is checked in both widths).
_EXT_EXTRA = [
    *range(obd2.RESPONSE_BASE_29 - 0x200, obd2.RESPONSE_BASE_29 + 0x300),
    obd2.FUNCTIONAL_ID_29,
    *range(0x18DB3300, 0x18DB3400),
    *(0x1FFFF000 + i for i in range(0x1000)),
    *(0x10000180 + i for i in range(32)),
]


def claims(drv: CanDriver, arb: int, ext: bool, payloads: list[bytes]) -> bool:
    """True when the codec gives values for the frame or calls it its own but malformed."""
    for data in payloads:
        try:
            out = drv.codec.decode(arb, data, ext)
        except ProtocolError:
            return True
        if out:
            return True
    return False


@pytest.mark.parametrize(("name", "factory", "payloads"), CASES, ids=[c[0] for c in CASES])
def test_filters_pass_exactly_the_frames_the_codec_decodes(
    name: str, factory: Callable[[], CanDriver], payloads: list[bytes]
) -> None:
    drv = factory()
    filters = drv.can_filters()
    assert filters, f"{name}: no filters"
    assert len(filters) <= MAX_FILTERS, f"{name}: {len(filters)} filters"
    for f in filters:
        assert set(f) == {"can_id", "can_mask", "extended"}
        full = EXT_ID_MASK if f["extended"] else STD_ID_MASK
        assert 0 <= f["can_id"] <= full and 0 <= f["can_mask"] <= full
    domain = [(i, False) for i in range(0x800)] + [(i, True) for i in range(0x800)]
    domain += [(i, True) for i in _EXT_EXTRA]
    dropped = [
        hex(a) for a, e in domain if claims(drv, a, e, payloads) and not matches(filters, a, e)
    ]
    assert not dropped, f"{name}: filters drop decoded frames {dropped}"
    extra = [
        hex(a) for a, e in domain if matches(filters, a, e) and not claims(drv, a, e, payloads)
    ]
    assert not extra, f"{name}: filters pass frames the codec does not want {extra}"


# --- where the filters go -----------------------------------------------------------------------


def test_bus_kwargs_carry_the_filters_unless_disabled_or_given() -> None:
    drv = megasquirt.MegasquirtDriver(interface="virtual", channel="x")
    kw = drv._bus_kwargs()
    assert kw["can_filters"] == drv.can_filters() != []
    off = megasquirt.MegasquirtDriver(interface="virtual", channel="x", bus_filters=False)
    assert "can_filters" not in off._bus_kwargs()
    mine = [{"can_id": 0x100, "can_mask": 0x700, "extended": False}]
    user = aemnet.AemNetDriver(bus_options={"can_filters": mine})
    assert user._bus_kwargs()["can_filters"] == mine
    top = aemnet.AemNetDriver(can_filters=mine)  # unknown options go to can.Bus
    assert top._bus_kwargs()["can_filters"] == mine
    none = aemnet.AemNetDriver(bus_options={"can_filters": None})  # "no filter", explicitly
    assert none._bus_kwargs()["can_filters"] is None


def test_drivers_without_wanted_frames_receive_everything() -> None:
    drv = aemnet.AemNetDriver(channel_map={"0": "", "1": ""})  # every sensor dropped
    assert drv.can_filters() is None
    assert "can_filters" not in drv._bus_kwargs()


def test_decode_capture_is_not_filtered(tmp_path: Path) -> None:
    path = tmp_path / "mixed.log"
    frames = [megasquirt.encode_group(0, {"rpm": 2000}), aemnet.encode(0, 1.0)]
    frames += [obd2.encode_request(0x0C), megasquirt.encode_group(4, {})]
    with can.Logger(str(path)) as writer:
        for i, f in enumerate(frames):
            m = frame_to_message(f, timestamp=1.0 + i)
            m.channel = "can0"
            writer.on_message_received(m)
    samples, stats = megasquirt.MegasquirtDriver.decode_capture(path, source="ecu")
    assert [s.channel for s in samples] == ["rpm"]
    # group 4 (no mapped signal) still counts as ours offline; the two others are foreign
    assert (stats.messages, stats.extra["other_frames"], stats.extra["records"]) == (2, 2, 4)


# --- a real shared bus --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(*drivers: CanDriver) -> AsyncIterator[None]:
    for d in drivers:
        await d.open()
    try:
        yield
    finally:
        for d in drivers:
            await d.close()


async def collect(drv: CanDriver, done: Callable[[list[Sample]], bool]) -> list[Sample]:
    got: list[Sample] = []

    async def run() -> None:
        async with contextlib.aclosing(drv.samples()) as it:
            async for batch in it:
                got.extend(batch)
                if done(got):
                    return

    await asyncio.wait_for(run(), 5.0)
    return got


def _has(channel: str) -> Callable[[list[Sample]], bool]:
    return lambda ss: any(s.channel == channel for s in ss)


@pytest.mark.parametrize("bus_filters", [True, False])
async def test_drivers_sharing_a_virtual_bus_only_receive_their_frames(
    channel: str, peer: can.BusABC, bus_filters: bool
) -> None:
    opts: dict[str, Any] = {
        "interface": "virtual",
        "channel": channel,
        "reconnect": False,
        "bus_filters": bus_filters,
    }
    ms = megasquirt.MegasquirtDriver(source="ecu", **opts)
    aem = aemnet.AemNetDriver(source="wb", **opts)
    wbo = rusefi_wbo.RusefiWboDriver(source="wbo", channel_map={"0": "afr_x", "1": ""}, **opts)
    async with running(ms, aem, wbo):
        foreign: list[CanFrame] = [
            obd2.encode_request(0x0C),
            obd2.encode_response(0x0C, 3000.0),
            haltech.encode(3000, 90, 50),
            (0x123, bytes(8), False),
            (0x5F0, bytes(8), True),  # MegaSquirt's id, but 29-bit
            (0x180, bytes(8), False),  # AEMnet's id, but 11-bit
            aemnet.encode(5, 1.0),  # an AEMnet sensor nobody maps
            rusefi_wbo.encode(1, 1.0),  # a wideband index mapped to nothing
            megasquirt.encode_group(7, {}),  # a group without a mapped signal
        ]
        ms_frames = [
            megasquirt.encode_group(0, {"rpm": 4000}),
            megasquirt.encode_group(52, {"knock_retard": 2.0}),
            megasquirt.encode_group(2, {"map": 95.0}),
        ]
        aem_frames = [aemnet.encode(1, 1.0), aemnet.encode(0, 0.9)]
        wbo_frames = [rusefi_wbo.encode_diag(0), rusefi_wbo.encode(0, 0.95)]
        for f in foreign:
            peer.send(frame_to_message(f))
        for f in [*ms_frames, *aem_frames, *wbo_frames]:  # each driver's last frame is last
            peer.send(frame_to_message(f))
        # Frames arrive in order, so once the last frame's values are in, all were seen.
        got_ms = await collect(ms, _has("map_kpa"))
        got_aem = await collect(aem, _has("afr_front"))
        got_wbo = await collect(wbo, _has("afr_x"))
    assert {s.source for s in got_ms + got_aem + got_wbo} == {"ecu", "wb", "wbo"}
    assert {s.channel for s in got_ms} >= {"rpm", "knock_front_deg", "map_kpa"}
    assert {s.channel for s in got_aem} >= {"afr_front", "afr_rear"}
    assert "wbo_wbo0_esr_ohm" in {s.channel for s in got_wbo}
    n_ms, n_aem, n_wbo = len(ms_frames), len(aem_frames), len(wbo_frames)
    total = len(foreign) + n_ms + n_aem + n_wbo
    if bus_filters:
        # group 7 is MegaSquirt's but carries no mapped signal, so it is filtered out too
        assert (ms.stats.messages, ms.stats.extra["other_frames"]) == (n_ms, 0)
        assert (aem.stats.messages, aem.stats.extra["other_frames"]) == (n_aem, 0)
        assert (wbo.stats.messages, wbo.stats.extra["other_frames"]) == (n_wbo, 0)
    else:  # control: without filters every driver wakes for every frame
        ms_all = n_ms + 1  # + group 7, decoded to nothing
        assert (ms.stats.messages, ms.stats.extra["other_frames"]) == (ms_all, total - ms_all)
        assert (aem.stats.messages, aem.stats.extra["other_frames"]) == (n_aem, total - n_aem)
        assert (wbo.stats.messages, wbo.stats.extra["other_frames"]) == (n_wbo, total - n_wbo)
    for d in (ms, aem, wbo):
        assert d.stats.bad_frames == 0


async def test_obd2_filtered_bus_still_polls_and_ignores_broadcasts(
    channel: str, peer: can.BusABC
) -> None:
    drv = obd2.Obd2Driver(
        interface="virtual", channel=channel, reconnect=False, pids={"rpm": 0.0}, timeout_s=0.5
    )
    ecu_bus = can.Bus(interface="virtual", channel=channel)
    responder = obd2.Obd2Responder(ecu_bus, {0x0C: 2500.0})
    try:
        responder.start()
        async with running(drv):
            for i in range(3):  # broadcasts from other sources on the same bus
                peer.send(frame_to_message(megasquirt.encode_group(0, {"rpm": 1000 + i})))
                peer.send(frame_to_message(aemnet.encode(0, 1.0)))
            got = await collect(drv, _has("rpm"))
        assert any(s.channel == "rpm" and s.value == 2500.0 for s in got)
        assert drv.stats.extra["other_frames"] == 0
        assert drv.stats.extra["replies"] >= 1
    finally:
        responder.stop()
        ecu_bus.shutdown()
