"""Atomic files and the session store under the data directory.

Everything the daemon writes (``sessions/<id>.json``, ``dataset.json``) goes through
:func:`atomic_write_text`: the text is written to a temporary file in the same directory,
flushed and fsynced, renamed over the target with ``os.replace`` and the directory is
fsynced, so a crash or a full disk leaves either the old file or the new one, never half
a file, and no temporary file behind. :class:`SessionStore` keeps one TuningSession per
closed run and maintains the TrainingDataset: each appended session brings its patterns
(or, for a table-only session, the derived VE pattern; see :mod:`dynoai_daemon.collector`),
the dataset's summary is recomputed on every write, and concurrent writers (threads of
one daemon, or a replay beside the daemon) are serialised with a lock file.
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
from dynoai_daemon.models import SESSION_ID_PATTERN, TrainingDataset, TuningSession, format_errors


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
    """Write ``dataset`` (with its summary) to ``path`` atomically.

    Raises:
        StoreFileError: the file could not be written; the message names the path.
    """
    return atomic_write_text(path, dataset.to_json())


def load_dataset(path: str | os.PathLike[str]) -> TrainingDataset:
    """Read a dataset written by :func:`save_dataset`.

    Raises:
        InputError: missing or unreadable file, not JSON, or invalid content; the
            message names the path and each bad field.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError("dataset file not found", path=str(p)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read dataset: {exc}", path=str(p)) from exc
    return TrainingDataset.from_json(text, source=str(p))


class SessionStore:
    """Sessions and the training dataset under one data directory.

    Layout: ``<data_dir>/sessions/<session_id>.json`` and ``<data_dir>/dataset.json``.

    Args:
        data_dir: the data directory (created on first write).
        dataset_id: the id given to a dataset this store creates.
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, dataset_id: str = "dynoai") -> None:
        self.data_dir = Path(data_dir)
        self.dataset_id = dataset_id
        self._lock = threading.Lock()
        # The parsed dataset and the (inode, mtime, ctime, size) of the file it came from, so that
        # appending many sessions does not re-parse a file nobody else has changed.
        self._cached: tuple[tuple[int, int, int, int], TrainingDataset] | None = None

    @property
    def sessions_dir(self) -> Path:
        """``<data_dir>/sessions``."""
        return self.data_dir / "sessions"

    @property
    def dataset_path(self) -> Path:
        """``<data_dir>/dataset.json``."""
        return self.data_dir / "dataset.json"

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

    def _signature(self) -> tuple[int, int, int, int] | None:
        try:
            st = self.dataset_path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreFileError(
                f"cannot stat: {exc.strerror or exc}", path=self.dataset_path
            ) from exc
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def _read_dataset(self, *, cached: bool) -> TrainingDataset:
        sig = self._signature()
        if sig is None:
            self._cached = None
            return TrainingDataset(dataset_id=self.dataset_id)
        if cached and self._cached is not None and self._cached[0] == sig:
            return self._cached[1]
        try:
            ds = load_dataset(self.dataset_path)
        except InputError as exc:
            raise StoreFileError(str(exc.args[0]), path=self.dataset_path) from exc
        self._cached = (sig, ds) if cached else None
        return ds

    def load_dataset(self) -> TrainingDataset:
        """Return the stored dataset (a fresh object, read from the file), or a new empty
        one with ``dataset_id`` if none is stored yet.

        Raises:
            StoreFileError: the dataset file is unreadable or invalid.
        """
        with self._lock:
            return self._read_dataset(cached=False)

    def dataset_session_ids(self) -> set[str]:
        """The ids of the sessions already in ``dataset.json`` (empty when there is none)."""
        with self._dataset_lock():
            return {s.session_id for s in self._read_dataset(cached=True).sessions}

    def save_dataset(self, dataset: TrainingDataset) -> Path:
        """Write ``dataset.json`` atomically (with its summary)."""
        with self._dataset_lock():
            self._cached = None
            return atomic_write_text(self.dataset_path, dataset.to_json())

    def append_many_to_dataset(self, sessions: Sequence[TuningSession]) -> dict[str, Any]:
        """Add several sessions to ``dataset.json`` with one write (replay, recovery).

        Like :meth:`append_to_dataset`, except that a session whose id is already in the
        dataset is not added again (a log replayed twice gives the same ids: the training
        data never holds a run twice). Rewriting the file once instead of once per
        session keeps a long replay linear in its number of runs.
        """
        with self._dataset_lock():
            dataset = self._read_dataset(cached=True)
            self._cached = None
            collector = TrainingDataCollector.from_dataset(dataset)
            known = {s.session_id for s in dataset.sessions}
            for session in sessions:
                if session.session_id in known:
                    continue
                known.add(session.session_id)
                collector.add_session(session)
                collector.extract_session_patterns(session)
            atomic_write_text(self.dataset_path, dataset.to_json())
            sig = self._signature()
            if sig is not None:
                self._cached = (sig, dataset)
            return dataset.summary()

    def append_to_dataset(self, session: TuningSession) -> dict[str, Any]:
        """Add a session and its patterns to ``dataset.json`` and write it atomically.

        A session already in the dataset (same id) is replaced together with its patterns.
        Sessions without extracted patterns but with initial and final VE tables get the
        table-only VE scaling pattern (:mod:`dynoai_daemon.collector`).

        Returns:
            The ``summary()`` of the dataset as written (use :meth:`load_dataset` for the
            dataset itself).

        Raises:
            StoreFileError: the existing dataset is invalid, or the write failed (the old
                file is then intact).
        """
        with self._dataset_lock():
            # The cached dataset is mutated in place; it is kept only if the write succeeds,
            # else the next append re-reads the file that is still on disk.
            dataset = self._read_dataset(cached=True)
            self._cached = None
            collector = TrainingDataCollector.from_dataset(dataset)
            collector.add_session(session)
            collector.extract_session_patterns(session)
            atomic_write_text(self.dataset_path, dataset.to_json())
            sig = self._signature()
            if sig is not None:
                self._cached = (sig, dataset)
            return dataset.summary()
