"""Model files and atomic writes.

A model is a folder with ``config.json`` (everything needed to rebuild and use it) and
``model.safetensors`` (weights). Loading never unpickles. Every write goes to a temporary
name first and is renamed into place, so a crash never leaves a half-written result.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stethoscope.errors import ModelFileError

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces ``path`` in one rename.

    An existing ``path`` is kept untouched if anything inside the block fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual folder mode
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(path: str | Path, config: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write a model folder: ``config.json`` (with the format version) and safetensors weights."""
    from stethoscope import __version__

    config = {"format_version": FORMAT_VERSION, "stethoscope_version": __version__, **config}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_directory(path) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(tensors, str(tmp / WEIGHTS_NAME))
    return Path(path)


def load_model(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a model folder back as ``(config, state_dict)``; clear errors for anything wrong."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError("no such model (expected a folder with config.json and "
                             f"{WEIGHTS_NAME})", path)
    if not path.is_dir():
        raise ModelFileError("not a stethoscope model folder (expected a folder with "
                             f"config.json and {WEIGHTS_NAME})", path)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_path.is_file():
        raise ModelFileError(f"missing {CONFIG_NAME}; not a stethoscope model", path)
    if not weights_path.is_file():
        raise ModelFileError(f"missing {WEIGHTS_NAME}; the model was not saved completely", path)
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(f"{CONFIG_NAME} is not valid JSON ({err})", path) from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{CONFIG_NAME} must hold a JSON object", path)
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"model format version {version!r} is not supported by this stethoscope "
            f"(reads version {FORMAT_VERSION}); retrain or use the stethoscope version "
            f"{config.get('stethoscope_version', 'that wrote it')}", path)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"cannot read weights {WEIGHTS_NAME} ({err})", path) from None
    return config, state
