"""Model files.

A model is a folder with ``config.json`` (everything needed to rebuild and use it),
``model.safetensors`` (weights) and the artefact marker of :mod:`stethoscope.atomic`.
Loading never unpickles, and every size the files declare is checked against
:data:`MAX_CONFIG_BYTES` / :data:`MAX_WEIGHTS_BYTES` before anything is allocated. The
folder is written atomically (:func:`stethoscope.atomic.atomic_directory`); the atomic
writers are re-exported here for older imports.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stethoscope.atomic import (  # noqa: F401  (re-exported: older imports use storage)
    atomic_directory,
    atomic_write_bytes,
    atomic_write_text,
)
from stethoscope.errors import ModelFileError

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_KIND = "model"
MAX_CONFIG_BYTES = 64 << 20  # config.json: settings and held-out scores, kilobytes in practice
MAX_WEIGHTS_BYTES = 4 << 30  # every registered model is well under 100 MB
MAX_TENSORS = 10_000
MAX_TENSOR_DIMS = 8
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on its JSON header
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1,
              "F8_E5M2FNUZ": 1, "C64": 8, "U64": 8, "U32": 4, "U16": 2}


def save_model(path: str | Path, config: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write a model folder: ``config.json`` (with the format version) and safetensors weights."""
    from stethoscope import __version__

    config = {"format_version": FORMAT_VERSION, "stethoscope_version": __version__, **config}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_directory(path, kind=MODEL_KIND) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(tensors, str(tmp / WEIGHTS_NAME))
        # safetensors creates its file 0600: give it config.json's mode (0666 less the umask)
        os.chmod(tmp / WEIGHTS_NAME, stat.S_IMODE((tmp / CONFIG_NAME).stat().st_mode))
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
    _check_size(config_path, MAX_CONFIG_BYTES, path)
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
    check_weights_header(weights_path, path)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"cannot read weights {WEIGHTS_NAME} ({err})", path) from None
    return config, state


def _check_size(file: Path, limit: int, folder: Path) -> None:
    size = file.stat().st_size
    if size > limit:
        raise ModelFileError(f"{file.name} is {size / 2**20:.0f} MiB; a model's is at most "
                             f"{limit / 2**20:.0f} MiB; not a stethoscope model file", folder)


def check_weights_header(weights: str | Path, folder: str | Path | None = None) -> dict:
    """Read a safetensors file's JSON header and check every tensor it declares (dtype,
    shape, byte range) against the file and the limits, before any tensor is allocated.

    Returns the header. Raises ModelFileError naming ``folder`` (or the file) otherwise.
    """
    weights = Path(weights)
    where = folder if folder is not None else weights

    def bad(problem: str) -> ModelFileError:
        return ModelFileError(f"{WEIGHTS_NAME} {problem}", where)

    file_size = weights.stat().st_size
    with open(weights, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise bad("is too short to be a safetensors file")
        (header_size,) = struct.unpack("<Q", head)
        if header_size > min(MAX_HEADER_BYTES, file_size - 8):
            raise bad(f"declares a {header_size}-byte header in a {file_size}-byte file")
        try:
            header = json.loads(handle.read(header_size))
        except (ValueError, UnicodeDecodeError):
            raise bad("has a header that is not JSON") from None
    if not isinstance(header, dict):
        raise bad("has a header that is not a JSON object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(tensors) > MAX_TENSORS:
        raise bad(f"declares {len(tensors)} tensors; at most {MAX_TENSORS} are allowed")
    payload = file_size - 8 - header_size
    total = sum(_tensor_bytes(name, entry, payload, bad) for name, entry in tensors.items())
    if total > MAX_WEIGHTS_BYTES:
        raise bad(f"declares {total / 1e9:.1f} GB of weights; a model's are at most "
                  f"{MAX_WEIGHTS_BYTES / 1e9:.1f} GB")
    return header


def _tensor_bytes(name: str, entry: object, payload: int, bad) -> int:
    """Bytes of one declared tensor, after checking its dtype, shape and byte range."""
    if not isinstance(entry, dict):
        raise bad(f"tensor {name!r} is not described by an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ITEM_BYTES:
        raise bad(f"tensor {name!r} has an unknown dtype {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                       for d in shape)):
        raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
    size = math.prod(shape) * ITEM_BYTES[dtype]
    if size > MAX_WEIGHTS_BYTES:
        raise bad(f"tensor {name!r} declares shape {shape} ({size / 1e9:.1f} GB); a model's "
                  f"weights are at most {MAX_WEIGHTS_BYTES / 1e9:.1f} GB")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= payload
            or offsets[1] - offsets[0] != size):
        raise bad(f"tensor {name!r} has byte range {offsets!r}, which does not match its "
                  f"shape {shape} and {dtype} or the file's {payload} bytes of data")
    return size
