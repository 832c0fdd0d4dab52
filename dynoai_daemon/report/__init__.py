"""``dynoai report``: a self-contained offline HTML report of one or more sessions.

:mod:`~dynoai_daemon.report.data` resolves and loads sessions with their raw runs,
:mod:`~dynoai_daemon.report.plots` draws the figures (matplotlib, SVG inlined),
:mod:`~dynoai_daemon.report.words` says what the patterns found, and
:mod:`~dynoai_daemon.report.html` assembles and writes the file.
"""

from dynoai_daemon.report.html import Built, build_report

__all__ = ["Built", "build_report"]
