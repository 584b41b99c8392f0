"""download.py against a local HTTP server on 127.0.0.1 (never the internet).

The server supports Range requests (SimpleHTTPRequestHandler does not) and can be told to cut
the connection after K bytes, to test resuming; it records every request it saw.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import re
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from stethoscope.download import (
    DATASETS,
    RemoteFile,
    dataset_files,
    download_dataset,
    download_file,
    extract_archive,
    partial_path,
)
from stethoscope.errors import DataError, DownloadError


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files from the server's folder with Range support and optional cut-offs."""

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        relative = self.path.split("?", 1)[0].lstrip("/")
        path = Path(server.root, relative)
        if not path.is_file():
            self.send_error(404, "not found")
            return
        data = path.read_bytes()
        start, status = 0, 200
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and server.honour_range:
            start, status = int(match.group(1)), 206
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if server.cut_after is not None:
            cut, server.cut_after = server.cut_after, None  # cut only once
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.root, httpd.requests, httpd.cut_after, httpd.honour_range = root, [], None, True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    httpd.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _payload(n: int = 300_000, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _serve(server, name: str, data: bytes) -> str:
    path = Path(server.root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return f"{server.base_url}/{name}"


# ---------------------------------------------------------------- download_file


def test_full_download_with_checksums(server, tmp_path):
    data = _payload()
    url = _serve(server, "blob.bin", data)
    dest = tmp_path / "out" / "blob.bin"
    got = download_file(url, dest, md5=hashlib.md5(data).hexdigest(),
                        sha256=hashlib.sha256(data).hexdigest(), chunk_size=4096)
    assert got == dest and dest.read_bytes() == data
    assert not partial_path(dest).exists()
    assert server.requests == [("/blob.bin", None)]


def test_complete_file_with_matching_checksum_is_not_downloaded_again(server, tmp_path):
    data = _payload()
    url = _serve(server, "blob.bin", data)
    dest = tmp_path / "blob.bin"
    md5 = hashlib.md5(data).hexdigest()
    download_file(url, dest, md5=md5)
    download_file(url, dest, md5=md5)
    assert len(server.requests) == 1
    dest.write_bytes(b"corrupted")  # a wrong file in place is replaced
    download_file(url, dest, md5=md5)
    assert len(server.requests) == 2 and dest.read_bytes() == data


def test_interrupted_transfer_leaves_part_and_next_call_resumes_with_range(server, tmp_path):
    data = _payload()
    url = _serve(server, "blob.bin", data)
    dest = tmp_path / "blob.bin"
    server.cut_after = 100_000
    with pytest.raises(DownloadError, match="interrupted.*run the command again"):
        download_file(url, dest, md5=hashlib.md5(data).hexdigest(), retries=0,
                      chunk_size=8192)
    part = partial_path(dest)
    assert not dest.exists()
    assert 0 < part.stat().st_size <= 100_000
    have = part.stat().st_size
    download_file(url, dest, md5=hashlib.md5(data).hexdigest(), chunk_size=8192)
    assert server.requests[-1] == ("/blob.bin", f"bytes={have}-")
    assert dest.read_bytes() == data and not part.exists()


def test_interruption_is_resumed_automatically_within_one_call(server, tmp_path):
    data = _payload()
    url = _serve(server, "blob.bin", data)
    server.cut_after = 50_000
    dest = download_file(url, tmp_path / "blob.bin", sha256=hashlib.sha256(data).hexdigest(),
                         chunk_size=8192)
    assert dest.read_bytes() == data
    assert [r[1] for r in server.requests][0] is None
    assert server.requests[1][1] is not None and server.requests[1][1].startswith("bytes=")


def test_server_ignoring_range_restarts_from_scratch(server, tmp_path):
    data = _payload()
    url = _serve(server, "blob.bin", data)
    dest = tmp_path / "blob.bin"
    partial_path(dest).write_bytes(b"x" * 1000)  # stale bytes that must not survive
    server.honour_range = False
    download_file(url, dest, md5=hashlib.md5(data).hexdigest())
    assert server.requests[-1][1] == "bytes=1000-"
    assert dest.read_bytes() == data


def test_already_complete_part_is_finished_without_refetching_bytes(server, tmp_path):
    data = _payload()
    url = _serve(server, "blob.bin", data)
    dest = tmp_path / "blob.bin"
    partial_path(dest).write_bytes(data)  # server answers 416 for a range past the end
    download_file(url, dest, md5=hashlib.md5(data).hexdigest())
    assert dest.read_bytes() == data and not partial_path(dest).exists()


def test_bad_checksum_is_rejected_and_nothing_is_left(server, tmp_path):
    url = _serve(server, "blob.bin", _payload())
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadError, match="checksum mismatch: expected md5 0+, got [0-9a-f]{32}"):
        download_file(url, dest, md5="0" * 32)
    assert not dest.exists() and not partial_path(dest).exists()


def test_size_mismatch_is_rejected(server, tmp_path):
    url = _serve(server, "blob.bin", _payload(1000))
    with pytest.raises(DownloadError, match="1000"):
        download_file(url, tmp_path / "blob.bin", size=999)
    assert not (tmp_path / "blob.bin").exists()


def test_http_error_is_one_line(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download_file(f"{server.base_url}/missing.zip", tmp_path / "missing.zip")
    assert "\n" not in str(info.value)


def test_offline_gives_clear_message(tmp_path):
    with socket.socket() as sock:  # find a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/files/x.zip"
    dest = tmp_path / "x.zip"
    with pytest.raises(DownloadError) as info:
        download_file(url, dest, timeout=5)
    message = str(info.value)
    assert message.startswith("cannot reach 127.0.0.1 (offline?)")
    assert f"download {url} by hand and place it at {dest}" in message
    assert "\n" not in message and not dest.exists()


# ---------------------------------------------------------------- extract_archive


def _wav_bytes(seed: int, channels: int = 1, seconds: float = 0.05) -> bytes:
    import io

    rng = np.random.default_rng(seed)
    wave = (0.1 * rng.standard_normal((int(16000 * seconds), channels))).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, wave, 16000, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def _make_zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_extract_zip_and_tar(tmp_path):
    members = {"m/a.txt": b"alpha", "m/sub/b.bin": b"beta"}
    _make_zip(tmp_path / "x.zip", members)
    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io_bytes(data))
    for archive in ("x.zip", "x.tar.gz"):
        out = extract_archive(tmp_path / archive, tmp_path / f"out-{archive}")
        assert (out / "m" / "a.txt").read_bytes() == b"alpha"
        assert (out / "m" / "sub" / "b.bin").read_bytes() == b"beta"
    picked = extract_archive(tmp_path / "x.zip", tmp_path / "picked",
                             include=lambda name: name.endswith(".txt"))
    assert (picked / "m" / "a.txt").exists() and not (picked / "m" / "sub").exists()


def io_bytes(data: bytes):
    import io

    return io.BytesIO(data)


@pytest.mark.parametrize("evil", ["../escape.txt", "/abs/escape.txt", "ok/../../escape.txt"])
def test_path_traversal_zip_is_rejected(tmp_path, evil):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fine.txt", b"ok")
        zf.writestr(zipfile.ZipInfo(evil), b"pwned")
    dest = tmp_path / "deep" / "out"
    with pytest.raises(DownloadError, match="unsafe member path"):
        extract_archive(archive, dest)
    assert not dest.exists()
    assert not list(tmp_path.rglob("escape.txt"))
    assert [p.name for p in dest.parent.iterdir()] == []  # no temporary folder left


def test_tar_link_leaving_the_folder_is_rejected(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        link = tarfile.TarInfo("inside/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(DownloadError, match="unsafe"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_archive_is_reported(tmp_path):
    archive = _make_zip(tmp_path / "x.zip", {"a.wav": _wav_bytes(0)})
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(DownloadError, match="not a zip or tar"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- catalogue and data sets


def test_catalogue_is_well_formed():
    assert set(DATASETS) == {"mimii", "dcase2020", "dcase2023", "dcase2024"}
    for info in DATASETS.values():
        assert info.files and {f.machine for f in info.files} == set(info.machines)
        for remote in info.files:
            assert remote.md5 is None or re.fullmatch(r"[0-9a-f]{32}", remote.md5)
            assert remote.url(info.record) == (
                f"https://zenodo.org/records/{info.record}/files/{remote.name}?download=1")
    mimii = DATASETS["mimii"]
    assert len(mimii.files) == 12 and all(f.md5 for f in mimii.files)
    assert [f.name for f in dataset_files("mimii", machine="valve", snr=-6)] == ["-6_dB_valve.zip"]
    assert [f.name for f in dataset_files("dcase2023", machine="ToyCar")] == ["dev_ToyCar.zip"]
    assert len(dataset_files("dcase2020")) == 6


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="nope"), "unknown data set"),
    (dict(name="mimii", machine="toaster"), "unknown machine"),
    (dict(name="mimii", snr=3), "unknown SNR"),
    (dict(name="dcase2023", snr=6), "MIMII only"),
    (dict(name="dcase2023", machine_id="id_00"), "MIMII and DCASE 2020 only"),
    (dict(name="mimii", machine_id="id_01"), "unknown machine id"),
])
def test_bad_dataset_choices_raise_data_error(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        download_dataset(out=tmp_path, base_url="http://127.0.0.1:9", **kwargs)


def _serve_archive(server, monkeypatch, dataset: str, remote_name: str, machine: str,
                   members: dict[str, bytes], snr: str | None = None, md5: str | None = None):
    info = DATASETS[dataset]
    archive = _make_zip(Path(server.root, "records", info.record, "files", remote_name), members)
    md5 = md5 or hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(DATASETS, dataset, dataclasses.replace(
        info, files=(RemoteFile(remote_name, machine, md5=md5, snr=snr),)))


def test_download_mimii_with_id_filter_into_layout(server, tmp_path, monkeypatch):
    members = {f"valve/{mid}/{cond}/0000000{i}.wav": _wav_bytes(i)
               for mid in ("id_00", "id_02") for cond in ("normal", "abnormal") for i in range(2)}
    _serve_archive(server, monkeypatch, "mimii", "6_dB_valve.zip", "valve", members, snr="6dB")
    out = tmp_path / "mimii"
    got = download_dataset("mimii", machine="valve", machine_id="0", snr="6_dB", out=out,
                           base_url=server.base_url)
    assert got == out
    wavs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.wav"))
    assert wavs == [f"6dB/valve/id_00/{c}/0000000{i}.wav"
                    for c in ("abnormal", "normal") for i in range(2)]
    data, sr = sf.read(out / wavs[0])
    assert sr == 16000 and len(data) == 800
    assert not (out / ".downloads" / "6_dB_valve.zip").exists()  # archive removed after use
    assert server.requests[0][0] == "/records/3384388/files/6_dB_valve.zip?download=1"
    requests = len(server.requests)
    download_dataset("mimii", machine="valve", machine_id="id_00", snr=6, out=out,
                     base_url=server.base_url)
    assert len(server.requests) == requests  # already in place: nothing fetched


def test_download_dcase_into_layout_and_resume(server, tmp_path, monkeypatch):
    names = ["train/section_00_source_train_normal_0000_v1pat_A.wav",
             "test/section_00_source_test_normal_0000_v1pat_A.wav",
             "test/section_00_target_test_anomaly_0000_v1pat_B.wav"]
    members = {f"valve/{n}": _wav_bytes(i) for i, n in enumerate(names)}
    members["valve/attributes_00.csv"] = b"file_name,d1p,d1v\n"
    _serve_archive(server, monkeypatch, "dcase2023", "dev_valve.zip", "valve", members)
    server.cut_after = 2000  # the first transfer breaks; download_dataset resumes it
    out = tmp_path / "dcase"
    download_dataset("dcase2023", machine="valve", out=out, base_url=server.base_url)
    assert sorted(p.relative_to(out / "valve").as_posix()
                  for p in (out / "valve").rglob("*.wav")) == sorted(names)
    assert (out / "valve" / "attributes_00.csv").exists()
    assert any(r[1] and r[1].startswith("bytes=") for r in server.requests)


def test_dataset_with_wrong_checksum_leaves_nothing(server, tmp_path, monkeypatch):
    members = {"fan/train/normal_id_00_00000000.wav": _wav_bytes(0)}
    _serve_archive(server, monkeypatch, "dcase2020", "dev_data_fan.zip", "fan", members,
                   md5="f" * 32)
    out = tmp_path / "d"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_dataset("dcase2020", machine="fan", out=out, base_url=server.base_url)
    assert not list(out.rglob("*.wav")) and not list(out.rglob("*.zip*"))


def test_archive_without_expected_layout_is_reported(server, tmp_path, monkeypatch):
    _serve_archive(server, monkeypatch, "dcase2023", "dev_fan.zip", "fan",
                   {"readme.txt": b"nothing here"})
    with pytest.raises(DownloadError, match="no fan recordings found"):
        download_dataset("dcase2023", machine="fan", out=tmp_path / "d",
                         base_url=server.base_url)


def test_a_download_adds_to_a_machine_folder_and_never_replaces_what_is_there(
        server, tmp_path, monkeypatch):
    """A second archive of the same machine (DCASE's development and additional training
    data) and the user's own files in ``<out>/<machine>`` stay; a file of the archive that
    would overwrite a different file already there is an error before anything moves."""
    out = tmp_path / "dcase"
    mine = out / "valve" / "train" / "my_own_recording.wav"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(_wav_bytes(9))
    dev = {"valve/train/section_00_source_train_normal_0000_a.wav": _wav_bytes(0),
           "valve/test/section_00_source_test_anomaly_0000_a.wav": _wav_bytes(1)}
    _serve_archive(server, monkeypatch, "dcase2023", "dev_valve.zip", "valve", dev)
    download_dataset("dcase2023", machine="valve", out=out, base_url=server.base_url)
    extra = {"valve/train/section_00_source_train_normal_0001_a.wav": _wav_bytes(2)}
    _serve_archive(server, monkeypatch, "dcase2023", "eval_valve_train.zip", "valve", extra)
    download_dataset("dcase2023", machine="valve", out=out, base_url=server.base_url)
    have = sorted(p.relative_to(out / "valve").as_posix() for p in (out / "valve").rglob("*.wav"))
    assert have == sorted([n.split("/", 1)[1] for n in [*dev, *extra]] +
                          ["train/my_own_recording.wav"])
    assert mine.read_bytes() == _wav_bytes(9)

    clash = {"valve/train/my_own_recording.wav": _wav_bytes(3),
             "valve/train/section_00_source_train_normal_0002_a.wav": _wav_bytes(4)}
    _serve_archive(server, monkeypatch, "dcase2023", "clash_valve.zip", "valve", clash)
    with pytest.raises(DownloadError, match="my_own_recording.wav.*differs"):
        download_dataset("dcase2023", machine="valve", out=out, base_url=server.base_url)
    assert mine.read_bytes() == _wav_bytes(9)
    assert not (out / "valve" / "train" / "section_00_source_train_normal_0002_a.wav").exists()
