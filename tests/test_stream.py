"""Streams: PCM of real valve clips through a pipe into a real `stethoscope stream`, one
line per window as soon as the window is complete, scored as `det.score_waveform` scores
the same audio; WAV streams, float samples, posting windows, one-line errors."""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from stethoscope.cli import main
from stethoscope.detector import Detector
from stethoscope.edge import model_window_samples
from stethoscope.stream import PcmFormat, PcmReader, iter_windows, run_stream
from tests.conftest import SHARED_DATA
from tests.test_watch import RecordingService

ROOT = Path(__file__).resolve().parents[1]
RATE = 16_000
ENV = {**os.environ, "STETHOSCOPE_PROGRESS": "0"}


@pytest.fixture(scope="module")
def valve(tmp_path_factory) -> dict:
    """Real DCASE 2023 valve clips (8 to fit on, 3 to stream), or simulated valve clips."""
    real = SHARED_DATA / "dcase2023_valve"
    if real.is_dir():
        train = sorted((real / "train").glob("*.wav"))[:8]
        stream = sorted((real / "test").glob("*.wav"))[::30][:3]
    else:
        from stethoscope.simulate import simulate_dataset

        root = Path(simulate_dataset("valve", 10, 1, tmp_path_factory.mktemp("sim"), seed=0))
        normal = sorted(root.rglob("normal/*.wav"))
        train, stream = normal[:8], normal[8:] + sorted(root.rglob("abnormal/*.wav"))
    pcm = np.concatenate([soundfile.read(p, dtype="int16")[0] for p in stream])
    return {"train": train, "pcm": pcm}


@pytest.fixture(scope="module")
def model(valve, tmp_path_factory) -> dict:
    from stethoscope.export import export_onnx

    base = tmp_path_factory.mktemp("model")
    Detector(device="cpu", progress=False).fit(valve["train"]).save(base / "model")
    return {"det": Detector.load(base / "model", device="cpu", progress=False),
            "folder": base / "model", "onnx": export_onnx(base / "model", base / "m.onnx")}


def expected_scores(det: Detector, wave: np.ndarray, window: int, hop: int) -> list[float]:
    starts = range(0, wave.shape[-1] - window + 1, hop)
    return [det.score_waveform(wave[..., s:s + window], RATE).score for s in starts]


def stream_command(model_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stethoscope", "stream", "--model", str(model_path),
            "--rate", str(RATE), *extra]


def test_pipe_gives_one_line_per_window_scored_like_score_waveform(model, valve):
    pcm = valve["pcm"]
    proc = subprocess.run(stream_command(model["folder"], "--format", "s16le", "--hop", "5"),
                          input=pcm.tobytes(), capture_output=True, cwd=ROOT, env=ENV,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    det = model["det"]
    window = model_window_samples(det.feature_config_.to_dict(), det.input_shape_[2])
    wave = (pcm.astype(np.float32) / 32768)[None]
    expected = expected_scores(det, wave, window, 5 * RATE)
    assert len(lines) == len(expected) == (len(pcm) - window) // (5 * RATE) + 1
    for i, (line, score) in enumerate(zip(lines, expected, strict=True)):
        assert line["window"] == i
        assert line["start_s"] == pytest.approx(5.0 * i)
        assert line["end_s"] == pytest.approx(5.0 * i + window / RATE)
        assert line["score"] == pytest.approx(score, rel=1e-6)
        assert line["anomalous"] == (score > det.threshold_.value_)
        assert line["compute_ms"] > 0 and line["error"] is None
    assert len({round(line["score"], 6) for line in lines}) > 1


def test_a_window_is_printed_as_soon_as_it_is_complete(model, valve):
    """Lines come while the stream is still open: the first window's line before any sample
    of the second window is written."""
    pcm = valve["pcm"]
    proc = subprocess.Popen(stream_command(model["onnx"]), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env={**ENV, "STETHOSCOPE_PROGRESS": "1"})  # its notes on stderr
    try:
        window = model_window(model)
        proc.stdin.write(pcm[:window].tobytes())
        proc.stdin.flush()
        first = read_line(proc, timeout=60)
        assert first is not None, "no line for a complete window while the stream is open"
        assert json.loads(first)["window"] == 0
        proc.stdin.write(pcm[window:window + window // 2].tobytes())  # half a window
        proc.stdin.flush()
        assert read_line(proc, timeout=1.0) is None  # nothing until the window is complete
        proc.stdin.write(pcm[window + window // 2: 2 * window].tobytes())
        proc.stdin.flush()
        second = read_line(proc, timeout=30)
        assert second is not None and json.loads(second)["window"] == 1
        proc.stdin.write(pcm[2 * window: 2 * window + RATE].tobytes())  # a 1 s tail
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
        assert proc.stdout.read() == b""
        assert "last 1 s were shorter than a window" in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()


def model_window(model: dict) -> int:
    from stethoscope.edge import EdgeScorer

    return EdgeScorer(model["onnx"]).window_samples


def read_line(proc: subprocess.Popen, timeout: float) -> bytes | None:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else None


def test_wav_streams_and_float_samples_score_alike(model, valve):
    pcm = valve["pcm"]
    as_float = (pcm.astype(np.float32) / 32768).astype("<f4")
    wav = io.BytesIO()
    soundfile.write(wav, pcm, RATE, subtype="PCM_16", format="WAV")
    runs = {
        "s16le": ("s16le", pcm.tobytes()),
        "f32le": ("f32le", as_float.tobytes()),
        "wav": ("wav", wav.getvalue()),
        "sniffed": ("s16le", wav.getvalue()),  # a raw format that starts with RIFF
    }
    scores = {}
    for name, (encoding, data) in runs.items():
        out = io.StringIO()
        count = run_stream(model=str(model["onnx"]), encoding=encoding, rate=RATE,
                           stdin=io.BytesIO(data), stdout=out)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert count == len(lines) == len(pcm) // model_window(model)
        scores[name] = [line["score"] for line in lines]
    for name in ("f32le", "wav", "sniffed"):
        assert scores[name] == pytest.approx(scores["s16le"], rel=1e-6), name


def test_windows_are_cut_exactly_from_a_pipe_that_returns_short_reads():
    class Trickle(io.RawIOBase):  # at most 7 bytes a read, as a slow pipe may give
        def __init__(self, data: bytes) -> None:
            self.data = memoryview(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            n = min(7, len(self.data), len(buffer))
            buffer[:n] = self.data[:n]
            self.data = self.data[n:]
            return n

    samples = np.arange(1000, dtype="<i2")
    reader = PcmReader(Trickle(samples.tobytes() + b"\x01"), PcmFormat("s16le", RATE, 1))
    windows = list(iter_windows(reader, 300, 200))
    assert [start for start, _ in windows] == [0, 200, 400, 600]
    for start, wave in windows:
        np.testing.assert_array_equal(wave[0] * 32768, samples[start:start + 300])
    assert reader.tail == 100 and reader.leftover_bytes == 1


def test_stream_posts_each_window_as_a_wav(model, valve):
    service = RecordingService(plan=[503])
    try:
        out = io.StringIO()
        pcm = valve["pcm"]
        count = run_stream(model=str(model["onnx"]), encoding="s16le", rate=RATE,
                           stdin=io.BytesIO(pcm.tobytes()), stdout=out, server=service.url,
                           token="t0k", machine="valve-3")
    finally:
        service.close()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    window = model_window(model)
    assert count == len(lines) == len(service.accepted()) == len(pcm) // window
    # the first try met a 503 and was retried: the windows are the service's recordings 2..
    assert [line["server"]["recording_id"] for line in lines] == list(range(2, count + 2))
    for i, (line, posted) in enumerate(zip(lines, service.accepted(), strict=True)):
        assert posted["path"] == "/v1/machines/valve-3/recordings"
        assert posted["headers"]["Authorization"] == "Bearer t0k"
        assert posted["headers"]["Content-Type"] == "audio/wav"
        samples, rate = soundfile.read(io.BytesIO(posted["body"]), dtype="int16")
        assert rate == RATE
        np.testing.assert_array_equal(samples, pcm[i * window:(i + 1) * window])
        assert line["score"] is not None  # scored locally as well


@pytest.mark.parametrize("args, message", [
    (["--rate", "44100"], "the model needs 16000 Hz"),
    (["--window", "2"], "is shorter than the model's"),
    (["--format", "wav"], "is not a WAV stream"),
])
def test_bad_streams_are_one_line_errors(model, args, message, capsysbinary, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\x00\x01" * 50000)))
    code = main(["stream", "--model", str(model["onnx"]), *args])
    err = capsysbinary.readouterr().err.decode()
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_device_without_sounddevice_is_a_clean_error(model, capsys):
    try:
        import sounddevice  # noqa: F401
    except (ImportError, OSError):
        pass
    else:
        pytest.skip("sounddevice is installed here: the error path cannot be shown")
    started = time.monotonic()
    assert main(["stream", "--model", str(model["onnx"]), "--device", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'stethoscope[microphone]'" in err
    assert time.monotonic() - started < 30


def test_stream_scores_on_the_threads_it_is_given(model, valve):
    """`--threads` (default 1) sets the model's compute threads; the scores do not change."""
    import io

    import torch

    from stethoscope.stream import run_stream

    before = torch.get_num_threads()
    pcm = valve["pcm"][: 12 * RATE].tobytes()
    try:
        lines = {}
        for threads in (1, 2):
            out = io.StringIO()
            assert run_stream(model=str(model["folder"]), stdin=io.BytesIO(pcm), stdout=out,
                              threads=threads) == 1
            assert torch.get_num_threads() == threads
            lines[threads] = json.loads(out.getvalue())
    finally:
        torch.set_num_threads(before)
    assert lines[1]["score"] == pytest.approx(lines[2]["score"], rel=1e-6)


@pytest.mark.parametrize("kind", ["folder", "onnx"])
def test_a_stream_at_another_rate_is_resampled_when_asked(model, valve, tmp_path, kind):
    """A 48 kHz stream (a typical sound card) scored by a 16 kHz model with --resample
    scores each window as `score --resample` scores the same audio as a WAV file; without
    --resample it is a one-line error that says what to do."""
    from stethoscope.audio import resample_wave

    window = model_window(model)
    clips = (valve["pcm"][: 2 * window].astype(np.float32) / 32768)[None]
    high = np.round(resample_wave(clips, RATE, 48_000) * 32767).clip(-32768, 32767)
    pcm48 = high.astype("<i2")[0]
    expected = []
    for i in range(2):
        path = tmp_path / f"w{i}.wav"
        soundfile.write(path, pcm48[i * 3 * window:(i + 1) * 3 * window], 48_000,
                        subtype="PCM_16")
        expected.append(Detector.load(model["folder"], resample=True, progress=False)
                        .score_recordings([path])[0].score)
    command = stream_command(model[kind], "--rate", "48000", "--resample")
    proc = subprocess.run(command, input=pcm48.tobytes(), capture_output=True, cwd=ROOT,
                          env=ENV, timeout=180)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [line["end_s"] for line in lines] == pytest.approx([window / RATE, 2 * window / RATE])
    assert [line["score"] for line in lines] == pytest.approx(expected, rel=1e-4)
    refused = subprocess.run(stream_command(model[kind], "--rate", "48000"),
                             input=pcm48.tobytes(), capture_output=True, cwd=ROOT, env=ENV,
                             timeout=180)
    assert refused.returncode == 2 and b"--resample" in refused.stderr
    assert refused.stderr.count(b"\n") == 1 and b"Traceback" not in refused.stderr
