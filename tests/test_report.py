"""``dynoai report``: sessions made by a real daemon, the HTML drawn by headless Chromium.

Two runs go through a Daemon (no MQTT, ``[report] auto = true``): a lean "before" run
and a corrected "after" run with weather conditions, each with steady holds, a WOT pull,
a throttle snap that pops on the coast, knock on the rear cylinder and rising IAT. The
report of both is checked for its content, for the absence of any network reference, and
rendered by Chromium to a PNG whose regions must hold drawn pixels.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dynoai_daemon.cli.main import main
from dynoai_daemon.config import load_settings
from dynoai_daemon.report import build_report
from dynoai_daemon.report.data import resolve
from tests.synth import Plan, make_log

PLAN = Plan(
    [
        ("idle", 2),
        ("hold", 2000, 45, 3),
        ("hold", 2500, 60, 3),
        ("hold", 3000, 80, 3),
        ("hold", 3500, 95, 3),
        ("pull", 2000, 5500, 8),
        ("snap", 5000, 3),
        ("hold", 3000, 70, 3),
        ("idle", 6),
    ]
)


def _frame(ratio: float, seed: int):  # type: ignore[no-untyped-def]
    shape = (19, 18)
    front = np.full(shape, ratio)
    rear = np.full(shape, 2 - ratio)
    f = make_log(PLAN, front, rear, seed=seed, knock_rear=[(3000, 4500, 2.5)],
                 iat=(90.0, 145.0), pop_afr=17.8)  # fmt: skip
    rpm, tq = f.columns["rpm"], f.columns["torque_ftlb"]
    f.columns["power_hp"] = tq * rpm / 5252.0
    return f


async def _run_daemon(cfg: Path, ratio: float, seed: int) -> None:
    from dynoai_daemon.channels import Frame
    from dynoai_daemon.service.daemon import Daemon

    daemon = Daemon(load_settings(cfg), drivers={})
    task = asyncio.create_task(daemon.run(), name="daemon")
    await asyncio.wait_for(daemon.ready.wait(), 10)
    frame = _frame(ratio, seed)
    for i in range(0, len(frame), 20):
        part = frame.slice(i, i + 20)
        daemon._feed(Frame(part.t, part.columns))
        await asyncio.sleep(0)
    daemon._handle_events(daemon.core.stop_run("end_of_log"))
    await asyncio.wait_for(daemon.wait_sessions_idle(), 60)
    daemon.request_stop()
    await asyncio.wait_for(task, 20)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    for station, ratio, cond in (
        ("before", 1.08, ""),
        ("after", 1.0, "[conditions]\nambient_temp_f = 88.0\nbarometric_pressure_inhg = 28.9\n"
                       "humidity_percent = 40.0\n"),
    ):  # fmt: skip
        cfg = root / f"{station}.toml"
        cfg.write_text(
            f'station = "{station}"\ndata_dir = "{root}"\n[mqtt]\nenabled = false\n'
            f"[report]\nauto = true\n{cond}"
        )
        asyncio.run(_run_daemon(cfg, ratio, seed=3 if station == "before" else 4))
    return root


def _sessions(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "sessions").glob("*.json"))


def test_daemon_wrote_a_report_per_session(data_dir: Path) -> None:
    sessions = _sessions(data_dir)
    assert len(sessions) == 2
    for s in sessions:
        html = s.with_suffix(".html").read_text()
        assert "<svg" in html and json.loads(s.read_text())["session_id"] in html


def _network_refs(html: str) -> list[str]:
    # xmlns declarations name a namespace; nothing is fetched from them.
    stripped = re.sub(r'\sxmlns(:\w+)?="[^"]*"', "", html)
    refs = re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'<>)]*", stripped)
    refs += re.findall(r"""(?:src|href)\s*=\s*["']?(?!data:|#)[^"'\s>]+""", stripped)
    refs += re.findall(r"url\(\s*['\"]?(?!data:|#)", stripped)
    refs += re.findall(r"@import|<script|<link|<iframe", stripped)
    return refs


def test_network_reference_check_catches_references() -> None:
    clean = '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink">'
    assert _network_refs(clean + '<image xlink:href="data:image/png;base64,AAAA"/></svg>') == []
    for bad in (
        '<img src="https://cdn.example.com/a.png">',
        "<script src=//cdn.example.com/plotly.js></script>",
        "<style>@font-face { src: url(https://fonts.example.com/f.woff2) }</style>",
        '<link rel="stylesheet" href="style.css">',
        '<a href="http://example.com">x</a>',
    ):
        assert _network_refs(clean + bad), bad


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed (scripts/setup.sh installs it)")
    return exe


def screenshot(html: Path, png: Path, profile: Path, size: tuple[int, int]) -> None:
    """Render a local HTML file with headless Chromium (no network) into a PNG."""
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
        f"--screenshot={png}", f"--window-size={size[0]},{size[1]}",
        html.resolve().as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, timeout=90, check=False)
    assert png.is_file(), proc.stderr.decode(errors="replace")[-2000:]


def inked_regions(png: Path, rows: int, cols: int, min_frac: float = 0.01) -> list[list[bool]]:
    """For a rows x cols split of the image: does each region hold non-white pixels?"""
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    h, w, _ = img.shape
    ink = (np.abs(img - 255).sum(axis=2)) > 60
    out = []
    for r in range(rows):
        line = []
        for c in range(cols):
            block = ink[r * h // rows : (r + 1) * h // rows, c * w // cols : (c + 1) * w // cols]
            line.append(bool(block.mean() > min_frac))
        out.append(line)
    return out


def test_report_overlay_offline_and_drawn(data_dir: Path, tmp_path: Path) -> None:
    settings = load_settings(None)
    out = tmp_path / "cmp.html"
    built = build_report(_sessions(data_dir), out, settings, data_dir=data_dir)
    html = out.read_text()
    assert built.size == len(html.encode()) and built.size < 5 * 1024 * 1024
    assert _network_refs(html) == []
    for fig in ("power", "afr", "iat", "ve-1", "ve-2", "knock-1", "decel-1"):
        assert f'id="fig-{fig}"' in html, fig
    # the "after" run carries conditions: its power is named as SAE J1349 corrected
    assert "SAE J1349 corrected, CF" in html and "uncorrected (conditions unknown)" in html
    assert "Decel popping: severity" in html and "Knock:" in html
    assert html.count('<h2 id="run-') == 2
    # the lean "before" run raised lean alerts, replayed from its raw run
    assert re.search(r"<td>lean</td>", html)
    # in the before run the front cylinder wants fuel: a positive mean correction
    m = re.search(r"Front: \d+ cells learned, mean correction ([+-][\d.]+) %", html)
    assert m is not None and float(m.group(1)) > 4

    png = tmp_path / "cmp.png"
    screenshot(out, png, tmp_path / "profile", (1200, 2400))
    regions = inked_regions(png, 6, 2)
    # every band of the page's first 2400 px holds drawn content (titles, tables, plots)
    assert all(any(row) for row in regions), regions
    # and the plots are drawn, not blank boxes: the power figure's band is well inked
    assert sum(sum(row) for row in regions) >= 9, regions


def test_cli_by_run_id_and_dir_with_png(data_dir: Path, tmp_path: Path) -> None:
    sid = _sessions(data_dir)[0].stem
    out = tmp_path / "one.html"
    rc = main(["report", sid, "--data-dir", str(data_dir), "-o", str(out), "--png"])
    assert rc == 0 and out.is_file()
    pngs = sorted(tmp_path.glob("one-*.png"))
    assert {p.name for p in pngs} >= {"one-power.png", "one-afr.png", "one-ve-1.png"}
    assert inked_regions(tmp_path / "one-ve-1.png", 2, 2) == [[True, True], [True, True]]
    assert resolve([str(data_dir)], tmp_path) == _sessions(data_dir)


def test_report_without_raw_run(data_dir: Path, tmp_path: Path) -> None:
    src = _sessions(data_dir)[0]
    lone = tmp_path / "lone.json"
    lone.write_text(src.read_text())
    built = build_report([lone], tmp_path / "lone.html", load_settings(None))
    html = (tmp_path / "lone.html").read_text()
    assert "raw run" in html and "not found" in html
    assert built.figures == ["ve-1", "knock-1"]  # the session grid still gives the maps


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "not a session JSON"),
        ('{"hello": 1}', "not a session"),
        ("\udcff", "not a session JSON"),
    ],
)
def test_bad_input_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, message: str
) -> None:
    path = tmp_path / "x.json"
    if content == "\udcff":
        path.write_bytes(b"\xff\xfe\x00garbage")
    elif content is not None:
        path.write_text(content)
    rc = main(["report", str(path), "-o", str(tmp_path / "o.html")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and str(path) in err
    assert "Traceback" not in err


def test_unknown_run_id_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["report", "nope-123", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "no session or run 'nope-123'" in err


def test_report_failure_is_logged_not_fatal(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dynoai_daemon.report as report

    def broken(*_a: object, **_k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(report, "build_report", broken)
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'station = "broken"\ndata_dir = "{tmp_path}"\n[mqtt]\nenabled = false\n'
        "[report]\nauto = true\n"
    )
    asyncio.run(_run_daemon(cfg, 1.0, seed=5))
    assert len(list((tmp_path / "sessions").glob("*.json"))) == 1
    assert list((tmp_path / "sessions").glob("*.html")) == []
