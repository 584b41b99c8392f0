"""Detection quality of every stethoscope model and its peers on labelled real data, in one run.

    python benchmarks/quality.py --suite          # every labelled real set in ../shared/data
    python benchmarks/quality.py --data ../shared/data/dcase2023_valve --seeds 3
    python benchmarks/quality.py --data DIR --systems baseline,clip-stats,new

``--suite`` runs, on the same splits and in the same run: every registered stethoscope
anomaly model through ``stethoscope.Detector`` with its published defaults (trainable models
with their registered epochs unless ``--suite-epochs`` asks for fewer, said in the table), the chosen new default
(issue 13; see ``NEW_METHOD_FILE``), and the peers: the log-feature Ledoit-Wolf Mahalanobis
baseline of issue 13, and PyOD's ``AudioAE`` (``AutoEncoder`` on the flattened log features
for feature arrays, which are not audio) in a benchmark-only virtualenv
``benchmarks/.venv-pyod``. The DCASE baseline autoencoder (``dcase-ae``) and the course conv
autoencoder (``seed-conv-ae``) are registered models and run as such. It writes one section
of ``docs/quality.md``: AUC, pAUC, TP/FP at each system's default threshold and the observed
false-alarm rate on the normal test clips, per set and averaged, plus the cheap systems with
10, 30 and all training clips (first N of a seeded random order, 3 draws for 10 and 30).

Labelled real sets (``--shared``, default ``../shared/data``):

* ``dcase2020_modspec``: 14 machines, official train (normal) and test splits, modulation
  spectra ``(N, 60, 8)`` of linear magnitudes;
* ``dcase2023_valve``: ``train/`` 60 normal WAVs, ``test/`` 40 normal + 100 anomalous;
* ``mimii_8ch``: one normal and one abnormal 8-channel recording per machine; each channel
  is a recording, non-overlapping ``--crop`` s crops of the first half of the normal one
  train, crops of its second half and of the abnormal one test (an AUC sanity check: one
  recording per machine, so its false-alarm rate says nothing about new recordings).

Layouts ``--data`` reads: DCASE (``train/``, ``test/``), MIMII (``normal/``, ``abnormal/``),
clip pairs (``*_normal.wav`` + ``*_abnormal.wav``), arrays (``train.npy``, ``test.npy``,
``test_labels.npy``) and DCASE 2020 modulation-spectrum arrays
(``<machine>_X_train_*.npy``, ``_X_test_``, ``_y_test_``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _common import (
    REPO,
    add_common_arguments,
    ensure_repo_on_path,
    logger,
    machine_line,
    markdown_table,
    shown_command,
    update_doc_section,
)

QUALITY_DOC = REPO / "docs" / "quality.md"
DEFAULT_CACHE = Path.home() / ".cache" / "stethoscope" / "quality-features"
SHARED = REPO.parent / "shared" / "data"

# The chosen new default of issue 13. While it lives outside the package it is imported from
# this file; once it is ported and registered, set NEW_METHOD_FILE = None and put its
# registered name in NEW_METHOD_MODEL: it then runs through stethoscope.Detector like every
# other model (the one-line swap).
NEW_METHOD_FILE: Path | None = None  # ported: stethoscope/models/clip_ensemble.py
NEW_METHOD_MODEL = "clip-ensemble"
NEW_METHOD_FEATURES = {"n_mels": 64, "n_fft": 1024, "hop_length": 256}  # clip-stats' own

PYOD_VENV = REPO / "benchmarks" / ".venv-pyod"
PYOD_REQUIREMENTS = ("pyod==3.6.7", "tqdm")  # tqdm: imported by PyOD's deep models, undeclared
SUITE_EPOCHS: int | None = None  # None: the registered (published) epochs
SUBSET_SIZES = (10, 30)
SUBSET_DRAWS = 3
PROMISED_RATE = 0.03  # the new default's promised false-alarm rate (its threshold rule)


# ----------------------------------------------------------------------------- data sets


@dataclass
class Split:
    """One train/test task.

    ``features(config)`` returns ``(train, test)`` arrays ``(N, C, M, F)``: log-mel of the
    clips under ``config`` for recordings, the arrays themselves for feature arrays (whatever
    the config). ``audio()`` returns ``(train, test)`` lists of PyOD ``AudioAE`` inputs (file
    paths or ``(waveform, sample_rate)``), or None for feature arrays."""

    name: str
    group: str  # "modspec", "wav", "mimii" or "other": how the averages are grouped
    features: Callable
    labels: np.ndarray
    audio: Callable | None = None
    notes: list[str] = field(default_factory=list)
    n_train: int = 0


def find_splits(data: Path, crop_seconds: float, cache_dir: Path | None) -> list[Split]:
    """The train/test tasks of ``data`` (see the module docstring for the layouts)."""
    from stethoscope.errors import DataError

    if not data.exists():
        raise DataError("no such data folder", data)
    if sorted(data.glob("*_X_train_*.npy")):
        return modspec_splits(data)
    if (data / "train.npy").exists():
        return [array_split(data)]
    if (data / "train").is_dir() and (data / "test").is_dir():
        return [dcase_split(data, cache_dir)]
    pairs = sorted(p for p in data.glob("*_normal.wav")
                   if (data / p.name.replace("_normal.wav", "_abnormal.wav")).exists())
    if pairs:
        return [pair_split(p, crop_seconds) for p in pairs]
    folders = sorted({p.parent for p in data.rglob("normal")
                      if p.is_dir() and (p.parent / "abnormal").is_dir()})
    if (data / "normal").is_dir() and (data / "abnormal").is_dir():
        folders = [data]
    if folders:
        return [mimii_split(f, data, cache_dir) for f in folders]
    raise DataError("no DCASE (train/, test/), MIMII (normal/, abnormal/), clip-pair, .npy or "
                    "modulation-spectrum layout found", data)


def suite_splits(shared: Path, crop_seconds: float, cache_dir: Path | None) -> list[Split]:
    """Every labelled real set of the suite that is present under ``shared``."""
    splits = []
    for folder in ("dcase2020_modspec", "dcase2023_valve", "mimii_8ch"):
        if (shared / folder).is_dir():
            splits += find_splits(shared / folder, crop_seconds, cache_dir)
    return splits


def modspec_splits(data: Path) -> list[Split]:
    """DCASE 2020 modulation spectra: one split per machine, the official train/test."""
    splits = []
    for train_file in sorted(data.glob("*_X_train_*.npy")):
        machine = train_file.name.split("_X_train_")[0]
        test_file = train_file.with_name(train_file.name.replace("_X_train_", "_X_test_"))
        labels_file = train_file.with_name(train_file.name.replace("_X_train_", "_y_test_"))
        train = np.load(train_file)[:, None].astype(np.float32)
        test = np.load(test_file)[:, None].astype(np.float32)
        labels = np.load(labels_file).astype(int).ravel()
        splits.append(Split(machine, "modspec", lambda _c, a=train, b=test: (a, b), labels,
                            n_train=len(train)))
    order = {name: i for i, name in enumerate(MODSPEC_ORDER)}
    return sorted(splits, key=lambda s: (order.get(s.name, 99), s.name))


MODSPEC_ORDER = ("ToyCar1", "ToyCar2", "fan2", "fan4", "fan6", "pump2", "pump4", "pump6",
                 "slider2", "slider4", "slider6", "valve2", "valve4", "valve6")


def clip_features(paths: list[Path], cache_dir: Path | None):
    from stethoscope.features import extract_features

    def load(config):
        return np.asarray(extract_features(paths, config, cache_dir=cache_dir), np.float32)
    return load


def dcase_split(data: Path, cache_dir: Path | None) -> Split:
    from stethoscope.datasets import find_clips, labels_of
    from stethoscope.errors import DataError

    train = find_clips(data / "train")
    test = find_clips(data / "test")
    if any(c.label == 1 for c in train):
        raise DataError("train/ holds anomalous clips", data / "train")
    train_paths, test_paths = [c.path for c in train], [c.path for c in test]
    load_train, load_test = clip_features(train_paths, cache_dir), clip_features(test_paths,
                                                                                 cache_dir)
    return Split(data.name, "wav", lambda c: (load_train(c), load_test(c)), labels_of(test),
                 audio=lambda: ([str(p) for p in train_paths], [str(p) for p in test_paths]),
                 n_train=len(train))


def mimii_split(folder: Path, root: Path, cache_dir: Path | None) -> Split:
    from stethoscope.datasets import find_clips
    from stethoscope.errors import DataError

    normal = find_clips(folder / "normal")
    abnormal = find_clips(folder / "abnormal")
    n_test = min(len(abnormal), len(normal) // 2)
    if n_test < 1 or len(normal) - n_test < 3:
        raise DataError(f"too few clips for a split: {len(normal)} normal, "
                        f"{len(abnormal)} abnormal", folder)
    train_paths = [c.path for c in normal[:-n_test]]
    test_paths = [c.path for c in normal[-n_test:] + abnormal]
    labels = np.r_[np.zeros(n_test, int), np.ones(len(abnormal), int)]
    name = str(folder.relative_to(root.parent)) if folder != root else folder.name
    load_train, load_test = clip_features(train_paths, cache_dir), clip_features(test_paths,
                                                                                 cache_dir)
    return Split(name, "other", lambda c: (load_train(c), load_test(c)), labels,
                 audio=lambda: ([str(p) for p in train_paths], [str(p) for p in test_paths]),
                 notes=[f"{len(train_paths)} normal clips train; {n_test} normal + "
                        f"{len(abnormal)} abnormal test"], n_train=len(train_paths))


def array_split(data: Path) -> Split:
    def load(_config):
        arrays = []
        for name in ("train.npy", "test.npy"):
            array = np.load(data / name, mmap_mode="r")
            arrays.append(np.asarray(array[:, None] if array.ndim == 3 else array, np.float32))
        return tuple(arrays)

    labels = np.load(data / "test_labels.npy").astype(int).ravel()
    return Split(data.name, "other", load, labels,
                 n_train=len(np.load(data / "train.npy", mmap_mode="r")))


def pair_split(normal_path: Path, crop_seconds: float) -> Split:
    """Crops of a multi-channel normal/abnormal clip pair; each channel is one recording."""
    from stethoscope.audio import read_wav
    from stethoscope.features import FeatureConfig, extract_features

    machine = normal_path.name.replace("_normal.wav", "")
    abnormal_path = normal_path.with_name(f"{machine}_abnormal.wav")
    specs: dict = {}

    def channel_specs(path: Path, config) -> np.ndarray:
        key = (path, config)
        if key not in specs:
            out = extract_features([path], config.replace(channels="all"), progress=False)
            specs[key] = np.asarray(out[0], dtype=np.float32)[:, None]  # (channels, 1, M, F)
        return specs[key]

    def crop_starts(frames: int, length: int, part: str) -> range:
        lo, hi = {"first": (0, frames // 2), "second": (frames // 2, frames),
                  "all": (0, frames)}[part]
        return range(lo, hi - length + 1, length)  # no overlap: held-out crops share no frame

    def crops(path: Path, config, part: str) -> np.ndarray:
        spec = channel_specs(path, config)
        length = max(2, int(round(crop_seconds * config.sample_rate / config.hop_length)))
        starts = crop_starts(spec.shape[-1], length, part)
        return np.concatenate([spec[..., s:s + length] for s in starts])

    def features(config):
        train = crops(normal_path, config, "first")
        test = np.concatenate([crops(normal_path, config, "second"),
                               crops(abnormal_path, config, "all")])
        return train, test

    def wave_crops(path: Path, part: str) -> list[tuple[np.ndarray, int]]:
        wave, rate = read_wav(path, channels="all")
        length = int(round(crop_seconds * rate))
        starts = crop_starts(wave.shape[1], length, part)
        return [(wave[ch, s:s + length], rate) for s in starts for ch in range(len(wave))]

    def audio():
        return (wave_crops(normal_path, "first"),
                wave_crops(normal_path, "second") + wave_crops(abnormal_path, "all"))

    probe = FeatureConfig()
    train, test = features(probe)
    n_normal = len(crops(normal_path, probe, "second"))
    labels = np.r_[np.zeros(n_normal, int), np.ones(len(test) - n_normal, int)]
    return Split(f"{normal_path.parent.name}/{machine}", "mimii", features, labels, audio=audio,
                 notes=[f"{crop_seconds:g} s crops of every channel, no overlap; train: first "
                        "half of the normal clip; test: its second half + the abnormal clip"],
                 n_train=len(train))


# ----------------------------------------------------------------------------- systems


@dataclass
class Outcome:
    """One system on one split: test scores, its default threshold, times."""

    scores: np.ndarray
    threshold: float
    fit_seconds: float
    score_seconds: float


def subset_rows(n: int, size: int | None, draw: int) -> np.ndarray:
    """The first ``size`` clips of a seeded random order (all clips when ``size`` is None)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(1000 + draw).permutation(n)[:size])


class StethoscopeModel:
    """A registered model through ``stethoscope.Detector`` with its published defaults."""

    kind = "stethoscope"

    def __init__(self, model: str, epochs: int | None, seed: int, cache_dir: Path | None):
        from stethoscope.models import registry

        self.name = model
        self.model = model
        self.kind = "new" if model == NEW_METHOD_MODEL else "stethoscope"
        self.epochs = epochs
        self.seed = seed
        self.cache_dir = cache_dir
        info = registry.info(model)
        self.features = info.features
        self.trainable = has_trainable_weights(model)
        self.registered_epochs = info.training.get("epochs")

    def run(self, split: Split, rows: np.ndarray) -> Outcome:
        from stethoscope.detector import Detector
        from stethoscope.features import FeatureConfig

        config = FeatureConfig().replace(**self.features)
        train, test = split.features(config)
        rule = {"threshold": f"gumbel:{PROMISED_RATE:g}"} if self.kind == "new" else {}
        detector = Detector(self.model, seed=self.seed, epochs=self.epochs, progress=False,
                            **rule)
        start = time.perf_counter()
        detector.fit(train[rows])
        fitted = time.perf_counter()
        scores = detector.score_samples(test)
        return Outcome(scores, detector.threshold_.value_, fitted - start,
                       time.perf_counter() - fitted)


class ScratchNewMethod:
    """The new default from ``NEW_METHOD_FILE`` (until it is registered)."""

    kind = "new"
    trainable = False

    def __init__(self, path: Path):
        spec = importlib.util.spec_from_file_location("issue13_method", path)
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)
        self.name = f"{NEW_METHOD_MODEL} (new)"
        self.features = NEW_METHOD_FEATURES

    def run(self, split: Split, rows: np.ndarray) -> Outcome:
        from stethoscope.features import FeatureConfig

        train, test = split.features(FeatureConfig().replace(**self.features))
        start = time.perf_counter()
        model = self.module.ClipGaussianEnsemble().fit(train[rows])
        threshold = self.module.threshold_from_held_out(model.held_out_scores())
        fitted = time.perf_counter()
        scores = model.score(test)
        return Outcome(scores, threshold, fitted - start, time.perf_counter() - fitted)


class LogFeatureBaseline:
    """Issue 13's baseline: log of the features flattened (feature arrays) or the per-mel
    mean and std of the log-mel (recordings), scikit-learn ``LedoitWolf`` on float32,
    Mahalanobis distance; threshold mean + 2 std of the training distances (the course rule)."""

    kind = "peer"
    trainable = False
    name = "log-feature baseline"

    def run(self, split: Split, rows: np.ndarray) -> Outcome:
        from sklearn.covariance import LedoitWolf

        from stethoscope.features import FeatureConfig

        train, test = split.features(FeatureConfig())
        start = time.perf_counter()
        model = LedoitWolf().fit(self.vectors(train[rows], split))
        distances = model.mahalanobis(self.vectors(train[rows], split))
        threshold = float(distances.mean() + 2 * distances.std())
        fitted = time.perf_counter()
        scores = model.mahalanobis(self.vectors(test, split))
        return Outcome(scores, threshold, fitted - start, time.perf_counter() - fitted)

    @staticmethod
    def vectors(x: np.ndarray, split: Split) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if split.audio is None:  # feature arrays (linear magnitudes): log, flattened
            return np.log(np.maximum(x, np.finfo(np.float32).tiny)).reshape(len(x), -1)
        return np.concatenate([x.mean(-1).reshape(len(x), -1), x.std(-1).reshape(len(x), -1)],
                              1)


class PyodPeer:
    """PyOD's ``AudioAE`` (recordings) or ``AutoEncoder`` on the flattened log features
    (feature arrays), each with PyOD's defaults, in ``benchmarks/.venv-pyod``; threshold:
    PyOD's own (``contamination`` 0.1 of the training scores). All splits go to one worker
    process (``--pyod-worker``), which pays PyOD's and torch's start-up once."""

    kind = "peer"
    trainable = True
    name = "PyOD AE"

    def __init__(self, python: Path, log):
        self.python = python
        self.log = log
        self.results: dict[str, Outcome] = {}

    def prepare(self, splits: list[Split], threads: int | None) -> None:
        with tempfile.TemporaryDirectory(prefix="quality-pyod-") as folder:
            folder = Path(folder)
            jobs = []
            for i, split in enumerate(splits):
                job = {"name": split.name, "dir": str(folder / str(i))}
                Path(job["dir"]).mkdir()
                if split.audio is None:
                    from stethoscope.features import FeatureConfig

                    train, test = split.features(FeatureConfig())
                    np.save(Path(job["dir"]) / "train.npy", LogFeatureBaseline.vectors(train, split))
                    np.save(Path(job["dir"]) / "test.npy", LogFeatureBaseline.vectors(test, split))
                    job["kind"] = "vectors"
                else:
                    train, test = split.audio()
                    job["kind"] = "audio"
                    for part, items in (("train", train), ("test", test)):
                        if items and isinstance(items[0], tuple):
                            np.save(Path(job["dir"]) / f"{part}_waves.npy",
                                    np.stack([w for w, _ in items]).astype(np.float32))
                            job[f"{part}_rate"] = int(items[0][1])
                        else:
                            job[f"{part}_paths"] = list(items)
                jobs.append(job)
            (folder / "jobs.json").write_text(json.dumps(jobs))
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            if threads:
                env["PYOD_SIDE_THREADS"] = str(threads)
            done = subprocess.run([str(self.python), str(Path(__file__).resolve()),
                                   "--pyod-worker", str(folder)], env=env,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                self.log("PyOD worker failed: " + " | ".join(tail))
                return
            for job in jobs:
                out = Path(job["dir"])
                if (out / "scores.npy").exists():
                    info = json.loads((out / "info.json").read_text())
                    self.results[job["name"]] = Outcome(np.load(out / "scores.npy"),
                                                        info["threshold"], info["fit_seconds"],
                                                        info["score_seconds"])
                else:
                    self.log(f"PyOD skipped {job['name']}: {(out / 'error.txt').read_text()}")

    def run(self, split: Split, rows: np.ndarray) -> Outcome:
        if split.name not in self.results:
            raise LookupError("PyOD gave no result for this split")
        return self.results[split.name]


def pyod_worker(folder: Path) -> int:
    """Runs inside ``benchmarks/.venv-pyod``: every job of ``folder/jobs.json``."""
    import torch

    if os.environ.get("PYOD_SIDE_THREADS"):
        torch.set_num_threads(int(os.environ["PYOD_SIDE_THREADS"]))
    from pyod.models.audio_ae import AudioAE
    from pyod.models.auto_encoder import AutoEncoder

    for job in json.loads((folder / "jobs.json").read_text()):
        out = Path(job["dir"])
        try:
            if job["kind"] == "vectors":
                train, test = np.load(out / "train.npy"), np.load(out / "test.npy")
                detector = AutoEncoder(verbose=0)
            else:
                train, test = (job.get(f"{part}_paths") or
                               [(w, job[f"{part}_rate"]) for w in np.load(out / f"{part}_waves.npy")]
                               for part in ("train", "test"))
                detector = AudioAE()
            start = time.perf_counter()
            detector.fit(train)
            fitted = time.perf_counter()
            scores = detector.decision_function(test)
            np.save(out / "scores.npy", np.asarray(scores, np.float64))
            (out / "info.json").write_text(json.dumps({
                "threshold": float(detector.threshold_), "fit_seconds": fitted - start,
                "score_seconds": time.perf_counter() - fitted}))
        except Exception as error:  # one job's failure is reported, the others still run
            (out / "error.txt").write_text(f"{type(error).__name__}: {error}")
    return 0


def pyod_importable(python: Path) -> bool:
    check = "import pyod.models.audio_ae, pyod.models.auto_encoder, torch, librosa"
    return python.exists() and subprocess.run([str(python), "-c", check],
                                              capture_output=True).returncode == 0


def ensure_pyod_venv(log) -> tuple[Path | None, str]:
    """``benchmarks/.venv-pyod``'s python, made on first use: a virtualenv that sees this
    environment's packages (torch CPU, librosa, scikit-learn) through a ``.pth`` file and adds
    only ``pyod`` itself, so no second (CUDA) torch is downloaded and the dev environment is
    left unchanged."""
    python = PYOD_VENV / "bin" / "python"
    if pyod_importable(python):
        return python, ""
    log(f"creating {PYOD_VENV.relative_to(REPO)} with {' '.join(PYOD_REQUIREMENTS)} (one-off)")
    if not python.exists():
        made = subprocess.run([sys.executable, "-m", "venv", str(PYOD_VENV)],
                              capture_output=True, text=True)
        if made.returncode != 0:
            return None, f"could not create {PYOD_VENV.name}: {made.stderr.strip()[-200:]}"
    import site

    site_packages = next(Path(PYOD_VENV / "lib").glob("python*/site-packages"))
    (site_packages / "host-environment.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n")
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                           *PYOD_REQUIREMENTS], capture_output=True, text=True)
    if done.returncode != 0 or not pyod_importable(python):
        return None, "PyOD does not import in benchmarks/.venv-pyod: " + \
            (done.stderr or done.stdout).strip()[-200:]
    return python, ""


def has_trainable_weights(model: str) -> bool:
    """Whether seeds matter: a model without trainable parameters is deterministic."""
    from stethoscope.features import FeatureConfig
    from stethoscope.models import registry

    config = FeatureConfig().replace(**registry.info(model).features)
    probe = registry.build(model, (1, config.n_mels, config.frames or 313))
    declared = getattr(probe, "trainable", None)  # models declare it (stethoscope.models.base)
    if declared is not None:
        return bool(declared)
    return any(p.requires_grad for p in probe.parameters())


# ----------------------------------------------------------------------------- metrics


def metrics_of(split: Split, outcome: Outcome) -> dict:
    """AUC, pAUC, counts at the system's threshold, observed false-alarm rate, and the ROC's
    TPR at the promised false-alarm rate (to see whether the threshold finds what it could)."""
    from sklearn.metrics import roc_curve

    from stethoscope.metrics import evaluate

    overall = evaluate(split.labels, outcome.scores, outcome.threshold)["overall"]
    fpr, tpr, _ = roc_curve(split.labels, outcome.scores)
    overall["tpr_at_promise"] = float(np.interp(PROMISED_RATE, fpr, tpr))
    # the most any threshold finds without more false alarms than this one raised: the
    # recall a threshold at the same (observed) false-alarm rate could have had
    observed = overall.get("false_alarm_rate")
    overall["tpr_at_observed"] = None if observed is None else float(
        tpr[fpr <= observed + 1e-12].max())
    overall["fit_seconds"] = outcome.fit_seconds
    overall["score_seconds"] = outcome.score_seconds
    return overall


def average(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


# ----------------------------------------------------------------------------- the suite


def build_systems(names: list[str] | None, args, log) -> list:
    from stethoscope.models import registry

    anomaly_models = [m for m in registry.names() if registry.info(m).kind == "anomaly"]
    wanted = names or ["baseline", *anomaly_models, "new", "pyod"]
    systems = []
    for name in wanted:
        if name == "baseline":
            systems.append(LogFeatureBaseline())
        elif name == "new":
            if NEW_METHOD_FILE is None:
                continue  # registered: it runs as a stethoscope model
            if not NEW_METHOD_FILE.exists():
                log(f"new method skipped: {NEW_METHOD_FILE} not found")
                continue
            systems.append(ScratchNewMethod(NEW_METHOD_FILE))
        elif name == "pyod":
            python, why = ensure_pyod_venv(log)
            if python is None:
                log(f"PyOD skipped: {why}")
                continue
            systems.append(PyodPeer(python, log))
        else:
            registry.info(name)  # unknown names fail before any work
            trainable = has_trainable_weights(name)
            epochs = args.epochs if args.epochs is not None else (
                args.suite_epochs if args.suite and trainable else None)
            systems.append(StethoscopeModel(name, epochs, args.seed, args.cache))
    return systems


def system_label(system) -> str:
    if isinstance(system, StethoscopeModel) and system.trainable and system.epochs:
        return f"{system.name} ({system.epochs} ep.)"
    return system.name


def run_suite(splits: list[Split], systems: list, log) -> dict:
    """``results[split][system] = metrics`` with all training clips."""
    results: dict[str, dict[str, dict]] = {}
    for split in splits:
        results[split.name] = {}
        for system in systems:
            label = system_label(system)
            log(f"{split.name}: {label} ...")
            try:
                outcome = system.run(split, np.arange(split.n_train))
            except Exception as error:  # a system that cannot take this data: say so
                from stethoscope.errors import StethoscopeError

                if not isinstance(error, StethoscopeError | LookupError | ValueError):
                    raise
                log(f"  skipped: {str(error).splitlines()[0][:160]}")
                continue
            m = metrics_of(split, outcome)
            log(f"  AUC {m['auc']:.3f} pAUC {m['pauc']:.3f} TP/FP {m['tp']}/{m['fp']} "
                f"({outcome.fit_seconds:.1f} s fit)")
            results[split.name][label] = m
    return results


def run_subsets(splits: list[Split], systems: list, results: dict, log) -> dict:
    """``subsets[split][system][size] = list of metrics`` (one per draw) for the systems
    without trainable weights, with 10, 30 and all training clips (all: from ``results``)."""
    out: dict = {}
    cheap = [s for s in systems if not s.trainable]
    for split in splits:
        out[split.name] = {}
        for system in cheap:
            label = system_label(system)
            per_size = {}
            if label in results[split.name]:
                per_size["all"] = [results[split.name][label]]
            for size in SUBSET_SIZES:
                if size >= split.n_train:
                    continue
                runs = []
                for draw in range(SUBSET_DRAWS):
                    try:
                        outcome = system.run(split, subset_rows(split.n_train, size, draw))
                    except Exception as error:
                        from stethoscope.errors import StethoscopeError

                        if not isinstance(error, StethoscopeError | ValueError):
                            raise
                        break
                    runs.append(metrics_of(split, outcome))
                if runs:
                    per_size[size] = runs
            out[split.name][label] = per_size
            log(f"{split.name}: {label} subsets " + ", ".join(
                f"{k}: AUC {average([r['auc'] for r in v]):.3f}" for k, v in per_size.items()))
    return out


# ----------------------------------------------------------------------------- tables


def groups_of(splits: list[Split]) -> list[tuple[str, list[str]]]:
    """The averages shown under the per-set rows."""
    by_group: dict[str, list[str]] = {}
    for split in splits:
        by_group.setdefault(split.group, []).append(split.name)
    out = []
    if len(by_group.get("modspec", [])) > 1:
        out.append((f"mean of {len(by_group['modspec'])} modspec", by_group["modspec"]))
    real = [s.name for s in splits if s.group != "mimii"]
    if len(real) > 1:
        out.append((f"mean of {len(real)} real sets (no MIMII)", real))
    if len(splits) > 1:
        out.append((f"mean of all {len(splits)}", [s.name for s in splits]))
    return out


def quality_tables(splits: list[Split], results: dict, labels: list[str]) -> str:
    """AUC / pAUC table and threshold table, per set and averaged."""
    head = ["set", "test normal/anomalous", *labels]
    auc_rows, thr_rows = [], []
    for split in splits:
        n_anomalous = int(split.labels.sum())
        counts = f"{len(split.labels) - n_anomalous}/{n_anomalous}"
        cell = results[split.name]
        auc_rows.append([split.name, counts] + [
            f"{cell[x]['auc']:.3f} / {cell[x]['pauc']:.3f}" if x in cell else "—"
            for x in labels])
        thr_rows.append([split.name, counts] + [
            f"{cell[x]['tp']}/{cell[x]['fp']} ({percent(cell[x]['false_alarm_rate'])})"
            if x in cell else "—" for x in labels])
    baseline = LogFeatureBaseline.name
    for title, names in groups_of(splits):
        auc_rows.append([f"**{title}**", ""] + [
            "**" + fmt(average([results[n][x]["auc"] for n in names if x in results[n]])) +
            " / " + fmt(average([results[n][x]["pauc"] for n in names if x in results[n]])) +
            "**" for x in labels])
        thr_rows.append([f"**{title}**: mean false-alarm rate; recall", ""] + [
            percent(average([results[n][x]["false_alarm_rate"] for n in names
                             if x in results[n]])) + "; " +
            fmt(average([results[n][x]["recall"] for n in names if x in results[n]]), 2)
            for x in labels])
    if baseline in labels:
        worst = []
        for x in labels:
            gaps = [results[s.name][x]["auc"] - results[s.name][baseline]["auc"]
                    for s in splits if x in results[s.name] and baseline in results[s.name]]
            worst.append(f"{min(gaps):+.3f}" if gaps else "n/a")
        auc_rows.append(["worst AUC minus baseline, any set", ""] + worst)
    times = ["fit + score s, all sets", ""] + [
        f"{sum(results[s.name][x]['fit_seconds'] + results[s.name][x]['score_seconds'] for s in splits if x in results[s.name]):.0f}"  # noqa: E501
        for x in labels]
    auc_rows.append(times)
    return ("**AUC / pAUC** (all training clips)\n\n" + markdown_table(head, auc_rows) +
            "\n\n**TP/FP at each system's default threshold (observed false-alarm rate on the "
            "normal test clips)**\n\n" + markdown_table(head, thr_rows))


def subset_table(splits: list[Split], subsets: dict, labels: list[str], new_label: str | None
                 ) -> str:
    """AUC with 10 / 30 / all training clips per system; the new default's threshold at each
    size: observed false-alarm rate, recall and the ROC's TPR at the promised rate."""
    sizes = [*SUBSET_SIZES, "all"]
    size_text = " / ".join(str(n) for n in sizes)
    head = ["set"] + [f"{x}: AUC @ {size_text}" for x in labels]
    if new_label:
        head += [f"{new_label} @{n}: FPR / recall / TPR@{PROMISED_RATE:.0%} / TPR@FPR"
                 for n in sizes]

    def mean_of(runs, key):
        return average([r[key] for r in runs]) if runs else None

    rows = []
    for split in splits:
        cell = subsets[split.name]
        row = [split.name] + [" / ".join(fmt(mean_of(cell.get(x, {}).get(n), "auc"))
                                         for n in sizes) for x in labels]
        if new_label:
            for n in sizes:
                runs = cell.get(new_label, {}).get(n)
                row.append(f"{percent(mean_of(runs, 'false_alarm_rate'))} / "
                           f"{fmt(mean_of(runs, 'recall'), 2)} / "
                           f"{fmt(mean_of(runs, 'tpr_at_promise'), 2)} / "
                           f"{fmt(mean_of(runs, 'tpr_at_observed'), 2)}" if runs else "n/a")
        rows.append(row)
    for title, names in groups_of(splits):
        row = [f"**{title}**"] + [" / ".join(
            fmt(average([mean_of(subsets[s].get(x, {}).get(n), "auc") for s in names]))
            for n in sizes) for x in labels]
        if new_label:
            for n in sizes:
                runs = [subsets[s].get(new_label, {}).get(n) for s in names]
                row.append(f"{percent(average([mean_of(r, 'false_alarm_rate') for r in runs]))}"
                           f" / {fmt(average([mean_of(r, 'recall') for r in runs]), 2)} / "
                           f"{fmt(average([mean_of(r, 'tpr_at_promise') for r in runs]), 2)}"
                           f" / {fmt(average([mean_of(r, 'tpr_at_observed') for r in runs]), 2)}")
        rows.append(row)
    return markdown_table(head, rows) + threshold_counts(splits, subsets, new_label, sizes)


def threshold_counts(splits: list[Split], subsets: dict, new_label: str | None, sizes: list
                     ) -> str:
    """How many labelled real sets (no MIMII crops) keep the threshold's promises, per
    training-set size: observed false-alarm rate within 1-6 %, and recall within 0.10 of
    the ROC's TPR at the promised rate and at the observed rate."""
    if not new_label:
        return ""
    real = [s for s in splits if not s.name.startswith("mimii")]
    lines = []
    for n in sizes:
        runs = [subsets[s.name].get(new_label, {}).get(n) for s in real]
        runs = [r for r in runs if r]

        def mean(r, key):
            return average([x[key] for x in r])

        rate = sum(0.01 <= mean(r, "false_alarm_rate") <= 0.06 for r in runs)
        near_promise = sum(abs(mean(r, "recall") - mean(r, "tpr_at_promise")) <= 0.10 + 1e-9
                           for r in runs)
        near_observed = sum(abs(mean(r, "recall") - mean(r, "tpr_at_observed")) <= 0.10 + 1e-9
                            for r in runs)
        lines.append(f"- {n} training clips: false-alarm rate within 1-6 % on {rate} of "
                     f"{len(runs)} sets; recall within 0.10 of the ROC's TPR at the promised "
                     f"{PROMISED_RATE:.0%} on {near_promise}, at the observed rate on "
                     f"{near_observed}.")
    return ("\n\nThe new default's threshold on the real sets (MIMII crops left out: their "
            "test normals are the second half of the training recording):\n\n" +
            "\n".join(lines))


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--pyod-worker"]:
        return pyod_worker(Path(argv[1]))
    ensure_repo_on_path()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--suite", action="store_true",
                       help="every labelled real set under --shared, every system")
    where.add_argument("--data", type=Path, help="one labelled data set folder")
    parser.add_argument("--shared", type=Path, default=SHARED,
                        help="the shared data folder for --suite (default ../shared/data)")
    parser.add_argument("--systems", default=None,
                        help="comma-separated: baseline, new, pyod and registered model names "
                             "(default: all of them)")
    parser.add_argument("--models", default=None, help="alias of --systems")
    parser.add_argument("--seed", type=int, default=0, help="seed of the trainable models")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of every trainable model (default: registered, or "
                             "--suite-epochs with --suite)")
    parser.add_argument("--suite-epochs", type=int, default=SUITE_EPOCHS,
                        help="epochs of the trainable models in --suite (default: their "
                             "registered epochs; fewer to fit a shorter time)")
    parser.add_argument("--no-subsets", action="store_true",
                        help="skip the 10 / 30 / all training clips table")
    parser.add_argument("--crop", type=float, default=1.0,
                        help="crop length in seconds for clip-pair data (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="feature cache folder (default ~/.cache/stethoscope/...)")
    parser.add_argument("--section", default=None,
                        help="name of the docs/quality.md section (default quality-suite, "
                             "or quality-<data folder>)")
    add_common_arguments(parser)
    parser.set_defaults(doc=QUALITY_DOC)
    args = parser.parse_args(argv)
    log = logger(args.quiet)
    os.environ.setdefault("STETHOSCOPE_PROGRESS", "0")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    from stethoscope.errors import StethoscopeError

    try:
        splits = (suite_splits(args.shared, args.crop, args.cache) if args.suite
                  else find_splits(args.data, args.crop, args.cache))
    except StethoscopeError as error:
        print(f"quality.py: {error}", file=sys.stderr)
        return 2
    if not splits:
        print(f"quality.py: no labelled data sets under {args.shared}", file=sys.stderr)
        return 2
    names = (args.systems or args.models)
    systems = build_systems(names.split(",") if names else None, args, log)
    for system in systems:
        if isinstance(system, PyodPeer):
            log("PyOD: every split in one worker ...")
            system.prepare(splits, args.threads)
    results = run_suite(splits, systems, log)
    labels = [system_label(s) for s in systems]
    body = [quality_tables(splits, results, labels)]
    if not args.no_subsets:
        subsets = run_subsets(splits, systems, results, log)
        cheap = [system_label(s) for s in systems if not s.trainable]
        new_label = next((system_label(s) for s in systems if s.kind == "new"), None)
        body.append(f"**AUC with 10, 30 and all training clips** (first N normal clips of a "
                    f"seeded random order; mean of {SUBSET_DRAWS} draws for 10 and 30; the "
                    "systems without trained weights) and the new default's threshold: observed "
                    "false-alarm rate, recall, and the ROC's TPR at the promised "
                    f"{PROMISED_RATE:.0%}\n\n" + subset_table(splits, subsets, cheap, new_label))
    elapsed = time.perf_counter() - started
    text = "\n\n".join(body)
    print(text, flush=True)
    if not args.no_doc:
        command = shown_command("quality.py", argv)
        fewer = [f"{s.name} {s.epochs} epochs (registered {s.registered_epochs})"
                 for s in systems if isinstance(s, StethoscopeModel) and s.trainable
                 and s.epochs]
        registered = [f"{s.name} {s.registered_epochs}" for s in systems
                      if isinstance(s, StethoscopeModel) and s.trainable and not s.epochs]
        notes = ("Thresholds: each system's default — stethoscope models mean + 2σ of their "
                 "normal training scores (out-of-sample where the model gives them); the new "
                 f"default its own rule ({PROMISED_RATE:.0%} promised); the baseline mean + 2σ "
                 "of its training distances; PyOD its contamination 0.1 of the training scores. "
                 "MIMII rows: crops of one recording per machine, so their false-alarm rates "
                 "say nothing about new recordings. " +
                 (f"Trained with fewer epochs to fit the time: {'; '.join(fewer)}. "
                  if fewer else "") +
                 (f"Registered epochs (early stopping where registered): {', '.join(registered)}"
                  f"; seed {args.seed}. " if registered else "") +
                 ("PyOD: `AudioAE` on the recordings (MIMII: on the crops), `AutoEncoder` on "
                  "the flattened log features of the feature arrays, PyOD's defaults. "
                  if any(isinstance(s, PyodPeer) for s in systems) else "") +
                 (f"`{NEW_METHOD_MODEL} (new)`: imported from {NEW_METHOD_FILE} until it is "
                  "registered. " if any(isinstance(s, ScratchNewMethod) for s in systems) else
                  f"`{NEW_METHOD_MODEL}` (the new default): the registered model with "
                  f"`threshold=\"gumbel:{PROMISED_RATE:g}\"`. "
                  if any(s.kind == "new" for s in systems) else "") +
                 f"Whole run: {elapsed / 60:.1f} min.")
        section = args.section or ("quality-suite" if args.suite
                                   else f"quality-{args.data.name}")
        update_doc_section(section, f"Command: `{command}`\n\n{machine_line()}\n\n{text}\n\n"
                           f"{notes}", doc=args.doc, draft=args.draft)
        log(f"wrote section {section} of {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
