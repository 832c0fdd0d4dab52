"""Storage under the data directory: atomic files, sessions and the training dataset.

See :mod:`dynoai_daemon.store.files`; docs/contract.md fixes the layout
(``sessions/<id>.json``, the append-only ``dataset.jsonl`` and its ``dataset.json`` export).
"""

from dynoai_daemon.store.files import (
    SessionStore,
    StoreFileError,
    atomic_write_json,
    atomic_write_text,
    load_dataset,
    save_dataset,
)

__all__ = [
    "SessionStore",
    "StoreFileError",
    "atomic_write_json",
    "atomic_write_text",
    "load_dataset",
    "save_dataset",
]
