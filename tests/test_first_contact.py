"""Issue 12, "trustworthy on first contact": one test (or a few) per numbered defect.

Each test reproduces the defect as a new user met it: through the CLI's ``main`` (what the
``stethoscope`` command runs; an exception that escapes it is the traceback a user saw),
through ``python -m stethoscope`` in a subprocess where the process itself matters (memory
limits, pipes, mounts, kills), or through the public API. Every test failed on the code at
commit 710445c and passes now.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import SHARED_DATA, default_model, simulated_machine

ROOT = Path(__file__).resolve().parents[1]
MEMORY_GUARD = 3 << 30  # address space for "must not allocate gigabytes" runs


# ----------------------------------------------------------------------------- helpers
def cli(*args, cwd: Path | None = None, progress: bool = False, limit: int | None = None,
        timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m stethoscope ARGS`` as a user runs it (PYTHONPATH: the code under test)."""
    environment = {**os.environ, **(env or {})}
    environment.pop("STETHOSCOPE_PROGRESS", None)
    if not progress:
        environment["STETHOSCOPE_PROGRESS"] = "0"
    environment["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)

    def guard() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run([sys.executable, "-m", "stethoscope", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=environment,
                          preexec_fn=guard)


class Run:
    """What one in-process CLI run gave: exit code, stdout, stderr."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def steth(capsys):
    """``steth(*args)``: run the CLI in this process as the console script does."""
    from stethoscope.cli import main

    def run(*args) -> Run:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse
            code = exit_.code
        out = capsys.readouterr()
        return Run(code, out.out, out.err)

    return run


def strict_json(text: str):
    """Parse JSON the way strict parsers do: NaN and Infinity are not JSON."""
    def refuse(token: str):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def assert_one_line_error(result, *needles: str) -> str:
    """Exit 2, no traceback, and one stderr line that mentions every needle."""
    err = result.stderr
    assert result.returncode == 2, (result.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def wav(path: Path, seconds: float = 10.0, rate: int = 16000, channels: int = 1,
        seed: int = 0, subtype: str = "PCM_16") -> Path:
    rng = np.random.default_rng(seed)
    data = (0.1 * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, rate, subtype=subtype)
    return path


def image_sources(page: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page.read_text())


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    """A simulated valve: 14 normal and 6 abnormal clips (MIMII layout)."""
    return simulated_machine(tmp_path_factory.mktemp("sim"), "valve", 14, 6, seed=3)


@pytest.fixture(scope="module")
def model(sim, tmp_path_factory) -> Path:
    """The default detector trained on 12 of the normal clips."""
    return default_model(sim, tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def ae_model(sim, tmp_path_factory) -> Path:
    """A one-epoch autoencoder (has encoder and decoder halves)."""
    from stethoscope import Detector

    out = tmp_path_factory.mktemp("ae") / "model"
    Detector("dcase-ae", epochs=1, progress=False).fit(
        sorted((sim / "normal").glob("*.wav"))[:12]).save(out)
    return out


def edited_model(model: Path, target: Path, edit) -> Path:
    """A copy of ``model`` whose config.json went through ``edit(config)``."""
    shutil.copytree(model, target)
    config = json.loads((target / "config.json").read_text())
    edit(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


# ----------------------------------------------------------------------------- 1
@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_1_evaluate_report_links_resolve_from_the_page_and_after_a_move(
        steth, tmp_path, sim, model, where, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = Path("rep") if where == "relative" else tmp_path / "rep"
    result = steth("evaluate", model, sim, "--report", report)
    assert result.returncode == 0, result.stderr
    page = tmp_path / "rep" / "index.html"
    sources = image_sources(page)
    assert sources and all(not Path(s).is_absolute() for s in sources), sources
    assert all((page.parent / s).is_file() for s in sources), sources
    moved = shutil.move(tmp_path / "rep", tmp_path / "elsewhere" / "copy")
    assert all((Path(moved) / s).is_file() for s in image_sources(Path(moved) / "index.html"))


def test_1_demo_report_links_resolve_with_a_relative_folder(tmp_path, monkeypatch):
    from stethoscope.demo import run_demo

    monkeypatch.chdir(tmp_path)
    page = run_demo(Path("demo"), machine="pump", n_train=12, n_test_normal=6, n_abnormal=6)
    sources = image_sources(tmp_path / page)
    assert sources and all((tmp_path / page).parent.joinpath(s).is_file() for s in sources)


def test_1_lab_report_does_not_double_its_folder(tmp_path, monkeypatch):
    from stethoscope.lab import run_lab

    rng = np.random.default_rng(0)
    arrays = (rng.random((40, 28, 28)).astype(np.float32), rng.integers(0, 10, 40),
              rng.random((10, 28, 28)).astype(np.float32), rng.integers(0, 10, 10))
    monkeypatch.chdir(tmp_path)
    page = run_lab("dense-ae", data=arrays, out=Path("lab-runs"), epochs=1, progress=False)
    sources = image_sources(tmp_path / page)
    assert sources and not any(s.startswith("lab-runs/") for s in sources), sources
    assert all((tmp_path / "lab-runs" / s).is_file() for s in sources)


# ----------------------------------------------------------------------------- 2
def test_2_score_json_parses_with_progress_bars_on(sim, model):
    result = cli("score", model, sim / "abnormal", "--json", progress=True)
    assert result.returncode in (0, 1), result.stderr
    data = strict_json(result.stdout)
    assert len(data["clips"]) == 6 and data["errors"] == []


def test_2_every_json_option_prints_strict_json(steth, tmp_path, sim, model, monkeypatch):
    monkeypatch.delenv("STETHOSCOPE_PROGRESS")  # progress bars on, as for a new user
    train = steth("train", sim / "normal", "--out", tmp_path / "m", "--json")
    assert train.returncode == 0, train.stderr
    assert strict_json(train.stdout)["threshold"]["rule"] == "gumbel:0.03"  # the model's own
    evaluate = steth("evaluate", model, sim, "--json")
    assert evaluate.returncode == 0, evaluate.stderr
    assert strict_json(evaluate.stdout)["metrics"]["overall"]["n_anomalous"] == 6
    models = steth("models", "--json")
    assert any(m["default"] for m in strict_json(models.stdout)["models"])


def test_2_a_nan_threshold_is_refused_not_printed_as_json(steth, tmp_path, sim, model):
    broken = edited_model(model, tmp_path / "nan",
                          lambda c: c["threshold"].update(value_=float("nan")))
    result = steth("score", broken, sim / "normal", "--json")
    assert result.stdout.strip() == "" or strict_json(result.stdout)
    assert_one_line_error(result, str(broken))


# ----------------------------------------------------------------------------- 3
def _copy_clips(sim: Path, folder: Path, count: int = 12) -> list[Path]:
    folder.mkdir(parents=True)
    return [Path(shutil.copy(p, folder)) for p in sorted((sim / "normal").glob("*.wav"))[:count]]


def test_3_train_out_onto_its_own_data_is_refused(steth, tmp_path, sim):
    clips = _copy_clips(sim, tmp_path / "d")
    result = steth("train", tmp_path / "d", "--out", tmp_path / "d")
    assert_one_line_error(result, str(tmp_path / "d"), "refusing")
    assert all(p.is_file() for p in clips)
    again = steth("train", tmp_path / "d", "--out", tmp_path / "d", "--force")
    assert_one_line_error(again, "refusing")  # --force never replaces a user's folder
    assert all(p.is_file() for p in clips)


def test_3_out_onto_a_user_file_is_refused(steth, tmp_path, sim):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert_one_line_error(steth("train", sim / "normal", "--out", notes), str(notes))
    assert notes.read_text() == "my notes"


def test_3_report_into_a_folder_with_other_files_is_refused(steth, tmp_path, sim, model):
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "thesis.tex").write_text("keep me")
    result = steth("evaluate", model, sim, "--report", folder, "--force")
    assert_one_line_error(result, str(folder), "refusing")
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"]


def test_3_force_replaces_only_stethoscope_artefacts(steth, tmp_path, sim):
    out = tmp_path / "m"
    assert steth("train", sim / "normal", "--out", out).returncode == 0
    assert_one_line_error(steth("train", sim / "normal", "--out", out), "--force")
    result = steth("train", sim / "normal", "--out", out, "--force", "--threshold", "p99")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["threshold"]["rule"] == "percentile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing left beside it


def test_3_encode_never_replaces_a_user_file(steth, tmp_path, sim, ae_model):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    result = steth("encode", ae_model, sim / "normal", "--out", notes)
    assert_one_line_error(result, str(notes))
    assert notes.read_text() == "my notes"
    codes = tmp_path / "codes.npy"
    assert steth("encode", ae_model, sim / "normal", "--out", codes).returncode == 0
    assert_one_line_error(steth("encode", ae_model, sim / "normal", "--out", codes), "--force")
    assert steth("encode", ae_model, sim / "normal", "--out", codes, "--force").returncode == 0


# ----------------------------------------------------------------------------- 4
@pytest.mark.parametrize("device", ["gpu", "cuda"])
def test_4_an_unusable_device_is_one_line_before_any_work(steth, tmp_path, sim, device):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is usable")
    start = time.perf_counter()
    result = steth("train", sim / "normal", "--device", device, "--out", tmp_path / "m")
    assert_one_line_error(result, device)
    assert not (tmp_path / "m").exists()
    assert time.perf_counter() - start < 60


def test_4_a_model_without_threshold_value_is_one_line(steth, tmp_path, sim, model):
    broken = edited_model(model, tmp_path / "m", lambda c: c["threshold"].update(value_=None))
    assert_one_line_error(steth("score", broken, sim / "normal"), str(broken))


def test_4_encode_onto_an_existing_folder_is_one_line(steth, tmp_path, sim, ae_model):
    (tmp_path / "out").mkdir()
    assert_one_line_error(steth("encode", ae_model, sim / "normal", "--out", tmp_path / "out"),
                          str(tmp_path / "out"))


def _in_private_mounts(script: str) -> subprocess.CompletedProcess:
    """Run a shell script in its own mount namespace (root only), or skip."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to mount a read-only or full file system")
    probe = subprocess.run([unshare, "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")
    env = {**os.environ, "STETHOSCOPE_PROGRESS": "0", "PYTHONPATH": os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)}
    return subprocess.run([unshare, "-m", "sh", "-ec", script], capture_output=True,
                          text=True, timeout=300, env=env)


def test_4_a_read_only_output_disk_is_found_before_training(tmp_path, sim):
    target = tmp_path / "ro"
    target.mkdir()
    script = (f"mount --bind {target} {target}; mount -o remount,bind,ro {target}; "
              f"{sys.executable} -m stethoscope train {sim / 'normal'} --model dcase-ae "
              f"--epochs 50 --out {target / 'model'}")
    start = time.perf_counter()
    result = _in_private_mounts(script)
    assert_one_line_error(result, str(target), "read-only")
    assert time.perf_counter() - start < 60  # refused before 50 epochs of training


def test_4_a_full_output_disk_is_one_line_and_leaves_nothing(tmp_path, sim):
    target = tmp_path / "full"
    target.mkdir()
    script = (f"mount -t tmpfs -o size=128k tmpfs {target}; "
              f"{sys.executable} -m stethoscope train {sim / 'normal'} --out {target / 'm'}"
              f" || code=$?; ls -A {target}; exit ${{code:-0}}")
    result = _in_private_mounts(script)
    assert_one_line_error(result, "no space left")
    assert result.stdout.strip() == ""  # nothing in the full disk: no temporaries


def test_4_out_of_memory_is_one_line(tmp_path, sim, model):
    big = wav(tmp_path / "long.wav", seconds=600, channels=8)
    driver = (
        "import resource, sys\n"
        "import stethoscope.cli, stethoscope.detector, stethoscope.evaluation, numpy\n"
        "import scipy.signal, soundfile, torch\n"
        "numpy.ones((256, 256)) @ numpy.ones((256, 256))  # BLAS buffers before the limit\n"
        "torch.ones(256, 256) @ torch.ones(256, 256)\n"
        "used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (used + (120 << 20),) * 2)\n"
        f"sys.exit(stethoscope.cli.main(['score', {str(model)!r}, {str(big)!r}, '--channels', "
        "'mean']))\n")
    env = {**os.environ, "STETHOSCOPE_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True,
                            timeout=180, env=env)
    # Where the allocation fails decides the message (numpy's MemoryError gives "out of
    # memory"); whatever it is, the user gets one line and exit 2, never a traceback.
    assert_one_line_error(result, "stethoscope: error:")


# ----------------------------------------------------------------------------- 5
_GUARDED = """
import contextlib, io, json, sys, traceback
import stethoscope.cli
results = {}
for name, args in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = stethoscope.cli.main(args)
        except SystemExit as exit_:
            code = exit_.code
        except BaseException:
            traceback.print_exc()
            code = 1
    results[name] = {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bounded(sim, model, tmp_path_factory) -> dict:
    """Files declaring sizes that would take gigabytes, each scored once in one process
    limited to MEMORY_GUARD of address space: {case: (result, the path to name)}."""
    base = tmp_path_factory.mktemp("bounds")
    cases: dict[str, tuple[list[str], Path]] = {}
    for field in ("n_mels", "n_fft"):
        broken = edited_model(model, base / field,
                              lambda c, f=field: c["features"].update({f: 1_000_000_000}))
        cases[field] = (["score", str(broken), str(sim / "normal")], broken)
    broken = base / "weights"
    shutil.copytree(model, broken)
    header = json.dumps({"w": {"dtype": "F32", "shape": [10_000_000_000],
                               "data_offsets": [0, 40_000_000_000]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(broken / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + 40_000_000_000)  # sparse: no disk used
    cases["safetensors"] = (["score", str(broken), str(sim / "normal")], broken)
    clip = wav(base / "one_hz.wav")
    data = bytearray(clip.read_bytes())
    data[24:32] = struct.pack("<II", 1, 2)  # sample rate 1 Hz, 2 bytes per second
    clip.write_bytes(bytes(data))
    cases["one_hz"] = (["score", str(model), str(clip), "--resample"], clip)

    env = {**os.environ, "STETHOSCOPE_PROGRESS": "0", "PYTHONPATH": os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)}
    run = subprocess.run(
        [sys.executable, "-c", _GUARDED, json.dumps({k: v[0] for k, v in cases.items()})],
        capture_output=True, text=True, timeout=300, env=env,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_GUARD,) * 2))
    assert run.returncode == 0, f"the guarded process died: {run.stderr[-2000:]}"
    results = json.loads(run.stdout.strip().splitlines()[-1])
    return {name: (Run(**results[name]), path) for name, (_, path) in cases.items()}


@pytest.mark.parametrize("field", ["n_mels", "n_fft"])
def test_5_a_config_declaring_huge_features_is_refused_before_allocating(bounded, field):
    result, _ = bounded[field]
    assert_one_line_error(result, field)


def test_5_a_safetensors_header_declaring_40_gb_is_refused(bounded):
    result, path = bounded["safetensors"]
    assert_one_line_error(result, str(path), "40.0 GB")


def test_5_a_one_hertz_wav_header_with_resample_is_refused(bounded):
    result, path = bounded["one_hz"]
    assert_one_line_error(result, str(path), "1 Hz")


# ----------------------------------------------------------------------------- 6
def test_6_bad_files_are_named_and_every_readable_clip_is_scored(steth, tmp_path, sim, model):
    folder = tmp_path / "mixed"
    good = _copy_clips(sim, folder, 5)
    corrupt = folder / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    spike = wav(folder / "spike.wav", subtype="FLOAT")
    data, rate = sf.read(spike, dtype="float32")
    data[1000] = 1e30
    sf.write(spike, data, rate, subtype="FLOAT")
    result = steth("score", model, folder, "--json")
    assert result.returncode == 2, result.stderr
    report = strict_json(result.stdout)
    assert sorted(Path(c["path"]).name for c in report["clips"]) == sorted(p.name for p in good)
    assert all(c["score"] is not None for c in report["clips"])
    assert sorted(Path(e["path"]).name for e in report["errors"]) == ["corrupt.wav", "spike.wav"]
    assert str(corrupt) in result.stderr and str(spike) in result.stderr
    assert "Traceback" not in result.stderr


def test_6_evaluate_reports_every_readable_clip_and_names_the_bad_one(steth, tmp_path, sim,
                                                                      model):
    data = Path(shutil.copytree(sim, tmp_path / "valve" / "id_00"))
    corrupt = data / "abnormal" / "zz_corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    result = steth("evaluate", model, data, "--report", tmp_path / "report")
    assert result.returncode == 2 and str(corrupt) in result.stderr, result.stderr
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["metrics"]["overall"]["n_anomalous"] == 6  # every readable one
    again = strict_json(steth("evaluate", model, data, "--json").stdout)
    assert [Path(e["path"]).name for e in again["errors"]] == ["zz_corrupt.wav"]


def test_6_training_names_the_clip_that_would_ruin_every_score(steth, tmp_path, sim):
    folder = tmp_path / "train"
    _copy_clips(sim, folder, 10)
    spike = wav(folder / "zz_spike.wav", subtype="FLOAT")
    data, rate = sf.read(spike, dtype="float32")
    data[500] = 1e30
    sf.write(spike, data, rate, subtype="FLOAT")
    assert_one_line_error(steth("train", folder, "--out", tmp_path / "m"), str(spike))


# ----------------------------------------------------------------------------- 7
@pytest.mark.parametrize("rule", ["mean+3std", "p99", "gamma:0.9", "fpr:0.01", "p95"])
def test_7_score_refits_the_threshold_without_retraining(steth, sim, model, rule):
    from stethoscope.scoring import parse_threshold

    result = steth("score", model, sim, "--json", "--threshold", rule)
    assert result.returncode in (0, 1), result.stderr
    data = strict_json(result.stdout)
    held_out = json.loads((model / "config.json").read_text())["train_scores"]["values"]
    expected = parse_threshold(rule).fit(held_out).value_
    assert data["threshold"] == pytest.approx(expected)
    if rule == "fpr:0.01":
        assert np.mean(np.asarray(held_out) > data["threshold"]) <= 0.01


def test_7_fixed_values_decide_the_exit_code(steth, sim, model):
    assert steth("score", model, sim, "--threshold", "value:1e9").returncode == 0
    low = steth("score", model, sim, "--threshold", "value:-1e9")
    assert low.returncode == 1 and "20 of 20 anomalous" in low.stdout


def test_7_evaluate_takes_a_threshold_rule(steth, sim, model):
    high = strict_json(steth("evaluate", model, sim, "--threshold", "value:1e9", "--json").stdout)
    low = strict_json(steth("evaluate", model, sim, "--threshold", "value:-1e9", "--json").stdout)
    assert high["metrics"]["overall"]["recall"] == 0 and low["metrics"]["overall"]["recall"] == 1


def test_7_evaluate_says_how_many_anomalies_its_threshold_finds(steth, tmp_path):
    valve = SHARED_DATA / "dcase2023_valve"
    if not valve.exists():
        pytest.skip(f"real data not available: {valve} is absent (see ../shared/data/README.md)")
    model = tmp_path / "valve"
    assert steth("train", valve / "train", "--out", model).returncode == 0
    result = steth("evaluate", model, valve / "test", "--report", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    found = int(re.search(r"finds (\d+) of 100 anomalies", result.stdout).group(1))
    assert "false-alarm rate" in result.stdout and "--threshold" in result.stdout
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Threshold rule: gumbel:0.03" in page and "measured false-alarm rate" in page
    # The choices it lists, fitted on the same held-out scores without retraining:
    fpr10 = re.search(r"fpr:0\.1 +\S+ +\S+ % +\S+ % +(\S+) %", result.stdout)
    assert fpr10 and float(fpr10.group(1)) > found, result.stdout


# ----------------------------------------------------------------------------- 8
def test_8_train_on_a_npy_feature_array(steth, tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(12, 1, 64, 313)).astype(np.float32))
    result = steth("train", tmp_path / "x.npy", "--out", tmp_path / "m")
    assert result.returncode == 0, result.stderr


def test_8_score_takes_channels(steth, tmp_path, model):
    stereo = wav(tmp_path / "stereo.wav", channels=2)
    for choice in ("1", "mean"):
        result = steth("score", model, stereo, "--channels", choice, "--json")
        assert result.returncode in (0, 1), result.stderr
        assert len(strict_json(result.stdout)["clips"]) == 1


def test_8_inputs_unlike_the_training_ones_are_warned_about(steth, tmp_path, model):
    eight = wav(tmp_path / "eight.wav", channels=8)
    result = steth("score", model, eight)
    assert result.returncode in (0, 1), result.stderr
    assert "warning" in result.stderr.lower() and "channel" in result.stderr.lower()
    slow = wav(tmp_path / "slow.wav", rate=8000)
    result = steth("score", model, slow, "--resample")
    assert result.returncode in (0, 1), result.stderr
    assert "warning" in result.stderr.lower() and "8000" in result.stderr


def test_8_a_short_clip_scored_by_a_long_model_is_named_with_its_length(steth, tmp_path,
                                                                        model):
    short = wav(tmp_path / "short.wav", seconds=0.1)
    assert_one_line_error(steth("score", model, short), str(short), "0.1 s")


def test_8_models_into_a_closed_pipe_is_quiet(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)}
    child = subprocess.Popen([sys.executable, "-m", "stethoscope", "models"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    child.stdout.close()  # like `| head` that has already exited
    _, err = child.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


def test_8_an_unknown_model_name_fails_before_any_simulation(steth, tmp_path):
    start = time.perf_counter()
    result = steth("demo", "--model", "idn", "--out", tmp_path / "demo")
    assert_one_line_error(result, "did you mean 'idnn'")
    assert not (tmp_path / "demo").exists()
    assert time.perf_counter() - start < 30


def test_8_every_option_has_help_and_every_page_states_the_exit_codes():
    import argparse

    from stethoscope.cli import build_parser

    def parsers(parser, name="stethoscope"):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from parsers(sub, f"{name} {sub_name}")

    for name, parser in parsers(build_parser()):
        text = parser.format_help()
        assert "exit codes: 0" in text and "2 error" in text, name
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action,
                                                              argparse._SubParsersAction):
                continue
            assert action.help, f"{name} {action.dest}: no help text"
            shown = action.default in (None, False, argparse.SUPPRESS) or "default" in \
                parser.formatter_class("x")._get_help_string(action).lower()
            assert shown, f"{name} {action.dest}: default {action.default!r} not in its help"


def test_8_spectrogram_axes_are_seconds_and_hertz():
    from stethoscope import plots
    from stethoscope.features import FeatureConfig

    cfg = FeatureConfig()
    fig = plots.plot_spectrograms([np.random.rand(64, 313)], ["clip"], features=cfg)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "time (s)" and "Hz" in ax.get_ylabel()
    assert ax.get_xlim()[1] == pytest.approx(313 * cfg.hop_length / cfg.sample_rate)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "1k" in labels and "4k" in labels


def test_8_spectrogram_titles_do_not_overlap():
    from stethoscope import plots

    name = "section_00_source_test_anomaly_0042_v1pat_B_v2pat_none_extra_attributes.wav"
    titles = [f"normal: {name} (score 3.14)", f"anomalous: {name} (score 9.99)"] * 2
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plots.plot_spectrograms([np.random.rand(64, 313)] * 4, titles)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
    assert len(boxes) == 4
    for i, a in enumerate(boxes):
        assert a.x0 >= 0 and a.x1 <= fig.bbox.width, "title leaves the figure"
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), "titles overlap"


def test_8_the_report_describes_the_default_models_scores_truthfully(steth, tmp_path, sim,
                                                                     model):
    assert steth("evaluate", model, sim, "--report", tmp_path / "r").returncode == 0
    page = (tmp_path / "r" / "index.html").read_text()
    assert "clip-ensemble" in page and "reconstruction error map" not in page
    assert "gauss_spectrum, gauss_peaks" in page  # the members whose z-scores it takes


def test_8_report_tables_do_not_repeat_rows(tmp_path):
    from stethoscope.report import write_evaluation_report
    from stethoscope.scoring import Threshold

    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(10), np.ones(10)].astype(int)
    scores = rng.normal(size=20) + 2 * y
    out = write_evaluation_report(
        tmp_path / "r", title="t", scores=scores, threshold=Threshold().fit(rng.normal(size=20)),
        clip_names=[f"c{i}.wav" for i in range(20)], y_true=y, sections=["00"] * 20,
        domains=["source", "target"] * 10)
    page = (out / "index.html").read_text()
    table = page.split("<caption>Overall", 1)[1].split("</table>", 1)[0]
    rows = [re.findall(r"<td>(.*?)</td>", r) for r in table.split("<tr>")[2:]]
    numbers = [tuple(r[1:]) for r in rows]
    assert len(numbers) == len(set(numbers)), rows
    assert any(r[0].startswith("overall") and "section 00" in r[0] for r in rows)


def test_8_datasets_never_says_about_0_gb(steth, tmp_path, monkeypatch):
    monkeypatch.delenv("STETHOSCOPE_PROGRESS")
    result = steth("datasets", "download", "dcase2023", "--machine", "valve", "--out",
                   tmp_path / "d", "--base-url", "http://127.0.0.1:9")
    assert "0.0 GB" not in result.stderr and "size not published" in result.stderr
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_8_a_stale_old_folder_of_this_pid_does_not_block_a_save(tmp_path):
    import torch

    from stethoscope.storage import save_model

    save_model(tmp_path / "m", {"model": "x"}, {"w": torch.ones(2)})
    stale = tmp_path / f".m.old-{os.getpid()}"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    save_model(tmp_path / "m", {"model": "y"}, {"w": torch.ones(2)})
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model"] == "y"


_KILLED_REPORT = """
import os, signal, sys
import numpy as np
from stethoscope.report import write_evaluation_report
from stethoscope.scoring import Threshold
renames = 0
real = os.replace
def replace(a, b):
    global renames
    renames += 1
    if str(a).endswith(".tmp") and os.path.isdir(a):
        os.kill(os.getpid(), signal.SIGKILL)  # killed right before the folder's rename
    return real(a, b)
os.replace = replace
rng = np.random.default_rng(0)
write_evaluation_report(sys.argv[1], title="t", scores=rng.normal(size=10),
                        threshold=Threshold().fit(rng.normal(size=10)),
                        clip_names=[f"c{i}" for i in range(10)])
"""


def test_8_a_killed_report_leaves_nothing_after_the_next_run(steth, tmp_path, sim, model):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", _KILLED_REPORT, str(tmp_path / "rep")],
                            env=env, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert any(p.name.startswith(".rep.") for p in tmp_path.iterdir())  # what a kill leaves
    result = steth("evaluate", model, sim, "--report", tmp_path / "rep")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_8_scratch_feature_folders_of_a_killed_training_are_cleaned(tmp_path, sim):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    driver = (
        "import os, signal, sys\n"
        "import stethoscope.detector as d\n"
        "d.LARGE_CORPUS_CLIPS = 1\n"
        "from stethoscope import Detector\n"
        "real = Detector._fit_corpus if hasattr(Detector, '_fit_corpus') else None\n"
        "def die(*a, **k): os.kill(os.getpid(), signal.SIGKILL)\n"
        "for name in ('_fit_corpus', '_fit_features'):\n"
        "    if hasattr(Detector, name): setattr(Detector, name, die)\n"
        f"Detector(progress=False).fit({str(sim / 'normal')!r})\n")
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert any(p.name.startswith("stethoscope-features-") for p in scratch.iterdir())
    assert cli("models", env={"TMPDIR": str(scratch)}).returncode == 0
    assert not any(p.name.startswith("stethoscope-features-") for p in scratch.iterdir())


def test_8_weights_and_config_get_the_same_file_mode(model):
    modes = {p.name: p.stat().st_mode & 0o777 for p in model.iterdir() if p.is_file()
             and not p.name.startswith(".")}
    assert modes["model.safetensors"] == modes["config.json"], modes


def _readme_block(heading: str, language: str) -> str:
    section = (ROOT / "README.md").read_text().split(f"## {heading}\n", 1)[1]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_8_the_readme_quick_start_runs_as_written_in_an_empty_folder(steth, tmp_path,
                                                                      monkeypatch):
    """Every line of both quick starts, in empty folders, through the entry point the
    ``stethoscope`` command runs (a line's ``> file`` is its stdout written to that file)."""
    import shlex

    fresh = tmp_path / "cli"
    fresh.mkdir()
    monkeypatch.chdir(fresh)
    for line in _readme_block("Quick start: command line", "bash").strip().splitlines():
        words = shlex.split(line, comments=True)
        assert words[0] == "stethoscope", line
        target = None
        if ">" in words:
            words, target = words[:words.index(">")], words[words.index(">") + 1]
        result = steth(*words[1:])
        allowed = (0, 1) if words[1] == "score" else (0,)
        assert result.returncode in allowed, (line, result.stderr[-1500:])
        if target:
            (fresh / target).write_text(result.stdout)
    assert strict_json((fresh / "scores.json").read_text())["clips"]
    assert (fresh / "report" / "index.html").is_file()
    python = tmp_path / "python"
    python.mkdir()
    monkeypatch.chdir(python)
    exec(compile(_readme_block("Quick start: Python", "python"), "README.md", "exec"), {})
    assert (python / "pump-model" / "model.safetensors").is_file()
