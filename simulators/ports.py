"""Free local ports: the one helper the simulated cell, its broker, the tests and benches share.

The operating system picks an unused ephemeral port; it is free "a moment ago", so a caller
binds it soon after (the tests and the cell do so within the same second).
"""

from __future__ import annotations

import socket
from typing import Literal


def free_port(kind: Literal["tcp", "udp"] = "tcp", host: str = "127.0.0.1") -> int:
    """Return a TCP or UDP port that was free on ``host`` a moment ago."""
    sock_type = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, sock_type) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


__all__ = ["free_port"]
