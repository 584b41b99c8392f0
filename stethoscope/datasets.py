"""Find recordings and read what their paths say: label, machine, section, domain.

Two public layouts carry labels in the path:

* MIMII: ``<machine>/id_XX/{normal,abnormal}/NNNNNNNN.wav`` (label from the folder);
* DCASE Task 2 (2021-2024):
  ``<machine>/{train,test}/section_XX_{source,target}_{train,test}_{normal,anomaly}_NNNN_<attrs>.wav``
  and DCASE 2020: ``<machine>/{train,test}/{normal,anomaly}_id_XX_NNNNNNNN.wav``.

Anything else is a clip with an unknown label (fine for training and scoring, not for
evaluation). Paths can be files, folders (searched recursively) or text lists of paths.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stethoscope.errors import DataError

WAV_SUFFIX = ".wav"
LIST_SUFFIXES = (".txt", ".lst")
SPLIT_FOLDERS = {"train", "test", "source_test", "target_test", "supplemental"}
GROUP_KEYS = ("section", "domain", "machine", "machine_id", "split")

_LABELS = {"normal": 0, "abnormal": 1, "anomaly": 1}
_DCASE = re.compile(
    r"^section_(?P<section>\d+)_(?P<domain>source|target)_(?P<split>train|test)_"
    r"(?P<label>normal|anomaly)_(?P<index>\d+)(?:_(?P<attributes>.+))?$", re.IGNORECASE)
_DCASE_UNLABELLED = re.compile(r"^section_(?P<section>\d+)_(?P<index>\d+)$", re.IGNORECASE)
_DCASE2020 = re.compile(r"^(?P<label>normal|anomaly)_(?P<id>id_\d+)_(?P<index>\d+)$",
                        re.IGNORECASE)
_DCASE2020_UNLABELLED = re.compile(r"^(?P<id>id_\d+)_(?P<index>\d+)$", re.IGNORECASE)
_MACHINE_ID = re.compile(r"^id_\d+$", re.IGNORECASE)


@dataclass(frozen=True)
class Clip:
    """One recording and what its path says about it (None where it says nothing)."""

    path: Path
    label: int | None = None  # 0 normal, 1 anomaly, None unknown
    machine: str | None = None
    machine_id: str | None = None
    section: str | None = None
    domain: str | None = None  # "source" / "target"
    split: str | None = None  # "train" / "test"
    attributes: str | None = None


def parse_clip(path: str | Path) -> Clip:
    """Read label, machine, section, domain, split and attributes from a clip's path."""
    path = Path(path)
    stem, parent = path.stem, path.parent.name
    grandparent = path.parent.parent.name
    folder_split = parent.lower() if parent.lower() in SPLIT_FOLDERS else None
    machine_above_split = (grandparent or None) if folder_split else None

    if match := _DCASE.match(stem):
        return Clip(path, label=_LABELS[match["label"].lower()], machine=machine_above_split,
                    section=match["section"], domain=match["domain"].lower(),
                    split=match["split"].lower(), attributes=match["attributes"])
    if match := _DCASE_UNLABELLED.match(stem):
        return Clip(path, machine=machine_above_split, section=match["section"],
                    split=_plain_split(folder_split))
    if match := _DCASE2020.match(stem):
        return Clip(path, label=_LABELS[match["label"].lower()], machine=machine_above_split,
                    machine_id=match["id"].lower(), split=_plain_split(folder_split))
    if match := _DCASE2020_UNLABELLED.match(stem):
        return Clip(path, machine=machine_above_split, machine_id=match["id"].lower(),
                    split=_plain_split(folder_split))
    if parent.lower() in _LABELS and _MACHINE_ID.match(grandparent):
        machine = path.parent.parent.parent.name or None
        return Clip(path, label=_LABELS[parent.lower()], machine=machine,
                    machine_id=grandparent.lower())
    return Clip(path)


def _plain_split(folder: str | None) -> str | None:
    """"source_test" → "test": the split part of a DCASE folder name."""
    if folder is None or folder == "supplemental":
        return None
    return folder.rsplit("_", 1)[-1]


def find_clips(inputs: str | Path | Sequence[str | Path], *, recursive: bool = True
               ) -> list[Clip]:
    """WAV files named by ``inputs`` (files, folders, or ``.txt``/``.lst`` lists of paths).

    Folders are searched (recursively by default) for ``*.wav`` in sorted order, skipping
    hidden files such as macOS ``._`` copies; a file listed twice is kept once.
    """
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    if not items:
        raise DataError("no input recordings given")
    paths: list[Path] = []
    for item in items:
        paths.extend(_expand(Path(item), recursive))
    return [parse_clip(p) for p in _unique(paths)]


def _expand(path: Path, recursive: bool, listed_in: Path | None = None) -> list[Path]:
    if not path.exists():
        where = f" (listed in {listed_in})" if listed_in else ""
        raise DataError(f"no such file or folder{where}", path)
    if path.is_dir():
        return _wavs_in(path, recursive)
    suffix = path.suffix.lower()
    if suffix == WAV_SUFFIX:
        return [path]
    if suffix in LIST_SUFFIXES and listed_in is None:
        return _read_list(path, recursive)
    raise DataError("is not a WAV file (give .wav files, folders of them, or a .txt/.lst "
                    "list of paths)", path)


def _wavs_in(folder: Path, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    found = sorted(p for p in candidates if p.suffix.lower() == WAV_SUFFIX
                   and not _is_hidden(p.relative_to(folder)) and p.is_file())
    if not found:
        raise DataError("no WAV files found in this folder", folder)
    return found


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _read_list(list_file: Path, recursive: bool) -> list[Path]:
    """Paths listed one per line (relative to the list's folder; ``#`` lines are comments)."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read this list of recordings ({err})", list_file) from None
    paths: list[Path] = []
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            paths.extend(_expand(list_file.parent / entry, recursive, listed_in=list_file))
    if not paths:
        raise DataError("this list of recordings names no files", list_file)
    return paths


def _unique(paths: list[Path]) -> list[Path]:
    seen: set[Path] = set()
    unique = []
    for path in paths:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def labels_of(clips: Sequence[Clip]) -> np.ndarray:
    """Labels as an int array (0 normal, 1 anomaly); DataError if any clip has none."""
    unknown = [c for c in clips if c.label is None]
    if unknown:
        raise DataError(f"label unknown: the name follows neither the MIMII nor the DCASE "
                        f"layout ({len(unknown)} of {len(clips)} clips have no label); "
                        "evaluation needs labelled clips", unknown[0].path)
    return np.array([c.label for c in clips], dtype=np.int64)


def groups_of(clips: Sequence[Clip], key: str) -> np.ndarray | None:
    """One string per clip for ``key`` ("section", "domain", ...), or None if any is unknown."""
    if key not in GROUP_KEYS:
        raise ValueError(f"unknown group key {key!r}; choose one of {', '.join(GROUP_KEYS)}")
    values = [getattr(c, key) for c in clips]
    if not values or any(v is None for v in values):
        return None
    return np.array(values, dtype=str)
