"""The Textual application of ``dynoai watch``: widgets over a :class:`WatchState`.

One worker keeps an aiomqtt subscription to the station's topics, reconnecting with
capped backoff when the broker goes (the top line says ``reconnecting`` with the reason,
then ``connected`` again), and feeds each message to the state model; a 10 Hz timer
repaints only the widgets whose part of the state changed. Three views (tab): the grid
(live channels, the cylinder's RPM x MAP grid with the live cell, and when the terminal
is wide a side panel with sources and alerts), the alert feed with source health, and
the build's pooled correction (``tune/current``). Keys: ``q`` quits, ``f``/``r`` pick the
cylinder, ``c``/``h``/``a`` show correction, hits or AFR in the cells.
"""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import aiomqtt
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Static

from dynoai_daemon.publish.mqtt import backoff_delay
from dynoai_daemon.watch.render import (
    Mode,
    render_alerts,
    render_grid,
    render_live,
    render_sources,
    render_status,
)
from dynoai_daemon.watch.state import WatchState

VIEWS = ("grid", "alerts", "tune")
WIDE_COLUMNS = 120


@dataclass(frozen=True)
class Broker:
    """Where and how to connect."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls_context: ssl.SSLContext | None = None
    backoff_initial: float = 0.2
    backoff_max: float = 5.0


class WatchApp(App[None]):
    """The live terminal view of one station."""

    TITLE = "dynoai watch"
    CSS = """
    Screen { layout: vertical; }
    #status { height: 1; }
    #live { height: 1; }
    #body { height: 1fr; }
    #grid { width: auto; min-width: 40; }
    #side { width: 1fr; padding: 0 0 0 2; }
    #side_live { height: auto; }
    #side_sources { height: auto; margin: 1 0 0 0; }
    #side_alerts { height: 1fr; margin: 1 0 0 0; }
    #lastalert { height: 1; }
    #alerts_view { height: 1fr; }
    #alerts_sources { height: auto; margin: 0 0 1 0; }
    #alerts_feed { height: 1fr; }
    #tune_view { height: 1fr; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        Binding("f", "cylinder('front')", "front"),
        Binding("r", "cylinder('rear')", "rear"),
        Binding("tab", "next_view", "view", priority=True),
        Binding("c", "mode('correction')", "corr"),
        Binding("h", "mode('hits')", "hits"),
        Binding("a", "mode('afr')", "AFR"),
    ]

    def __init__(self, state: WatchState, broker: Broker) -> None:
        super().__init__()
        self.state = state
        self.broker = broker
        self.cylinder = "front"
        self.mode: Mode = "correction"
        self.view = "grid"
        self.connection = "connecting"
        self.connections = 0
        self._dirty: set[str] = {"all"}
        self._tick = asyncio.Event()
        self._mounted = False
        self._shown: dict[str, Text | str] = {}

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Static(id="status")
        with Vertical(id="grid_view"):
            yield Static(id="live")
            with Horizontal(id="body"):
                yield Static(id="grid")
                with Vertical(id="side"):
                    yield Static(id="side_live")
                    yield Static(id="side_sources")
                    yield Static(id="side_alerts")
            yield Static(id="lastalert")
        with Vertical(id="alerts_view"):
            yield Static(id="alerts_sources")
            yield Static(id="alerts_feed")
        yield Static(id="tune_view")
        yield Footer()

    def on_mount(self) -> None:
        self._mounted = True
        self._apply_view()
        self.set_interval(0.1, self._repaint)
        self.run_worker(self._mqtt_loop(), name="mqtt", exclusive=True)

    def on_resize(self) -> None:
        if self._mounted:
            self._apply_view()

    @property
    def wide(self) -> bool:
        """True when there is room for the side panel."""
        return self.size.width >= WIDE_COLUMNS

    def _apply_view(self) -> None:
        self.query_one("#grid_view").display = self.view == "grid"
        self.query_one("#alerts_view").display = self.view == "alerts"
        self.query_one("#tune_view").display = self.view == "tune"
        self.query_one("#side").display = self.wide
        self.query_one("#live").display = not self.wide
        self.query_one("#lastalert").display = not self.wide
        self._dirty.add("all")
        self._repaint()

    # ------------------------------------------------------------------ actions

    def action_cylinder(self, cyl: str) -> None:
        """Show the front or rear cylinder."""
        self.cylinder = cyl
        self._dirty.add("all")
        self._repaint()

    def action_mode(self, mode: Mode) -> None:
        """Show correction, hits or AFR in the cells."""
        self.mode = mode
        self._dirty.add("cells")
        self._repaint()

    def action_next_view(self) -> None:
        """Cycle grid -> alerts -> tune."""
        self.view = VIEWS[(VIEWS.index(self.view) + 1) % len(VIEWS)]
        self._apply_view()

    # ------------------------------------------------------------------ painting

    def _put(self, widget_id: str, content: Text | str) -> None:
        # Textual re-lays out a widget on every update: skip the ones that did not change.
        if self._shown.get(widget_id) == content:
            return
        self._shown[widget_id] = content
        self.query_one(f"#{widget_id}", Static).update(content)

    def _repaint(self) -> None:
        if not self._dirty or not self._mounted:
            return
        d, self._dirty = self._dirty, set()
        every = "all" in d
        if every:
            self._shown.clear()
        st = self.state
        self._put("status", render_status(st, self.connection, self.cylinder, self.view))
        if self.view == "grid":
            if every or d & {"cells", "live", "session", "station"}:
                self._put("grid", render_grid(st, self.cylinder, self.mode))
            if every or "live" in d:
                if self.wide:
                    self._put("side_live", render_live(st, compact=False))
                else:
                    self._put("live", render_live(st, compact=True))
            if every or d & {"alerts", "health", "session", "tune"}:
                if self.wide:
                    self._put("side_sources", render_sources(st))
                    self._put("side_alerts", render_alerts(st, max(1, self.size.height - 20)))
                else:
                    self._put("lastalert", render_alerts(st, 1))
        elif self.view == "alerts":
            self._put("alerts_sources", render_sources(st))
            self._put("alerts_feed", render_alerts(st, max(1, self.size.height)))
        elif self.view == "tune":
            if st.tune:
                self._put("tune_view", render_grid(st, self.cylinder, self.mode, tune=True))
            else:
                self._put(
                    "tune_view", "no pooled correction of the build yet (retained tune/current)"
                )

    def _changed(self, parts: set[str]) -> None:
        self._dirty |= parts
        self._tick.set()

    async def wait_until(self, pred: Callable[[], bool]) -> None:
        """Wait until ``pred()`` is true after some message or connection change.

        Callers bound the wait with ``asyncio.timeout``.
        """
        while not pred():
            self._tick.clear()
            await self._tick.wait()

    # ------------------------------------------------------------------ MQTT

    def _set_connection(self, text: str) -> None:
        self.connection = text
        self._changed({"status"})
        self._repaint()

    async def _mqtt_loop(self) -> None:
        b = self.broker
        attempt = 0
        client_id = f"dynoai-watch-{uuid.uuid4().hex[:10]}"
        while True:
            try:
                async with aiomqtt.Client(
                    b.host,
                    b.port,
                    username=b.username,
                    password=b.password,
                    identifier=client_id,
                    clean_session=True,
                    keepalive=5,
                    timeout=5,
                    tls_context=b.tls_context,
                ) as client:
                    for f in self.state.subscriptions():
                        await client.subscribe(f, qos=1)
                    attempt = 0
                    self.connections += 1
                    self._set_connection("connected")
                    async for m in client.messages:
                        raw: Any = m.payload
                        payload = bytes(raw) if isinstance(raw, bytes | bytearray) else b""
                        changed = self.state.apply(m.topic.value, payload, bool(m.retain))
                        if changed:
                            if "station" in changed:
                                changed.add("all")
                            self._changed(changed)
                    raise aiomqtt.MqttError("message stream ended")
            except aiomqtt.MqttError as exc:
                attempt += 1
                self._set_connection(
                    f"reconnecting to {b.host}:{b.port}: {exc}" if str(exc) else "reconnecting"
                )
            await asyncio.sleep(backoff_delay(attempt, b.backoff_initial, b.backoff_max))
