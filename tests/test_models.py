"""Tests for the baseline spectrogram models: the course's seed-conv-ae and the DCASE dcase-ae."""

from __future__ import annotations

import json
from dataclasses import replace
from itertools import pairwise

import numpy as np
import pytest
import torch

from stethoscope.errors import DataError
from stethoscope.features import FeatureConfig, extract_features
from stethoscope.models import build, info, names
from stethoscope.storage import load_model, save_model
from stethoscope.training import TrainConfig, fit

SEED_SHAPE = (1, 64, 312)
DCASE_SHAPE = (1, 128, 24)  # short clips keep the tests quick; the model takes any length ≥ 5


def conv_params(c_in: int, c_out: int, kernel: int = 3) -> int:
    return c_in * c_out * kernel * kernel + c_out


def linear_params(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def batchnorm_params(n: int) -> int:
    return 2 * n  # weight and bias; running statistics are buffers


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fake_specs(shape: tuple[int, ...], n: int, seed: int = 0) -> torch.Tensor:
    """Spectrogram-like values: dB around -40 with a 12 dB spread."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=generator) * 12 - 40


# ---------------------------------------------------------------- registry


def test_both_baselines_are_registered_with_their_defaults():
    assert {"seed-conv-ae", "dcase-ae"} <= set(names())
    assert info("seed-conv-ae").features["n_mels"] == 64
    assert info("seed-conv-ae").features["frames"] == 312
    assert info("dcase-ae").features["n_mels"] == 128
    for name in ("seed-conv-ae", "dcase-ae"):
        assert info(name).scoring["pooling"] == "mean"
        config = replace(TrainConfig(), **info(name).training)  # only real TrainConfig keys
        assert config.lr == pytest.approx(1e-3)
    assert info("dcase-ae").training["example_batch_size"] == 256


def test_registered_feature_overrides_are_feature_config_fields():
    for name in ("seed-conv-ae", "dcase-ae"):
        config = FeatureConfig().replace(**info(name).features)
        for key, value in info(name).features.items():
            assert getattr(config, key) == value


# ---------------------------------------------------------------- architecture


def test_seed_conv_ae_has_the_notebooks_11193_weights():
    widths = [1, 32, 16, 4, 4, 16, 32, 1]
    expected = sum(conv_params(a, b) for a, b in pairwise(widths))
    model = build("seed-conv-ae", SEED_SHAPE)
    assert n_params(model) == expected == 11_193


def test_seed_conv_ae_takes_multichannel_spectrograms():
    model = build("seed-conv-ae", (8, 64, 312)).eval()
    x = fake_specs((8, 64, 312), 2)
    assert model(x).shape == x.shape
    widths = [8, 32, 16, 4, 4, 16, 32, 8]
    assert n_params(model) == sum(conv_params(a, b) for a, b in pairwise(widths))
    assert model.error_maps(x).shape == (2, 64, 312)


def test_dcase_ae_has_the_baseline_layer_sizes():
    hidden = [linear_params(128, 128) + batchnorm_params(128)] * 3
    encoder = linear_params(640, 128) + batchnorm_params(128) + sum(hidden) \
        + linear_params(128, 8) + batchnorm_params(8)
    decoder = linear_params(8, 128) + batchnorm_params(128) + sum(hidden) \
        + linear_params(128, 640)
    model = build("dcase-ae", DCASE_SHAPE)
    assert n_params(model.encoder) == encoder
    assert n_params(model.decoder) == decoder
    assert n_params(model) == encoder + decoder
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == 9
    assert all(m.momentum == 0.01 and m.eps == 1e-3 for m in norms)


@pytest.mark.parametrize("name, shape, code_shape", [
    ("seed-conv-ae", SEED_SHAPE, (4, 8, 39)),
    ("dcase-ae", DCASE_SHAPE, (8,)),
])
def test_output_matches_input_and_encoder_decoder_work_apart(name, shape, code_shape):
    model = build(name, shape)
    model.before_training(fake_specs(shape, 4).numpy())
    model.train()
    model(model.make_examples(fake_specs(shape, 4))[0])  # move BatchNorm statistics off defaults
    model.eval()
    inputs, targets = model.make_examples(fake_specs(shape, 2, seed=1))
    with torch.no_grad():
        output = model(inputs)
        code = model.encoder(inputs)
        assert output.shape == inputs.shape == targets.shape
        assert code.shape == (inputs.shape[0], *code_shape)
        assert torch.allclose(model.decoder(code), output)


def test_seed_conv_ae_rejects_shapes_the_pooling_cannot_undo():
    with pytest.raises(DataError, match="divisible by 8"):
        build("seed-conv-ae", (1, 64, 313))
    model = build("seed-conv-ae", SEED_SHAPE)
    with pytest.raises(DataError, match="do not fit"):
        model.make_examples(fake_specs((1, 128, 312), 1))


def test_dcase_ae_rejects_other_mel_counts_and_too_short_clips():
    with pytest.raises(DataError, match="stacks 5 frames"):
        build("dcase-ae", (1, 128, 4))
    model = build("dcase-ae", DCASE_SHAPE)
    with pytest.raises(DataError, match="do not fit"):
        model.make_examples(fake_specs((1, 64, 24), 1))


# ---------------------------------------------------------------- seed-conv-ae standardisation


def test_standardisation_is_fitted_streaming_over_a_memmap(tmp_path):
    data = fake_specs(SEED_SHAPE, 37).numpy()  # 37 clips: several chunks and a partial one
    path = tmp_path / "specs.npy"
    np.save(path, data)
    specs = np.load(path, mmap_mode="r")
    model = build("seed-conv-ae", SEED_SHAPE)
    model.before_training(specs)
    assert float(model.standardize.mean) == pytest.approx(data.astype(np.float64).mean(), rel=1e-5)
    assert float(model.standardize.std) == pytest.approx(data.astype(np.float64).std(), rel=1e-5)
    _, targets = model.make_examples(torch.from_numpy(data[:3]))
    assert abs(float(targets.mean())) < 0.1 and abs(float(targets.std()) - 1) < 0.1


def test_seed_conv_ae_error_is_scale_free():
    specs = fake_specs(SEED_SHAPE, 4)
    model = build("seed-conv-ae", SEED_SHAPE)
    model.before_training(specs.numpy())
    scaled = build("seed-conv-ae", SEED_SHAPE)
    scaled.load_state_dict(model.state_dict())
    scaled.before_training((specs * 3 + 5).numpy())  # same sounds, other dB scale and offset
    model.eval(), scaled.eval()
    with torch.no_grad():
        assert torch.allclose(scaled.error_maps(specs * 3 + 5), model.error_maps(specs),
                              rtol=1e-4, atol=1e-5)


def test_seed_conv_ae_rejects_non_finite_training_data():
    specs = fake_specs(SEED_SHAPE, 2).numpy()
    specs[1, 0, 3, 4] = np.nan
    with pytest.raises(DataError, match="NaN"):
        build("seed-conv-ae", SEED_SHAPE).before_training(specs)


# ---------------------------------------------------------------- error maps


def baseline_windows(log_mel: np.ndarray, frames: int = 5) -> np.ndarray:
    """The DCASE baseline's ``file_to_vectors`` stacking, written out as its loop."""
    mels, n_frames = log_mel.shape
    n_vectors = n_frames - frames + 1
    vectors = np.zeros((n_vectors, mels * frames), dtype=np.float32)
    for t in range(frames):
        vectors[:, mels * t : mels * (t + 1)] = log_mel[:, t : t + n_vectors].T
    return vectors


def test_dcase_windows_follow_the_baseline_order():
    specs = fake_specs((2, 128, 24), 2)  # 2 clips × 2 channels
    inputs, targets = build("dcase-ae", (2, 128, 24)).make_examples(specs)
    expected = np.concatenate([baseline_windows(specs[b, c].numpy())
                               for b in range(2) for c in range(2)])
    assert inputs.shape == (2 * 2 * 20, 640)
    np.testing.assert_array_equal(inputs.numpy(), expected)
    assert torch.equal(inputs, targets)


def test_dcase_error_map_mean_is_the_baselines_mean_window_mse():
    specs = fake_specs(DCASE_SHAPE, 3)
    model = build("dcase-ae", DCASE_SHAPE).eval()
    with torch.no_grad():
        error_map = model.error_maps(specs)
        clip_mse = []
        for clip in specs:
            windows = torch.from_numpy(baseline_windows(clip[0].numpy()))
            clip_mse.append(float(((model(windows) - windows) ** 2).mean()))
    assert error_map.shape == (3, 128, 20)
    np.testing.assert_allclose(error_map.mean(dim=(1, 2)).numpy(), clip_mse, rtol=1e-5)


@pytest.mark.parametrize("name, shape", [("seed-conv-ae", SEED_SHAPE), ("dcase-ae", DCASE_SHAPE)])
def test_error_map_is_zero_for_a_perfect_reconstruction(name, shape, monkeypatch):
    specs = fake_specs(shape, 2)
    model = build(name, shape)
    model.before_training(specs.numpy())
    # A perfect model outputs its target: the standardised input (seed) or the windows (dcase).
    standardize = getattr(model, "standardize", torch.nn.Identity())
    monkeypatch.setattr(model, "forward", lambda x: standardize(x))
    error_map = model.error_maps(specs)
    assert error_map.shape[0] == 2 and torch.count_nonzero(error_map) == 0


def test_seed_conv_ae_error_map_points_at_the_wrong_cell(monkeypatch):
    specs = fake_specs(SEED_SHAPE, 1)
    model = build("seed-conv-ae", SEED_SHAPE)
    model.before_training(specs.numpy())

    def reconstruct_with_one_wrong_cell(x):
        out = model.standardize(x).clone()
        out[:, :, 10, 20] += 2.0
        return out

    monkeypatch.setattr(model, "forward", reconstruct_with_one_wrong_cell)
    error_map = model.error_maps(specs)
    assert error_map[0, 10, 20] == pytest.approx(4.0)
    assert torch.count_nonzero(error_map) == 1


def test_dcase_error_map_points_at_the_wrong_mel_band(monkeypatch):
    model = build("dcase-ae", DCASE_SHAPE)

    def reconstruct_with_one_wrong_band(x):
        out = x.clone()
        out[:, 2 * 128 + 50] += 5.0  # the middle stacked frame, mel band 50
        return out

    monkeypatch.setattr(model, "forward", reconstruct_with_one_wrong_band)
    error_map = model.error_maps(fake_specs(DCASE_SHAPE, 2))
    assert torch.allclose(error_map[:, 50], torch.full((2, 20), 25.0 / 5))
    assert torch.count_nonzero(error_map) == 2 * 20


# ---------------------------------------------------------------- rebuilding


@pytest.mark.parametrize("name, shape", [("seed-conv-ae", SEED_SHAPE), ("dcase-ae", DCASE_SHAPE)])
def test_rebuilt_from_hparams_and_saved_weights_gives_identical_outputs(name, shape, tmp_path):
    specs = fake_specs(shape, 4)
    model = build(name, shape)
    model.before_training(specs.numpy())
    model.train()
    model(model.make_examples(specs)[0])  # BatchNorm running statistics leave their defaults
    model.eval()
    save_model(tmp_path / "m", {"model": name, "hparams": model.hparams}, model.state_dict())

    config, state = load_model(tmp_path / "m")
    rebuilt = build(config["model"], shape, **json.loads(json.dumps(config["hparams"])))
    rebuilt.load_state_dict(state, strict=True)
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt.error_maps(specs), model.error_maps(specs))
    if name == "seed-conv-ae":
        assert float(rebuilt.standardize.std) == float(model.standardize.std) != 1.0


def test_hparams_rebuild_a_non_default_architecture():
    model = build("dcase-ae", DCASE_SHAPE, frames=3, hidden=32, latent=4)
    rebuilt = build("dcase-ae", DCASE_SHAPE, **model.hparams)
    assert model.hparams == {"frames": 3, "hidden": 32, "latent": 4}
    assert n_params(rebuilt) == n_params(model)
    assert rebuilt.make_examples(fake_specs(DCASE_SHAPE, 1))[0].shape == (22, 3 * 128)
    assert build("seed-conv-ae", SEED_SHAPE, dropout=0.1).hparams == {"dropout": 0.1}


# ---------------------------------------------------------------- training on real clips


def valve_log_mel(folder, name: str, count: int) -> np.ndarray:
    """Log-mel ``(count, 1, M, F)`` of the first normal training clips, with ``name``'s features."""
    paths = sorted((folder / "train").glob("*.wav"))[:count]
    return extract_features(paths, FeatureConfig().replace(**info(name).features))


@pytest.mark.parametrize("name, settings", [
    ("seed-conv-ae", {"batch_size": 2, "epochs": 4}),
    ("dcase-ae", {"batch_size": 2, "example_batch_size": 256, "epochs": 3}),
])
def test_training_on_real_valve_clips_lowers_the_loss(name, settings, dcase_valve):
    specs = valve_log_mel(dcase_valve, name, count=6)
    assert specs.shape[1:] == ((1, 64, 312) if name == "seed-conv-ae" else (1, 128, 313))
    model = build(name, specs.shape[1:])
    model.before_training(specs)
    config = replace(TrainConfig(), **{**info(name).training, **settings,
                                       "progress": False, "patience": None})
    history = fit(model, torch.from_numpy(specs), config=config,
                  batch_transform=lambda batch: model.make_examples(batch[0]))
    assert history.epochs == settings["epochs"]
    assert history["loss"][-1] < history["loss"][0]
    with torch.no_grad():
        scores = model.error_maps(torch.from_numpy(specs)).mean(dim=(1, 2))
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("name", ["frame-knn", "idnn"])
def test_frame_models_name_themselves_when_clips_do_not_fit(name):
    model = build(name, (1, 16, 40))
    with pytest.raises(DataError, match=f"do not fit {name} built for \\(1, 16\\)"):
        model.error_maps(torch.zeros(1, 1, 8, 40))
    with pytest.raises(DataError, match="frames a window"):
        model.error_maps(torch.zeros(1, 1, 16, 2))
