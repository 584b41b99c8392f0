"""Model folders and atomic writes: round trips, clear errors, nothing half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stethoscope import atomic
from stethoscope.atomic import OutputError
from stethoscope.errors import ModelFileError
from stethoscope.storage import (
    FORMAT_VERSION,
    atomic_directory,
    atomic_write_text,
    load_model,
    save_model,
)

ROOT = Path(__file__).resolve().parents[1]


def test_round_trip(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.zeros(4)}
    save_model(tmp_path / "m", {"model": "x"}, state)
    config, loaded = load_model(tmp_path / "m")
    assert config["model"] == "x" and config["format_version"] == FORMAT_VERSION
    assert torch.equal(loaded["w"], state["w"])


def test_other_format_version_is_a_clear_error(tmp_path):
    save_model(tmp_path / "m", {"model": "x"}, {"w": torch.ones(1)})
    cfg = tmp_path / "m" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "format_version": 99}))
    with pytest.raises(ModelFileError, match="format version 99") as err:
        load_model(tmp_path / "m")
    assert str(tmp_path / "m") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["no_weights", "bad_json", "bad_weights", "missing", "file"])
def test_damaged_model_folders(tmp_path, damage):
    path = tmp_path / "m"
    save_model(path, {"model": "x"}, {"w": torch.ones(2)})
    if damage == "no_weights":
        (path / "model.safetensors").unlink()
    elif damage == "bad_json":
        (path / "config.json").write_text("{not json")
    elif damage == "bad_weights":
        (path / "model.safetensors").write_bytes(b"\x00" * 20)
    elif damage == "missing":
        path = tmp_path / "nothing"
    else:
        path = tmp_path / "plain.txt"
        path.write_text("hello")
    with pytest.raises(ModelFileError) as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_atomic_directory_keeps_the_old_folder_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("second")
        raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_text(tmp_path / "x.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert oct((tmp_path / "x.json").stat().st_mode & 0o777) != oct(0o600)


# ---- stethoscope.atomic: ownership, faults at every rename, cleanup after kills ----------



def _write_version(target: Path, text: str) -> None:
    with atomic.atomic_directory(target, kind="model") as tmp:
        (tmp / "a.txt").write_text(text)
        (tmp / "b.txt").write_text(text)


def _assert_whole(target: Path, *versions: str) -> str:
    """``target`` holds exactly one complete version, and nothing else lies beside it."""
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    text = (target / "a.txt").read_text()
    assert text in versions and (target / "b.txt").read_text() == text
    return text


def test_atomic_writers_need_only_the_standard_library():
    code = ("import sys, stethoscope.atomic; "
            "bad = [m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules]; "
            "sys.exit(bool(bad))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


@pytest.mark.parametrize("failing_call", [1, 2, 3])
def test_a_failing_rename_keeps_one_whole_version(tmp_path, monkeypatch, failing_call):
    """Replacing a folder renames up to three times (marker file, old aside, new in);
    whichever fails, the old version stays whole and no temporary is left."""
    target = tmp_path / "out"
    _write_version(target, "old")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == failing_call:
            raise OSError(5, "injected failure")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        _write_version(target, "new")
    monkeypatch.undo()
    assert _assert_whole(target, "old") == "old"


_KILL_AT_RENAME = """
import os, signal, sys
from stethoscope import atomic
real, calls, when = os.replace, [0], sys.argv[3]
def replace(src, dst):
    calls[0] += 1
    if calls[0] == int(sys.argv[2]) and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
    if calls[0] == int(sys.argv[2]) and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
with atomic.atomic_directory(sys.argv[1], kind="model") as tmp:
    (tmp / "a.txt").write_text("new")
    (tmp / "b.txt").write_text("new")
"""


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("rename", [1, 2, 3])
def test_a_kill_at_any_rename_leaves_one_whole_version_after_the_next_write(
        tmp_path, rename, when):
    target = tmp_path / "out"
    _write_version(target, "old")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", _KILL_AT_RENAME, str(target), str(rename),
                             when], env=env, capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    atomic.clean_stale(tmp_path, force_rescan=True)  # what the next write here does first
    _assert_whole(target, "old", "new")
    _write_version(target, "third")
    assert _assert_whole(target, "third") == "third"


def test_a_cut_between_the_two_renames_is_put_back(tmp_path):
    target = tmp_path / "out"
    _write_version(target, "old")
    aside = tmp_path / f".out.stethoscope-{2**22 + 7}-0badcafe.old"  # a pid that cannot exist
    os.replace(target, aside)  # the state a kill between the two renames leaves
    atomic.clean_stale(tmp_path, force_rescan=True)
    assert _assert_whole(target, "old") == "old"


def test_temporaries_of_live_processes_are_left_alone(tmp_path):
    live = tmp_path / f".out.stethoscope-{os.getppid()}-0badcafe.tmp"
    live.mkdir()
    assert atomic.clean_stale(tmp_path, force_rescan=True) == []
    assert live.is_dir()


def test_other_peoples_files_are_never_replaced(tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep")
    with pytest.raises(OutputError, match="refusing"), \
            atomic.atomic_directory(mine, kind="model") as tmp:
        (tmp / "x").write_text("x")
    report = tmp_path / "rep"
    with atomic.atomic_directory(report, kind="report"):
        pass
    with pytest.raises(OutputError, match="stethoscope report folder, not a stethoscope model"):
        atomic.check_replaceable(report, "model")
    assert (mine / "todo.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "rep"]


def test_prepare_output_asks_for_force_and_checks_writability(tmp_path):
    target = tmp_path / "m"
    atomic.prepare_output(target, "model")  # new: fine, and nothing is created
    assert not target.exists()
    _write_version(target, "v1")
    with pytest.raises(OutputError, match="--force"):
        atomic.prepare_output(target, "model")
    assert atomic.prepare_output(target, "model", force=True) == target
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        atomic.check_writable(tmp_path / "file" / "below")


def test_folders_of_older_versions_count_as_their_kind(tmp_path):
    legacy = tmp_path / "old-model"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    (legacy / "model.safetensors").write_bytes(b"")
    assert atomic.artefact_kind(legacy) == "model"
    (legacy / "my-notes.txt").write_text("x")  # once the user added a file, it is theirs
    assert atomic.artefact_kind(legacy) is None


def test_scratch_folders_are_named_after_their_process(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(atomic.tempfile, "tempdir", None)
    dead = tmp_path / f"stethoscope-features-{2**22 + 7}-0badcafe"
    dead.mkdir()
    with atomic.scratch_directory() as folder:
        assert str(os.getpid()) in folder.name and folder.is_dir()
        assert not dead.exists()
    assert list(tmp_path.iterdir()) == []


def test_model_files_are_written_with_the_same_mode(tmp_path):
    save_model(tmp_path / "m", {"model": "x"}, {"w": torch.ones(2)})
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("header, message", [
    ({"w": {"dtype": "F32", "shape": [10**10], "data_offsets": [0, 4 * 10**10]}}, "40.0 GB"),
    ({"w": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "invalid shape"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "byte range"),
])
def test_safetensors_headers_are_checked_before_any_allocation(tmp_path, header, message):
    import struct

    path = tmp_path / "m"
    save_model(path, {"model": "x"}, {"w": torch.ones(2)})
    raw = json.dumps(header).encode()
    with open(path / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    with pytest.raises(ModelFileError, match=message) as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_an_oversized_config_is_refused_unread(tmp_path, monkeypatch):
    from stethoscope import storage

    save_model(tmp_path / "m", {"model": "x"}, {"w": torch.ones(2)})
    monkeypatch.setattr(storage, "MAX_CONFIG_BYTES", 10)
    with pytest.raises(ModelFileError, match="config.json is"):
        load_model(tmp_path / "m")
