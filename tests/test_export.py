"""ONNX export: onnxruntime scores the real valve clips as the PyTorch path does, for every
exportable model; the edge scorer runs without torch; unexportable models and files that
are not ours get one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from stethoscope.cli import main
from stethoscope.detector import Detector
from stethoscope.edge import EdgeScorer
from stethoscope.export import ExportError, export_onnx, export_support
from stethoscope.models import registry
from tests.conftest import SHARED_DATA

pytest.importorskip("onnxruntime")

# onnxruntime vs PyTorch: relative difference of a window's score. Both compute in float32
# (clip-stats' Mahalanobis distances in float64); measured at most 6e-6 on the valve clips.
RELATIVE_TOLERANCE = 1e-4
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def valve(tmp_path_factory) -> dict:
    """Real DCASE 2023 valve clips (8 normal training clips, 3 normal and 3 anomalous test
    clips), or simulated valve clips when the shared data is absent."""
    real = SHARED_DATA / "dcase2023_valve"
    if real.is_dir():
        train = sorted((real / "train").glob("*.wav"))[:8]
        test = sorted((real / "test").glob("*normal*.wav"))[:3] + \
            sorted((real / "test").glob("*anomaly*.wav"))[:3]
        return {"train": train, "test": test, "real": True}
    from stethoscope.simulate import simulate_dataset

    root = Path(simulate_dataset("valve", 11, 3, tmp_path_factory.mktemp("sim"), seed=0))
    normal = sorted(root.rglob("normal/*.wav"))
    return {"train": normal[:8], "test": normal[8:] + sorted(root.rglob("abnormal/*.wav")),
            "real": False}


def exportable() -> list[str]:
    return [name for name, reason in export_support().items() if reason is None]


@pytest.fixture(scope="module")
def models(valve, tmp_path_factory) -> dict[str, tuple[Detector, Path]]:
    """Each exportable model fitted (trained ones for one epoch), saved, loaded back and
    exported to ONNX."""
    base = tmp_path_factory.mktemp("models")
    out = {}
    for name in exportable():
        Detector(name, epochs=1, device="cpu", progress=False).fit(valve["train"]).save(
            base / name)
        onnx_file = export_onnx(base / name, base / f"{name}.onnx")
        out[name] = (Detector.load(base / name, device="cpu", progress=False), onnx_file)
    return out


def first_window(path: Path, samples: int) -> np.ndarray:
    wave, _ = soundfile.read(path, dtype="float32", always_2d=True)
    return np.ascontiguousarray(wave.T[:, :samples])


def test_every_registered_anomaly_model_is_exportable():
    assert set(export_support()) == set(registry.names())
    assert exportable() == registry.names(), export_support()


def test_clip_ensemble_mixture_and_rhythm_members_export(valve, tmp_path):
    """The members the valve fixture does not reach: the PCA + Gaussian mixture (from 100
    training clips: 0.6 s windows of the clips give them) and the envelope rhythm (slide
    rails' default, here asked for)."""
    folder = tmp_path / "model"
    det = Detector(features={"window_s": 0.6}, model_params={"rhythm": True},
                   progress=False).fit(valve["train"])
    assert {"gmm_spectrum", "gauss_rhythm"} <= set(det.model_.members)
    det.save(folder)
    det = Detector.load(folder, device="cpu", progress=False)
    scorer = EdgeScorer(export_onnx(folder, tmp_path / "model.onnx"))
    for path in valve["test"]:
        window = first_window(path, scorer.window_samples)
        expected = det.score_waveform(window, scorer.sample_rate).score
        assert scorer.score_window(window)[0] == pytest.approx(expected, rel=RELATIVE_TOLERANCE,
                                                               abs=RELATIVE_TOLERANCE)


@pytest.mark.parametrize("name", exportable())
def test_onnxruntime_scores_match_pytorch_on_real_clips(name, models, valve):
    det, onnx_file = models[name]
    scorer = EdgeScorer(onnx_file)
    assert scorer.sample_rate == det.feature_config_.sample_rate
    assert scorer.threshold == pytest.approx(det.threshold_.value_)
    differences = []
    for path in valve["test"]:
        window = first_window(path, scorer.window_samples)
        reference = det.score_waveform(window, scorer.sample_rate)
        score, anomalous = scorer.score_window(window)
        differences.append(abs(score - reference.score) / max(abs(reference.score), 1e-6))
        if abs(reference.score - det.threshold_.value_) > 1e-3 * abs(det.threshold_.value_):
            assert anomalous == reference.anomalous
    assert max(differences) <= RELATIVE_TOLERANCE, (name, differences)
    # the clips differ from one another: a graph that ignored its input would fail here
    scores = [scorer.score_window(first_window(p, scorer.window_samples))[0]
              for p in valve["test"]]
    assert np.ptp(scores) > 10 * RELATIVE_TOLERANCE * max(abs(s) for s in scores)


def test_edge_scores_whole_files_like_the_detector(models, valve):
    det, onnx_file = models["clip-stats"]
    scorer = EdgeScorer(onnx_file)
    paths = valve["test"][:3]
    for expected, path in zip(det.score_recordings(paths), paths, strict=True):
        got = scorer.score_file(path)
        assert got["error"] is None and got["path"] == str(path)
        assert got["score"] == pytest.approx(expected.score, rel=RELATIVE_TOLERANCE)
        assert len(got["windows"]) == len(expected.windows)


def test_edge_scorer_imports_no_torch(models, valve, tmp_path):
    """The edge scorer runs where only onnxruntime, NumPy and soundfile are installed; so do
    `stream` and `watch` given an ONNX model."""
    det, onnx_file = models["clip-stats"]
    path = valve["test"][0]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(path, inbox / path.name)
    code = (
        "import io, json, sys\n"
        "from stethoscope.edge import EdgeScorer\n"
        f"result = EdgeScorer({str(onnx_file)!r}).score_file({str(path)!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported by the edge scorer'\n"
        "from stethoscope.cli import main\n"
        f"assert main(['watch', {str(inbox)!r}, '--model', {str(onnx_file)!r}, '--out', "
        f"{str(tmp_path / 'out.jsonl')!r}, '--once', '--settle', '0', '--poll']) == 0\n"
        "sys.stdin = io.TextIOWrapper(io.BytesIO(bytes(640000)))\n"
        f"assert main(['stream', '--model', {str(onnx_file)!r}]) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported by watch or stream'\n"
        "print(json.dumps(result))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 + 1 + 2  # watch's result, stream's two windows, the edge result
    result = json.loads(lines[-1])
    expected = det.score_recordings([path])[0]
    assert result["score"] == pytest.approx(expected.score, rel=RELATIVE_TOLERANCE)


def test_edge_command_line_prints_one_line_per_recording(models, valve, tmp_path):
    _, onnx_file = models["clip-stats"]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00")
    paths = [str(p) for p in valve["test"][:2]]
    proc = subprocess.run([sys.executable, "-m", "stethoscope.edge", str(onnx_file), *paths,
                           str(broken)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["path"] for line in lines] == [*paths, str(broken)]
    assert all(line["error"] is None for line in lines[:2])
    assert "broken.wav" in lines[2]["error"]
    assert proc.returncode == 2  # one recording could not be scored


def test_cli_export_checks_and_refuses_to_replace(models, valve, tmp_path, capsys):
    _, onnx_file = models["clip-stats"]
    model_dir = onnx_file.with_suffix("")
    out = tmp_path / "valve.onnx"
    assert main(["export", str(model_dir), "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "check: one test window scores" in printed and out.is_file()
    first = out.read_bytes()
    assert main(["export", str(model_dir), "--onnx", str(out), "--no-check"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["export", str(model_dir), "--onnx", str(out), "--force", "--no-check"]) == 0
    assert out.read_bytes() == first  # same model, same bytes
    precious = tmp_path / "notes.onnx"
    precious.write_text("my notes")
    assert main(["export", str(model_dir), "--onnx", str(precious), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not an ONNX file written by" in err
    assert precious.read_text() == "my notes"


def test_unexportable_models_say_why(models, tmp_path, capsys):
    _, onnx_file = models["dcase-ae"]
    source = onnx_file.with_suffix("")
    renamed = tmp_path / "renamed"
    shutil.copytree(source, renamed)
    config = json.loads((renamed / "config.json").read_text())
    config["model"] = "no-such-model"
    (renamed / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="cannot be exported to ONNX"):
        export_onnx(renamed, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()

    # a saved layout the exporter does not know (a tensor missing) is named, not guessed
    from safetensors.numpy import load_file, save_file

    changed = tmp_path / "changed"
    shutil.copytree(models["idnn"][1].with_suffix(""), changed)
    tensors = load_file(changed / "model.safetensors")
    del tensors["mel_std"]
    save_file(tensors, changed / "model.safetensors")
    assert main(["export", str(changed), "--onnx", str(tmp_path / "y.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mel_std" in err
    assert not (tmp_path / "y.onnx").exists()


def test_edge_scorer_rejects_what_it_cannot_score(models, tmp_path):
    from stethoscope.errors import AudioError, ModelFileError

    _, onnx_file = models["clip-stats"]
    scorer = EdgeScorer(onnx_file)
    with pytest.raises(AudioError, match="shorter than the model's"):
        scorer.score_waveform(np.zeros(1000, np.float32), scorer.sample_rate)
    with pytest.raises(AudioError, match="sample rate 8000 Hz"):
        scorer.score_waveform(np.zeros(scorer.window_samples, np.float32), 8000)
    not_ours = tmp_path / "other.onnx"
    not_ours.write_bytes(b"\x08\x07")
    with pytest.raises(ModelFileError):
        EdgeScorer(not_ours)


@pytest.mark.parametrize("channels", ["mean", "all"])
def test_multichannel_models_export(channels, tmp_path_factory):
    """``mean`` averages every channel's log-mel inside the graph (any channel count);
    ``all`` feeds each channel to the model."""
    from stethoscope.simulate import simulate_dataset

    root = Path(simulate_dataset("fan", 6, 1, tmp_path_factory.mktemp("fan"), channels=2,
                                 duration=4.0, seed=1, progress=False))
    normal = sorted(root.rglob("normal/*.wav"))
    folder = tmp_path_factory.mktemp("mc") / "model"
    Detector(features={"channels": channels}, progress=False).fit(normal[:5]).save(folder)
    det = Detector.load(folder, device="cpu", progress=False)
    scorer = EdgeScorer(export_onnx(folder, folder.with_suffix(".onnx")))
    assert scorer.input_channels == (None if channels == "mean" else 2)
    for path in [normal[5], *root.rglob("abnormal/*.wav")]:
        expected = det.score_recordings([path])[0]
        got = scorer.score_file(path)
        assert got["score"] == pytest.approx(expected.score, rel=RELATIVE_TOLERANCE)


@pytest.mark.parametrize("settings", [
    {"n_fft": 1024, "hop_length": 256, "n_mels": 64},  # factored 32·32 (clip-stats)
    {"n_fft": 400, "hop_length": 160, "n_mels": 40},  # 20·20: A even, 25 ms / 10 ms frames
    {"n_fft": 1000, "hop_length": 300, "n_mels": 32, "fmin": 50.0, "fmax": 7000.0},  # 40·25
    {"n_fft": 509, "hop_length": 100, "n_mels": 24},  # prime n_fft: one product, gathered
    {"n_fft": 512, "hop_length": 128, "n_mels": 32, "power": 1.0},  # magnitude, not power
])
def test_onnx_log_mel_front_end_matches_the_features(settings):
    import onnx
    import onnxruntime

    from stethoscope.export import GraphBuilder, add_logmel
    from stethoscope.features import FeatureConfig, logmel

    config = FeatureConfig(**settings)
    samples = 16000 * 2 + 37
    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal((3, samples))).astype(np.float32)
    wave[1] *= np.linspace(0, 1, samples, dtype=np.float32)  # channels differ
    b = GraphBuilder()
    spec, frames = add_logmel(b, "x", samples, config.to_dict())
    b.nodes.append(onnx.helper.make_node("Identity", [spec], ["y"]))
    model = b.model([onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                        [3, samples])],
                    [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], {})
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": wave})[0]
    expected = logmel(wave, config)
    assert got.shape == expected.shape == (3, config.n_mels, frames)
    assert np.abs(got - expected).max() < 1e-3  # dB; float32 rounding of two transforms
