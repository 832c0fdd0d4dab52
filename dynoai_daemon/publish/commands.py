"""MQTT request/response commands: validate every request, answer every request, never crash.

A request arrives on ``<base>/<station>/request/<cmd>`` and gets exactly one reply on
``<base>/<station>/response/<cmd>``:
``{"status": "ok"|"error", "data": ..., "error": str|null, "transaction": str|null}``.
:class:`CommandRouter` checks the size limit, parses JSON (an empty payload is ``{}``),
validates the body against the command's pydantic schema (``build/set`` also runs the
injected build validator, by default the project's ``BuildConfiguration``), calls the
handler, and turns every failure (garbage, oversized, unknown command, invalid schema, a
handler that raises or times out) into an error reply. The transaction string of a
request is echoed whenever it could be read, so a client can match replies.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dynoai_daemon.models import BuildConfiguration
from dynoai_daemon.publish.topics import COMMANDS, Topics

log = structlog.get_logger("dynoai.commands")

#: Default request size limit.
MAX_REQUEST_BYTES: Final = 64 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]
BuildValidator = Callable[[dict[str, Any]], dict[str, Any]]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    transaction: str | None = Field(None, max_length=128)


class PingRequest(_Request):
    """``ping``: no arguments."""


class RunStartRequest(_Request):
    """``run/start``: open a run now (operator override of the run detector)."""


class RunStopRequest(_Request):
    """``run/stop``: close the open run into a session now."""


class BuildSetRequest(_Request):
    """``build/set``: replace the BuildConfiguration attached to new sessions."""

    build: dict[str, Any]
    #: the base tune file the ECU runs with this build (starts a new tune pool)
    tune: str | None = Field(None, max_length=4096)


class TuneResetRequest(_Request):
    """``tune/reset``: start a new pool of the current build (after loading a table)."""


#: The schema of each command's request body.
REQUEST_SCHEMAS: Final[dict[str, type[_Request]]] = {
    "ping": PingRequest,
    "run/start": RunStartRequest,
    "run/stop": RunStopRequest,
    "build/set": BuildSetRequest,
    "tune/reset": TuneResetRequest,
}
assert set(REQUEST_SCHEMAS) == set(COMMANDS)


def validate_build(build: dict[str, Any]) -> dict[str, Any]:
    """Validate a BuildConfiguration with the project's model (imported lazily).

    Returns:
        The normalised build as JSON-ready data.

    Raises:
        pydantic.ValidationError: the build is invalid.
    """
    return BuildConfiguration.model_validate(build).model_dump(mode="json")


class CommandError(Exception):
    """Raised by a handler to send an error reply with exactly this message."""


def _pydantic_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(body)"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


class CommandRouter:
    """Validates requests and dispatches them to handlers.

    Args:
        handlers: command name -> async handler taking the validated body (a dict
            including ``transaction``; for ``build/set`` the ``build`` is already
            validated and normalised) and returning the reply's ``data``.
        topics: the station's topics; when None, any topic of the form
            ``.../request/<cmd>`` is accepted and answered on ``.../response/<cmd>``.
        max_bytes: request size limit.
        build_validator: validates and normalises a ``build/set`` build; raises on bad
            input (pydantic ValidationError, ValueError or CommandError).
        timeout_s: a handler running longer gets an error reply (and is cancelled).
        schemas: override the request schemas (tests, extensions).
    """

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        topics: Topics | None = None,
        max_bytes: int = MAX_REQUEST_BYTES,
        build_validator: BuildValidator | None = validate_build,
        timeout_s: float = 10.0,
        schemas: Mapping[str, type[BaseModel]] | None = None,
    ) -> None:
        self.handlers = dict(handlers)
        self.topics = topics
        self.max_bytes = max_bytes
        self.build_validator = build_validator
        self.timeout_s = timeout_s
        self.schemas: dict[str, type[BaseModel]] = dict(
            schemas if schemas is not None else REQUEST_SCHEMAS
        )
        self.handled = 0
        self.errors = 0

    @classmethod
    def for_dispatcher(
        cls,
        dispatch: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]],
        *,
        commands: tuple[str, ...] = COMMANDS,
        **kwargs: Any,
    ) -> CommandRouter:
        """Build a router that sends every command to one ``dispatch(cmd, body)`` coroutine."""

        def bind(cmd: str) -> Handler:
            async def handler(body: dict[str, Any]) -> dict[str, Any] | None:
                return await dispatch(cmd, body)

            return handler

        return cls({cmd: bind(cmd) for cmd in commands}, **kwargs)

    def _split(self, topic: str) -> tuple[str, str] | None:
        # -> (command, response topic), or None when the topic is not a request.
        if self.topics is not None:
            cmd = self.topics.command_of(topic)
            if cmd is None:
                return None
            try:
                return cmd, self.topics.response(cmd)
            except Exception:
                return None
        head, sep, cmd = topic.partition("/request/")
        if not sep or not cmd or any(c in topic for c in "+#"):
            return None
        return cmd, f"{head}/response/{cmd}"

    async def handle(self, topic: str, payload: bytes) -> tuple[str, dict[str, Any]] | None:
        """Answer one request.

        Args:
            topic: the topic it arrived on.
            payload: its raw bytes.

        Returns:
            (response topic, response body), or None when ``topic`` is not a request topic
            (nothing to answer). Never raises (except CancelledError).
        """
        split = self._split(topic)
        if split is None:
            return None
        cmd, response_topic = split
        self.handled += 1
        transaction: str | None = None

        def error(msg: str) -> tuple[str, dict[str, Any]]:
            self.errors += 1
            log.warning("command rejected", command=cmd[:64], error=msg, transaction=transaction)
            body = {"status": "error", "data": None, "error": msg, "transaction": transaction}
            return response_topic, body

        if len(payload) > self.max_bytes:
            return error(f"request too large: {len(payload)} bytes > {self.max_bytes}")
        try:
            raw: Any = json.loads(payload) if payload.strip() else {}
        except (UnicodeDecodeError, ValueError) as exc:
            return error(f"request is not valid JSON: {exc}")
        if not isinstance(raw, dict):
            return error(f"request must be a JSON object, not {type(raw).__name__}")
        tx = raw.get("transaction")
        if isinstance(tx, str) and len(tx) <= 128:
            transaction = tx
        handler = self.handlers.get(cmd)
        schema = self.schemas.get(cmd)
        if handler is None or schema is None:
            known = ", ".join(sorted(self.handlers))
            return error(f"unknown command {cmd[:64]!r}; known: {known}")
        try:
            body = schema.model_validate(raw).model_dump()
        except ValidationError as exc:
            return error(f"invalid request: {_pydantic_message(exc)}")
        if cmd == "build/set" and self.build_validator is not None:
            try:
                body["build"] = self.build_validator(body["build"])
            except ValidationError as exc:
                return error(f"invalid build: {_pydantic_message(exc)}")
            except (ValueError, TypeError, CommandError) as exc:
                return error(f"invalid build: {exc}")
        try:
            async with asyncio.timeout(self.timeout_s):
                data = await handler(body)
        except TimeoutError:
            return error(f"command timed out after {self.timeout_s:g} s")
        except CommandError as exc:
            return error(str(exc))
        except ValidationError as exc:
            return error(f"invalid request: {_pydantic_message(exc)}")
        except Exception as exc:
            log.exception("command handler failed", command=cmd)
            return error(f"{type(exc).__name__}: {exc}")
        log.info("command done", command=cmd, transaction=transaction)
        return response_topic, {
            "status": "ok",
            "data": data,
            "error": None,
            "transaction": transaction,
        }
