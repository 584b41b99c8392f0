"""The fleet's models: one Detector per machine folder, loaded once, with a version hash."""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stethoscope.service.errors import ServiceError

MACHINE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MODEL_FILES = ("config.json", "model.safetensors")


def valid_machine_name(name: str) -> bool:
    """Letters, digits, ``_ . -``, 1-64 characters, no ``..``: safe in paths and URLs."""
    return bool(MACHINE_NAME.fullmatch(name)) and ".." not in name


def model_version(folder: Path) -> str:
    """A short SHA-256 of the model's files: changes whenever the model does."""
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        path = folder / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class MachineModel:
    """One machine's detector. ``lock`` serialises its use: the log-mel front end sets the
    process's torch thread count while it runs, so two calls at once would fight over it."""

    name: str
    folder: Path
    detector: object
    version: str
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def threshold(self) -> float:
        return float(self.detector.threshold_.value_)

    @property
    def model_name(self) -> str:
        return str(self.detector.model)

    def warm_up(self) -> None:
        """Score one recording of noise so the first real upload is not the slow one."""
        cfg = self.detector.feature_config_
        noise = np.random.default_rng(0).normal(0, 0.01, cfg.sample_rate * 10)
        with self.lock:
            self.detector.score_waveform(noise.astype(np.float32), cfg.sample_rate)


def load_fleet(models_dir: str | Path, *, warm_up: bool = True) -> dict[str, MachineModel]:
    """Every ``models_dir/<machine>/`` holding a ``config.json``, loaded as a Detector.

    Raises
    ------
    ServiceError
        when the folder is missing, holds no model folders or a folder name is unsafe.
    ModelFileError
        when a model folder cannot be loaded (the message names it).
    """
    from stethoscope.detector import Detector

    root = Path(models_dir)
    if not root.is_dir():
        raise ServiceError("no such models folder (expected DIR/<machine>/config.json)", root)
    fleet: dict[str, MachineModel] = {}
    for folder in sorted(p for p in root.iterdir() if (p / "config.json").is_file()):
        if not valid_machine_name(folder.name):
            raise ServiceError("machine folder names may hold only letters, digits, '_', '.' "
                               "and '-' (1-64 characters)", folder)
        det = Detector.load(folder, device="cpu", progress=False)
        fleet[folder.name] = MachineModel(folder.name, folder, det, model_version(folder))
    if not fleet:
        raise ServiceError("holds no model folders (expected DIR/<machine>/config.json, "
                           "e.g. the models/ folder `stethoscope demo` writes)", root)
    if warm_up:
        for machine in fleet.values():
            machine.warm_up()
    return fleet
