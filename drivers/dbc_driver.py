"""DBC-described CAN protocols: a cantools codec with a compiled fast path, and the ``dbc`` driver.

:class:`DbcCodec` decodes the messages of a cantools database into channels through a
*route* table (signal -> channel, with an optional linear unit conversion such as degC ->
degF or lambda -> AFR). Messages whose routed signals are all byte-aligned integers get a
precompiled ``struct`` decoder (about 5x faster than cantools for broadcast frames); all
others go through ``cantools``. Both paths give the same numbers (a test compares them on
random frames). The shipped ECU protocols (MegaSquirt, rusEFI, Haltech) are DBC files under
``drivers/dbc`` decoded with this codec, so that users with another ECU can drop in their
own DBC through :class:`DbcDriver` (option ``dbc_file`` plus ``signals``: signal -> channel;
unmapped signals are ignored).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import cantools
from cantools.database.can import Database, Message

from drivers.can_base import (
    EXT_ID_MASK,
    ByteLike,
    CanDriver,
    CanFilter,
    CanFrame,
    Decoded,
    frame_filters,
    parse_int,
)
from dynoai_daemon.errors import ConfigError, ProtocolError

Route = tuple[str, float, float]
"""``(channel, mul, add)``: channel value = physical signal value * mul + add."""

FastDecoder = Callable[[ByteLike], Decoded]

_INT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_EXT_FLAG = 0x80000000  # marks 29-bit ids in the plan keys


def load_packaged_dbc(name: str) -> Database:
    """Load a DBC shipped in ``drivers/dbc`` (e.g. ``"megasquirt.dbc"``)."""
    text = resources.files("drivers.dbc").joinpath(name).read_text(encoding="utf-8")
    db = cantools.database.load_string(text, database_format="dbc", strict=True)
    assert isinstance(db, Database)
    return db


def load_dbc_file(path: str | Path) -> Database:
    """Load a user's DBC file.

    Raises:
        ConfigError: the file is missing or not a valid DBC.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"dbc_file {str(p)!r} does not exist", field="dbc_file")
    try:
        db = cantools.database.load_file(str(p), database_format="dbc", strict=True)
    except Exception as exc:  # cantools raises several unrelated types for a bad file
        raise ConfigError(
            f"dbc_file {str(p)!r} is not a valid DBC: {exc}", field="dbc_file"
        ) from exc
    if not isinstance(db, Database):
        raise ConfigError(f"dbc_file {str(p)!r} is not a CAN database", field="dbc_file")
    return db


def signal_names(db: Database) -> set[str]:
    """Return every routable key of ``db``: ``Signal`` and ``Message.Signal``."""
    out: set[str] = set()
    for m in db.messages:
        for s in m.signals:
            out.add(s.name)
            out.add(f"{m.name}.{s.name}")
    return out


def build_routes(
    db: Database,
    defaults: Mapping[str, Sequence[Route]],
    overrides: Mapping[str, str | Sequence[str]] | None = None,
    *,
    what: str = "channel_map",
) -> dict[str, list[Route]]:
    """Merge a protocol's default routes with the user's ``signal -> channel`` overrides.

    An override keeps the default's unit conversion (mapping ``clt`` elsewhere still
    converts degC to degF); an empty channel name drops the signal; a list fans one
    signal out to several channels.

    Raises:
        ConfigError: an override names a signal the database does not have.
    """
    known = signal_names(db)
    routes: dict[str, list[Route]] = {k: list(v) for k, v in defaults.items()}
    for sig, chans in (overrides or {}).items():
        if sig not in known:
            raise ConfigError(f"{what}: unknown signal {sig!r}", field=what)
        names = [chans] if isinstance(chans, str) else list(chans)
        base = defaults.get(sig) or [("", 1.0, 0.0)]
        mul, add = base[0][1], base[0][2]
        routes[sig] = [(c, mul, add) for c in names if c]
    return {k: v for k, v in routes.items() if v}


def compile_fast_decoder(
    message: Message, routes: Sequence[tuple[str, str, float, float]]
) -> FastDecoder | None:
    """Build a ``struct``-based decoder for the routed signals of ``message``.

    Args:
        message: the cantools message.
        routes: ``(signal_name, channel, mul, add)`` entries.

    Returns:
        A function of the frame data, or None when a routed signal is not a byte-aligned
        8/16/32/64-bit integer, the message is multiplexed, or multi-byte signals mix byte
        orders (cantools handles those).
    """
    if message.is_multiplexed():
        return None
    sigs = {s.name: s for s in message.signals}
    fields: dict[str, tuple[int, int, bool]] = {}
    orders: set[str] = set()
    for sig_name, *_ in routes:
        s = sigs.get(sig_name)
        if s is None or s.is_float or s.length not in (8, 16, 32, 64):
            return None
        if s.byte_order == "big_endian":
            if s.start % 8 != 7:
                return None
        elif s.start % 8 != 0:
            return None
        nbytes = s.length // 8
        if nbytes > 1:
            orders.add(s.byte_order)
        fields[sig_name] = (s.start // 8, nbytes, bool(s.is_signed))
    if len(orders) > 1:
        return None
    prefix = "<" if orders == {"little_endian"} else ">"
    fmt = prefix
    pos = 0
    index: dict[str, int] = {}
    for i, (name, (first, nbytes, signed)) in enumerate(
        sorted(fields.items(), key=lambda kv: kv[1][0])
    ):
        if first < pos:
            return None  # overlapping signals
        fmt += "x" * (first - pos)
        code = _INT_CODES[nbytes]
        fmt += code.lower() if signed else code
        pos = first + nbytes
        index[name] = i
    if pos > message.length:
        return None
    unpack = struct.Struct(fmt).unpack_from
    spec: list[tuple[int, str, float, float]] = []
    for sig_name, channel, mul, add in routes:
        s = sigs[sig_name]
        scale, offset = float(s.scale), float(s.offset)
        spec.append((index[sig_name], channel, scale * mul, offset * mul + add))

    def decode(data: ByteLike) -> Decoded:
        raw = unpack(data)
        return [(ch, raw[i] * a + b) for i, ch, a, b in spec]

    return decode


@dataclass
class _Plan:
    message: Message
    routes: list[tuple[str, str, float, float]]
    fast: FastDecoder | None


class DbcCodec:
    """Pure codec for the messages of a cantools database.

    Args:
        db: the database.
        routes: signal key (``Signal`` or ``Message.Signal``) -> list of ``(channel, mul,
            add)``. Signals without a route are dropped unless ``passthrough_prefix`` is set.
        id_offset: added to every DBC frame id (a configurable base id).
        extended: force 11-bit (False) or 29-bit (True) ids; None keeps the DBC's.
        passthrough_prefix: emit unrouted signals as ``<prefix>_<signal>``.
        fast: use the compiled struct decoders where possible.
        strict_length: a frame whose length differs from the DBC's is a ProtocolError (else
            only shorter frames are).

    Raises:
        ConfigError: a shifted id leaves the id space.
    """

    def __init__(
        self,
        db: Database,
        routes: Mapping[str, Sequence[Route]],
        *,
        id_offset: int = 0,
        extended: bool | None = None,
        passthrough_prefix: str | None = None,
        fast: bool = True,
        strict_length: bool = True,
    ) -> None:
        self.db = db
        self.id_offset = id_offset
        self.strict_length = strict_length
        self.counters: dict[str, int] = {"cantools_decodes": 0, "fast_decodes": 0}
        self._plans: dict[int, _Plan] = {}
        self._by_name: dict[str, tuple[int, bool, Message]] = {}
        for m in db.messages:
            ext = bool(m.is_extended_frame) if extended is None else extended
            arb = m.frame_id + id_offset
            limit = 0x1FFFFFFF if ext else 0x7FF
            if not 0 <= arb <= limit:
                raise ConfigError(
                    f"message {m.name}: id {arb:#x} outside the {'29' if ext else '11'}-bit range",
                    field="base_id",
                )
            plan_routes: list[tuple[str, str, float, float]] = []
            for s in m.signals:
                rs = routes.get(f"{m.name}.{s.name}")
                if rs is None:
                    rs = routes.get(s.name)
                if rs is None and passthrough_prefix is not None:
                    rs = [(f"{passthrough_prefix}_{s.name}", 1.0, 0.0)]
                for ch, mul, add in rs or ():
                    plan_routes.append((s.name, ch, float(mul), float(add)))
            fast_dec = compile_fast_decoder(m, plan_routes) if (fast and plan_routes) else None
            self._plans[_key(arb, ext)] = _Plan(m, plan_routes, fast_dec)
            self._by_name[m.name] = (arb, ext, m)

    def decode(self, arbitration_id: int, data: ByteLike, is_extended: bool) -> Decoded | None:
        """Decode a frame; None when its id is not in the database.

        Raises:
            ProtocolError: wrong length for its message.
        """
        plan = self._plans.get(arbitration_id | (_EXT_FLAG if is_extended else 0))
        if plan is None:
            return None
        n = len(data)
        want = plan.message.length
        if n != want and (self.strict_length or n < want):
            raise ProtocolError(
                f"{plan.message.name}: {n} data bytes, expected {want} (id {arbitration_id:#x})"
            )
        if not plan.routes:
            return []
        if plan.fast is not None:
            self.counters["fast_decodes"] += 1
            return plan.fast(data)
        return self.decode_slow(plan, data)

    def decode_with_cantools(
        self, arbitration_id: int, data: ByteLike, is_extended: bool
    ) -> Decoded | None:
        """Decode through cantools only (reference path used by tests and fallbacks)."""
        plan = self._plans.get(_key(arbitration_id, is_extended))
        if plan is None:
            return None
        if len(data) < plan.message.length:
            raise ProtocolError(f"{plan.message.name}: frame too short")
        return self.decode_slow(plan, data)

    def decode_slow(self, plan: _Plan, data: ByteLike) -> Decoded:
        """Decode one planned message through cantools."""
        self.counters["cantools_decodes"] += 1
        try:
            vals = plan.message.decode(bytes(data), decode_choices=False, scaling=True)
        except Exception as exc:  # cantools.DecodeError and bitstruct errors
            raise ProtocolError(f"{plan.message.name}: {exc}") from exc
        if not isinstance(vals, dict):  # a container message decodes to its parts
            raise ProtocolError(f"{plan.message.name}: container messages are not supported")
        out: Decoded = []
        for sig, ch, mul, add in plan.routes:
            v = vals.get(sig)
            if isinstance(v, int | float):
                out.append((ch, float(v) * mul + add))
        return out

    def frame_ids(self) -> list[tuple[int, bool]]:
        """Return ``(arbitration_id, extended)`` of every message, after the id offset."""
        return [(arb, ext) for arb, ext, _ in self._by_name.values()]

    def wanted_frames(self) -> list[tuple[int, bool]]:
        """Return ``(arbitration_id, extended)`` of the messages with at least one route.

        Only these frames can yield values; frames of unrouted messages decode to ``[]``.
        """
        return [
            (key & EXT_ID_MASK, bool(key & _EXT_FLAG))
            for key, plan in self._plans.items()
            if plan.routes
        ]

    def can_filters(self) -> list[CanFilter] | None:
        """Return acceptance filters of the routed messages (see :meth:`wanted_frames`)."""
        return frame_filters(self.wanted_frames())

    def message(self, name: str) -> Message:
        """Return the cantools message called ``name``."""
        return self._by_name[name][2]

    def encode(self, name: str, values: Mapping[str, float]) -> CanFrame:
        """Encode physical signal values into a frame of message ``name``.

        Signals not given are sent as raw 0.

        Raises:
            KeyError: unknown message.
            ValueError: a value outside the signal's DBC range or an unknown signal.
        """
        arb, ext, m = self._by_name[name]
        full: dict[str, Any] = {}
        known = {s.name: s for s in m.signals}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"{name}: unknown signals {sorted(unknown)}")
        for sname, s in known.items():
            full[sname] = values[sname] if sname in values else float(s.offset)
        try:
            data = m.encode(full, scaling=True, padding=False, strict=True)
        except Exception as exc:
            raise ValueError(f"{name}: cannot encode {dict(values)}: {exc}") from exc
        return arb, bytes(data), ext


def _key(arb: int, ext: bool) -> int:
    return arb | (_EXT_FLAG if ext else 0)


class DbcDriver(CanDriver):
    """Any ECU described by a user's DBC file.

    Args:
        dbc_file: path of the DBC.
        signals: signal key (``Signal`` or ``Message.Signal``) -> channel name; a list
            fans out. Signals not listed are ignored (``channel_map`` entries are added).
        scale: optional ``{signal: [mul, add]}`` conversion applied after the DBC scaling.
            The bus is opened with acceptance filters for the messages that carry a mapped
            signal only (option ``bus_filters``, see :class:`CanDriver`).
        id_offset: added to every DBC id.
        strict_length: frames with a DLC other than the DBC's are bad frames (else only
            shorter ones).
        **kwargs: :class:`CanDriver` options.

    Raises:
        ConfigError: no/invalid DBC, or a signal the DBC does not define.
    """

    name = "dbc"

    def __init__(
        self,
        *,
        dbc_file: str | Path | None = None,
        signals: Mapping[str, str | Sequence[str]] | None = None,
        scale: Mapping[str, Sequence[float]] | None = None,
        id_offset: int | str = 0,
        strict_length: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not dbc_file:
            raise ConfigError("dbc: option dbc_file is required", field="dbc_file")
        self.db = load_dbc_file(dbc_file)
        mapping: dict[str, str | Sequence[str]] = dict(signals or {})
        mapping.update(self.channel_map)
        if not mapping:
            raise ConfigError("dbc: option signals maps no signal to a channel", field="signals")
        defaults: dict[str, list[Route]] = {}
        for sig, conv in (scale or {}).items():
            if len(conv) != 2:
                raise ConfigError(f"dbc: scale of {sig!r} must be [mul, add]", field="scale")
            defaults[sig] = [("", float(conv[0]), float(conv[1]))]
        routes = build_routes(self.db, defaults, mapping, what="signals")
        routes = {k: [r for r in v if r[0]] for k, v in routes.items()}
        self.codec = DbcCodec(
            self.db,
            routes,
            id_offset=parse_int(id_offset, what="id_offset"),
            strict_length=strict_length,
        )


def channels_of(routes: Mapping[str, Iterable[Route]]) -> set[str]:
    """Return every channel a route table can produce."""
    return {ch for rs in routes.values() for ch, _, _ in rs}
