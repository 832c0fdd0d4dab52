"""systemd's sd_notify protocol without libsystemd: READY, STATUS, WATCHDOG and STOPPING.

systemd (``Type=notify``) passes an AF_UNIX datagram socket in ``NOTIFY_SOCKET``: a path,
or an abstract-namespace name written with a leading ``@``. Each notification is one
datagram of newline-separated ``KEY=value`` lines. Without ``NOTIFY_SOCKET`` (not under
systemd, or in tests) every call is a no-op. The watchdog interval comes from
``WATCHDOG_USEC`` (only for the process named by ``WATCHDOG_PID`` when that is set);
:func:`watchdog_task` pings at half of it, and only while the daemon says it is healthy,
so that a wedged core loop gets the service restarted.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("dynoai.sdnotify")


class SdNotifier:
    """Sends notifications to systemd's notify socket.

    Args:
        socket_path: the socket; ``$NOTIFY_SOCKET`` when None. Empty: disabled.
    """

    def __init__(self, socket_path: str | None = None) -> None:
        path = os.environ.get("NOTIFY_SOCKET", "") if socket_path is None else socket_path
        self.address: str | None = None
        if path.startswith("@"):
            self.address = "\0" + path[1:]  # abstract namespace
        elif path.startswith("/"):
            self.address = path
        elif path:
            log.warning("NOTIFY_SOCKET ignored: not a path or abstract name", value=path)
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        """True when a notify socket is configured."""
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=value`` lines.

        Returns:
            True if it was sent; False when disabled or the send failed (logged, counted;
            a notification must never take the daemon down).
        """
        if self.address is None or not lines:
            return False
        data = "\n".join(lines).encode("utf-8")
        try:
            # A socket per message: a few microseconds, and nothing to leak or reopen.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(data, self.address)
        except OSError as exc:
            self.failed += 1
            log.warning("sd_notify failed", error=str(exc))
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (``READY=1``), with an optional status line."""
        lines = ["READY=1"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        """Set the status line shown by ``systemctl status``."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Keep-alive ping (``WATCHDOG=1``)."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd the service is shutting down (``STOPPING=1``)."""
        lines = ["STOPPING=1"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify(*lines)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Return how often to ping the watchdog: half of ``WATCHDOG_USEC``, in seconds.

    Args:
        environ: the environment to read; ``os.environ`` when None.

    Returns:
        Seconds between pings, or None when no watchdog is set for this process
        (``WATCHDOG_USEC`` missing, invalid or 0, or ``WATCHDOG_PID`` names another process).
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return value / 2_000_000


async def watchdog_task(
    notifier: SdNotifier,
    is_healthy: Callable[[], bool],
    *,
    interval: float | None = None,
) -> None:
    """Ping the watchdog every ``interval`` seconds while ``is_healthy()`` is true.

    Returns at once when there is no watchdog (no interval and no ``WATCHDOG_USEC``) or no
    notify socket; otherwise runs until cancelled. An unhealthy check skips the ping, so
    systemd restarts the service once the checks have failed for the whole WatchdogSec.

    Args:
        notifier: where to send ``WATCHDOG=1``.
        is_healthy: called before each ping; an exception counts as unhealthy.
        interval: seconds between pings; :func:`watchdog_interval` when None.
    """
    period = interval if interval is not None else watchdog_interval()
    if period is None or period <= 0 or not notifier.enabled:
        return
    was_healthy = True
    while True:
        try:
            healthy = bool(is_healthy())
        except Exception:
            log.exception("health check raised")
            healthy = False
        if healthy:
            notifier.watchdog()
        if healthy != was_healthy:
            log.warning("watchdog " + ("resumed" if healthy else "withheld: daemon unhealthy"))
            was_healthy = healthy
        await asyncio.sleep(period)
