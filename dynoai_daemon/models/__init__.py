"""The user's data model (being carved into one module per concern)."""

from dynoai_daemon.models.session import *  # noqa: F403
from dynoai_daemon.models.session import __all__ as __all__
