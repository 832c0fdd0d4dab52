"""Live model predictions: ``dynoai/<S>/predict/<build_id>`` when a build is set.

When the daemon starts with a build in its config or gets ``build/set``, and the models
folder (``<data_dir>/models``, where ``dynoai train`` writes by default) holds trained
models, the predictions for that build are computed off the event loop and published
retained on ``predict/<build_id>`` (payload: build id, the models' dataset digest, the
predictions keyed by kind) before the first pull. Models are loaded once, through the
same checks as ``dynoai predict`` (a refused folder is logged and nothing is published);
the folder is re-read when its card changes. Without models this is silent apart from
one info line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from dynoai_daemon.errors import InputError
from dynoai_daemon.ml import MODEL_CARD
from dynoai_daemon.ml.predict import predict_build, prediction_payload
from dynoai_daemon.models import build_id

log = structlog.get_logger(__name__)


class Predictions:
    """Predictions for the station's builds from a models folder.

    Args:
        models_dir: the folder ``dynoai train`` wrote.
    """

    def __init__(self, models_dir: str | Path) -> None:
        self.models_dir = Path(models_dir)
        self._models: dict[str, Any] | None = None
        self._card: dict[str, Any] = {}
        self._stamp: float | None = None
        self.published = 0
        self.last_error: str | None = None

    def _load(self) -> bool:
        # Look for the card first: without models, scikit-learn is never imported (its
        # import costs a second of CPU the live path should not pay).
        card = self.models_dir / MODEL_CARD
        try:
            stamp = card.stat().st_mtime
        except OSError:
            if self._stamp is None:
                log.info("no models: predictions off", models=str(self.models_dir))
            self._models, self._stamp = None, -1.0
            return False
        if stamp != self._stamp:
            from dynoai_daemon.ml.store import load_models

            self._stamp = stamp
            try:
                self._models, self._card = load_models(self.models_dir)
                self.last_error = None
            except InputError as exc:
                self._models = None
                self.last_error = str(exc)
                log.error("models refused: predictions off", error=str(exc))
        return self._models is not None

    def payload(self, build: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """``(build_id, payload)`` for a build, or None without usable models (CPU work:
        call it in an executor)."""
        if not self._load() or self._models is None:
            return None
        pred = predict_build(self._models, build)
        return build_id(build), prediction_payload(pred, build, self._card)

    async def publish(self, publisher: Any, build: Mapping[str, Any]) -> str | None:
        """Compute in an executor and publish retained; returns the topic or None."""
        loop = asyncio.get_running_loop()
        try:
            res = await loop.run_in_executor(None, self.payload, dict(build))
        except Exception as exc:  # a model that fails on this build: log, never crash
            log.error("prediction failed", error=repr(exc))
            return None
        if res is None or publisher is None:
            return None
        bid, payload = res
        topic = str(publisher.topic(f"predict/{bid}"))
        publisher.publish_retained(topic, payload)
        self.published += 1
        log.info("predictions published", topic=topic)
        return topic
