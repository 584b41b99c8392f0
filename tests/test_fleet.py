"""stethoscope fleet: per-machine models on a process pool and on a real Dask LocalCluster,
the same models and scores as training each machine alone, and one bad machine failing alone.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from threadpoolctl import threadpool_limits

from stethoscope import Detector, fleet
from stethoscope.cli import main
from stethoscope.errors import DataError
from stethoscope.simulate import simulate_dataset
from tests._fleet_jobs import dask_settings, die_on_request, threads_after_late_imports
from tests.conftest import shared_path

GOOD = [("fan", "id_00"), ("fan", "id_02"), ("pump", "id_00"), ("valve", "id_04")]
BAD = "slider_id_06"  # every WAV of this machine is corrupt


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Four simulated machines (6 normal clips to train, 2 normal + 2 abnormal to score, 3 s
    each) and a fifth whose recordings are not WAV data."""
    root = tmp_path_factory.mktemp("fleet") / "plant"
    for machine, machine_id in GOOD:
        simulate_dataset(machine, 8, 2, root, machine_id=machine_id, duration=3.0, seed=1,
                         progress=False)
    for label, count in (("normal", 6), ("abnormal", 2)):
        folder = root / "slider" / "id_06" / label
        folder.mkdir(parents=True)
        for i in range(count):
            (folder / f"{i:08d}.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 4)
    return root


@contextmanager
def one_thread():
    """Train 'alone' as a fleet worker does: one torch and one BLAS thread (rounding in
    multi-threaded reductions differs in the last bits), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def alone(tree: Path, settings: dict) -> dict[str, Detector]:
    """Each good machine trained by itself in this process, with the fleet's settings."""
    machines = {m.name: m for m in fleet.find_machines(tree).machines}
    with one_thread():
        return {name: Detector(**settings, progress=False).fit(list(machines[name].train))
                for name in machines if name != BAD}


def assert_same_model(folder: Path, reference: Detector) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    expected = reference.model_.state_dict()
    assert set(weights) == set(expected)
    for key, value in expected.items():
        assert torch.equal(weights[key], value.cpu()), key
    loaded = Detector.load(folder)
    assert loaded.threshold_.value_ == reference.threshold_.value_


def assert_same_scores(rows: list[dict], references: dict[str, Detector], tree: Path) -> None:
    machines = {m.name: m for m in fleet.find_machines(tree).machines}
    for name, det in references.items():
        mine = [r for r in rows if r["machine"] == name]
        with one_thread():
            expected = det.score_recordings(list(machines[name].test))
        assert [r["path"] for r in mine] == [e.path for e in expected]
        assert [r["score"] for r in mine] == [e.score for e in expected]
        assert [r["anomalous"] for r in mine] == [e.anomalous for e in expected]
        assert [r["label"] for r in mine] == [0, 0, 1, 1]
        assert all(r["error"] is None and r["threshold"] == det.threshold_.value_ for r in mine)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- discovery


def test_find_machines_names_and_splits_a_mimii_tree(tree):
    found = fleet.find_machines(tree)
    assert found.names() == ["fan_id_00", "fan_id_02", "pump_id_00", "slider_id_06",
                             "valve_id_04"]
    fan = found.machines[0]
    # MIMII: the last min(#abnormal, #normal // 2) normal clips are held out for testing
    assert [p.name for p in fan.train] == [f"{i:08d}.wav" for i in range(6)]
    assert [p.parent.name for p in fan.test] == ["normal", "normal", "abnormal", "abnormal"]
    assert fan.test_labels == (0, 0, 1, 1) and len(fan.held_out_normal) == 2


def test_find_machines_reads_the_dcase_layout_of_real_data():
    root = shared_path("dcase2023_mixed")
    found = fleet.find_machines(root)
    assert "valve_section_00" in found.names() and "ToyCar_section_00" in found.names()
    for machine in found.machines:
        assert machine.train and all(p.parent.name == "train" for p in machine.train)
        assert all(p.parent.name == "test" for p in machine.test)


def test_find_machines_refuses_a_tree_without_machines(tmp_path):
    (tmp_path / "loose").mkdir()
    simulate_dataset("fan", 2, 0, tmp_path / "x", duration=1.0, progress=False)
    loose = tmp_path / "loose" / "clip.wav"
    loose.write_bytes((tmp_path / "x" / "fan" / "id_00" / "normal" / "00000000.wav")
                      .read_bytes())
    with pytest.raises(DataError, match="no machine recordings found"):
        fleet.find_machines(tmp_path / "loose")


# ----------------------------------------------------------------------------- local engine


def test_local_fleet_trains_and_scores_like_each_machine_alone(tree, tmp_path, capsys):
    models, table = tmp_path / "models", tmp_path / "scores.csv"
    code, out, err = run_cli(capsys, "fleet", "train", tree, "--out", models, "--engine",
                             "local", "--workers", 2, "--model", "dcase-ae", "--epochs", 1,
                             "--json")
    assert code == 2  # one machine failed, after all finished
    summary = json.loads(out)
    assert summary["failed"] == [BAD]
    failure_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(failure_lines) == 1 and BAD in failure_lines[0]
    assert "00000000.wav" in failure_lines[0]  # names the file it could not read
    assert sorted(p.name for p in models.iterdir()) == sorted(
        f"{m}_{i}" for m, i in GOOD)  # nothing written for the bad machine
    by_name = {m["machine"]: m for m in summary["machines"]}
    references = alone(tree, {"model": "dcase-ae", "epochs": 1})
    for name, det in references.items():
        assert_same_model(models / name, det)
        assert by_name[name]["clips"] == 6 and by_name[name]["held_out"] == 2
        assert by_name[name]["threshold"] == det.threshold_.value_

    code, out, err = run_cli(capsys, "fleet", "score", tree, "--models", models, "--out",
                             table, "--workers", 2)
    assert code == 2  # the bad machine has no model
    rows = fleet.read_table(table)
    assert len(rows) == 5 * 4
    assert_same_scores(rows, references, tree)
    bad_rows = [r for r in rows if r["machine"] == BAD]
    assert all(r["score"] is None and "no model" in r["error"] for r in bad_rows)
    assert [line for line in err.splitlines() if "error:" in line] == [
        line for line in err.splitlines() if BAD in line and "error:" in line]


def test_existing_models_are_replaced_only_with_force(tree, tmp_path, capsys):
    models = tmp_path / "models"
    good = fleet.Fleet(tree, tuple(m for m in fleet.find_machines(tree).machines
                                   if m.name == "fan_id_00"))
    with fleet.open_engine("local", 1) as engine:
        assert fleet.train_fleet(good, models, engine=engine)[0].ok
        before = (models / "fan_id_00" / "config.json").read_bytes()
        with pytest.raises(DataError, match="pass --force"):
            fleet.train_fleet(good, models, engine=engine)
        assert (models / "fan_id_00" / "config.json").read_bytes() == before
        (models / "fan_id_02").mkdir()
        (models / "fan_id_02" / "notes.txt").write_text("mine")
        with pytest.raises(DataError, match="not a stethoscope model folder"):
            fleet.check_model_folders(models, ["fan_id_02"], force=True)
        results = fleet.train_fleet(good, models, engine=engine, force=True,
                                    settings={"seed": 3, "model": "clip-stats"})
    assert results[0].ok and (models / "fan_id_00" / "config.json").read_bytes() != before
    assert (models / "fan_id_02" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("engine", ["local", "dask"])
def test_a_worker_that_dies_fails_its_job_alone(engine):
    """The local pool re-runs the jobs of a broken pool one at a time; Dask re-runs a dead
    worker's jobs itself and gives up on the one that killed 4 workers (KilledWorker)."""
    if engine == "dask":
        pytest.importorskip("dask.distributed",
                            reason="dask.distributed is not installed (pip install "
                                   "'stethoscope[fleet]')")
    jobs = [fleet.TrainJob(name, ()) for name in ("a", "dies", "b", "c")]
    with fleet.open_engine(engine, 2) as opened:
        outcomes = dict((job.machine, out) for job, out in opened.run(die_on_request, jobs))
    assert [outcomes[name] for name in "abc"] == ["a done", "b done", "c done"]
    assert isinstance(outcomes["dies"], BaseException)


def test_a_pinned_worker_keeps_one_thread_in_libraries_it_loads_later():
    """scikit-learn's and SciPy's own OpenMP and OpenBLAS load at a worker's first mixture
    fit, after the job pinned its threads; they must start with one thread too (they
    started with one per core: 2 workers on 2 cores trained 3x slower than 1)."""
    with fleet.open_engine("local", 1) as engine:
        [(_, pools)] = list(engine.run(threads_after_late_imports, [fleet.TrainJob("a", ())]))
    assert any("gomp" in name for name in pools) and any("blas" in name for name in pools)
    assert set(pools.values()) == {1}, pools


def test_score_table_formats_round_trip_and_are_never_half_written(tmp_path):
    rows = [{"machine": "fan_id_00", "path": "a.wav", "score": 1.25, "threshold": 2.0,
             "anomalous": False, "label": 0, "error": None},
            {"machine": "fan_id_00", "path": "b.wav", "score": None, "threshold": 2.0,
             "anomalous": None, "label": None, "error": "b.wav: cannot read"}]
    for name in ("t.csv", "t.parquet"):
        path = fleet.write_table(rows, tmp_path / name)
        assert fleet.read_table(path) == rows
        with pytest.raises(DataError, match="pass --force"):
            fleet.write_table(rows, path)
        fleet.write_table(rows[:1], path, force=True)
        assert fleet.read_table(path) == rows[:1]
    (tmp_path / "mine.csv").write_text("my,own,data\n")
    with pytest.raises(DataError, match="not a stethoscope score table"):
        fleet.write_table(rows, tmp_path / "mine.csv", force=True)
    with pytest.raises(DataError, match=r"\.csv or \.parquet"):
        fleet.check_table_path(tmp_path / "t.xlsx")


# ----------------------------------------------------------------------------- dask engine


def test_dask_fleet_on_a_local_cluster_matches_each_machine_alone(tree, tmp_path, capsys):
    pytest.importorskip("dask.distributed",
                        reason="dask.distributed is not installed (pip install "
                               "'stethoscope[fleet]')")
    models, table = tmp_path / "models", tmp_path / "scores.parquet"
    code, out, err = run_cli(capsys, "fleet", "train", tree, "--out", models, "--engine",
                             "dask", "--workers", 2)
    assert code == 2
    assert "FAILED" in out and out.count(" ok") == 4
    assert [line for line in err.splitlines() if "error:" in line][0].count(BAD) == 1
    references = alone(tree, {})
    for name, det in references.items():
        assert_same_model(models / name, det)

    code, out, err = run_cli(capsys, "fleet", "score", tree, "--models", models, "--out",
                             table, "--engine", "dask", "--workers", 2, "--json")
    assert code == 2
    summary = json.loads(out)
    assert summary["failed"] == [BAD] and summary["recordings"] == 20
    rows = fleet.read_table(table)
    assert_same_scores(rows, references, tree)
    good = [r for r in rows if r["machine"] != BAD]
    scores = np.array([r["score"] for r in good])
    labels = np.array([r["label"] for r in good])
    assert scores[labels == 1].mean() > scores[labels == 0].mean()  # the faults score higher


def test_models_travel_as_bytes_unless_the_workers_share_the_storage(tree, tmp_path):
    """Workers that see the driver's folders (a process pool, a LocalCluster) write and read
    model folders themselves; a cluster without shared storage gets and returns the files'
    bytes. Both give the same models and scores as training each machine alone."""
    pytest.importorskip("dask.distributed",
                        reason="dask.distributed is not installed (pip install "
                               "'stethoscope[fleet]')")
    good = fleet.Fleet(tree, tuple(m for m in fleet.find_machines(tree).machines
                                   if m.name != BAD))
    references = alone(tree, {})
    for shared in (True, False):
        models = tmp_path / f"models-{shared}"
        with fleet.open_engine("dask", 2, shared_files=shared) as engine:
            assert engine.shares_files is shared
            # compute-bound jobs: the LocalCluster's workers run without Dask's profiler and
            # with its slower monitors
            settings = engine.client.run(dask_settings, list(fleet.LOCAL_CLUSTER_CONFIG))
            assert len(settings) == 2
            assert all(s == fleet.LOCAL_CLUSTER_CONFIG for s in settings.values())
            results = fleet.train_fleet(good, models, engine=engine)
            rows, _ = fleet.score_fleet(good, models, None, engine=engine)
        assert all(r.ok for r in results)
        assert all(bool(r.model_files) is not shared for r in results)  # bytes only if needed
        for name, det in references.items():
            assert_same_model(models / name, det)
        assert_same_scores(rows, references, tree)
    assert fleet.open_engine("dask", 1, address="tcp://127.0.0.1:1").shares_files is False
    assert fleet.open_engine("local", 1).shares_files is True
