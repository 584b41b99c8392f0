"""Public data sets: resumable, checksummed downloads and safe extraction.

``download_file`` streams a URL into ``<dest>.part``, resumes an interrupted transfer with an
HTTP ``Range`` request, verifies size and checksum and only then renames the file into place,
so ``dest`` either does not exist or is complete. ``extract_archive`` unpacks zip/tar archives
into a temporary folder (rejecting members that would land outside it) and renames it into
place. ``download_dataset`` uses both to fetch MIMII and DCASE Task 2 development data from
Zenodo and arrange them in the folder layouts ``stethoscope.datasets`` reads.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import ssl
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from stethoscope.errors import DataError, DownloadError
from stethoscope.progress import progress_bar

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "RemoteFile",
    "dataset_files",
    "download_dataset",
    "download_file",
    "extract_archive",
    "total_size_text",
]

USER_AGENT = "stethoscope-downloader/1 (python urllib)"


# --------------------------------------------------------------------------------------
# download_file
# --------------------------------------------------------------------------------------


def download_file(
    url: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    size: int | None = None,
    progress: bool = True,
    timeout: float = 30,
    chunk_size: int = 1 << 20,
    retries: int = 2,
) -> Path:
    """Download ``url`` to ``dest`` atomically, resuming a previous partial download.

    Bytes go to ``<dest>.part``; a later call continues from its end with a ``Range``
    request (a server that ignores ranges and answers 200 makes it start over). The file is
    renamed to ``dest`` only after its size (``size`` or the server's Content-Length) and
    checksum (``md5`` / ``sha256``) match; on a mismatch the partial file is deleted and
    :class:`DownloadError` is raised. An existing ``dest`` whose checksum matches is not
    downloaded again. A connection cut mid-transfer is resumed up to ``retries`` times
    before giving up (the ``.part`` file stays for the next call).
    """
    dest = Path(dest)
    part = partial_path(dest)
    expected = _expected_digests(md5, sha256)
    if dest.is_file() and _is_complete(dest, expected, size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        try:
            _fetch_into_part(url, dest, part, expected, size, progress, timeout, chunk_size)
            break
        except _Interrupted as cut:
            attempt += 1
            if attempt > retries:
                raise DownloadError(f"transfer of {url} interrupted after {cut.have} bytes "
                                    f"({cut.reason}); run the command again to resume from "
                                    f"{part.name}", dest) from None
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))  # let a flaky link recover
    _verify_part(part, dest, expected, size)
    os.replace(part, dest)
    return dest


def partial_path(dest: str | Path) -> Path:
    """Where ``download_file`` keeps the bytes of an unfinished download of ``dest``."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


class _Interrupted(Exception):
    """The connection broke mid-transfer; what arrived is kept in the ``.part`` file."""

    def __init__(self, have: int, reason: str) -> None:
        super().__init__(reason)
        self.have, self.reason = have, reason


def _expected_digests(md5: str | None, sha256: str | None) -> dict[str, str]:
    digests = {"md5": md5, "sha256": sha256}
    return {name: value.strip().lower() for name, value in digests.items() if value}


def _hash_file(path: Path, algorithms: Iterable[str], chunk_size: int = 1 << 20) -> dict:
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            for hasher in hashers.values():
                hasher.update(block)
    return hashers


def _is_complete(path: Path, expected: dict[str, str], size: int | None) -> bool:
    """An existing final file counts as done when size and checksums (if known) match."""
    if size is not None and path.stat().st_size != size:
        return False
    if not expected:
        return True  # dest only ever appears through the atomic rename of a verified file
    hashers = _hash_file(path, expected)
    return all(hashers[name].hexdigest() == value for name, value in expected.items())


def _verify_part(part: Path, dest: Path, expected: dict[str, str], size: int | None) -> None:
    """Check size and checksums of the finished ``.part``; delete it and raise on mismatch."""
    have = part.stat().st_size
    if size is not None and have != size:
        part.unlink(missing_ok=True)
        raise DownloadError(f"size mismatch: expected {size} bytes, got {have}", dest)
    if not expected:
        return
    hashers = _hash_file(part, expected)
    for name, value in expected.items():
        got = hashers[name].hexdigest()
        if got != value:
            part.unlink(missing_ok=True)
            raise DownloadError(f"checksum mismatch: expected {name} {value}, got {got} "
                                "(partial file deleted; run again to download afresh)", dest)


def _open(url: str, offset: int, timeout: float, dest: Path):
    """Open ``url`` (from byte ``offset`` when > 0); turn network failures into one line."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            return err  # caller decides: the .part may already be complete
        raise DownloadError(f"server answered HTTP {err.code} {err.reason} for {url}",
                            dest) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise DownloadError(_unreachable_message(url, dest, err)) from None


def _unreachable_message(url: str, dest: Path, err: BaseException) -> str:
    host = urllib.parse.urlsplit(url).hostname or url
    reason = getattr(err, "reason", err)
    if isinstance(reason, ssl.SSLError):
        detail = f"TLS error: {reason}"
    elif isinstance(reason, socket.gaierror):
        detail = "name lookup failed"
    elif isinstance(reason, ConnectionRefusedError):
        detail = "connection refused"
    elif isinstance(reason, TimeoutError):
        detail = "timed out"
    else:
        detail = str(reason) or type(reason).__name__
    return (f"cannot reach {host} (offline?) [{detail}]; download {url} by hand "
            f"and place it at {dest}")


def _fetch_into_part(url: str, dest: Path, part: Path, expected: dict[str, str],
                     size: int | None, progress: bool, timeout: float,
                     chunk_size: int) -> None:
    """One HTTP request: append to (or restart) ``part`` until the body ends."""
    offset = part.stat().st_size if part.is_file() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    response = _open(url, offset, timeout, dest)
    with response:
        status = getattr(response, "status", None) or response.getcode()
        if status == 416:
            # Nothing left to send from ``offset``: the part is complete (or was corrupt,
            # in which case verification deletes it and the next call starts afresh).
            return
        if status == 206 and _range_start(response.headers) == offset:
            mode = "ab"
        else:
            offset, mode = 0, "wb"  # server ignored the Range header: start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else size
        if size is not None and total is not None and total != size:
            raise DownloadError(f"server announces {total} bytes, expected {size} for {url}",
                                dest)
        have = offset
        with open(part, mode) as handle, _progress_bar(progress, dest.name, total,
                                                       offset) as advance:
            try:
                while block := response.read(chunk_size):
                    handle.write(block)
                    have += len(block)
                    advance(len(block))
            except (http.client.IncompleteRead, ConnectionError, TimeoutError,
                    ssl.SSLError) as err:
                raise _Interrupted(have, type(err).__name__) from None
        if total is not None and have < total:
            raise _Interrupted(have, f"connection closed at {have} of {total} bytes")


def _range_start(headers) -> int | None:
    """First byte position of a ``Content-Range: bytes a-b/n`` header, if any."""
    value = headers.get("Content-Range", "")
    try:
        unit, spec = value.split(" ", 1)
        return int(spec.split("-", 1)[0]) if unit.strip() == "bytes" else None
    except ValueError:
        return None


@contextmanager
def _progress_bar(progress: bool, name: str, total: int | None, done: int) -> Iterator:
    """Yield ``advance(n)``: a bar with bytes, speed and ETA (:mod:`stethoscope.progress`)."""
    with progress_bar(total, name, enabled=progress, unit="bytes", done=done) as bar:
        yield bar.advance


# --------------------------------------------------------------------------------------
# extract_archive
# --------------------------------------------------------------------------------------


def extract_archive(archive: str | Path, dest: str | Path, *,
                    include: Callable[[str], bool] | None = None) -> Path:
    """Unpack a zip or tar(.gz/.bz2/.xz) archive into the folder ``dest`` atomically.

    Members are extracted into a temporary sibling folder which is renamed to ``dest`` at the
    end, so an interrupted extraction never leaves a half-filled ``dest``. Members with
    absolute paths, ``..`` components or links pointing outside raise :class:`DownloadError`
    (the whole archive is refused before anything is written). ``include(member_name)``
    selects a subset of members.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DownloadError("no such archive", archive)
    if dest.exists():
        raise DownloadError("extraction target already exists; remove it first", dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".extract", dir=dest.parent))
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp, include)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, tmp, include)
        else:
            raise DownloadError("not a zip or tar archive (truncated download?)", archive)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _check_member_name(name: str, archive: Path) -> None:
    pure = Path(name.replace("\\", "/"))
    if pure.is_absolute() or name.startswith(("/", "\\")) or ".." in pure.parts or (
            len(name) > 1 and name[1] == ":"):
        raise DownloadError(f"unsafe member path {name!r} (would extract outside the target "
                            "folder); archive rejected", archive)


def _extract_zip(archive: Path, into: Path, include: Callable[[str], bool] | None) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for info in members:
                _check_member_name(info.filename, archive)
            chosen = [m for m in members if include is None or include(m.filename)]
            zf.extractall(into, members=chosen)  # CRCs are checked while reading each member
    except zipfile.BadZipFile as err:
        raise DownloadError(f"broken zip archive ({err})", archive) from None


def _extract_tar(archive: Path, into: Path, include: Callable[[str], bool] | None) -> None:
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for member in members:
                _check_member_name(member.name, archive)
            chosen = [m for m in members if include is None or include(m.name)]
            # The stdlib "data" filter also refuses links leaving the folder, devices, setuid.
            tf.extractall(into, members=chosen, filter="data")
    except tarfile.FilterError as err:
        raise DownloadError(f"unsafe member ({err}); archive rejected", archive) from None
    except tarfile.TarError as err:
        raise DownloadError(f"broken tar archive ({err})", archive) from None


# --------------------------------------------------------------------------------------
# Public data sets on Zenodo
# --------------------------------------------------------------------------------------

ZENODO = "https://zenodo.org"


@dataclass(frozen=True)
class RemoteFile:
    """One archive of a Zenodo record, with what it holds and how to check it."""

    name: str
    machine: str
    md5: str | None = None  # None: checksum not published where we could read it
    snr: str | None = None  # MIMII only: "-6dB", "0dB", "6dB"
    approx_gb: float | None = None

    def url(self, record: str, base_url: str | None = None) -> str:
        base = (base_url or ZENODO).rstrip("/")
        return f"{base}/records/{record}/files/{urllib.parse.quote(self.name)}?download=1"


@dataclass(frozen=True)
class DatasetInfo:
    """A public data set: its Zenodo record, machines, archives and folder layout."""

    name: str
    title: str
    record: str
    layout: str  # "mimii": <machine>/id_XX/{normal,abnormal}; "dcase": <machine>/{train,test}
    machines: tuple[str, ...]
    files: tuple[RemoteFile, ...]
    licence: str
    snrs: tuple[str, ...] = ()
    machine_ids: tuple[str, ...] = ()
    notes: str = ""

    @property
    def page(self) -> str:
        return f"{ZENODO}/records/{self.record}"


# MIMII (Purohit et al., DCASE 2019). md5 and sizes as listed on the Zenodo record page.
_MIMII_MD5 = {
    ("-6dB", "fan"): ("f02ae808a58d84b6815b7ec38ff30879", 10.9),
    ("-6dB", "pump"): ("d20b783a0ff9c93d58f452f98c37b112", 8.2),
    ("-6dB", "slider"): ("49913eda7d37f182cbf8ed5c984140e0", 8.0),
    ("-6dB", "valve"): ("fdfaf185fea61b21e11952a070a4ada7", 8.0),
    ("0dB", "fan"): ("6354d1cc2165c52168f9ef1bcd9c7c52", 10.4),
    ("0dB", "pump"): ("488748295c3f60b25de07b58fe75b049", 7.9),
    ("0dB", "slider"): ("4d674c21474f0646ecd75546db6c0c4e", 7.5),
    ("0dB", "valve"): ("178478eb0d11c79080a35562bfdeee71", 7.5),
    ("6dB", "fan"): ("0890f7d3c2fd8448634e69ff1d66dd47", 10.2),
    ("6dB", "pump"): ("a09ba6060c10fc09cd4c8770213b0b9f", 7.7),
    ("6dB", "slider"): ("838c2b3441858359c4704ef13a1b27ff", 7.1),
    ("6dB", "valve"): ("fe5fb7c337cd701b1d31dc641e621892", 6.9),
}

# DCASE 2020 Task 2 development data (record 3678171); md5 as published by Zenodo (also
# used by the soundata loader).
_DCASE2020_MD5 = {
    "fan": "649bdfc06263ae7a838963f43b6641e6",
    "pump": "90e7091ef722b7238a7f1009365779cd",
    "slider": "da24a757719f0d94d5aa2d646bbfdc86",
    "valve": "34d2672f55bb041589ef79c10dc89934",
    "ToyCar": "4dec75ca8d9f666aa9e4c1894a740501",
    "ToyConveyor": "03b6aa1bfd09a39d53af0ba39f71fa91",
}

# DCASE 2023 Task 2 development data, version 3.0 (record 7882613, attributes fixed on
# 2023-05-01); md5 as published by Zenodo (also used by the soundata loader).
_DCASE2023_MD5 = {
    "bearing": "8a813bc8d8f156b5395bfccdfac7673c",
    "fan": "9348591e96fb0ad499a1e33b082562fc",
    "gearbox": "b6e55f6a31faa0fc8569ec0afdd53ccf",
    "slider": "b3f8dee36b4718c36d659a4fd1c4afe0",
    "ToyCar": "4e3bf15f4101ed4ed4f1fecde2e2b2a3",
    "ToyTrain": "6b02a6c65eebb3b8b1ae59a6b25bb897",
    "valve": "b2051a2022eadb53cd97581120811cae",
}

_DCASE2023_MACHINES = ("bearing", "fan", "gearbox", "slider", "ToyCar", "ToyTrain", "valve")


def _mimii_name(snr: str, machine: str) -> str:
    return f"{snr[:-2]}_dB_{machine}.zip"  # "-6dB" -> "-6_dB_fan.zip"


DATASETS: dict[str, DatasetInfo] = {
    "mimii": DatasetInfo(
        name="mimii",
        title="MIMII: sound data set for malfunctioning industrial machine investigation "
              "and inspection (8-channel, 16 kHz, 10 s clips)",
        record="3384388",
        layout="mimii",
        machines=("fan", "pump", "slider", "valve"),
        snrs=("-6dB", "0dB", "6dB"),
        machine_ids=("id_00", "id_02", "id_04", "id_06"),
        files=tuple(RemoteFile(_mimii_name(snr, m), m, md5=md5, snr=snr, approx_gb=gb)
                    for (snr, m), (md5, gb) in _MIMII_MD5.items()),
        licence="CC BY-SA 4.0",
        notes="Each archive holds all four machine ids of one machine at one SNR.",
    ),
    "dcase2020": DatasetInfo(
        name="dcase2020",
        title="DCASE 2020 Task 2 development data (MIMII + ToyADMOS, mono 16 kHz)",
        record="3678171",
        layout="dcase",
        machines=tuple(_DCASE2020_MD5),
        machine_ids=("id_00", "id_01", "id_02", "id_03", "id_04", "id_05", "id_06"),
        files=tuple(RemoteFile(f"dev_data_{m}.zip", m, md5=md5)
                    for m, md5 in _DCASE2020_MD5.items()),
        licence="CC BY-NC-SA 4.0",
        notes="Files are named normal_id_XX_NNNNNNNN.wav / anomaly_id_XX_NNNNNNNN.wav.",
    ),
    "dcase2023": DatasetInfo(
        name="dcase2023",
        title="DCASE 2023 Task 2 development data (MIMII DG + ToyADMOS2, mono 16 kHz)",
        record="7882613",
        layout="dcase",
        machines=_DCASE2023_MACHINES,
        files=tuple(RemoteFile(f"dev_{m}.zip", m, md5=_DCASE2023_MD5[m])
                    for m in _DCASE2023_MACHINES),
        licence="CC BY 4.0",
        notes="One section (00) per machine, source and target domains.",
    ),
    "dcase2024": DatasetInfo(
        name="dcase2024",
        title="DCASE 2024 Task 2 development data (mono 16 kHz)",
        record="10902294",
        layout="dcase",
        machines=_DCASE2023_MACHINES,
        # No md5 found in any source we could read: only the size announced by the server
        # (Content-Length) is verified for these archives.
        files=tuple(RemoteFile(f"dev_{m}.zip", m) for m in _DCASE2023_MACHINES),
        licence="see https://zenodo.org/records/10902294",
        notes="Checksums unknown to stethoscope: only sizes are verified.",
    ),
}


def _dataset(name: str) -> DatasetInfo:
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise DataError(f"unknown data set {name!r}; choose from "
                        f"{', '.join(DATASETS)}") from None


def _normalise_snr(snr: str | int | float | None, info: DatasetInfo) -> str | None:
    """Accept 6, "6", "6dB", "6_dB", "-6 dB" and return the catalogue's form ("6dB")."""
    if snr is None:
        return None
    if not info.snrs:
        raise DataError(f"--snr applies to MIMII only; {info.name} has no SNR variants")
    text = str(snr).replace(" ", "").replace("_", "").lower().removesuffix("db")
    try:
        value = f"{int(float(text))}dB"
    except ValueError:
        value = ""
    if value not in info.snrs:
        raise DataError(f"unknown SNR {snr!r} for {info.name}; choose from "
                        f"{', '.join(info.snrs)}")
    return value


def _normalise_machine(machine: str | None, info: DatasetInfo) -> str | None:
    if machine is None:
        return None
    for known in info.machines:
        if known.lower() == machine.lower():
            return known
    raise DataError(f"unknown machine {machine!r} for {info.name}; choose from "
                    f"{', '.join(info.machines)}")


def _normalise_ids(machine_id: str | Iterable[str] | None, info: DatasetInfo) -> tuple[str, ...]:
    if machine_id is None:
        return ()
    if not info.machine_ids:
        raise DataError(f"--id applies to MIMII and DCASE 2020 only; {info.name} is organised "
                        "in sections")
    raw = [machine_id] if isinstance(machine_id, str | int) else list(machine_id)
    ids = []
    for item in raw:
        text = str(item).lower().removeprefix("id_").removeprefix("id")
        value = f"id_{int(text):02d}" if text.isdigit() else str(item)
        if value not in info.machine_ids:
            raise DataError(f"unknown machine id {item!r} for {info.name}; choose from "
                            f"{', '.join(info.machine_ids)}")
        ids.append(value)
    return tuple(dict.fromkeys(ids))


def dataset_files(name: str, *, machine: str | None = None,
                  snr: str | int | None = None) -> list[RemoteFile]:
    """The archives ``download_dataset`` would fetch for these choices (for listings)."""
    info = _dataset(name)
    machine = _normalise_machine(machine, info)
    snr = _normalise_snr(snr, info)
    return [f for f in info.files
            if (machine is None or f.machine == machine) and (snr is None or f.snr == snr)]


def total_size_text(files: Iterable[RemoteFile]) -> str:
    """What the archives weigh, as far as the catalogue knows: ``"about 31.0 GB"``,
    ``"at least 7.5 GB (2 archives of unknown size)"`` or ``"size not published"``."""
    files = list(files)
    known = [f.approx_gb for f in files if f.approx_gb is not None]
    unknown = len(files) - len(known)
    if not known:
        return "size not published"
    total = f"{sum(known):.1f} GB"
    if not unknown:
        return f"about {total}"
    return f"at least {total} ({unknown} archive{'s' if unknown > 1 else ''} of unknown size)"


def download_dataset(name: str, *, machine: str | None = None,
                     machine_id: str | Iterable[str] | None = None,
                     snr: str | int | None = None, out: str | Path,
                     base_url: str | None = None, progress: bool = True,
                     keep_archives: bool = False) -> Path:
    """Download, verify and unpack a public data set into the layout stethoscope reads.

    MIMII lands in ``<out>/<snr>/<machine>/id_XX/{normal,abnormal}/*.wav`` (``snr`` is
    ``-6dB``, ``0dB`` or ``6dB``; all three when ``snr`` is None), DCASE data in
    ``<out>/<machine>/{train,test}/*.wav``. ``machine`` None means every machine;
    ``machine_id`` keeps only those ids (MIMII, DCASE 2020). Archives go to
    ``<out>/.downloads`` and resume after an interruption; an archive whose contents are
    already in place is not fetched again. ``base_url`` replaces ``https://zenodo.org``.
    Returns ``out``.
    """
    from stethoscope.atomic import atomic_write_text

    info = _dataset(name)
    ids = _normalise_ids(machine_id, info)
    files = dataset_files(name, machine=machine, snr=snr)
    out = Path(out)
    downloads = out / ".downloads"
    for remote in files:
        marker = downloads / f"{remote.name}.{_selection_tag(ids)}.done"
        if marker.is_file():
            continue  # unpacked by an earlier call
        archive = download_file(remote.url(info.record, base_url), downloads / remote.name,
                                md5=remote.md5, progress=progress)
        staging = downloads / f"{remote.name}.extracting"
        shutil.rmtree(staging, ignore_errors=True)  # left over from an interrupted call
        extract_archive(archive, staging, include=_member_filter(info, ids))
        try:
            placed = _arrange(info, remote, staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if not placed:
            raise DownloadError(f"no {remote.machine} recordings found in the archive "
                                f"(expected {_expected_layout(info)})", archive)
        atomic_write_text(marker, "\n".join(str(p) for p in placed) + "\n")
        if not keep_archives:
            archive.unlink(missing_ok=True)
    return out


def _selection_tag(ids: tuple[str, ...]) -> str:
    return "+".join(ids) if ids else "all"


def _expected_layout(info: DatasetInfo) -> str:
    return ("<machine>/id_XX/{normal,abnormal}/*.wav" if info.layout == "mimii"
            else "<machine>/{train,test}/*.wav")


def _member_filter(info: DatasetInfo, ids: tuple[str, ...]):
    """Which archive members to unpack: all of them, or those of the chosen machine ids."""
    if not ids:
        return None
    if info.layout == "mimii":
        return lambda name: any(part in ids for part in Path(name).parts)
    # DCASE 2020: the id is in the file name (normal_id_00_00000000.wav); keep non-WAV files.
    return lambda name: (not name.lower().endswith(".wav")
                         or any(f"_{i}_" in Path(name).name for i in ids))


def _arrange(info: DatasetInfo, remote: RemoteFile, staging: Path, out: Path) -> list[Path]:
    """Move the recordings from the unpacked archive into their final folders."""
    placed = []
    if info.layout == "mimii":
        for id_dir in sorted(p for p in staging.rglob("id_*") if p.is_dir()):
            machine = id_dir.parent.name if id_dir.parent != staging else remote.machine
            placed.append(_move_into_place(id_dir, out / remote.snr / machine / id_dir.name))
    else:
        for machine_dir in sorted(_dcase_machine_dirs(staging)):
            machine = machine_dir.name if machine_dir != staging else remote.machine
            placed.append(_move_into_place(machine_dir, out / machine))
    return placed


def _dcase_machine_dirs(staging: Path) -> list[Path]:
    """Folders that hold ``train`` or ``test`` subfolders (the machine folders)."""
    found = {p.parent for p in staging.rglob("*")
             if p.is_dir() and p.name in ("train", "test")}
    return [d for d in found if not any(o != d and o in d.parents for o in found)]


def _move_into_place(source: Path, target: Path) -> Path:
    """Move the files under ``source`` into ``target``, adding to what is already there.

    Nothing in ``target`` is replaced or removed: the user's own files and an earlier
    archive of the same machine (DCASE's development and additional training data) stay. A
    file already there with the same bytes is left alone; one that differs is a
    DownloadError naming it, raised before any file moves."""
    import filecmp

    moves = [(path, target / path.relative_to(source))
             for path in sorted(source.rglob("*")) if path.is_file()]
    for path, there in moves:
        if there.exists() and (not there.is_file() or
                               not filecmp.cmp(there, path, shallow=False)):
            raise DownloadError("exists and differs from the archive's file of that name; "
                                "move it away to download the archive's", there)
    for path, there in moves:
        if not there.exists():
            there.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, there)
    return target
