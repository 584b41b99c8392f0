"""Model folders and atomic writes: round trips, clear errors, nothing half-written."""

from __future__ import annotations

import json

import pytest
import torch

from stethoscope.errors import ModelFileError
from stethoscope.storage import (
    FORMAT_VERSION,
    atomic_directory,
    atomic_write_text,
    load_model,
    save_model,
)


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
