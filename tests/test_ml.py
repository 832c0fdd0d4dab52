"""The five pattern models: trained on a simulated fleet, validated on unseen builds.

A module fixture simulates a fleet (parts -> true VE, the ECU on the family's stock map)
and trains on it once. Checks: every model beats its per-family baseline in build-grouped
CV; builds that are not in the fleet, simulated afterwards with their truth, get VE region
predictions clearly closer to the truth than the fleet mean; the model folder refuses a
planted pickle, an untrusted type and a card from another scikit-learn major without
executing anything; ``predict`` prints JSON keyed by kind; ``build/set`` to a daemon on a
real mosquitto publishes the predictions retained on ``predict/<build_id>``.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dynoai_daemon.cli.main import main
from dynoai_daemon.config import Settings
from dynoai_daemon.ml.store import load_models, save_models
from dynoai_daemon.ml.targets import KINDS, VE_TARGETS, collect
from dynoai_daemon.ml.training import model_card, train_all, trained_models
from dynoai_daemon.models import build_id
from dynoai_daemon.patterns.cells import REGIONS
from dynoai_daemon.service.daemon import Daemon
from simulators.dyno import Simulation
from simulators.fleet import build_scenario, generate_fleet, random_build, random_day, session_plan
from simulators.truth import steady_weights
from tests.collect_support import pg_db, restore_logging
from tests.mosquitto import MosquittoBroker, Subscriber
from tests.pg import TestDatabase

__all__ = ["pg_db", "restore_logging"]  # fixtures, imported for pytest

FLEET_BUILDS = 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A fleet of 20 builds x 3 sessions, its tables, the trained models on disk."""
    sessions = [fs.session.model_dump(mode="json") for fs in generate_fleet(FLEET_BUILDS, seed=7)]
    tables = collect(sessions)
    results = train_all(tables)
    folder = tmp_path_factory.mktemp("models")
    models = trained_models(results)
    card = model_card(results, tables)
    save_models(folder, models, card)
    return {"sessions": sessions, "tables": tables, "card": card, "folder": folder}


def test_every_model_beats_its_baseline_in_build_grouped_cv(trained: dict[str, Any]) -> None:
    card = trained["card"]
    assert set(card["models"]) == set(KINDS), card.get("not_trained")
    for kind, entry in card["models"].items():
        assert entry["n_builds"] >= 10
        for part, info in entry["parts"].items():
            cv = info["cv"]
            assert cv["groups"] == "build" and cv["folds"] == 5
            assert cv["model"] < cv["baseline"], (kind, part, cv)
    assert len(card["dataset_digest"]) == 64


def _true_region_deltas(sim: Simulation) -> dict[str, float]:
    """Mean over both cylinders of (true VE / ECU VE - 1) x 100 in the region's cells that
    a session of the build learns from (steady weight >= 3), clipped to the core's 15 %."""
    t = sim.engine.tables
    rpm = t.rpm_axis[:, None]
    kpa = t.map_axis[None, :]
    seen = steady_weights(sim) >= 3.0
    out = {}
    for name, (r0, r1, k0, k1) in REGIONS.items():
        mask = (rpm >= r0) & (rpm <= r1) & (kpa >= k0) & (kpa <= k1) & seen
        vals = np.concatenate([(t.ratio_front[mask] - 1) * 100, (t.ratio_rear[mask] - 1) * 100])
        out[f"ve_delta_{name}"] = float(np.clip(vals, -15, 15).mean())
    return out


def test_unseen_builds_are_predicted_closer_than_the_fleet_mean(trained: dict[str, Any]) -> None:
    from dynoai_daemon.ml.predict import predict_build

    models, _ = load_models(trained["folder"])
    fleet_y = np.asarray(trained["tables"].tables["ve_scaling"].y)
    fleet_mean = fleet_y.mean(axis=0)
    rng = np.random.default_rng(991)
    err_model, err_mean = [], []
    for i in range(8):
        build = random_build(rng)
        day = random_day(rng, soak=False)
        sc = build_scenario(
            build, day, session_plan(rng, soak=False, short=True), name=f"u{i}", seed=i
        )
        truth = _true_region_deltas(Simulation(sc))
        bc = sc.build.to_build_config()
        bc["exhaust_type"] = sc.build.exhaust_type
        pred = predict_build(models, bc, conditions=day)["ve_scaling"]
        for j, t in enumerate(VE_TARGETS):
            err_model.append(abs(pred[t]["value"] - truth[t]))
            err_mean.append(abs(fleet_mean[j] - truth[t]))
            assert pred[t]["uncertainty"] >= 0
    assert np.mean(err_model) < 0.6 * np.mean(err_mean), (np.mean(err_model), np.mean(err_mean))


def _copy_models(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _build_file(tmp: Path) -> Path:
    p = tmp / "build.toml"
    p.write_text(
        '[build]\nengine_family = "milwaukee_8"\ndisplacement_ci = 117\ncompression_ratio = 10.7\n'
        'stage = "stage_2"\nexhaust_type = "true_dual"\nheader_length_delta_in = 4.0\n'
        "pair_valve_present = false\noctane_requirement = 93\n"
        '[build.cam_spec]\nprofile = "s_and_s_585"\nintake_duration_deg = 240\n'
        "exhaust_duration_deg = 248\nlobe_separation_angle_deg = 104\n"
        "overlap_deg_front = 48\noverlap_deg_rear = 42\n"
        "[conditions]\nambient_temp_f = 90.0\n"
    )
    return p


def test_predict_json_has_the_kinds_as_keys(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "predict",
            "--build",
            str(_build_file(tmp_path)),
            "--models",
            str(trained["folder"]),
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == set(KINDS)
    ve = out["ve_scaling"]
    assert all(k in ve for k in VE_TARGETS)
    assert len(ve["cells"]["front"]) == 19 and len(ve["cells"]["front"][0]) == 18
    assert 0.0 <= out["decel_popping"]["pop_probability"]["value"] <= 1.0
    assert len(out["decel_popping"]["enrichment_zones"]) == 4
    assert out["heat_soak"]["inputs"]["ambient_temp_f"] == 90.0
    assert "safe_advance_wot" in out["knock_timing"]


class _Boom:
    """Unpickling it would create ``path``: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def test_planted_pickle_is_refused_without_running_it(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _copy_models(trained["folder"], tmp_path / "m1")
    marker = tmp_path / "ran"
    (folder / "extra.pkl").write_bytes(pickle.dumps(_Boom(marker)))
    rc = main(["predict", "--build", str(_build_file(tmp_path)), "--models", str(folder)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "extra.pkl" in err
    assert not marker.exists()
    # A pickle under a model's name: not a skops archive, refused, not executed.
    (folder / "extra.pkl").unlink()
    (folder / "heat_soak.skops").write_bytes(pickle.dumps(_Boom(marker)))
    rc = main(["predict", "--build", str(_build_file(tmp_path)), "--models", str(folder)])
    err = capsys.readouterr().err
    assert rc == 2 and "not a skops model file" in err and "heat_soak.skops" in err
    assert not marker.exists()


def test_untrusted_type_and_other_sklearn_major_are_refused(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import skops.io as sio
    from sklearn.neighbors import KNeighborsRegressor

    folder = _copy_models(trained["folder"], tmp_path / "m2")
    x = np.arange(20.0).reshape(10, 2)
    model = KNeighborsRegressor(n_neighbors=2).fit(x, x[:, 0])
    sio.dump({"kind": "heat_soak", "parts": {"x": model}}, folder / "heat_soak.skops")
    rc = main(["predict", "--build", str(_build_file(tmp_path)), "--models", str(folder)])
    err = capsys.readouterr().err
    assert rc == 2 and "untrusted types" in err and "heat_soak.skops" in err
    # An estimator skops itself trusts by default is refused too: it is not one of ours.
    from sklearn.linear_model import LinearRegression

    linear = LinearRegression().fit(x, x[:, 0])
    sio.dump({"kind": "heat_soak", "parts": {"x": linear}}, folder / "heat_soak.skops")
    rc = main(["predict", "--build", str(_build_file(tmp_path)), "--models", str(folder)])
    err = capsys.readouterr().err
    assert rc == 2 and "sklearn.linear_model._base.LinearRegression" in err
    folder = _copy_models(trained["folder"], tmp_path / "m3")
    card = json.loads((folder / "model_card.json").read_text())
    card["models"]["knock_timing"]["sklearn"] = "0.24.2"
    (folder / "model_card.json").write_text(json.dumps(card))
    rc = main(["predict", "--build", str(_build_file(tmp_path)), "--models", str(folder)])
    err = capsys.readouterr().err
    assert rc == 2 and "scikit-learn 0.24.2" in err


def test_bad_build_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "b.toml"
    p.write_text('[build]\nengine_family = "twin_cam"\ndisplacement_ci = 5\n')
    assert main(["predict", "--build", str(p), "--models", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: build.displacement_ci")
    assert main(["predict", "--build", str(tmp_path / "none.toml")]) == 2
    assert main(["train", "--data-dir", str(tmp_path / "empty")]) == 2
    assert "no sessions folder" in capsys.readouterr().err
    (tmp_path / "d" / "sessions").mkdir(parents=True)
    (tmp_path / "d" / "sessions" / "broken.json").write_text('{"session_id": ')
    assert main(["train", "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: session file not readable as JSON") and "broken.json" in err
    p.write_text('[build]\nengine_family = "twin_cam"\ndisplacement_ci = 103\n')
    assert main(["predict", "--build", str(p), "--models", str(tmp_path / "nomodels")]) == 2
    assert "no models folder" in capsys.readouterr().err


def test_fleet_cli_then_train_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--fleet", "4", "--seed", "3", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "12 session(s) of 4 build(s)" in out
    assert len(list((tmp_path / "sessions").glob("*.json"))) == 12
    assert main(["train", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ve_scaling" in out and "model_card.json" in out
    card = json.loads((tmp_path / "models" / "model_card.json").read_text())
    assert card["models"]["ve_scaling"]["cv"]["groups"] == "build"
    assert (tmp_path / "models" / "ve_scaling.skops").exists()
    assert main(["simulate", "--fleet", "0", "--data-dir", str(tmp_path)]) == 2


async def test_build_set_publishes_predictions_retained(
    trained: dict[str, Any], tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    _copy_models(trained["folder"], tmp_path / "models")
    st = "mlcell"
    settings = Settings(
        station=st, data_dir=tmp_path, mqtt={"url": f"mqtt://127.0.0.1:{mosquitto.port}"}
    )
    daemon = Daemon(settings, drivers={})
    task = asyncio.create_task(daemon.run())
    build = {
        "engine_family": "twin_cam",
        "displacement_ci": 110,
        "compression_ratio": 10.2,
        "stage": "stage_2",
        "exhaust_type": "2-into-1",
        "cam_spec": {"profile": "wood_tw_555", "overlap_deg_front": 30, "overlap_deg_rear": 26},
    }
    try:
        await asyncio.wait_for(daemon.ready.wait(), 10)
        async with Subscriber(mosquitto.port, f"dynoai/{st}/predict/+") as sub:
            import aiomqtt

            async with aiomqtt.Client("127.0.0.1", mosquitto.port) as c:
                await c.publish(
                    f"dynoai/{st}/request/build/set", json.dumps({"build": build}).encode(), qos=1
                )
            m = await sub.wait_for(lambda r: bool(r.payload), within=30)
        payload = m.json()
        normal = daemon.builder.build_config.model_dump(mode="json")
        assert m.topic == f"dynoai/{st}/predict/{build_id(normal)}"
        assert payload["build_id"] == build_id(normal)
        assert set(payload["predictions"]) == set(KINDS)
        assert payload["dataset_digest"] == trained["card"]["dataset_digest"]
        # Retained: a late subscriber gets it too.
        async with Subscriber(mosquitto.port, f"dynoai/{st}/predict/+") as late:
            r = await late.wait_for(lambda r: bool(r.payload), within=10)
            assert r.retain and r.topic == m.topic
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 15)


async def test_daemon_with_a_build_in_its_config_publishes_at_start(
    trained: dict[str, Any], tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    _copy_models(trained["folder"], tmp_path / "models")
    build = {"engine_family": "sportster", "displacement_ci": 88, "stage": "stage_1"}
    settings = Settings(
        station="mlstart",
        data_dir=tmp_path,
        mqtt={"url": f"mqtt://127.0.0.1:{mosquitto.port}"},
        build=build,
    )
    daemon = Daemon(settings, drivers={})
    async with Subscriber(mosquitto.port, "dynoai/mlstart/predict/+") as sub:
        task = asyncio.create_task(daemon.run())
        try:
            m = await sub.wait_for(lambda r: bool(r.payload), within=30)
            bid = build_id(daemon.builder.build_config.model_dump(mode="json"))
            assert m.topic == f"dynoai/mlstart/predict/{bid}"
            assert daemon.predictions.published == 1
        finally:
            daemon.request_stop()
            await asyncio.wait_for(task, 15)


async def test_refused_models_publish_nothing(
    trained: dict[str, Any], tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    folder = _copy_models(trained["folder"], tmp_path / "models")
    (folder / "evil.pkl").write_bytes(pickle.dumps(_Boom(tmp_path / "ran")))
    settings = Settings(
        station="mlbad",
        data_dir=tmp_path,
        mqtt={"url": f"mqtt://127.0.0.1:{mosquitto.port}"},
        build={"engine_family": "twin_cam", "displacement_ci": 103},
    )
    daemon = Daemon(settings, drivers={})
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.ready.wait(), 10)
        while daemon._predict_tasks:
            await asyncio.wait(set(daemon._predict_tasks), timeout=10)
        assert daemon.predictions.published == 0
        assert "evil.pkl" in (daemon.predictions.last_error or "")
        assert not (tmp_path / "ran").exists()
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 15)


def test_first_guess_ve_scales_a_base_table_on_its_own_axes() -> None:
    from dynoai_daemon.ml.predict import first_guess_ve

    cells = {
        "rpm_axis": [1000.0, 3000.0],
        "map_axis": [20.0, 100.0],
        "front": [[0.0, 10.0], [-10.0, 20.0]],
        "rear": [[0.0, 0.0], [0.0, 0.0]],
    }
    base = [[50.0, 50.0, 50.0], [80.0, 80.0, 80.0]]
    out = first_guess_ve(cells, base, [1000.0, 2000.0], [20.0, 60.0, 150.0])
    # (2000, 60) is the centre of the grid: the mean of the four corners = +5 %
    assert out == [[50.0, 52.5, 55.0], [76.0, 84.0, 92.0]]
    assert first_guess_ve(cells, base, [1000.0, 2000.0], [20.0, 60.0, 150.0], "rear") == base
    with pytest.raises(ValueError):
        first_guess_ve(cells, base, [1000.0], [20.0, 60.0, 150.0])


def test_train_from_the_collectors_postgresql_store(
    trained: dict[str, Any],
    tmp_path: Path,
    pg_db: TestDatabase,
    restore_logging: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The fleet's sessions reach the central store through the collector's own path
    # (backfill), and `train --db` streams them back: the same dataset, the same models.
    sessions_dir = tmp_path / "station" / "sessions"
    sessions_dir.mkdir(parents=True)
    for s in trained["sessions"]:
        (sessions_dir / f"{s['session_id']}.json").write_text(json.dumps(s))
    assert main(["collect", "--backfill", str(tmp_path / "station"), "--db", pg_db.url]) == 0
    models = tmp_path / "models"
    assert main(["train", "--db", pg_db.url, "--models", str(models)]) == 0
    out = capsys.readouterr().out
    assert f"{len(trained['sessions'])} session(s) read from the database" in out
    card = json.loads((models / "model_card.json").read_text())
    assert card["dataset_digest"] == trained["card"]["dataset_digest"]
    assert set(card["models"]) == set(trained["card"]["models"])
    # --db and --data-dir are one or the other.
    with pytest.raises(SystemExit) as exc:
        main(["train", "--db", pg_db.url, "--data-dir", str(tmp_path)])
    assert exc.value.code == 2
