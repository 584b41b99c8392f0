"""MNIST and Fashion-MNIST for the course lab, from wherever they already are.

Sources, in order: the path the user gives (a Keras ``mnist.npz`` or a folder with the four
IDX files), the Keras cache (``~/.keras/datasets``), Debian's ``/usr/share/datasets`` for
Fashion-MNIST, our own cache (``~/.cache/stethoscope``), and only then a checksummed
download from the public location into that cache.
"""

from __future__ import annotations

import gzip
import os
import zipfile
from pathlib import Path

import numpy as np

from stethoscope.errors import DataError, DownloadError

KINDS = ("mnist", "fashion")
IMAGE_SIDE = 28
BASE_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
BASE_URL_ENV = "STETHOSCOPE_MNIST_BASE_URL"
CACHE_ENV = "STETHOSCOPE_CACHE_DIR"

MNIST_NPZ = "mnist.npz"
MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"

# The four IDX files, in the order load_mnist returns them.
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# Fashion-MNIST's published MD5s (Zalando's README; the Keras bucket serves the same files).
FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# IDX type codes → big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/ format).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

MnistArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def load_mnist(path: str | Path | None = None, *, kind: str = "mnist",
               cache_dir: str | Path | None = None, download: bool = True,
               base_url: str | None = None, progress: bool = True) -> MnistArrays:
    """``(x_train, y_train, x_test, y_test)``: images float32 in [0, 1] shaped (N, 28, 28),
    labels int64.

    ``path`` is a Keras-layout ``.npz`` or a folder with the four IDX ``.gz`` files; without
    it the usual caches are searched and, if ``download``, the data is fetched once from
    ``base_url`` (default Keras' public bucket, or ``$STETHOSCOPE_MNIST_BASE_URL``).
    """
    source = find_mnist(path, kind=kind, cache_dir=cache_dir, download=download,
                        base_url=base_url, progress=progress)
    return read_mnist(source)


def find_mnist(path: str | Path | None = None, *, kind: str = "mnist",
               cache_dir: str | Path | None = None, download: bool = True,
               base_url: str | None = None, progress: bool = True) -> Path:
    """The ``.npz`` file or IDX folder :func:`load_mnist` reads, downloading it if needed."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if path is not None:
        path = Path(path).expanduser()
        if not path.exists():
            raise DataError(f"no such file or folder (expected a Keras {MNIST_NPZ} or a "
                            f"folder with {', '.join(IDX_FILES)})", path)
        return path
    cache = default_cache_dir(cache_dir) / kind
    for candidate in _known_locations(kind, cache):
        if _is_complete_source(candidate):
            return candidate
    target = cache / MNIST_NPZ if kind == "mnist" else cache
    if not download:
        raise DataError(f"{kind} data not found; pass its path (a Keras {MNIST_NPZ} or a "
                        f"folder with the four IDX .gz files) or place it here", target)
    return _download(kind, cache, base_url or os.environ.get(BASE_URL_ENV) or BASE_URL,
                     progress)


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$STETHOSCOPE_CACHE_DIR``, else ``~/.cache/stethoscope``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "stethoscope")


def _keras_datasets_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "datasets"


def _known_locations(kind: str, cache: Path) -> list[Path]:
    if kind == "mnist":
        return [_keras_datasets_dir() / MNIST_NPZ, cache / MNIST_NPZ]
    return [_keras_datasets_dir() / "fashion-mnist", DEBIAN_FASHION_DIR, cache]


def _is_complete_source(path: Path) -> bool:
    if path.is_file():
        return True
    return path.is_dir() and all(_idx_file(path, name) is not None for name in IDX_FILES)


def _download(kind: str, cache: Path, base_url: str, progress: bool) -> Path:
    from stethoscope.download import download_file

    base_url = base_url if base_url.endswith("/") else base_url + "/"
    files = ([(MNIST_NPZ, None, MNIST_SHA256)] if kind == "mnist"
             else [(name, FASHION_MD5[name], None) for name in IDX_FILES])
    for name, md5, sha256 in files:
        try:
            download_file(base_url + name, cache / name, md5=md5, sha256=sha256,
                          progress=progress)
        except DownloadError as err:
            raise DownloadError(f"cannot download {kind} file {name} ({err.problem}); "
                                f"download {base_url + name} yourself and pass its path "
                                f"(--data) or place it at {cache / name}") from None
    return cache / MNIST_NPZ if kind == "mnist" else cache


# ---- reading ---------------------------------------------------------------------------


def read_mnist(path: str | Path) -> MnistArrays:
    """Read a Keras ``.npz`` or an IDX folder into validated, scaled arrays."""
    path = Path(path)
    raw = _read_idx_folder(path) if path.is_dir() else _read_npz(path)
    return validate_mnist_arrays(raw, path)


def _read_npz(path: Path) -> MnistArrays:
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise DataError(f"not a Keras MNIST .npz: missing {', '.join(missing)} "
                                f"(has {', '.join(data.files) or 'nothing'})", path)
            return tuple(np.asarray(data[k]) for k in keys)  # type: ignore[return-value]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"cannot read as a Keras MNIST .npz ({err})", path) from None


def _idx_file(folder: Path, name: str) -> Path | None:
    """``name`` (gzipped) or its uncompressed twin inside ``folder``, if present."""
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_folder(folder: Path) -> MnistArrays:
    arrays = []
    for name in IDX_FILES:
        file = _idx_file(folder, name)
        if file is None:
            raise DataError(f"missing {name}; an IDX folder needs {', '.join(IDX_FILES)}",
                            folder)
        arrays.append(read_idx(file))
    return tuple(arrays)  # type: ignore[return-value]


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (gzipped or not) into an array of its declared type and shape."""
    # Hand-written: the only common reader lives in torchvision, which this project lacks.
    path = Path(path)
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read IDX file ({err})", path) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError("not an IDX file (bad magic number)", path)
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError("truncated IDX header", path)
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(f"IDX body has {len(data) - header} bytes, header says {expected} "
                        f"for shape {shape}", path)
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def validate_mnist_arrays(raw: MnistArrays, path: str | Path) -> MnistArrays:
    """Check shapes (N, 28, 28), dtypes and label range of ``(x_train, y_train, x_test,
    y_test)``; return images as float32 in [0, 1] and labels as int64. ``path`` names the
    origin in error messages."""
    if len(raw) != 4:
        raise DataError(f"expected 4 arrays (x_train, y_train, x_test, y_test), got {len(raw)}",
                        path)
    raw = tuple(np.asarray(a) for a in raw)  # type: ignore[assignment]
    out = []
    for split, (x, y) in (("train", raw[0:2]), ("test", raw[2:4])):
        if x.ndim != 3 or x.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise DataError(f"x_{split} has shape {x.shape}; expected (N, 28, 28) images", path)
        if y.shape != (x.shape[0],):
            raise DataError(f"y_{split} has shape {y.shape}; expected ({x.shape[0]},) labels "
                            f"to match x_{split}", path)
        if x.shape[0] == 0:
            raise DataError(f"x_{split} holds no images", path)
        if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.integer)):
            raise DataError(f"x_{split}/y_{split} have dtypes {x.dtype}/{y.dtype}; expected "
                            "numeric images and integer labels", path)
        if y.min() < 0 or y.max() > 9:
            raise DataError(f"y_{split} has labels outside 0..9 ({y.min()}..{y.max()})", path)
        out += [_scaled(x, f"x_{split}", path), y.astype(np.int64)]
    return tuple(out)  # type: ignore[return-value]


def _scaled(x: np.ndarray, name: str, path: Path) -> np.ndarray:
    """uint8 0..255 → /255; floats already in [0, 1] are kept."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    x = x.astype(np.float32)
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise DataError(f"{name} must be uint8 0..255 or floats in [0, 1]", path)
    return x
