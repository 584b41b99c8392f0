"""The Detector as a scikit-learn estimator, one featurizer for every input kind, one model
protocol every model passes, and the direction of imports along the data path."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from sklearn.base import clone
from sklearn.metrics import make_scorer, roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.utils.estimator_checks import check_parameters_default_constructible

from stethoscope import Detector
from stethoscope.datasets import find_clips, labels_of
from stethoscope.errors import ConfigError
from stethoscope.features import FeatureConfig, extract_features
from stethoscope.models import build, info, names
from stethoscope.scoring import pool_scores
from stethoscope.simulate import simulate_dataset
from stethoscope.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- scikit-learn conventions


def test_default_parameters_are_constructible_and_clone_round_trips():
    check_parameters_default_constructible("Detector", Detector())
    det = Detector("frame-knn", features={"n_mels": 32}, model_params={"k": 3}, seed=4)
    twin = clone(det)
    assert twin is not det and twin.get_params() == det.get_params()
    assert twin.get_params()["model_params__k"] == 3


def test_nested_set_params_reach_into_the_dict_parameters_without_changing_them():
    params = {"k": 1}
    det = Detector("frame-knn", model_params=params, features=FeatureConfig(n_mels=16))
    det.set_params(model_params__k=5, features__hop_length=256)
    assert det.model_params == {"k": 5} and params == {"k": 1}
    assert det.features.hop_length == 256 and det.features.n_mels == 16
    with pytest.raises(ValueError, match="invalid parameter"):
        det.set_params(seed__x=1)


def test_fit_returns_self_and_only_sets_fitted_attributes(tmp_path):
    X = np.random.default_rng(0).normal(size=(12, 1, 16, 40)).astype(np.float32)
    det = Detector(progress=False)
    before = det.get_params()
    assert det.fit(X) is det
    assert det.get_params() == before  # fit changes no parameter
    fitted = {k for k in vars(det) if k.endswith("_") and not k.startswith("_")}
    assert {"model_", "feature_config_", "model_params_", "pooling_", "input_shape_",
            "threshold_", "train_scores_", "threshold_source_", "history_",
            "train_input_"} <= fitted


def test_effective_settings_are_fitted_attributes_not_hidden_mutations(tmp_path):
    slider = [c for c in find_clips(simulate_dataset("slider", 6, 0, tmp_path / "s", seed=0,
                                                     progress=False)) if c.label == 0]
    det = Detector(progress=False).fit(slider)
    assert det.model_params is None  # the parameter stays as the user gave it
    assert det.model_params_ == {"rhythm": True}  # the per-machine default, visible
    assert det.feature_config_.hop_length == 256 and det.features is None
    assert det.feature_config_.window_s == pytest.approx(10.0)


def test_settings_are_checked_before_any_data_is_read(tmp_path):
    missing = tmp_path / "nothing-here"
    for bad, message in ((dict(model="idn"), "did you mean 'idnn'"),
                         (dict(device="gpu"), "unknown device"),
                         (dict(precision="fp8"), "precision"),
                         (dict(threshold="mean+x"), "threshold"),
                         (dict(window_pooling="avg"), "window pooling")):
        with pytest.raises(ConfigError, match=message):
            Detector(**bad).fit(missing)  # the missing folder is never looked at


def test_cuda_on_a_machine_without_it_is_a_clean_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="not available"):
        Detector(device="cuda").fit(np.zeros((4, 1, 8, 10), np.float32))


def test_cross_validation_and_grid_search_over_a_small_real_set(dcase_valve):
    clips = find_clips(dcase_valve / "test")
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(clips), 40, replace=False))
    X = [clips[i].path for i in pick]
    y = labels_of([clips[i] for i in pick])
    auc = make_scorer(roc_auc_score, response_method="decision_function")
    folds = StratifiedKFold(n_splits=2, shuffle=True, random_state=0)
    scores = cross_val_score(Detector(progress=False), X, y, scoring=auc, cv=folds)
    assert scores.shape == (2,) and np.isfinite(scores).all()
    search = GridSearchCV(Detector(progress=False),
                          {"model_params__rhythm": [False, True]},
                          scoring=auc, cv=folds).fit(X, y)
    assert search.best_params_["model_params__rhythm"] in (False, True)
    assert ("gauss_rhythm" in search.best_estimator_.model_.members) == \
        search.best_params_["model_params__rhythm"]


# ---------------------------------------------------------------- one featurizer


@pytest.fixture(scope="module")
def stereo_wavs(tmp_path_factory) -> list[Path]:
    """Two-channel recordings whose channels differ (the second is louder and filtered)."""
    folder = tmp_path_factory.mktemp("stereo")
    root = simulate_dataset("pump", 8, 0, folder, seed=3, channels=2, progress=False)
    return sorted(Path(root).rglob("*.wav"))


@pytest.mark.parametrize("channels", [0, 1, "mean", "all"])
def test_array_npy_and_wavs_give_identical_scores_for_every_channel_choice(
        channels, stereo_wavs, tmp_path):
    config = FeatureConfig(channels="all", hop_length=256)
    array = np.asarray(extract_features(stereo_wavs, config))  # (N, 2, 64, F)
    np.save(tmp_path / "features.npy", array)
    features = {"channels": channels}
    scores = {}
    for kind, X in (("array", array), ("npy", tmp_path / "features.npy"),
                    ("wavs", stereo_wavs)):
        det = Detector(features=features, progress=False).fit(X)
        scores[kind] = det.score_samples(X)
        assert det.input_shape_[0] == (2 if channels == "all" else 1)
    np.testing.assert_allclose(scores["npy"], scores["array"], rtol=1e-6)
    np.testing.assert_allclose(scores["wavs"], scores["array"], rtol=1e-4, atol=1e-5)


def test_a_one_element_list_holding_a_npy_file_trains_like_the_file(tmp_path):
    array = np.random.default_rng(1).normal(size=(10, 1, 8, 30)).astype(np.float32)
    np.save(tmp_path / "x.npy", array)
    direct = Detector(progress=False).fit(tmp_path / "x.npy")
    listed = Detector(progress=False).fit([str(tmp_path / "x.npy")])  # `train x.npy`
    np.testing.assert_array_equal(direct.score_samples(array), listed.score_samples(array))


# ---------------------------------------------------------------- one model protocol


def _corpus(shape: tuple[int, int, int], n: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(-40, 6, size=(1, *shape))
    return (base + rng.normal(0, 2, size=(n, *shape))).astype(np.float32)


SHAPES = {"seed-conv-ae": (1, 16, 32), "dcase-ae": (1, 16, 20), "idnn": (1, 16, 20),
          "clip-ensemble": (1, 16, 40),
          "frame-knn": (1, 16, 20), "clip-stats": (1, 16, 20), "clip-stats-rhythm": (1, 16, 40)}


def _fit(name: str, specs: np.ndarray, seed: int = 0):
    torch.manual_seed(seed)
    model = build(name, specs.shape[1:])
    plan = None
    if model.trainable:
        from stethoscope.models.base import TrainPlan

        plan = TrainPlan(TrainConfig(epochs=2, batch_size=4, patience=None, progress=False,
                                     seed=seed), val_fraction=0.0)
    return model.fit(specs, plan)


def _pool(name: str):
    rule = info(name).scoring.get("pooling", "mean")
    return lambda maps: pool_scores(maps, rule)


def test_every_anomaly_model_is_covered_by_the_protocol_suite():
    assert set(names()) == set(SHAPES)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_protocol_fit_error_maps_held_out_scores_save_load_and_determinism(name, tmp_path):
    from safetensors.torch import load_file, save_file

    specs = _corpus(SHAPES[name])
    model = _fit(name, specs)
    batch = torch.from_numpy(specs[:3])
    with torch.no_grad():
        maps = model.error_maps(batch)
        scores = np.asarray(model.clip_scores(batch, _pool(name)))
        explained = model.explain(batch)
    assert maps.ndim == 3 and maps.shape[0] == 3 and torch.isfinite(torch.as_tensor(maps)).all()
    assert explained.shape[:2] == (3, SHAPES[name][1])
    assert scores.shape == (3,) and np.isfinite(scores).all()
    held_out, source = model.held_out_scores(specs, _pool(name))
    assert np.asarray(held_out).ndim == 1 and np.isfinite(held_out).all() and source
    # hparams are constructor arguments only: they rebuild the model, weights fill it
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "w.safetensors"))
    rebuilt = build(name, SHAPES[name], **model.hparams)
    rebuilt.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    if rebuilt.trainable:
        rebuilt.eval()
    with torch.no_grad():
        again = np.asarray(rebuilt.clip_scores(batch, _pool(name)))
    np.testing.assert_allclose(again, scores, rtol=1e-5, atol=1e-6)
    twin = _fit(name, specs)  # same data, same seed: same model
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(twin.clip_scores(batch, _pool(name))), scores,
                                   rtol=1e-5, atol=1e-6)


def test_statistics_models_are_not_torch_modules_and_trained_ones_are():
    for name in SHAPES:
        model = build(name, SHAPES[name])
        assert isinstance(model, torch.nn.Module) == model.trainable, name


# ---------------------------------------------------------------- imports follow the data path

DATA_PATH = ["errors", "atomic", "progress", "runtime", "compute", "audio", "datasets",
             "features", "training", "models", "scoring", "metrics", "plots", "report",
             "storage", "detector", "evaluation"]


def _imports(path: Path) -> set[str]:
    names_ = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "stethoscope."):
            names_.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names_ |= {a.name.split(".")[1] for a in node.names
                       if a.name.startswith("stethoscope.")}
    return names_


def test_no_module_imports_a_later_stage_of_the_data_path():
    order = {name: i for i, name in enumerate(DATA_PATH)}
    package = ROOT / "stethoscope"
    for name in DATA_PATH:
        path = package / f"{name}.py"
        if not path.exists():
            path = package / name / "__init__.py"
            files = sorted((package / name).glob("*.py"))
        else:
            files = [path]
        for file in files:
            later = {m for m in _imports(file) if m in order and order[m] > order[name]}
            assert not later, f"{file.relative_to(ROOT)} imports later stages {sorted(later)}"


def test_storage_and_atomic_writes_do_not_need_torch():
    for name in ("atomic.py",):
        path = ROOT / "stethoscope" / name
        if not path.exists():
            pytest.skip(f"{name} not there yet")
        tree = ast.parse(path.read_text())
        modules = {n.names[0].name for n in ast.walk(tree) if isinstance(n, ast.Import)}
        modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(m and (m.startswith("torch") or m.startswith("numpy")) for m in modules)


def test_wav_mean_channels_average_the_channels_log_mels(stereo_wavs):
    config = FeatureConfig(channels="all")
    both = np.asarray(extract_features(stereo_wavs[:2], config))
    mean = np.asarray(extract_features(stereo_wavs[:2], config.replace(channels="mean")))
    np.testing.assert_allclose(mean, both.mean(axis=1, keepdims=True), rtol=1e-5, atol=1e-4)
    assert sf.info(str(stereo_wavs[0])).channels == 2


def test_precision_defaults_to_the_models_registered_choice_and_is_saved(tmp_path):
    specs = _corpus((1, 16, 32), n=6)
    small = {"features": {"frames": 32}, "epochs": 1, "progress": False}
    conv = Detector("seed-conv-ae", **small).fit(specs)
    dense = Detector("dcase-ae", **small).fit(specs)
    assert conv.precision is None and conv.precision_ == "auto"
    assert conv.train_config_.precision == "auto"
    assert dense.precision_ == "fp32"
    assert Detector("seed-conv-ae", precision="fp32", **small).fit(specs).precision_ == "fp32"
    conv.save(tmp_path / "m")
    assert Detector.load(tmp_path / "m").precision_ == "auto"
