"""Model files: ``<kind>.skops`` plus ``model_card.json``, saved and loaded safely.

A model file is a skops archive (never a pickle) holding ``{"kind", "parts": {name:
{"estimator", "columns", "targets", "metric"}}}``. Loading never executes anything
untrusted: the folder may hold only ``*.skops`` files of the five kinds and
``model_card.json`` (anything else, e.g. a ``.pkl``, refuses the whole folder); each
file's types (every class its schema names, read as JSON, plus what
``skops.io.get_untrusted_types`` reports) must all be on :data:`TRUSTED_TYPES` (the exact
classes our pipelines use, so even an estimator skops trusts by default is refused when
it is not ours), else the file is refused; a
card whose scikit-learn major version differs from the installed one is refused. Every
refusal is an :class:`~dynoai_daemon.errors.InputError` naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sklearn
import skops.io as sio

from dynoai_daemon.errors import InputError
from dynoai_daemon.ml import MODEL_CARD
from dynoai_daemon.ml.targets import KINDS
from dynoai_daemon.store.files import atomic_write_json

CARD = MODEL_CARD
#: Every type our model files legitimately contain: a file naming any other type (even
#: one skops would trust by default, e.g. another estimator) is refused.
TRUSTED_TYPES: frozenset[str] = frozenset(
    {
        "builtins.bool",
        "builtins.dict",
        "builtins.float",
        "builtins.int",
        "builtins.list",
        "builtins.NoneType",
        "builtins.slice",
        "builtins.str",
        "builtins.tuple",
        "numpy.bool_",
        "numpy.float64",
        "numpy.int64",
        "numpy.intp",
        "numpy.ndarray",
        "numpy.dtype",
        "sklearn.tree._tree.Tree",
        "sklearn.compose._column_transformer.ColumnTransformer",
        "sklearn.ensemble._forest.ExtraTreesClassifier",
        "sklearn.ensemble._forest.ExtraTreesRegressor",
        "sklearn.impute._base.MissingIndicator",
        "sklearn.impute._base.SimpleImputer",
        "sklearn.pipeline.Pipeline",
        "sklearn.preprocessing._encoders.OneHotEncoder",
        "sklearn.tree._classes.ExtraTreeClassifier",
        "sklearn.tree._classes.ExtraTreeRegressor",
        "sklearn.utils._bunch.Bunch",
    }
)


def sklearn_major(version: str) -> str:
    """The major version ("1" of "1.9.1")."""
    return version.split(".", 1)[0]


def save_models(folder: str | Path, models: Mapping[str, Any], card: Mapping[str, Any]) -> Path:
    """Write ``<kind>.skops`` for each kind and the card (each atomically), removing the
    files of kinds not in ``models`` so folder and card agree."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for kind in KINDS:
        path = out / f"{kind}.skops"
        if kind not in models:
            path.unlink(missing_ok=True)
            continue
        fd, tmp = tempfile.mkstemp(prefix=f".{kind}.", suffix=".skops", dir=out)
        os.close(fd)
        try:
            sio.dump(models[kind], tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    atomic_write_json(out / CARD, dict(card), indent=1)
    return out


def read_card(folder: str | Path) -> dict[str, Any]:
    """The model card, checked for the scikit-learn major version.

    Raises:
        InputError: missing or unreadable card, or another scikit-learn major.
    """
    path = Path(folder) / CARD
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"no model card (train first: dynoai train), {path}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"model card not readable: {exc}, {path}") from exc
    if not isinstance(card, dict) or not isinstance(card.get("models"), dict):
        raise InputError(f"model card has no 'models' table, {path}")
    here = sklearn_major(sklearn.__version__)
    for kind, entry in card["models"].items():
        ver = str((entry or {}).get("sklearn", ""))
        if sklearn_major(ver) != here:
            raise InputError(
                f"model {kind} was trained with scikit-learn {ver or '?'}, this is "
                f"{sklearn.__version__} (major {here}): retrain, {path}"
            )
    return card


def check_folder(folder: str | Path) -> list[Path]:
    """The model files of a folder; refuses anything that is not ours.

    Raises:
        InputError: the folder is missing, or holds a file other than ``<kind>.skops``
            and the card (a pickle, a joblib dump, an unknown kind).
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"no models folder (train first: dynoai train), {root}")
    allowed = {f"{k}.skops" for k in KINDS} | {CARD}
    files: list[Path] = []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") and p.name.endswith(".skops"):
            continue  # a temporary file of an interrupted save
        if p.name not in allowed or not p.is_file():
            raise InputError(
                f"refusing models folder: unexpected file {p.name!r} (only <kind>.skops and "
                f"{CARD}; pickles are never loaded), {p}"
            )
        if p.suffix == ".skops":
            files.append(p)
    return files


def _schema_types(path: Path) -> set[str]:
    """Every ``module.class`` the archive's schema names (read as JSON, nothing built).

    Raises:
        InputError: the archive has no readable schema.
    """
    try:
        with zipfile.ZipFile(path) as z:
            schema = json.loads(z.read("schema.json"))
    except (OSError, KeyError, zipfile.BadZipFile, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"model file has no readable schema: {exc}, {path}") from exc
    found: set[str] = set()
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            mod, cls = node.get("__module__"), node.get("__class__")
            if isinstance(mod, str) and isinstance(cls, str):
                found.add(f"{mod}.{cls}")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def load_model(path: str | Path) -> dict[str, Any]:
    """Load one ``.skops`` file after checking every type it holds.

    Raises:
        InputError: not a skops archive, an untrusted type, or not our structure.
    """
    p = Path(path)
    if not zipfile.is_zipfile(p):
        raise InputError(f"not a skops model file (refused, not executed), {p}")
    try:
        untrusted = sio.get_untrusted_types(file=p)
    except Exception as exc:
        raise InputError(f"model file not readable: {exc}, {p}") from exc
    bad = sorted((set(untrusted) | _schema_types(p)) - TRUSTED_TYPES)
    if bad:
        raise InputError(f"model file holds untrusted types {', '.join(bad)} (refused), {p}")
    try:
        obj = sio.load(p, trusted=list(untrusted))
    except Exception as exc:
        raise InputError(f"model file not loadable: {exc}, {p}") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("parts"), dict):
        raise InputError(f"model file is not a dynoai model, {p}")
    return obj


def load_models(folder: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Every model of a folder and its card, all checked (see the module docstring)."""
    files = check_folder(folder)
    card = read_card(folder)
    models: dict[str, dict[str, Any]] = {}
    for p in files:
        models[p.stem] = load_model(p)
    if not models:
        raise InputError(f"no model files (train first: dynoai train), {folder}")
    return models, card
