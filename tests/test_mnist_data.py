"""MNIST loading: Keras .npz, IDX folders, caches, and downloads from a loopback server."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from stethoscope.errors import DataError, DownloadError
from stethoscope.lab import mnist_data
from stethoscope.lab.mnist_data import find_mnist, load_mnist, read_idx, read_mnist

IDX_NAMES = mnist_data.IDX_FILES


@pytest.fixture(autouse=True)
def _no_real_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never find (or write) the machine's real Keras or stethoscope caches."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setenv(mnist_data.CACHE_ENV, str(tmp_path / "default-cache"))
    monkeypatch.delenv(mnist_data.BASE_URL_ENV, raising=False)
    monkeypatch.setattr(mnist_data, "DEBIAN_FASHION_DIR", tmp_path / "no-debian")


@pytest.fixture(scope="module")
def real_small() -> tuple[np.ndarray, ...]:
    """The first 7 training and 5 test images (uint8) and labels of the real MNIST."""
    from conftest import shared_path

    with np.load(shared_path("mnist", "mnist.npz")) as data:
        return (data["x_train"][:7], data["y_train"][:7], data["x_test"][:5], data["y_test"][:5])


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> Path:
    """An IDX file as the MNIST site documents it: 0, 0, type 0x08, ndim, big-endian dims."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_idx_folder(folder: Path, arrays: tuple[np.ndarray, ...], *,
                     compress: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in zip(IDX_NAMES, arrays, strict=True):
        write_idx(folder / (name if compress else name.removesuffix(".gz")), array,
                  compress=compress)
    return folder


def write_npz(path: Path, arrays: tuple[np.ndarray, ...]) -> Path:
    np.savez(path, x_train=arrays[0], y_train=arrays[1], x_test=arrays[2], y_test=arrays[3])
    return path


def small_arrays(seed: int = 0, n_train: int = 6, n_test: int = 3) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n_train, dtype=np.uint8),
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n_test, dtype=np.uint8))


def assert_same_data(loaded: tuple[np.ndarray, ...], raw: tuple[np.ndarray, ...]) -> None:
    for got, want in zip(loaded[0::2], raw[0::2], strict=True):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want.astype(np.float32) / 255, rtol=0, atol=1e-7)
    for got, want in zip(loaded[1::2], raw[1::2], strict=True):
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1 for the duration of the test."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # silence per-request logging
        pass


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---- real data -------------------------------------------------------------------------


def test_real_npz_loads_scaled_and_validated(mnist_npz: Path) -> None:
    x_train, y_train, x_test, y_test = load_mnist(mnist_npz)
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert 0.0 == x_train.min() and x_train.max() == 1.0
    assert set(np.unique(y_test)) == set(range(10))
    assert y_train.shape == (60000,) and y_test.shape == (10000,)


def test_idx_parser_matches_npz_contents(tmp_path: Path, real_small) -> None:
    folder = write_idx_folder(tmp_path / "idx", real_small)
    assert_same_data(read_mnist(folder), real_small)
    np.testing.assert_array_equal(read_idx(folder / IDX_NAMES[0]), real_small[0])


def test_uncompressed_idx_files_are_read_too(tmp_path: Path, real_small) -> None:
    folder = write_idx_folder(tmp_path / "raw", real_small, compress=False)
    assert_same_data(load_mnist(folder), real_small)


def test_idx_parser_reads_other_declared_types(tmp_path: Path) -> None:
    values = np.arange(12).reshape(3, 4) * -1000
    path = tmp_path / "ints-idx2"
    path.write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 3, 4)
                     + values.astype(">i4").tobytes())
    parsed = read_idx(path)
    assert parsed.shape == (3, 4)
    np.testing.assert_array_equal(parsed, values)


# ---- bad input -------------------------------------------------------------------------


def test_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere.npz: no such file"):
        load_mnist(tmp_path / "nowhere.npz")


def test_npz_without_mnist_keys_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, images=np.zeros((2, 28, 28)))
    with pytest.raises(DataError, match=r"other.npz: not a Keras MNIST .npz: missing x_train"):
        load_mnist(path)


def test_wrong_image_shape_is_rejected(tmp_path: Path) -> None:
    arrays = list(small_arrays())
    arrays[2] = np.zeros((3, 32, 32), dtype=np.uint8)
    with pytest.raises(DataError, match=r"x_test has shape \(3, 32, 32\)"):
        load_mnist(write_npz(tmp_path / "cifar.npz", tuple(arrays)))


def test_label_count_mismatch_is_rejected(tmp_path: Path) -> None:
    arrays = list(small_arrays())
    arrays[1] = arrays[1][:-1]
    with pytest.raises(DataError, match="y_train has shape"):
        load_mnist(write_npz(tmp_path / "short.npz", tuple(arrays)))


def test_labels_outside_digits_are_rejected(tmp_path: Path) -> None:
    arrays = list(small_arrays())
    arrays[3] = np.array([0, 1, 12], dtype=np.uint8)
    with pytest.raises(DataError, match="outside 0..9"):
        load_mnist(write_npz(tmp_path / "labels.npz", tuple(arrays)))


def test_not_an_npz_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "mnist.npz"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match="mnist.npz: cannot read"):
        load_mnist(path)


def test_bad_idx_magic_and_truncation_are_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"PK\x03\x04whatever")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(bad)
    truncated = write_idx(tmp_path / "trunc.gz", np.zeros((4, 28, 28)))
    data = gzip.decompress(truncated.read_bytes())[:-10]
    truncated.write_bytes(gzip.compress(data))
    with pytest.raises(DataError, match="trunc.gz: IDX body has"):
        read_idx(truncated)


def test_idx_folder_missing_a_file_names_it(tmp_path: Path) -> None:
    folder = write_idx_folder(tmp_path / "idx", small_arrays())
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte.gz"):
        read_mnist(folder)


# ---- caches and downloads ---------------------------------------------------------------


def test_keras_cache_is_used_before_any_download(tmp_path: Path) -> None:
    raw = small_arrays(1)
    keras = tmp_path / "keras-home" / "datasets"
    keras.mkdir(parents=True)
    write_npz(keras / "mnist.npz", raw)
    assert find_mnist(download=False) == keras / "mnist.npz"
    assert_same_data(load_mnist(download=False, base_url="http://127.0.0.1:9/"), raw)


def test_nothing_found_without_download_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"mnist\.npz: mnist data not found; pass its path"):
        load_mnist(download=False, cache_dir=tmp_path / "cache")


def test_download_once_into_cache_then_offline(tmp_path: Path, http_root, monkeypatch) -> None:
    root, url = http_root
    raw = small_arrays(2)
    served = write_npz(root / "mnist.npz", raw)
    monkeypatch.setattr(mnist_data, "MNIST_SHA256", _sha256(served))
    cache = tmp_path / "cache"
    assert_same_data(load_mnist(cache_dir=cache, base_url=url, progress=False), raw)
    assert (cache / "mnist" / "mnist.npz").is_file()
    served.unlink()  # the server no longer has it: the cached copy must be used
    assert_same_data(load_mnist(cache_dir=cache, base_url=url, download=False), raw)


def test_base_url_from_environment(tmp_path: Path, http_root, monkeypatch) -> None:
    root, url = http_root
    raw = small_arrays(3)
    served = write_npz(root / "mnist.npz", raw)
    monkeypatch.setattr(mnist_data, "MNIST_SHA256", _sha256(served))
    monkeypatch.setenv(mnist_data.BASE_URL_ENV, url.rstrip("/"))
    assert_same_data(load_mnist(progress=False), raw)
    assert (tmp_path / "default-cache" / "mnist" / "mnist.npz").is_file()


def test_checksum_mismatch_fails_and_keeps_nothing(tmp_path: Path, http_root) -> None:
    root, url = http_root
    write_npz(root / "mnist.npz", small_arrays(4))  # not the official file
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="checksum mismatch") as caught:
        load_mnist(cache_dir=cache, base_url=url, progress=False)
    assert "\n" not in str(caught.value)
    assert not (cache / "mnist" / "mnist.npz").exists()


def test_offline_error_names_the_file_and_where_to_put_it(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as caught:
        load_mnist(cache_dir=cache, base_url="http://127.0.0.1:9/", progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert "cannot download mnist file mnist.npz" in message
    assert str(cache / "mnist" / "mnist.npz") in message


def test_fashion_idx_download_verifies_md5(tmp_path: Path, http_root, monkeypatch) -> None:
    root, url = http_root
    raw = small_arrays(5)
    write_idx_folder(root, raw)
    for name in IDX_NAMES:
        monkeypatch.setitem(mnist_data.FASHION_MD5, name, _md5(root / name))
    cache = tmp_path / "cache"
    assert_same_data(load_mnist(kind="fashion", cache_dir=cache, base_url=url,
                                progress=False), raw)
    assert all((cache / "fashion" / name).is_file() for name in IDX_NAMES)


def test_fashion_from_debian_folder(tmp_path: Path, monkeypatch) -> None:
    raw = small_arrays(6)
    debian = write_idx_folder(tmp_path / "debian-fashion", raw)
    monkeypatch.setattr(mnist_data, "DEBIAN_FASHION_DIR", debian)
    assert find_mnist(kind="fashion", download=False) == debian
    assert_same_data(load_mnist(kind="fashion", download=False), raw)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        load_mnist(kind="cifar")
