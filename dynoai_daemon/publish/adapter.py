"""Build the daemon's publisher from settings (kept separate so the daemon imports lazily)."""

from dynoai_daemon.publish.mqtt import make_publisher

__all__ = ["make_publisher"]
