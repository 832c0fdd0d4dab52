"""Lazy registry of drivers: ``name -> "module:Class"``, imported on first use.

Like python-can's interface table, nothing here imports a driver module until a driver of
that name is asked for, so an optional dependency one driver needs (say cantools) only
matters when that driver is built, and gives a clear error then.
"""

from __future__ import annotations

import importlib
from typing import Any

from drivers.base import Driver
from dynoai_daemon.errors import DriverNotAvailableError

REGISTRY: dict[str, str] = {
    "innovate_mts": "drivers.innovate_mts:InnovateMtsDriver",
    "aem_serial": "drivers.aem_serial:AemSerialDriver",
    "serial_csv": "drivers.serial_csv:SerialCsvDriver",
    "aemnet": "drivers.aemnet:AemNetDriver",
    "rusefi_wbo": "drivers.rusefi_wbo:RusefiWboDriver",
    "megasquirt": "drivers.megasquirt:MegasquirtDriver",
    "rusefi": "drivers.rusefi:RusefiDriver",
    "haltech": "drivers.haltech:HaltechDriver",
    "dbc": "drivers.dbc_driver:DbcDriver",
    "obd2": "drivers.obd2:Obd2Driver",
    "jetdrive": "drivers.jetdrive:JetDriveDriver",
}


def driver_class(name: str) -> type[Driver]:
    """Import and return the driver class registered as ``name``.

    Raises:
        DriverNotAvailableError: unknown name, or its module (or a dependency) is missing.
    """
    try:
        target = REGISTRY[name]
    except KeyError:
        raise DriverNotAvailableError(
            f"unknown driver {name!r}; known: {', '.join(sorted(REGISTRY))}"
        ) from None
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DriverNotAvailableError(
            f"driver {name!r} cannot be built here: {exc} (install the missing package)"
        ) from exc
    try:
        cls = getattr(module, cls_name)
    except AttributeError:
        raise DriverNotAvailableError(f"driver {name!r}: {target} not found") from None
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise DriverNotAvailableError(f"driver {name!r}: {target} is not a Driver")
    return cls


def create_driver(name: str, **options: Any) -> Driver:
    """Build the driver ``name`` with keyword options (no I/O happens here).

    Raises:
        DriverNotAvailableError: see :func:`driver_class`.
        ConfigError: the options are invalid for that driver.
    """
    return driver_class(name)(**options)


def available() -> dict[str, str | None]:
    """Return ``{name: None}`` for drivers that can be built here, else the reason."""
    out: dict[str, str | None] = {}
    for name in sorted(REGISTRY):
        try:
            driver_class(name)
            out[name] = None
        except DriverNotAvailableError as exc:
            out[name] = str(exc)
    return out
