"""The command line: exit codes, one-line errors, no half-written output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from stethoscope.cli import main


@pytest.fixture(scope="module")
def small_valve(tmp_path_factory):
    from tests.conftest import shared_path

    root = shared_path("dcase2023_valve")
    base = tmp_path_factory.mktemp("valve")
    for split in ("train", "test"):
        names = sorted(p.name for p in (root / split).glob("*.wav"))
        normal = [n for n in names if "_normal_" in n][:6]
        anomaly = [n for n in names if "_anomaly_" in n][:4]
        (base / split).mkdir()
        for name in normal + anomaly:
            shutil.copy(root / split / name, base / split / name)
    return base


@pytest.fixture(scope="module")
def model_dir(small_valve, tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "model"
    code = main(["train", str(small_valve / "train"), "--model", "dcase-ae", "--epochs", "1",
                 "--out", str(out)])
    assert code == 0
    return out


def _score(model, inputs, capsys, *extra):
    code = main(["score", str(model), *map(str, inputs), *extra])
    return code, capsys.readouterr()


def test_train_writes_a_model_folder(model_dir):
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


def test_score_exit_codes_follow_the_verdicts(model_dir, small_valve, capsys, tmp_path):
    code, out = _score(model_dir, [small_valve / "test"], capsys, "--json")
    result = json.loads(out.out)
    flagged = any(c["anomalous"] for c in result["clips"])
    assert code == (1 if flagged else 0)
    assert len(result["clips"]) == 10
    # A model whose threshold is above every score says "all normal" (exit 0) ...
    config = json.loads((model_dir / "config.json").read_text())
    high = tmp_path / "high"
    shutil.copytree(model_dir, high)
    config["threshold"]["value_"] = 1e12
    (high / "config.json").write_text(json.dumps(config))
    assert _score(high, [small_valve / "test"], capsys)[0] == 0
    # ... and one whose threshold is below every score finds anomalies (exit 1).
    config["threshold"]["value_"] = -1e12
    (high / "config.json").write_text(json.dumps(config))
    code, out = _score(high, [small_valve / "test"], capsys)
    assert code == 1 and "10 of 10 anomalous" in out.out


@pytest.mark.parametrize("bad", ["corrupt", "empty_dir", "missing", "silence"])
def test_bad_input_is_one_line_and_exit_2(model_dir, tmp_path, capsys, bad):
    import numpy as np
    import soundfile as sf

    target = tmp_path / f"{bad}.wav"
    if bad == "corrupt":
        target.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    elif bad == "empty_dir":
        target = tmp_path / "empty"
        target.mkdir()
    elif bad == "silence":
        sf.write(target, np.zeros(16000 * 10, dtype=np.int16), 16000, subtype="PCM_16")
    code, out = _score(model_dir, [target], capsys)
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0], out.err


def test_unreadable_model_is_exit_2(tmp_path, capsys, small_valve):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{broken")
    code, out = _score(tmp_path / "model", [small_valve / "test"], capsys)
    assert code == 2 and str(tmp_path / "model") in out.err
    assert len(out.err.strip().splitlines()) == 1


def test_failed_training_leaves_no_output(tmp_path, capsys):
    empty = tmp_path / "nothing"
    empty.mkdir()
    code = main(["train", str(empty), "--out", str(tmp_path / "model")])
    assert code == 2 and not (tmp_path / "model").exists()
    assert "no WAV files" in capsys.readouterr().err


def test_evaluate_writes_the_report(model_dir, small_valve, tmp_path, capsys):
    code = main(["evaluate", str(model_dir), str(small_valve / "test"), "--report",
                 str(tmp_path / "report")])
    assert code == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["metrics"]["overall"]["tp"] + metrics["metrics"]["overall"]["fn"] == 4
    assert "AUC" in capsys.readouterr().out.upper()


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "seed-conv-ae" in out and "dcase-ae" in out and "(default)" in out


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "stethoscope", "--version"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.startswith("stethoscope ")


def test_lab_encode_decode_round_trip(tmp_path, mnist_npz, capsys):
    import numpy as np
    import torch

    from stethoscope.lab import load_lab_model

    assert main(["lab", "conv-ae", "--epochs", "1", "--subset", "300", "--data",
                 str(mnist_npz), "--out", str(tmp_path / "lab")]) == 0
    images = np.load(mnist_npz)["x_test"][:5].astype(np.float32) / 255.0
    np.save(tmp_path / "images.npy", images)
    run = tmp_path / "lab" / "conv-ae"
    assert main(["encode", str(run), str(tmp_path / "images.npy"), "--out",
                 str(tmp_path / "codes.npy")]) == 0
    assert main(["decode", str(run), str(tmp_path / "codes.npy"), "--out",
                 str(tmp_path / "out.npy")]) == 0
    whole = load_lab_model(run).eval()
    with torch.no_grad():
        expected = whole(torch.from_numpy(images)[:, None]).numpy().reshape(5, 28, 28)
    assert np.allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6)
    assert np.load(tmp_path / "codes.npy").shape == (5, 8, 7, 7)
