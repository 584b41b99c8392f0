"""Finding recordings and reading labels, sections and domains from MIMII and DCASE paths."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from stethoscope.datasets import Clip, find_clips, groups_of, labels_of, parse_clip
from stethoscope.errors import DataError


def write_wav(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, 0.1 * np.sin(np.arange(1600) / 5.0), 16000, subtype="PCM_16")
    return path


# ---------------------------------------------------------------- parse_clip


@pytest.mark.parametrize("folder,label", [("normal", 0), ("abnormal", 1)])
def test_parse_mimii_layout(folder, label):
    clip = parse_clip(Path("data/6_dB_pump/pump/id_04") / folder / "00000012.wav")
    assert clip.label == label
    assert (clip.machine, clip.machine_id) == ("pump", "id_04")
    assert clip.section is None and clip.domain is None


@pytest.mark.parametrize("name,label,section,domain,split,attributes", [
    ("section_00_source_train_normal_0007_pat_01.wav", 0, "00", "source", "train", "pat_01"),
    ("section_02_target_test_anomaly_0013_car_A1_spd_28V_mic_1.wav", 1, "02", "target",
     "test", "car_A1_spd_28V_mic_1"),
    ("section_01_source_test_normal_0003.wav", 0, "01", "source", "test", None),
])
def test_parse_dcase_task2_names(name, label, section, domain, split, attributes):
    clip = parse_clip(Path("dev") / "valve" / "test" / name)
    assert clip.label == label
    assert (clip.section, clip.domain, clip.split) == (section, domain, split)
    assert clip.attributes == attributes
    assert clip.machine == "valve"


def test_dcase_name_is_authoritative_over_folder():
    clip = parse_clip("dcase2023_valve/train/section_00_source_test_normal_0000_pat_01.wav")
    assert (clip.label, clip.split, clip.domain, clip.section) == (0, "test", "source", "00")


def test_dcase_machine_unknown_without_split_folder():
    assert parse_clip("mixed/section_00_target_test_anomaly_0001.wav").machine is None


@pytest.mark.parametrize("name,label", [("normal_id_00_00000004.wav", 0),
                                        ("anomaly_id_06_00000123.wav", 1)])
def test_parse_dcase2020_names(name, label):
    clip = parse_clip(Path("ToyCar") / "test" / name)
    assert clip.label == label
    assert (clip.machine, clip.split) == ("ToyCar", "test")
    assert clip.machine_id in ("id_00", "id_06")


def test_unlabelled_evaluation_names_keep_section():
    clip = parse_clip("bearing/test/section_03_0042.wav")
    assert clip.label is None
    assert (clip.section, clip.machine, clip.split) == ("03", "bearing", "test")


@pytest.mark.parametrize("path", ["recordings/pump_2024-05-01.wav", "fan_normal.wav",
                                  "x/normal/00000001.wav", "id_00/normal"])
def test_other_names_have_unknown_label(path):
    assert parse_clip(path).label is None


# ---------------------------------------------------------------- find_clips on built trees


def test_find_clips_in_mimii_tree(tmp_path):
    for machine, ident, folder, n in [("fan", "id_00", "normal", 3), ("fan", "id_00",
                                      "abnormal", 2), ("valve", "id_02", "normal", 1)]:
        for i in range(n):
            write_wav(tmp_path / machine / ident / folder / f"{i:08d}.wav")
    clips = find_clips(tmp_path)
    assert len(clips) == 6
    assert [str(c.path) for c in clips] == sorted(str(c.path) for c in clips)
    assert labels_of(clips).tolist() == [1, 1, 0, 0, 0, 0]
    assert Counter(c.machine for c in clips) == {"fan": 5, "valve": 1}
    assert groups_of(clips, "machine_id").tolist() == ["id_00"] * 5 + ["id_02"]
    assert groups_of(clips, "domain") is None


def test_find_clips_in_dcase_tree(tmp_path):
    names = ["section_00_source_train_normal_0000_a.wav",
             "section_00_target_train_normal_0000_b.wav"]
    for name in names:
        write_wav(tmp_path / "slider" / "train" / name)
    write_wav(tmp_path / "slider" / "test" / "section_00_target_test_anomaly_0000_b.WAV")
    clips = find_clips([tmp_path / "slider" / "train", tmp_path / "slider" / "test"])
    assert [c.label for c in clips] == [0, 0, 1]
    assert groups_of(clips, "domain").tolist() == ["source", "target", "target"]
    assert groups_of(clips, "section").tolist() == ["00"] * 3
    assert {c.machine for c in clips} == {"slider"}


def test_recursive_flag_and_hidden_files(tmp_path):
    write_wav(tmp_path / "top.wav")
    write_wav(tmp_path / "sub" / "deep.wav")
    write_wav(tmp_path / "._top.wav")  # macOS resource-fork copy from a zip
    write_wav(tmp_path / ".cache" / "x.wav")
    (tmp_path / "notes.txt.bak").write_text("not audio")
    assert [c.path.name for c in find_clips(tmp_path)] == ["deep.wav", "top.wav"]
    assert [c.path.name for c in find_clips(tmp_path, recursive=False)] == ["top.wav"]


def test_files_and_duplicates(tmp_path):
    a = write_wav(tmp_path / "a.wav")
    b = write_wav(tmp_path / "b.wav")
    clips = find_clips([b, str(a), tmp_path])
    assert [c.path.name for c in clips] == ["b.wav", "a.wav"]
    assert all(isinstance(c, Clip) for c in clips)


def test_list_file_relative_to_its_folder(tmp_path):
    write_wav(tmp_path / "data" / "one.wav")
    write_wav(tmp_path / "data" / "more" / "two.wav")
    listing = tmp_path / "data" / "clips.lst"
    listing.write_text("# training clips\none.wav\n\nmore\n")
    assert [c.path.name for c in find_clips(listing)] == ["one.wav", "two.wav"]


def test_list_naming_a_missing_file(tmp_path):
    listing = tmp_path / "clips.txt"
    listing.write_text("gone.wav\n")
    with pytest.raises(DataError, match="no such file or folder.*listed in"):
        find_clips(listing)


# ---------------------------------------------------------------- real DCASE data


def test_real_dcase_valve_test_set(dcase_valve):
    clips = find_clips(dcase_valve / "test")
    assert len(clips) == 140
    labels = labels_of(clips)
    assert labels.dtype.kind == "i" and int(labels.sum()) == 100
    domains = groups_of(clips, "domain")
    assert set(domains) == {"source", "target"}
    assert set(groups_of(clips, "section")) == {"00"}
    assert all(c.split == "test" for c in clips)


def test_real_dcase_valve_train_set_is_all_normal(dcase_valve):
    clips = find_clips(dcase_valve / "train")
    assert len(clips) == 60
    assert not labels_of(clips).any()


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="no such file or folder") as info:
        find_clips(missing)
    assert info.value.path == missing and str(missing) in str(info.value)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("nothing here")
    with pytest.raises(DataError, match="no WAV files found in this folder"):
        find_clips(tmp_path / "empty")


def test_non_wav_file_given_explicitly(tmp_path):
    mp3 = tmp_path / "song.mp3"
    mp3.write_bytes(b"ID3")
    with pytest.raises(DataError, match="not a WAV file") as info:
        find_clips([mp3])
    assert info.value.path == mp3


def test_no_inputs():
    with pytest.raises(DataError):
        find_clips([])


def test_labels_of_unknown_label_names_the_file(tmp_path):
    clips = [parse_clip("fan/id_00/normal/00000000.wav"), parse_clip(tmp_path / "mine.wav")]
    with pytest.raises(DataError, match="label unknown") as info:
        labels_of(clips)
    assert info.value.path == tmp_path / "mine.wav"


def test_groups_of_rejects_unknown_key():
    with pytest.raises(ValueError, match="group key"):
        groups_of([parse_clip("a.wav")], "colour")
