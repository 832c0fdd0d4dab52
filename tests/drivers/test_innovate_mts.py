"""Innovate MTS codec and driver decoding: golden vectors worked out by hand (not from our
encoder) from Innovate's OT-2 SDK manual, "Packets in General" / "Data Packets" / "Aux
Channels" (pp. 13-17, which restate Innovate's Serial Protocol 2), cross-checked with
ohhorob/arduino-digihead lib/MTS/src/Packet.cpp; framing under any chunking, resync on
garbage, and a hypothesis fuzz of the stream decoder."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.innovate_mts import (
    AuxItem,
    InnovateMtsDriver,
    LambdaItem,
    MtsDecoder,
    MtsPacket,
    decode_packet,
    encode_header,
    encode_packet,
    header_length,
    is_header,
    lambda_item,
    status_item,
)
from drivers.registry import create_driver, driver_class
from dynoai_daemon.channels import SensorStatus
from dynoai_daemon.errors import ConfigError, InputError, ProtocolError

# --------------------------------------------------------------------------- golden vectors
#
# LC-2, one sensor: B2 82 43 13 01 3A
#   header 0xB282 = 1011 0010 1000 0010: bits 15,13,9,7 set (0xA280 mask ok), bit 14 = 0
#   (not recording), bit 12 = 1 (data), bit 8 = 0, bits 6..0 = 2 -> 2 words, 6 bytes.
#   status 0x4313 = 0100 0011 0001 0011: (w & 0x4200) == 0x4200; F = bits 12..10 = 000
#   (normal); AF = bit 8 (1) as bit 7 -> 128, + bits 6..0 (0x13 = 19) = 147.
#   lambda bytes 01 3A: L = (0x01 & 0x3F) << 7 | (0x3A & 0x7F) = 128 + 58 = 186.
#   lambda = (186 + 500) / 1000 = 0.686; AFR = 686 * 147 / 10000 = 10.0842.
LC2_NORMAL = bytes.fromhex("B282 4313 013A")

# Free air: F = 001 -> status 0x4200 | 1 << 10 | 0x100 | 0x13 = 0x4713; O2 level L = 209
# (20.9 %) = 1 * 128 + 81 -> bytes 01 51. Must give no lambda and no AFR (a reader that
# ignores F turns 209 into a bogus lean AFR).
LC2_FREE_AIR = bytes.fromhex("B282 4713 0151")

# Warming up: F = 100 -> 0x4200 | 0x1000 | 0x100 | 0x13 = 0x5313; L = 500 (50.0 % of
# operating temperature) = 3 * 128 + 116 -> bytes 03 74.
LC2_WARMUP = bytes.fromhex("B282 5313 0374")

# Error: F = 110 -> 0x4200 | 0x1800 | 0x100 | 0x13 = 0x5B13; L = 2 (heater open) -> 00 02.
LC2_ERROR = bytes.fromhex("B282 5B13 0002")

# Two chained sensors: header B2 84 (4 words, 10 bytes). Second L bytes 02 0C:
# L = 2 << 7 | 0x0C = 268 -> lambda 0.768, AFR = 768 * 147 / 10000 = 11.2896.
CHAIN2 = bytes.fromhex("B284 4313 013A 4313 020C")

# LM-2: one lambda pair + 4 aux words = 6 words -> header 0xA280 | 0x1000 | 6 = B2 86.
# Aux value = ((w & 0xFF00) >> 1) | (w & 0xFF):
#   07 7F -> 0x0700 >> 1 = 0x380 = 896, | 0x7F = 1023
#   04 00 -> 0x0400 >> 1 = 0x200 = 512
#   00 00 -> 0
#   02 2C -> 0x0200 >> 1 = 256, | 0x2C (44) = 300
LM2_AUX = bytes.fromhex("B286 4313 013A 077F 0400 0000 022C")

# Recording flag: bit 14 set -> 0xB282 | 0x4000 = 0xF282.
LC2_RECORDING = bytes.fromhex("F282 4313 013A")

# Command reply: bit 12 clear -> 0xA280 | 1 word = A2 81, one payload word 00 05.
REPLY = bytes.fromhex("A281 0005")


def one(data: bytes) -> MtsPacket:
    dec = MtsDecoder()
    pkts = dec.feed(data)
    assert len(pkts) == 1, pkts
    assert dec.pending == 0 and dec.skipped_bytes == 0 and dec.bad_frames == 0
    return pkts[0]


def test_golden_lc2_normal() -> None:
    pkt = one(LC2_NORMAL)
    assert pkt.is_data and not pkt.recording and pkt.size == 6
    assert pkt.words == (0x4313, 0x013A)
    (item,) = pkt.items
    assert item == LambdaItem(function=0, af=147, l_value=186)
    assert item.status is SensorStatus.NORMAL
    assert item.lambda_value == pytest.approx(0.686)
    assert item.afr == pytest.approx(10.0842)


def test_golden_free_air_gives_no_afr() -> None:
    (item,) = one(LC2_FREE_AIR).items
    assert isinstance(item, LambdaItem)
    assert item.function == 1 and item.status is SensorStatus.O2_LEVEL
    assert item.l_value == 209 and item.af == 147
    assert item.lambda_value is None and item.afr is None


def test_golden_warmup_and_error() -> None:
    (warm,) = one(LC2_WARMUP).items
    assert isinstance(warm, LambdaItem)
    assert warm.status is SensorStatus.WARMING_UP and warm.l_value == 500 and warm.afr is None
    (err,) = one(LC2_ERROR).items
    assert isinstance(err, LambdaItem)
    assert err.status is SensorStatus.ERROR and err.l_value == 2
    assert err.error == "heater open" and err.afr is None


def test_golden_chain_of_two() -> None:
    pkt = one(CHAIN2)
    assert header_length(0xB284) == 4 and pkt.size == 10
    a, b = pkt.lambdas
    assert a.afr == pytest.approx(10.0842)
    assert b.l_value == 268
    assert b.lambda_value == pytest.approx(0.768)
    assert b.afr == pytest.approx(11.2896)


def test_golden_lm2_aux() -> None:
    pkt = one(LM2_AUX)
    assert [type(i) for i in pkt.items] == [LambdaItem, AuxItem, AuxItem, AuxItem, AuxItem]
    assert [a.value for a in pkt.aux] == [1023, 512, 0, 300]


def test_golden_recording_and_reply() -> None:
    assert one(LC2_RECORDING).recording
    reply = one(REPLY)
    assert not reply.is_data and reply.items == () and reply.words == (5,)


def test_long_packet_length_uses_bit_8() -> None:
    # 129 words: bit 8 carries length bit 7 -> 0xA280 | 0x1000 | 0x100 | 0x01 = 0xB381.
    assert encode_header(129) == bytes.fromhex("B381")
    assert is_header(0xB381) and header_length(0xB381) == 129
    data = bytes.fromhex("B381") + bytes.fromhex("0001") * 129
    pkt = one(data)
    # 2 * (129 + 1) = 260 bytes, not "len + 4".
    assert pkt.size == 260 == len(data)
    assert len(pkt.aux) == 129


def test_encoder_reproduces_golden_vectors() -> None:
    assert encode_packet([LambdaItem(0, 147, 186)]) == LC2_NORMAL
    assert encode_packet([lambda_item(0.686)]) == LC2_NORMAL
    assert encode_packet([status_item(SensorStatus.O2_LEVEL, 209)]) == LC2_FREE_AIR
    assert encode_packet([status_item(SensorStatus.WARMING_UP, 500)]) == LC2_WARMUP
    assert encode_packet([status_item(SensorStatus.ERROR, 2)]) == LC2_ERROR
    assert encode_packet([lambda_item(0.686), lambda_item(0.768)]) == CHAIN2
    aux = [AuxItem(v) for v in (1023, 512, 0, 300)]
    assert encode_packet([lambda_item(0.686), *aux]) == LM2_AUX
    assert encode_packet([lambda_item(0.686)], recording=True) == LC2_RECORDING
    assert encode_packet([5], is_data=False) == REPLY


def test_encoder_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        encode_packet([AuxItem(1024)])
    with pytest.raises(ValueError):
        encode_packet([LambdaItem(0, 147, 8192)])
    with pytest.raises(ValueError):
        encode_packet([0x0080])  # bit 7 set: not a data word
    with pytest.raises(ValueError):
        encode_header(256)
    with pytest.raises(ValueError):
        lambda_item(math.nan)
    # Lambda saturates like a real controller instead of wrapping.
    assert lambda_item(0.1).l_value == 0 and lambda_item(20.0).l_value == 8191


# --------------------------------------------------------------------------- framing


def test_decode_packet_low_level() -> None:
    assert decode_packet(b"") == (0, None)
    assert decode_packet(LC2_NORMAL[:5]) == (0, None)  # need more
    n, pkt = decode_packet(LC2_NORMAL + b"\x01")
    assert n == 6 and pkt is not None and pkt.lambdas[0].l_value == 186
    n, pkt = decode_packet(b"\x01\x02" + LC2_NORMAL)
    assert (n, pkt) == (2, None)  # garbage before the header
    n, pkt = decode_packet(bytes.fromhex("B282 4313") + LC2_NORMAL)
    assert (n, pkt) == (1, None)  # cut short by the next header
    # A lone byte that could start a header is kept, not dropped.
    assert decode_packet(b"\xb2") == (0, None)


def test_split_and_byte_by_byte() -> None:
    stream = LC2_NORMAL + CHAIN2 + LM2_AUX + REPLY + LC2_ERROR
    whole = MtsDecoder().feed(stream)
    assert len(whole) == 5
    for cut in range(1, len(stream)):
        dec = MtsDecoder()
        got = dec.feed(stream[:cut]) + dec.feed(stream[cut:])
        assert got == whole, cut
    dec = MtsDecoder()
    got = []
    for b in stream:
        got += dec.feed(bytes([b]))
    assert got == whole
    assert dec.skipped_bytes == 0 and dec.bad_frames == 0 and dec.pending == 0
    assert dec.packets == 5 and dec.replies == 1


def test_resync_on_garbage() -> None:
    dec = MtsDecoder()
    garbage = bytes([0x00, 0x7F, 0x12, 0x81, 0xFF, 0x55])
    pkts = dec.feed(garbage + LC2_NORMAL + garbage + CHAIN2)
    assert [p.size for p in pkts] == [6, 10]
    assert dec.skipped_bytes == 2 * len(garbage)
    assert dec.bad_frames == 0


def test_truncated_packet_is_bad_and_next_one_survives() -> None:
    dec = MtsDecoder()
    # The first packet loses its last two bytes (a glitch); the next header cuts it short.
    pkts = dec.feed(CHAIN2[:-2] + LC2_NORMAL)
    assert len(pkts) == 1 and pkts[0].lambdas[0].l_value == 186
    assert dec.bad_frames == 1 and dec.bad_packets == 1
    assert dec.skipped_bytes == len(CHAIN2) - 2


def test_status_word_without_lambda_word_is_bad() -> None:
    dec = MtsDecoder()
    # Header says 1 word, the word is a lambda status word: the pair is incomplete.
    bad = bytes.fromhex("B281 4313")
    assert dec.feed(bad + LC2_NORMAL) == [one(LC2_NORMAL)]
    assert dec.bad_frames == 1 and dec.skipped_bytes == 4


def test_flush_counts_cut_off_tail() -> None:
    dec = MtsDecoder()
    assert dec.feed(LC2_NORMAL + LC2_NORMAL[:3]) == [one(LC2_NORMAL)]
    assert dec.pending == 3
    assert dec.flush() == []
    assert dec.skipped_bytes == 3 and dec.pending == 0


# --------------------------------------------------------------------------- hypothesis

items_st = st.one_of(
    st.builds(
        LambdaItem,
        function=st.integers(0, 7),
        af=st.integers(0, 255),
        l_value=st.integers(0, 8191),
    ),
    st.builds(AuxItem, st.integers(0, 1023)),
)
packet_st = st.builds(
    lambda items, rec: encode_packet(items, rec),
    st.lists(items_st, min_size=0, max_size=8),
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=1500), cuts=st.lists(st.integers(1, 64), max_size=40))
def test_fuzz_any_bytes(data: bytes, cuts: list[int]) -> None:
    """Any bytes, any chunking: clean packets or ProtocolError, every byte accounted for."""
    whole_dec = MtsDecoder()
    try:
        whole = whole_dec.feed(data)
    except ProtocolError:
        return
    dec = MtsDecoder()
    got: list[MtsPacket] = []
    pos = 0
    for c in cuts:
        got += dec.feed(data[pos : pos + c])
        pos += c
    got += dec.feed(data[pos:])
    assert got == whole
    assert dec.skipped_bytes == whole_dec.skipped_bytes
    assert dec.bad_frames == whole_dec.bad_frames
    assert sum(p.size for p in got) + dec.skipped_bytes + dec.pending == len(data)
    assert dec.pending <= 2 * 256
    for p in got:  # what was decoded re-encodes to a packet that decodes to itself
        assert one(encode_packet(p.words, p.recording, is_data=p.is_data)) == p


@settings(max_examples=200, deadline=None)
@given(packets=st.lists(packet_st, min_size=1, max_size=6), garbage=st.binary(max_size=40))
def test_fuzz_packet_after_any_garbage_is_recovered(packets: list[bytes], garbage: bytes) -> None:
    """Whatever precedes it, a well-formed packet stream is decoded exactly."""
    dec = MtsDecoder()
    got = dec.feed(garbage + b"".join(packets))
    tail = got[-len(packets) :]
    assert [encode_packet(p.items, p.recording) for p in tail] == packets


@settings(max_examples=200, deadline=None)
@given(
    packets=st.lists(packet_st, min_size=1, max_size=6),
    noise=st.lists(st.binary(max_size=12).map(lambda b: bytes(x & 0x7F for x in b)), max_size=6),
)
def test_fuzz_data_like_noise_between_packets(packets: list[bytes], noise: list[bytes]) -> None:
    """Noise without header bytes between packets is skipped and counted byte for byte."""
    stream = b""
    for i, p in enumerate(packets):
        stream += (noise[i] if i < len(noise) else b"") + p
    dec = MtsDecoder()
    got = []
    for i in range(0, len(stream), 7):
        got += dec.feed(stream[i : i + 7])
    assert [encode_packet(p.items, p.recording) for p in got] == packets
    assert dec.skipped_bytes == sum(len(n) for n in noise[: len(packets)])
    assert dec.bad_frames == 0


# --------------------------------------------------------------------------- driver decoding


def test_driver_samples_from_packets() -> None:
    drv = InnovateMtsDriver(source="wb")
    out: list = []
    stream = CHAIN2 + LM2_AUX + LC2_FREE_AIR + LC2_ERROR + REPLY
    assert drv.ingest(stream, 5.0, out) == 4  # the command reply is not a data message
    by = [(s.channel, s.value) for s in out]
    assert all(s.t == 5.0 and s.source == "wb" for s in out)
    # CHAIN2: both sensors normal; AFR = lambda x 14.7 (0.686 x 14.7 = 10.0842).
    assert by[:4] == [
        ("afr_front", pytest.approx(10.0842)),
        ("afr_front_status", 0.0),
        ("afr_rear", pytest.approx(0.768 * 14.7)),
        ("afr_rear_status", 0.0),
    ]
    # LM2_AUX: one lambda, then aux channels named after the source.
    assert by[4:10] == [
        ("afr_front", pytest.approx(10.0842)),
        ("afr_front_status", 0.0),
        ("wb_aux0", 1023.0),
        ("wb_aux1", 512.0),
        ("wb_aux2", 0.0),
        ("wb_aux3", 300.0),
    ]
    # Free air: no AFR, detail 209, status O2_LEVEL. Error: detail = code 2, status ERROR.
    assert by[10:] == [
        ("afr_front_detail", 209.0),
        ("afr_front_status", float(SensorStatus.O2_LEVEL)),
        ("afr_front_detail", 2.0),
        ("afr_front_status", float(SensorStatus.ERROR)),
    ]
    st_ = drv.sync_stats()
    assert st_.messages == 4 and st_.bad_frames == 0 and st_.last_seen == 5.0
    assert st_.extra["command_replies"] == 1 and st_.extra["aux_items"] == 4


def test_driver_reports_gasoline_scale_and_custom_channels() -> None:
    # A controller set to methanol (AF 6.4 -> 64) still reports lambda 0.686; the driver
    # reports lambda x stoich, so 0.686 x 14.7 = 10.0842 and with stoich 14.64 -> 10.043.
    pkt = encode_packet([LambdaItem(0, 64, 186), LambdaItem(0, 64, 186), lambda_item(1.0)])
    drv = InnovateMtsDriver(channels=["afr_rear"], stoich=14.64, channel_map={"afr_rear": "x"})
    out: list = []
    drv.ingest(pkt, 1.0, out)
    vals = {s.channel: s.value for s in out}
    assert vals["x"] == pytest.approx(0.686 * 14.64)
    # Positions beyond the configured list get source-named channels.
    assert vals["innovate_mts_afr1"] == pytest.approx(0.686 * 14.64)
    assert vals["innovate_mts_afr2"] == pytest.approx(14.64)
    assert vals["x_status"] == 0.0


def test_driver_options_validated() -> None:
    with pytest.raises(ConfigError):
        InnovateMtsDriver(stoich=0)
    with pytest.raises(ConfigError):
        InnovateMtsDriver(channels="afr_front")
    with pytest.raises(ConfigError):
        InnovateMtsDriver(baudrate=-1)
    with pytest.raises(ConfigError, match="baud"):
        InnovateMtsDriver(baud=19200)  # a typo in the config is named, not a TypeError
    with pytest.raises(ConfigError):
        InnovateMtsDriver(poll_interval_s=0)


def test_registered_by_name() -> None:
    drv = create_driver("innovate_mts", source="wb", port="/dev/dynoai-lm2")
    assert isinstance(drv, InnovateMtsDriver)
    assert (drv.kind, drv.baudrate, drv.port, drv.source) == (
        "serial",
        19200,
        "/dev/dynoai-lm2",
        "wb",
    )
    assert driver_class("aem_serial").__name__ == "AemSerialDriver"
    assert driver_class("serial_csv").__name__ == "SerialCsvDriver"


def test_decode_capture_nominal_timing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cap = tmp_path / "lm2.bin"
    cap.write_bytes(b"\x00\x01" + LC2_NORMAL + CHAIN2 + REPLY + LC2_WARMUP + LC2_NORMAL[:4])
    samples, stats = InnovateMtsDriver.decode_capture(cap, source="wb")
    times = sorted({s.t for s in samples})
    assert times == pytest.approx([0.0, 0.08192, 2 * 0.08192])
    assert stats.messages == 3
    assert stats.skipped_bytes == 2 + 4  # leading junk + the cut-off last packet
    assert stats.bad_frames == 0
    warm = [s for s in samples if s.t == times[2]]
    assert {s.channel: s.value for s in warm} == {
        "afr_front_detail": 500.0,
        "afr_front_status": float(SensorStatus.WARMING_UP),
    }
    same, _ = InnovateMtsDriver.decode_capture(cap.read_bytes(), source="wb")
    assert same == samples
    with pytest.raises(InputError):
        InnovateMtsDriver.decode_capture(tmp_path / "missing.bin")
