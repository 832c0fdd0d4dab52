"""Atomic files and the session store: nothing half-written, nothing lost, errors name paths.

Faults that cannot be produced for real on demand (a failing fsync or rename) are injected
by patching ``os``; a real crash is a child process killed with SIGKILL while it rewrites
a session file in a loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from dynoai_daemon.errors import StoreError
from dynoai_daemon.models import HeatSoakPattern, SessionPatterns, TrainingDataset, TuningSession
from dynoai_daemon.store import SessionStore, StoreFileError, atomic_write_json, atomic_write_text
from dynoai_daemon.store.files import load_dataset, save_dataset
from tests.test_models import full_session, region_tables

REPO = Path(__file__).resolve().parents[1]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_text_creates_parents_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "f.txt"
    assert atomic_write_text(target, "one\n") == target
    assert target.read_text() == "one\n"
    atomic_write_text(target, "two\n")
    assert target.read_text() == "two\n"
    assert os.listdir(target.parent) == ["f.txt"]


def test_atomic_write_json_refuses_nan_and_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "d.json"
    atomic_write_json(target, {"x": 1.5, "y": None})
    assert json.loads(target.read_text()) == {"x": 1.5, "y": None}
    with pytest.raises(StoreFileError) as info:
        atomic_write_json(target, {"x": float("nan")})
    assert info.value.path == str(target) and str(target) in str(info.value)
    assert json.loads(target.read_text()) == {"x": 1.5, "y": None}
    assert leftovers(tmp_path) == []


def test_serialisation_error_mid_document_leaves_old_file(tmp_path: Path) -> None:
    target = tmp_path / "d.json"
    atomic_write_json(target, {"v": 1})

    class Boom:
        """Not serialisable: json raises half-way through the document."""

    with pytest.raises(StoreFileError, match="serialise"):
        atomic_write_json(target, {"a": list(range(1000)), "b": Boom()})
    assert json.loads(target.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["d.json"]


def test_pydantic_models_are_written_as_json(tmp_path: Path) -> None:
    s = full_session()
    path = atomic_write_json(tmp_path / "s.json", s)
    assert TuningSession.model_validate_json(path.read_text()) == s


@pytest.mark.parametrize("fail", ["fsync", "replace"])
def test_failure_during_write_keeps_old_file_and_cleans_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: str
) -> None:
    target = tmp_path / "f.json"
    atomic_write_text(target, "old")

    def broken(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, fail, broken)
    with pytest.raises(StoreFileError, match="No space left") as info:
        atomic_write_text(target, "new" * 1000)
    monkeypatch.undo()
    assert isinstance(info.value, StoreError)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.json"]


def test_interrupt_during_write_is_reraised_and_cleans_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f.json"
    atomic_write_text(target, "old")

    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.json"]


def test_unwritable_directory_names_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreFileError) as info:
        atomic_write_text(blocker / "sub" / "f.json", "x")
    assert "file/sub/f.json" in str(info.value)


CHILD = """
import sys
from dynoai_daemon.store import SessionStore
from tests.test_models import full_session
store = SessionStore(sys.argv[1])
sessions = [full_session("crash-1"), full_session("crash-1")]
sessions[1].notes = "x" * 200_000  # the versions differ in size, so a torn file would show
n = 0
while True:
    store.save_session(sessions[n % 2])
    n += 1
    print(n, flush=True)
"""


def test_killed_writer_never_leaves_a_torn_file(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for _ in range(25):  # let it complete a few rewrites, then kill it mid-loop
            assert proc.stdout.readline(), "writer exited early"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    store = SessionStore(tmp_path)
    s = store.load_session("crash-1")  # complete and valid, old or new version
    assert s.notes in ("rear ran lean at cruise", "x" * 200_000)
    assert store.list_sessions() == ["crash-1"]  # a temp file the kill left is not a session


# --------------------------------------------------------------------------- session store


def test_save_load_and_list_sessions(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "data")
    assert store.list_sessions() == []
    b = full_session("cell1-20250106T183500-2")
    a = full_session("cell1-20250106T183000-1")
    pb = store.save_session(b)
    pa = store.save_session(a)
    assert pa == tmp_path / "data" / "sessions" / "cell1-20250106T183000-1.json"
    assert pb.is_file()
    assert store.list_sessions() == ["cell1-20250106T183000-1", "cell1-20250106T183500-2"]
    assert store.load_session(a.session_id) == a
    assert list(store.iter_sessions()) == [a, b]
    assert leftovers(store.sessions_dir) == []


def test_session_errors_name_the_path_and_field(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    with pytest.raises(StoreFileError, match="no session") as info:
        store.load_session("missing-1")
    assert info.value.path.endswith("sessions/missing-1.json")
    with pytest.raises(StoreFileError, match="not a valid session id"):
        store.load_session("../../etc/passwd")
    data = json.loads(full_session("bad-1").model_dump_json())
    data["conditions"]["humidity_percent"] = 140
    store.sessions_dir.mkdir(parents=True)
    (store.sessions_dir / "bad-1.json").write_text(json.dumps(data))
    with pytest.raises(StoreFileError) as info:
        store.load_session("bad-1")
    assert "conditions.humidity_percent" in str(info.value)
    assert "bad-1.json" in str(info.value)


def test_append_to_dataset_adds_sessions_and_patterns_once(tmp_path: Path) -> None:
    store = SessionStore(tmp_path, dataset_id="cell1")
    assert not store.dataset_path.exists()
    assert store.load_dataset().sessions == []
    a = full_session("a-1")
    assert store.append_to_dataset(a)["pattern_counts"]["knock_timing"] == 1
    # table-only session: gets the fallback VE pattern
    initial, front, rear = region_tables()
    t = TuningSession(
        session_id="tables-1",
        initial_ve_table_front=initial,
        final_ve_table_front=front,
        initial_ve_table_rear=initial,
        final_ve_table_rear=rear,
    )
    store.append_to_dataset(t)
    # the same session again (a replayed log) does not duplicate anything
    assert store.append_to_dataset(a)["appended"] == 0
    assert store.dataset_path.name == "dataset.jsonl"
    assert len(store.dataset_path.read_bytes().splitlines()) == 2
    on_disk = json.loads(store.export_dataset().read_text())
    assert on_disk["dataset_id"] == "cell1"
    assert on_disk["summary"]["total_sessions"] == 2
    assert on_disk["summary"]["pattern_counts"] == {
        "ve_scaling": 2,
        "cylinder_imbalance": 1,
        "decel_popping": 1,
        "heat_soak": 1,
        "knock_timing": 1,
    }
    loaded = store.load_dataset()
    assert [s.session_id for s in loaded.sessions] == ["a-1", "tables-1"]
    assert sorted(p.source for p in loaded.ve_scaling_patterns) == ["cells", "tables"]
    assert load_dataset(store.export_path) == loaded
    # a session id already stored is not appended again, even with other content
    a2 = full_session("a-1")
    a2.patterns = SessionPatterns(heat_soak=[HeatSoakPattern(ve_inflation_pct=2.0)])
    counts = store.append_to_dataset(a2)["pattern_counts"]
    assert counts == on_disk["summary"]["pattern_counts"]
    # a fresh store (a restarted daemon) indexes the file once and agrees
    assert SessionStore(tmp_path).append_to_dataset(a2)["pattern_counts"] == counts
    assert leftovers(tmp_path) == []


def test_corrupt_dataset_is_reported_and_left_alone(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    store.append_to_dataset(full_session("a-1"))
    with store.dataset_path.open("ab") as fh:
        fh.write(b'{"no_id": 5}\n')
    before = store.dataset_path.read_bytes()
    with pytest.raises(StoreFileError) as info:
        SessionStore(tmp_path).append_to_dataset(full_session("b-1"))
    assert "dataset.jsonl" in str(info.value) and "line 2" in str(info.value)
    assert store.dataset_path.read_bytes() == before


def test_failed_dataset_write_keeps_previous_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SessionStore(tmp_path)
    store.append_to_dataset(full_session("a-1"))
    before = store.dataset_path.read_bytes()

    def full_disk(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(StoreFileError, match=r"dataset\.jsonl.*No space left"):
        store.append_to_dataset(full_session("b-1"))
    monkeypatch.undo()
    assert store.dataset_path.read_bytes() == before  # the partial line was cut off
    # the store is still usable and did not count the failed session
    assert store.append_to_dataset(full_session("c-1"))["total_sessions"] == 2
    assert store.append_to_dataset(full_session("b-1"))["total_sessions"] == 3
    assert [s.session_id for s in store.load_dataset().sessions] == ["a-1", "c-1", "b-1"]


def test_torn_last_line_is_ignored_and_cut_before_the_next_append(tmp_path: Path) -> None:
    store = SessionStore(tmp_path)
    store.append_to_dataset(full_session("a-1"))
    with store.dataset_path.open("ab") as fh:
        fh.write(b'{"session_id": "half-1", "sess')  # a crash mid-line
    assert [s.session_id for s in store.load_dataset().sessions] == ["a-1"]
    store.append_to_dataset(full_session("b-1"))
    assert [s.session_id for s in SessionStore(tmp_path).load_dataset().sessions] == [
        "a-1",
        "b-1",
    ]


def test_old_dataset_json_is_imported_once(tmp_path: Path) -> None:
    old = TrainingDataset(dataset_id="old")
    old.add_session(full_session("old-1"))
    save_dataset(old, tmp_path / "dataset.json")
    store = SessionStore(tmp_path)
    assert [s.session_id for s in store.load_dataset().sessions] == ["old-1"]
    assert store.append_to_dataset(full_session("new-1"))["total_sessions"] == 2
    assert [s.session_id for s in store.load_dataset().sessions] == ["old-1", "new-1"]


def test_two_stores_on_one_directory_see_each_others_writes(tmp_path: Path) -> None:
    one, two = SessionStore(tmp_path), SessionStore(tmp_path)
    one.append_to_dataset(full_session("a-1"))
    two.append_to_dataset(full_session("b-1"))
    one.append_to_dataset(full_session("c-1"))
    assert [s.session_id for s in two.load_dataset().sessions] == ["a-1", "b-1", "c-1"]


def test_concurrent_appends_lose_nothing(tmp_path: Path) -> None:
    stores = [SessionStore(tmp_path) for _ in range(3)]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for n in range(4):
                stores[k].append_to_dataset(full_session(f"w{k}-{n}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    ds = stores[0].load_dataset()
    assert sorted(s.session_id for s in ds.sessions) == sorted(
        f"w{k}-{n}" for k in range(3) for n in range(4)
    )
    assert ds.summary()["pattern_counts"]["ve_scaling"] == 12
