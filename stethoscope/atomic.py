"""Atomic file and folder writes that never replace what stethoscope did not write.

Standard library only: downloads, the simulator and the CLI use it without importing torch.

* A write goes to a temporary sibling named after the writing process
  (``.<name>.stethoscope-<pid>-<hex>.tmp``) and is renamed into place, so ``path`` holds
  either its old or its new complete content, never half of one.
* A folder stethoscope writes holds a marker file, :data:`MARKER`, naming its kind
  (``model``, ``report``, ``lab``, ...). An existing ``path`` is replaced only when it is
  an empty folder or an artefact of the same kind; a user's file or folder is refused
  with :class:`OutputError` and left exactly as it was.
* Temporaries of processes that died (SIGKILL, power cut) are removed the next time
  something is written in their folder; a folder replacement cut between its two renames
  is put back.

Written by hand because no library combines ownership markers with crash cleanup; the
renames themselves are ``os.replace``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stethoscope.errors import StethoscopeError

MARKER = ".stethoscope.json"
TAG = "stethoscope"
LEGACY_TMP_AGE_S = 3600  # pid-less temporaries of older versions: stale after an hour
SCRATCH_PREFIX = "stethoscope-features-"

# What older stethoscope versions (no marker) left in a folder of each kind.
LEGACY_ARTEFACTS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "model": (frozenset({"config.json", "model.safetensors"}),
              frozenset({"config.json", "model.safetensors"})),
    "report": (frozenset({"index.html", "metrics.json"}),
               frozenset({"index.html", "report.md", "figures", "metrics.json", "scores.csv",
                          "history.json", "history.csv"})),
    "lab": (frozenset({"index.html", "report.md"}),
            frozenset({"index.html", "report.md", "cnn-overfit", "dropout", "dense-ae",
                       "conv-ae"})),
    "lab-run": (frozenset({"config.json", "results.json"}),
                frozenset({"config.json", "results.json", "history.json", "history.csv",
                           "model", "none", "input", "hidden", "curves.png", "dropout.png",
                           "loss.png", "reconstructions.png"})),
}

_OURS = re.compile(rf"^\.(?P<name>.+)\.{TAG}-(?P<pid>\d+)-[0-9a-f]+\.(?P<what>tmp|old)$")
_LEGACY_OLD = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")
_LEGACY_TMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
_SCRATCH = re.compile(r"^(?P<prefix>stethoscope-[a-z]+-)(?P<pid>\d+)-[0-9a-f]+$")
_cleaned: set[str] = set()


class OutputError(StethoscopeError):
    """An output path cannot be written: it holds something stethoscope did not write,
    or something it wrote that the user did not ask to replace."""


# ---------------------------------------------------------------------------- ownership


def artefact_kind(path: str | Path) -> str | None:
    """The kind of stethoscope artefact the folder ``path`` is (its marker, or the files
    an older version wrote), or None when it is not one."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text())
        if isinstance(marker, dict) and isinstance(marker.get("artefact"), str):
            return marker["artefact"]
    except (OSError, ValueError):
        pass
    try:
        names = set(os.listdir(path))
    except OSError:
        return None
    for kind, (required, allowed) in LEGACY_ARTEFACTS.items():
        if names and required <= names and names <= allowed:
            return kind
    return None


def _describe(path: Path) -> str:
    if path.is_symlink():
        return "is a symbolic link"
    if not path.is_dir():
        return "is a file"
    kind = artefact_kind(path)
    if kind is not None:
        return f"is a stethoscope {kind} folder"
    count = len(os.listdir(path))
    return f"is a folder holding {count} item{'s' if count != 1 else ''} stethoscope did not write"


def is_replaceable(path: str | Path, kind: str) -> bool:
    """Whether ``path`` is absent, an empty folder or a stethoscope ``kind`` artefact."""
    path = Path(path)
    if not os.path.lexists(path):
        return True
    if path.is_symlink() or not path.is_dir():
        return False
    return not os.listdir(path) or artefact_kind(path) == kind


def check_replaceable(path: str | Path, kind: str) -> None:
    """Raise :class:`OutputError` unless ``path`` may be replaced by a new ``kind`` folder."""
    path = Path(path)
    if not is_replaceable(path, kind):
        raise OutputError(f"{_describe(path)}, not a stethoscope {kind} folder; refusing to "
                          "replace it (choose a new output path)", path)


def prepare_output(path: str | Path, kind: str, *, force: bool = False) -> Path:
    """Check, before any long work, that a ``kind`` folder can be written at ``path``.

    A new path or an empty folder is fine; an existing ``kind`` artefact only with
    ``force``; anything else never. The nearest existing parent must be writable.
    """
    path = Path(path)
    check_replaceable(path, kind)
    if os.path.lexists(path) and os.listdir(path) and not force:
        raise OutputError(f"already holds a stethoscope {kind}; pass --force to replace it",
                          path)
    check_writable(path.parent)
    return path


def prepare_output_file(path: str | Path, *, magic: bytes, what: str,
                        force: bool = False) -> Path:
    """Check that a file can be written at ``path``: new, or (with ``force``) a file
    starting with ``magic`` (e.g. ``b"\\x93NUMPY"`` for .npy); the parent writable."""
    path = Path(path)
    if os.path.lexists(path):
        if path.is_dir() and not path.is_symlink():
            raise OutputError(f"is a folder; give a file name for the {what}", path)
        with open(path, "rb") as handle:
            ours = handle.read(len(magic)) == magic
        if not ours:
            raise OutputError(f"exists and is not a {what}; refusing to replace it", path)
        if not force:
            raise OutputError(f"already exists; pass --force to replace this {what}", path)
    check_writable(path.parent)
    return path


def check_writable(folder: str | Path) -> None:
    """Raise :class:`OutputError` when files cannot be created in ``folder`` (or, if it
    does not exist yet, in its nearest existing parent): read-only disk, no permission."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError("is not a folder; cannot write inside it", folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{TAG}-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"cannot write here ({err.strerror or err})", folder) from None


def write_marker(folder: str | Path, kind: str) -> Path:
    """Mark ``folder`` as a stethoscope ``kind`` artefact (see :func:`artefact_kind`)."""
    from stethoscope import __version__

    text = json.dumps({"artefact": kind, "written_by": f"stethoscope {__version__}"}) + "\n"
    return atomic_write_text(Path(folder) / MARKER, text)


def claim_folder(folder: str | Path, kind: str) -> Path:
    """Create ``folder`` (or take an empty one, or one of this ``kind``) as a ``kind``
    container that stethoscope fills piece by piece, e.g. a demo or lab folder."""
    folder = Path(folder)
    check_replaceable(folder, kind)
    folder.mkdir(parents=True, exist_ok=True)
    if artefact_kind(folder) != kind:
        write_marker(folder, kind)
    return folder


# ---------------------------------------------------------------------------- writing


def _temporary_name(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{TAG}-{os.getpid()}-{secrets.token_hex(4)}.{what}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename.

    The file gets the usual mode (0666 less the umask), like any file the user creates.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise OutputError("is a folder; cannot write a file in its place", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    tmp = _temporary_name(path, "tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_directory(path: str | Path, *, kind: str = "folder") -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces ``path`` and is marked
    as a ``kind`` artefact.

    ``path`` must be absent, an empty folder or a ``kind`` artefact
    (:class:`OutputError` otherwise, raised before the block runs). An existing ``path``
    is kept untouched if anything inside the block fails, and put back if the swap
    itself fails (or, after a kill between the two renames, by the next write here).
    """
    path = Path(path)
    check_replaceable(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    tmp = _temporary_name(path, "tmp")
    os.mkdir(tmp, 0o777)  # the usual folder mode (umask applies), unlike mkdtemp's 0700
    try:
        yield tmp
        write_marker(tmp, kind)
        check_replaceable(path, kind)  # the block ran long: look again before replacing
        _swap_into_place(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` is moved aside first and removed
    only once the new one is in place (restored if the second rename fails)."""
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    old = _temporary_name(path, "old")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


# ---------------------------------------------------------------------------- cleaning


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as err:
        return err.errno != errno.ESRCH
    return True


def clean_stale(folder: str | Path, *, force_rescan: bool = False) -> list[Path]:
    """Remove the temporaries that dead processes left in ``folder``; put a folder whose
    replacement was cut between its two renames back in place. Once per folder and process
    unless ``force_rescan``. Returns what was removed or restored."""
    folder = Path(folder)
    key = str(folder.absolute())
    if key in _cleaned and not force_rescan:
        return []
    _cleaned.add(key)
    try:
        entries = [entry.name for entry in os.scandir(folder) if entry.name.startswith(".")]
    except OSError:
        return []
    touched = []
    for name in entries:
        stale = _stale_target(folder, name)
        if stale is None:
            continue
        item, target, is_old = folder / name, folder / stale, name.endswith(".old") or (
            _LEGACY_OLD.match(name) is not None)
        if is_old and not os.path.lexists(target):
            try:
                os.replace(item, target)  # the new version never arrived: keep the old one
            except OSError:
                continue
        else:
            _remove(item)
        touched.append(item)
    return touched


def _stale_target(folder: Path, name: str) -> str | None:
    """The path name whose dead writer left temporary ``name``, or None if not stale."""
    if match := _OURS.match(name):
        return None if pid_alive(int(match["pid"])) else match["name"]
    if match := _LEGACY_OLD.match(name):
        return None if pid_alive(int(match["pid"])) else match["name"]
    if match := _LEGACY_TMP.match(name):
        try:
            age = time.time() - (folder / name).lstat().st_mtime
        except OSError:
            return None
        return match["name"] if age > LEGACY_TMP_AGE_S else None
    return None


@contextmanager
def scratch_directory(prefix: str = SCRATCH_PREFIX) -> Iterator[Path]:
    """A scratch folder in the system temp dir, named after this process
    (``<prefix><pid>-<hex>``) and removed afterwards; those of dead processes are removed
    first (see :func:`clean_stale_scratch`)."""
    clean_stale_scratch()
    folder = Path(tempfile.gettempdir()) / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(folder, 0o700)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def clean_stale_scratch(directory: str | Path | None = None) -> list[Path]:
    """Remove ``stethoscope-<what>-<pid>-<hex>`` scratch folders of dead processes from
    the temp dir (or ``directory``). Returns what was removed."""
    directory = Path(directory or tempfile.gettempdir())
    removed = []
    try:
        names = [e.name for e in os.scandir(directory) if e.name.startswith(f"{TAG}-")]
    except OSError:
        return []
    for name in names:
        match = _SCRATCH.match(name)
        if match and not pid_alive(int(match["pid"])):
            shutil.rmtree(directory / name, ignore_errors=True)
            removed.append(directory / name)
    return removed
