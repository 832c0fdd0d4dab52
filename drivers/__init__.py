"""Hardware drivers: one module per wire protocol.

Each module holds a pure codec (bytes or CAN frames in, values and status out, plus the
inverse encoder the simulators use) and an async driver that reads a port, bus or socket
with it. Drivers are found by name through :mod:`drivers.registry`, imported lazily so a
missing optional dependency only matters for the driver that needs it.
"""

from drivers.base import Driver, DriverStats
from drivers.registry import REGISTRY, available, create_driver, driver_class

__all__ = ["REGISTRY", "Driver", "DriverStats", "available", "create_driver", "driver_class"]
