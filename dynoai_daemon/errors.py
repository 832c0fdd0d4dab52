"""The project's exception hierarchy.

Everything dynoai raises on purpose derives from :class:`DynoError`, so callers and the
CLI can tell our errors (bad input, a dead port, a broken frame) from programming bugs.
Vendor exceptions (pyserial, python-can, paho) are re-raised as one of these with
``raise ... from`` so that the original stays attached.
"""

from __future__ import annotations


class DynoError(Exception):
    """Root of every error dynoai raises on purpose."""


class ConfigError(DynoError):
    """A configuration value is invalid; ``field`` names it when known."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InputError(DynoError):
    """Bad user input other than config: a malformed log file, a bad argument.

    ``path`` and ``line`` locate the problem when it comes from a file.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line

    def __str__(self) -> str:
        msg = super().__str__()
        if self.path is not None and self.line is not None:
            return f"{self.path}:{self.line}: {msg}"
        if self.path is not None:
            return f"{self.path}: {msg}"
        return msg


class LogFormatError(InputError):
    """A recorded log could not be parsed; always names file and line."""


class DriverError(DynoError):
    """Base class of driver failures."""


class DriverNotAvailableError(DriverError):
    """The driver is unknown or an optional dependency it needs is missing."""


class DriverOpenError(DriverError):
    """The port, bus or socket could not be opened."""


class DriverOperationError(DriverError):
    """An opened port, bus or socket failed while in use (e.g. USB unplug)."""


class DriverTimeoutError(DriverError):
    """A device did not answer in time."""


class ProtocolError(DynoError):
    """A frame or packet violates its wire protocol."""


class PublishError(DynoError):
    """MQTT publishing failed."""


class StoreError(DynoError):
    """Reading or writing the data directory failed."""
