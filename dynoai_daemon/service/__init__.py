"""Service plumbing: the daemon's lifecycle (``daemon``), the raw recorder, and systemd's
sd_notify protocol (``sdnotify``: READY, STATUS, WATCHDOG, STOPPING).

Nothing is imported here, so that ``dynoai_daemon.service.sdnotify`` stays importable
without pulling in the whole daemon.
"""
