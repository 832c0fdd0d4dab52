"""MQTT topic names, their retain/QoS table, and the JSON payload encoding (docs/contract.md).

Every topic the daemon uses is built here from the base topic and the station id, so that
no other module spells a topic by hand. :data:`TOPIC_TABLE` is the one place where the
contract's retain flag and QoS of each topic live; :meth:`Topics.spec` looks a concrete
topic up in it. :func:`encode_payload` is the single JSON encoder for everything
published: compact separators, UTF-8, NaN and infinities as ``null`` (JSON has no NaN),
numpy scalars and arrays as plain numbers and lists.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Final

import aiomqtt

from dynoai_daemon.errors import PublishError

#: MQTT topic names are at most 65535 bytes of UTF-8 (spec 1.5.3).
MAX_TOPIC_BYTES: Final = 65535

#: Commands a station answers on ``request/<cmd>`` (docs/contract.md).
COMMANDS: Final[tuple[str, ...]] = ("run/start", "run/stop", "build/set", "ping", "tune/reset")


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """How one kind of topic is published.

    Attributes:
        pattern: the topic below ``<base>/<station>/`` as an MQTT filter.
        retain: whether messages on it are retained by the broker.
        qos: the QoS it is published with.
        durable: True when it goes through the outbox (at-least-once, survives a kill).
    """

    pattern: str
    retain: bool
    qos: int
    durable: bool = False


#: The contract's MQTT table. Order matters: the first matching pattern wins, so
#: ``session/last`` comes before ``session/+``.
TOPIC_TABLE: Final[tuple[TopicSpec, ...]] = (
    TopicSpec("state", retain=True, qos=1),
    TopicSpec("health", retain=True, qos=0),
    TopicSpec("source/+/availability", retain=True, qos=1),
    TopicSpec("live", retain=False, qos=0),
    TopicSpec("run/current", retain=True, qos=1),
    TopicSpec("run/+/cells", retain=False, qos=0),
    TopicSpec("predict/+", retain=True, qos=1),
    TopicSpec("alert/+", retain=False, qos=1, durable=True),
    TopicSpec("session/last", retain=True, qos=1, durable=True),
    TopicSpec("session/+", retain=False, qos=1, durable=True),
    TopicSpec("request/#", retain=False, qos=1),
    TopicSpec("response/#", retain=False, qos=1),
)

#: Used for a topic outside the table: a plain reliable message.
DEFAULT_SPEC: Final = TopicSpec("#", retain=False, qos=1)


def filter_matches(pattern: str, topic: str) -> bool:
    """Tell whether an MQTT topic filter (with ``+`` and ``#``) matches a concrete topic.

    aiomqtt's ``Topic.matches`` does the matching; a string that is not a valid concrete
    topic (empty, or holding a wildcard) matches nothing.
    """
    try:
        return aiomqtt.Topic(topic).matches(pattern)
    except ValueError:
        return False


def check_topic(topic: str) -> str:
    """Validate a topic for publishing and return it.

    Raises:
        PublishError: empty, containing a wildcard or NUL, or longer than 65535 bytes.
    """
    if not topic:
        raise PublishError("empty MQTT topic")
    if any(c in topic for c in "+#\x00"):
        raise PublishError(f"MQTT topic must not contain wildcards or NUL: {topic!r}")
    if len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
        raise PublishError("MQTT topic longer than 65535 bytes")
    return topic


def _segment(kind: str, value: str) -> str:
    # One topic level: a slash or wildcard inside an id would change the topic's shape.
    if not value or any(c in value for c in "/+#\x00"):
        raise PublishError(f"invalid {kind} for a topic level: {value!r}")
    return value


class Topics:
    """All topics of one station.

    Args:
        base: the base topic (``dynoai`` by default), without leading/trailing slash.
        station: the station id.

    Raises:
        PublishError: base or station is empty or contains wildcards.
    """

    def __init__(self, base: str, station: str) -> None:
        if not base or base.startswith("/") or base.endswith("/") or any(c in base for c in "+#"):
            raise PublishError(f"invalid base topic {base!r}")
        self.base = base
        self.station = _segment("station", station)
        self.root = f"{base}/{station}"

    def topic(self, suffix: str) -> str:
        """Return ``<base>/<station>/<suffix>``."""
        return check_topic(f"{self.root}/{suffix.strip('/')}")

    def suffix(self, topic: str) -> str | None:
        """Return the part of ``topic`` below this station's root, or None if it is not ours."""
        prefix = self.root + "/"
        return topic[len(prefix) :] if topic.startswith(prefix) else None

    def spec(self, topic: str) -> TopicSpec:
        """Look a concrete topic (or a suffix) up in :data:`TOPIC_TABLE`."""
        suffix = self.suffix(topic)
        if suffix is None:
            suffix = topic
        for spec in TOPIC_TABLE:
            if filter_matches(spec.pattern, suffix):
                return spec
        return DEFAULT_SPEC

    @property
    def state(self) -> str:
        """Retained online/offline state; also the last will's topic."""
        return f"{self.root}/state"

    @property
    def health(self) -> str:
        """Retained health summary."""
        return f"{self.root}/health"

    @property
    def live(self) -> str:
        """Throttled live channel values (QoS 0)."""
        return f"{self.root}/live"

    @property
    def run_current(self) -> str:
        """Retained description of the open run (empty payload when none)."""
        return f"{self.root}/run/current"

    @property
    def session_last(self) -> str:
        """Retained summary of the newest session."""
        return f"{self.root}/session/last"

    @property
    def request_filter(self) -> str:
        """The subscription filter for every command request."""
        return f"{self.root}/request/#"

    def source_availability(self, source: str) -> str:
        """Retained availability of one source."""
        return f"{self.root}/source/{_segment('source name', source)}/availability"

    def run_cells(self, run_id: str) -> str:
        """Changed cells of a run (QoS 0)."""
        return f"{self.root}/run/{_segment('run id', run_id)}/cells"

    def alert(self, kind: str) -> str:
        """A live alert of one kind (durable)."""
        return f"{self.root}/alert/{_segment('alert kind', kind)}"

    def session(self, session_id: str) -> str:
        """A whole session JSON (durable)."""
        return f"{self.root}/session/{_segment('session id', session_id)}"

    def request(self, command: str) -> str:
        """The request topic of a command, e.g. ``request/run/start``."""
        return check_topic(f"{self.root}/request/{command.strip('/')}")

    def response(self, command: str) -> str:
        """The response topic of a command."""
        return check_topic(f"{self.root}/response/{command.strip('/')}")

    def command_of(self, topic: str) -> str | None:
        """Return the command named by a request topic, or None for any other topic."""
        suffix = self.suffix(topic)
        if suffix is None or not suffix.startswith("request/"):
            return None
        cmd = suffix[len("request/") :]
        return cmd or None


def _clean(obj: Any) -> Any:
    # Replace non-finite floats anywhere in a JSON-ready structure with None.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _default(obj: Any) -> Any:
    # numpy scalars/arrays (and anything else with tolist/item) without importing numpy.
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return _clean(tolist())
    item = getattr(obj, "item", None)
    if callable(item):
        return _clean(item())
    if isinstance(obj, set | frozenset):
        return _clean(sorted(obj, key=repr))
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def encode_payload(payload: Any) -> bytes:
    """Encode a payload as compact UTF-8 JSON; NaN/inf become ``null``; None becomes b"".

    Bytes are taken as already encoded (a large payload encoded off the event loop).

    Raises:
        PublishError: the payload holds something JSON cannot represent.
    """
    if payload is None:
        return b""
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    try:
        text = json.dumps(
            _clean(payload),
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
            default=_default,
        )
    except (TypeError, ValueError) as exc:
        raise PublishError(f"payload is not JSON serialisable: {exc}") from exc
    return text.encode("utf-8")
