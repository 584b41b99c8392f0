"""Recordings of any length: windows on real long and mixed-length recordings."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from stethoscope import Detector
from stethoscope.datasets import find_clips, labels_of
from stethoscope.errors import DataError
from stethoscope.features import FeatureConfig, window_starts


def test_window_starts_cover_the_recording_and_align_the_last_window_to_its_end():
    cfg = FeatureConfig(window_s=10.0, window_hop_s=5.0)
    assert window_starts(16000 * 10, cfg) == [0]
    assert window_starts(16000 * 20, cfg) == [0, 80000, 160000]
    assert window_starts(16000 * 12, cfg) == [0, 32000]  # the last window ends at 12 s
    with pytest.raises(DataError, match="shorter than the model's 10 s window"):
        window_starts(1600, cfg, "short.wav")
    assert window_starts(1600, cfg.replace(pad_short=True)) == [0]


@pytest.fixture(scope="module")
def valve_detector(request):
    from tests.conftest import shared_path

    folder = shared_path("dcase2023_valve")
    return Detector(progress=False).fit(folder / "train"), folder


def test_a_five_minute_recording_flags_the_stretches_its_anomalous_clips_fill(
        valve_detector, tmp_path):
    det, folder = valve_detector
    clips = find_clips(folder / "test")
    labels = labels_of(clips)
    by_clip = det.score_samples(clips)
    flags = by_clip > det.threshold_.value_
    normal = [i for i in np.flatnonzero(labels == 0) if not flags[i]][:25]
    anomalous = [i for i in np.argsort(-by_clip) if labels[i] == 1 and flags[i]][:5]
    assert len(normal) == 25 and len(anomalous) == 5
    order = normal[:4] + [anomalous[0]] + normal[4:10] + anomalous[1:3] + normal[10:20] + \
        [anomalous[3]] + normal[20:] + [anomalous[4]]
    waves = [sf.read(str(clips[i].path), dtype="int16")[0] for i in order]
    long_wav = tmp_path / "shift.wav"
    sf.write(str(long_wav), np.concatenate(waves), 16000, subtype="PCM_16")
    assert sf.info(str(long_wav)).duration == pytest.approx(300.0)

    [result] = det.score_recordings([long_wav])
    assert result.ok and len(result.windows) == 30
    starts = [w.start_s for w in result.windows]
    assert starts == pytest.approx([10.0 * k for k in range(30)])
    flagged = {k for k, w in enumerate(result.windows) if w.anomalous}
    assert flagged == {k for k, i in enumerate(order) if i in anomalous}
    np.testing.assert_allclose([w.score for w in result.windows], by_clip[order], rtol=1e-4,
                               atol=1e-4)
    assert result.anomalous and result.score == pytest.approx(max(by_clip[order]), rel=1e-4)


def test_mixed_length_real_clips_train_and_score_together(request):
    from tests.conftest import shared_path

    mixed = shared_path("dcase2023_mixed")
    train = sorted(mixed.glob("*/train/*.wav"))
    lengths = {round(sf.info(str(p)).duration) for p in train}
    assert lengths == {10, 12}
    det = Detector(progress=False).fit(train)
    assert det.feature_config_.window_s == pytest.approx(10.0)
    results = det.score_recordings(sorted(mixed.glob("*/test/*.wav")))
    assert all(r.ok for r in results)
    for r in results:
        seconds = sf.info(r.path).duration
        assert len(r.windows) == (2 if seconds > 11 else 1)
        assert r.windows[-1].end_s == pytest.approx(seconds, abs=0.02)
        assert r.score == pytest.approx(max(w.score for w in r.windows))


def test_a_clip_shorter_than_the_window_is_an_error_naming_it_unless_padded(
        valve_detector, tmp_path):
    det, folder = valve_detector
    wave, rate = sf.read(str(sorted((folder / "test").glob("*.wav"))[0]), dtype="int16")
    short = tmp_path / "short.wav"
    sf.write(str(short), wave[: rate // 10], rate, subtype="PCM_16")
    [result] = det.score_recordings([short])
    assert not result.ok and str(short) in result.error and "shorter" in result.error
    det_pad = Detector(features={"pad_short": True}, progress=False).fit(folder / "train")
    [ok] = det_pad.score_recordings([short])
    assert ok.ok and len(ok.windows) == 1


def test_the_evaluation_report_draws_timelines_of_long_recordings(valve_detector, tmp_path):
    from stethoscope.evaluation import evaluate_detector

    det, folder = valve_detector
    clips = find_clips(folder / "test")
    labels = labels_of(clips)
    normal = [c for c, y in zip(clips, labels, strict=True) if y == 0][:6]
    anomalous = [c for c, y in zip(clips, labels, strict=True) if y == 1][:3]
    layout = tmp_path / "valve" / "id_00"
    for name, parts in (("normal", normal[:3]), ("normal", normal[3:6]),
                        ("abnormal", [normal[0], *anomalous[:2]])):
        out = layout / name
        out.mkdir(parents=True, exist_ok=True)
        index = len(list(out.glob("*.wav")))
        waves = [sf.read(str(c.path), dtype="int16")[0] for c in parts]
        sf.write(str(out / f"{index:08d}.wav"), np.concatenate(waves), 16000, subtype="PCM_16")
    result = evaluate_detector(det, layout, report_dir=tmp_path / "report")
    assert [len(r.windows) for r in result["recordings"]] == [3, 3, 3]
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Where along the recordings" in page
    assert (tmp_path / "report" / "figures" / "timeline_0.png").stat().st_size > 5_000


def test_cli_trains_with_window_and_hop_and_score_json_lists_the_windows(valve_detector, tmp_path):
    import json
    import subprocess
    import sys

    _, folder = valve_detector
    wave, rate = sf.read(str(sorted((folder / "train").glob("*.wav"))[0]), dtype="int16")
    data = tmp_path / "long"
    data.mkdir()
    for k in range(4):
        sf.write(str(data / f"{k}.wav"), np.concatenate([wave, wave, wave]), rate,
                 subtype="PCM_16")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "stethoscope", *args], capture_output=True,
                              text=True, cwd=tmp_path)

    trained = run("train", str(data), "--out", "m", "--window", "10s", "--hop", "5s", "--json")
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout)
    assert summary["recordings"] == 4 and summary["windows"] == 4 * 5
    assert summary["window_s"] == 10.0
    scored = run("score", "m", str(data / "0.wav"), "--json")
    assert scored.returncode in (0, 1), scored.stderr
    [clip] = json.loads(scored.stdout)["clips"]
    assert [w["start_s"] for w in clip["windows"]] == [0.0, 5.0, 10.0, 15.0, 20.0]
