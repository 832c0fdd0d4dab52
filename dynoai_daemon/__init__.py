"""dynoai: live dyno data acquisition and V-twin tuning daemon.

The package holds the daemon side: data model, streaming core, patterns, alerts,
publishing, storage, ML and the ``dynoai`` command line. Hardware protocol code lives in
the sibling ``drivers`` package and the simulated dyno cell in ``simulators``.
"""

__version__ = "0.1.0"
