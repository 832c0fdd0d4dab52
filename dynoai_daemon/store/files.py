"""Atomic files, the session store and the append-only training dataset.

Whole files the daemon writes (``sessions/<id>.json``, an exported ``dataset.json``) go
through :func:`atomic_write_text`: the text is written to a temporary file in the same
directory, flushed and fsynced, renamed over the target with ``os.replace`` and the
directory is fsynced, so a crash or a full disk leaves either the old file or the new one,
never half a file, and no temporary file behind.

The training dataset lives in ``dataset.jsonl``: one line per session,
``{"session_id", "session", "patterns"}`` (the patterns the collector learns from it,
tagged with its id; see :mod:`dynoai_daemon.collector`). Adding a session appends one line
and fsyncs it: O(1) work and memory per session however large the dataset grows (the
store keeps only the ids and the pattern counts). A session id already present is not
appended again (replaying a log twice adds nothing). A write cut short (full disk,
crash) is truncated away, so the file is always whole lines. The seed's
``TrainingDataset`` JSON is produced on demand from it (:meth:`SessionStore.load_dataset`,
:func:`save_dataset`, ``dynoai dataset export``); a ``dataset.json`` left by an older
version is imported once. Writers in several threads or processes (a replay beside the
daemon) are serialised with a lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dynoai_daemon.collector import TrainingDataCollector
from dynoai_daemon.errors import InputError, StoreError
from dynoai_daemon.models import (
    PATTERN_KINDS,
    SESSION_ID_PATTERN,
    TrainingDataset,
    TuningSession,
    format_errors,
)

DATASET_LOG = "dataset.jsonl"
DATASET_EXPORT = "dataset.json"


class StoreFileError(StoreError):
    """A StoreError about one file; ``path`` names it (also in the message)."""

    def __init__(self, message: str, *, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data itself is synced
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, creating parent directories.

    Args:
        path: the target file.
        text: the whole new content.
        encoding: text encoding.

    Returns:
        The target path.

    Raises:
        StoreFileError: the file could not be written (the old content, if any, is intact
            and no temporary file is left).
    """
    target = Path(path)
    data = text.encode(encoding)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise StoreFileError(f"cannot write: {exc.strerror or exc}", path=target) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise StoreFileError(f"cannot write: {exc.strerror or exc}", path=target) from exc
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 1) -> Path:
    """Serialise ``obj`` as JSON (NaN/inf refused) and write it atomically.

    The whole document is serialised before any file is touched, so a serialisation
    error leaves the old file as it was.

    Args:
        path: the target file.
        obj: a JSON-serialisable object, or a pydantic model.
        indent: JSON indent (None for compact).

    Returns:
        The target path.

    Raises:
        StoreFileError: ``obj`` cannot be serialised (e.g. holds NaN) or the write failed.
    """
    try:
        if hasattr(obj, "model_dump"):
            obj = obj.model_dump(mode="json")
        text = json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise StoreFileError(f"cannot serialise to JSON: {exc}", path=path) from exc
    return atomic_write_text(path, text)


def save_dataset(dataset: TrainingDataset, path: str | os.PathLike[str]) -> Path:
    """Write ``dataset`` (with its summary) as the seed's JSON to ``path``, atomically.

    Raises:
        StoreFileError: the file could not be written (the old one, if any, is intact).
    """
    return atomic_write_text(path, dataset.to_json())


def load_dataset(path: str | os.PathLike[str]) -> TrainingDataset:
    """Read a TrainingDataset JSON file (as :func:`save_dataset` writes it).

    Raises:
        InputError: missing or unreadable file, not JSON, or invalid content; the
            message names the path and each bad field.
    """
    p = Path(path)
    try:
        text = p.read_bytes()
    except FileNotFoundError as exc:
        raise InputError("dataset file not found", path=str(p)) from exc
    except OSError as exc:
        raise InputError(f"cannot read dataset: {exc.strerror or exc}", path=str(p)) from exc
    return TrainingDataset.from_json(text, source=str(p))


def _session_line(session: TuningSession) -> tuple[bytes, dict[str, int]]:
    # The patterns exactly as the collector adds them to a dataset (tagged, table fallback).
    scratch = TrainingDataset(dataset_id="line")
    collector = TrainingDataCollector.from_dataset(scratch)
    collector.add_session(session)
    counts = collector.extract_session_patterns(session)
    patterns = {
        kind: [p.model_dump(mode="json") for p in scratch.patterns_of(kind)]
        for kind in PATTERN_KINDS
    }
    # Id and counts first: indexing the file reads only this head of each line.
    body = {
        "session_id": session.session_id,
        "pattern_counts": counts,
        "session": session.model_dump(mode="json"),
        "patterns": patterns,
    }
    try:
        text = json.dumps(body, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise StoreFileError(f"cannot serialise session: {exc}", path=session.session_id) from exc
    return (text + "\n").encode("utf-8"), counts


class SessionStore:
    """Sessions and the training dataset under one data directory.

    Layout: ``<data_dir>/sessions/<session_id>.json`` and ``<data_dir>/dataset.jsonl``
    (export: ``dataset.json``).

    Args:
        data_dir: the data directory (created on first write).
        dataset_id: the id given to the dataset this store exports.
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, dataset_id: str = "dynoai") -> None:
        self.data_dir = Path(data_dir)
        self.dataset_id = dataset_id
        self._lock = threading.Lock()
        # What the log holds up to byte offset _scanned: ids and pattern counts only.
        self._ids: set[str] = set()
        self._counts: dict[str, int] = dict.fromkeys(PATTERN_KINDS, 0)
        self._scanned = 0
        self._scanned_ino: int | None = None

    @property
    def sessions_dir(self) -> Path:
        """``<data_dir>/sessions``."""
        return self.data_dir / "sessions"

    @property
    def dataset_path(self) -> Path:
        """``<data_dir>/dataset.jsonl``: the append-only dataset."""
        return self.data_dir / DATASET_LOG

    @property
    def export_path(self) -> Path:
        """``<data_dir>/dataset.json``: where ``dynoai dataset export`` writes by default."""
        return self.data_dir / DATASET_EXPORT

    def session_path(self, session_id: str) -> Path:
        """Return the file of a session id.

        Raises:
            StoreFileError: the id is not a safe file name.
        """
        if not re.fullmatch(SESSION_ID_PATTERN, session_id):
            raise StoreFileError(f"not a valid session id: {session_id!r}", path=self.sessions_dir)
        return self.sessions_dir / f"{session_id}.json"

    def save_session(self, session: TuningSession) -> Path:
        """Write ``sessions/<session_id>.json`` atomically (replacing an older version).

        Returns:
            The file written.

        Raises:
            StoreFileError: the write failed.
        """
        path = self.session_path(session.session_id)
        return atomic_write_text(path, session.model_dump_json(indent=1))

    def load_session(self, session_id: str) -> TuningSession:
        """Read one session.

        Raises:
            StoreFileError: no such session, unreadable, or invalid (naming the fields).
        """
        path = self.session_path(session_id)
        try:
            text = path.read_bytes()
        except FileNotFoundError as exc:
            raise StoreFileError(f"no session {session_id!r}", path=path) from exc
        except OSError as exc:
            raise StoreFileError(f"cannot read: {exc.strerror or exc}", path=path) from exc
        try:
            return TuningSession.model_validate_json(text)
        except ValidationError as exc:
            raise StoreFileError(f"invalid session: {format_errors(exc)}", path=path) from exc

    def list_sessions(self) -> list[str]:
        """Return the stored session ids, sorted (temporary files are ignored)."""
        if not self.sessions_dir.is_dir():
            return []
        return sorted(
            p.stem
            for p in self.sessions_dir.iterdir()
            if p.suffix == ".json" and not p.name.startswith(".") and p.is_file()
        )

    def iter_sessions(self) -> Iterator[TuningSession]:
        """Yield every stored session in id order."""
        for sid in self.list_sessions():
            yield self.load_session(sid)

    @contextlib.contextmanager
    def _dataset_lock(self) -> Iterator[None]:
        # Threads first, then other processes (a replay beside the daemon).
        with self._lock:
            try:
                self.data_dir.mkdir(parents=True, exist_ok=True)
                fh = open(self.data_dir / ".dataset.lock", "a+b")  # noqa: SIM115
            except OSError as exc:
                raise StoreFileError(
                    f"cannot lock: {exc.strerror or exc}", path=self.data_dir
                ) from exc
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                fh.close()

    def _lines(
        self, start: int, *, head_only: bool = False
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield ``(end offset, record)`` of each whole line from byte ``start``.

        ``head_only``: parse only the line's head (id and pattern counts), not the session.

        Raises:
            StoreFileError: unreadable file, or a whole line that is not a record (named
                by its line number counted from ``start``).
        """
        path = self.dataset_path
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreFileError(f"cannot read: {exc.strerror or exc}", path=path) from exc
        with fh:
            fh.seek(start)
            pos = start
            for n, raw in enumerate(fh, 1):
                if not raw.endswith(b"\n"):
                    return  # a line being written, or cut short: not part of the dataset
                pos += len(raw)
                try:
                    cut = raw.find(b',"session":') if head_only else -1
                    rec = json.loads(raw[:cut] + b"}" if cut > 0 else raw)
                    if not isinstance(rec, dict) or not isinstance(rec.get("session_id"), str):
                        raise ValueError("no session_id")
                except ValueError as exc:
                    raise StoreFileError(
                        f"line {n}: not a dataset record: {exc}", path=path
                    ) from exc
                yield pos, rec

    def _catch_up(self) -> None:
        """Index lines appended since the last look (by us or another process)."""
        try:
            st = self.dataset_path.stat()
        except FileNotFoundError:
            self._ids.clear()
            self._counts = dict.fromkeys(PATTERN_KINDS, 0)
            self._scanned, self._scanned_ino = 0, None
            return
        except OSError as exc:
            raise StoreFileError(
                f"cannot stat: {exc.strerror or exc}", path=self.dataset_path
            ) from exc
        if st.st_ino != self._scanned_ino or st.st_size < self._scanned:
            self._ids.clear()
            self._counts = dict.fromkeys(PATTERN_KINDS, 0)
            self._scanned, self._scanned_ino = 0, st.st_ino
        if st.st_size == self._scanned:
            return
        for pos, rec in self._lines(self._scanned, head_only=True):
            self._ids.add(rec["session_id"])
            counts = rec.get("pattern_counts")
            if not isinstance(counts, dict):
                pats = rec.get("patterns") or {}
                counts = {kind: len(pats.get(kind) or []) for kind in PATTERN_KINDS}
            for kind in PATTERN_KINDS:
                self._counts[kind] += int(counts.get(kind) or 0)
            self._scanned = pos

    def _import_old_export(self) -> list[TuningSession]:
        # A dataset.json from before the append-only store: its sessions come first.
        if self.dataset_path.exists() or not self.export_path.exists():
            return []
        try:
            old = load_dataset(self.export_path)
        except InputError as exc:
            raise StoreFileError(str(exc.args[0]), path=self.export_path) from exc
        return list(old.sessions)

    def _append(self, sessions: Sequence[TuningSession]) -> dict[str, Any]:
        self._catch_up()
        todo = [*self._import_old_export(), *sessions]
        lines: list[bytes] = []
        added: dict[str, dict[str, int]] = {}
        for session in todo:
            sid = session.session_id
            if sid in self._ids or sid in added:
                continue
            line, counts = _session_line(session)
            lines.append(line)
            added[sid] = counts
        if lines:
            self._write_lines(b"".join(lines))
            for sid, counts in added.items():
                self._ids.add(sid)
                for kind, n in counts.items():
                    self._counts[kind] += n
            st = self.dataset_path.stat()
            self._scanned, self._scanned_ino = st.st_size, st.st_ino
        return {
            "total_sessions": len(self._ids),
            "pattern_counts": dict(self._counts),
            "appended": len(added),
        }

    def _write_lines(self, data: bytes) -> None:
        path = self.dataset_path
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise StoreFileError(f"cannot write: {exc.strerror or exc}", path=path) from exc
        try:
            size = os.fstat(fd).st_size
            if size != self._scanned:
                # A torn last line (a crash or full disk mid-write): cut it off first.
                os.ftruncate(fd, self._scanned)
                size = self._scanned
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # whole lines only: undo the partial append
                raise
        except OSError as exc:
            raise StoreFileError(f"cannot write: {exc.strerror or exc}", path=path) from exc
        finally:
            os.close(fd)
        if size == 0:
            _fsync_dir(path.parent)

    def load_dataset(self) -> TrainingDataset:
        """Return the whole dataset as the seed's TrainingDataset (read from the file), or a
        new empty one with ``dataset_id`` if none is stored yet.

        Raises:
            StoreFileError: the dataset file is unreadable or invalid.
        """
        with self._lock:
            if not self.dataset_path.exists() and self.export_path.exists():
                try:
                    return load_dataset(self.export_path)
                except InputError as exc:
                    raise StoreFileError(str(exc.args[0]), path=self.export_path) from exc
            sessions: list[Any] = []
            lists: dict[str, list[Any]] = {kind: [] for kind in PATTERN_KINDS}
            seen: set[str] = set()
            for _, rec in self._lines(0):
                if rec["session_id"] in seen:
                    continue  # two processes raced on one id: the first line counts
                seen.add(rec["session_id"])
                sessions.append(rec.get("session"))
                pats = rec.get("patterns") or {}
                for kind in PATTERN_KINDS:
                    lists[kind].extend(pats.get(kind) or [])
            body: dict[str, Any] = {"dataset_id": self.dataset_id, "sessions": sessions}
            for kind in PATTERN_KINDS:
                body[f"{kind}_patterns"] = lists[kind]
            try:
                return TrainingDataset.model_validate(body)
            except ValidationError as exc:
                raise StoreFileError(
                    f"invalid dataset: {format_errors(exc)}", path=self.dataset_path
                ) from exc

    def dataset_session_ids(self) -> set[str]:
        """The ids of the sessions already in the dataset."""
        with self._dataset_lock():
            self._catch_up()
            return set(self._ids)

    def export_dataset(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the seed's ``dataset.json`` (default: in the data directory) atomically."""
        return save_dataset(self.load_dataset(), path or self.export_path)

    def append_many_to_dataset(self, sessions: Sequence[TuningSession]) -> dict[str, Any]:
        """Append several sessions in one write (replay, recovery); same rules as
        :meth:`append_to_dataset`."""
        with self._dataset_lock():
            return self._append(sessions)

    def append_to_dataset(self, session: TuningSession) -> dict[str, Any]:
        """Append a session and its patterns to ``dataset.jsonl`` (one line, fsynced).

        A session id already in the dataset is not appended again. Sessions without
        extracted patterns but with initial and final VE tables get the table-only VE
        scaling pattern (:mod:`dynoai_daemon.collector`).

        Returns:
            ``{"total_sessions", "pattern_counts", "appended"}`` after the append.

        Raises:
            StoreFileError: the existing dataset is invalid, or the write failed (the
                file then holds exactly what it held before).
        """
        with self._dataset_lock():
            return self._append([session])
