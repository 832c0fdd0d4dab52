"""``dynoai watch``: the live terminal view of a station, from MQTT only.

:mod:`~dynoai_daemon.watch.state` is the model (messages in, state out, no terminal),
:mod:`~dynoai_daemon.watch.render` turns it into rich text, and
:mod:`~dynoai_daemon.watch.app` is the Textual application that connects the two to a
broker. Import :mod:`~dynoai_daemon.watch.app` only where Textual is wanted.
"""

from dynoai_daemon.watch.state import WatchState

__all__ = ["WatchState"]
