"""Compute per 10 s window when monitoring: ``stethoscope stream`` and PyTorch vs onnxruntime.

Two measurements, in one run:

1. **`stream` through a pipe.** A real ``stethoscope stream`` subprocess is fed raw PCM of
   real valve clips (seeded noise without the shared data) as fast as it reads, once with the
   default model's folder (PyTorch) and once with its ONNX export; every output line carries
   the compute time of its window (``compute_ms``: features + model + pooling). Reported:
   median and p99 over the windows. Target: median <= 5 ms with the default model.
2. **PyTorch vs onnxruntime, per model.** Every exportable model is fitted (trained ones for
   one epoch: latency does not depend on the weights) on the real valve training clips,
   saved, loaded back and exported; then one 10 s window is scored by both runtimes,
   alternated call by call after a warm-up (``DetectorScorer.score_waveform`` and
   ``EdgeScorer.score_waveform``, the calls ``stream`` makes), with all cores and with one
   thread (torch threads and onnxruntime intra-op threads alike). Reported: medians and
   their ratio. Target: onnxruntime no slower than PyTorch.

    python benchmarks/streaming.py              # all models, 200 calls each
    python benchmarks/streaming.py --quick      # default model only, 30 calls
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import (
    REPO,
    add_common_arguments,
    ensure_repo_on_path,
    logger,
    machine_line,
    markdown_table,
    median,
    percentile,
    publish,
    shown_command,
    usable_cores,
)

ensure_repo_on_path()

import soundfile  # noqa: E402
import torch  # noqa: E402

from stethoscope.detector import DEFAULT_MODEL, Detector  # noqa: E402
from stethoscope.edge import DetectorScorer, EdgeScorer  # noqa: E402
from stethoscope.export import export_onnx, export_support  # noqa: E402

SECTION = "streaming"
DOC = REPO / "docs" / "monitoring.md"
VALVE = REPO.parent / "shared" / "data" / "dcase2023_valve"
SAMPLE_RATE = 16_000
TARGET_STREAM_MS = 5.0


def training_clips(folder: Path, count: int) -> tuple[list[Path], str]:
    """Real valve training clips, or seeded noise clips written to ``folder``."""
    real = sorted((VALVE / "train").glob("*.wav")) if VALVE.is_dir() else []
    if real:
        return real[:count], f"{min(count, len(real))} real DCASE 2023 valve training clips"
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"noise_{i:03d}.wav"
        soundfile.write(path, 0.1 * rng.standard_normal(10 * SAMPLE_RATE), SAMPLE_RATE,
                        subtype="PCM_16")
        paths.append(path)
    return paths, f"{count} seeded-noise clips (no shared data)"


def test_audio(count: int) -> tuple[np.ndarray, str]:
    """``count`` 10 s clips end to end as float32 ``(n,)``: real valve test clips or noise."""
    real = sorted((VALVE / "test").glob("*.wav")) if VALVE.is_dir() else []
    if real:
        waves = [soundfile.read(p, dtype="float32")[0] for p in real[:count]]
        return np.concatenate(waves), f"{len(waves)} real valve test clips"
    rng = np.random.default_rng(1)
    return (0.1 * rng.standard_normal(count * 10 * SAMPLE_RATE)).astype(np.float32), \
        f"{count} seeded-noise clips"


def fitted_model(name: str, clips: list[Path], folder: Path) -> tuple[Path, Path]:
    """Fit ``name`` (one epoch when trained), save it and export it; returns both paths."""
    det = Detector(name, epochs=1, device="cpu", progress=False).fit(clips)
    det.save(folder / name)
    export_onnx(folder / name, folder / f"{name}.onnx", force=True)
    return folder / name, folder / f"{name}.onnx"


# ----------------------------------------------------------------------------- stream
def stream_compute(model: Path, pcm: bytes) -> list[float]:
    """compute_ms of every window of a real `stethoscope stream` fed ``pcm`` (s16le)."""
    env = {**os.environ, "STETHOSCOPE_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-m", "stethoscope", "stream", "--model", str(model),
                           "--format", "s16le", "--rate", str(SAMPLE_RATE)],
                          input=pcm, capture_output=True, check=True, env=env, cwd=REPO)
    return [json.loads(line)["compute_ms"] for line in proc.stdout.decode().splitlines()]


# ----------------------------------------------------------------------------- runtimes
def scorers(folder: Path, onnx_file: Path, threads: int) -> dict[str, object]:
    torch.set_num_threads(threads)
    return {"PyTorch": DetectorScorer(folder, device="cpu"),
            "onnxruntime": EdgeScorer(onnx_file, threads=threads)}


def alternate_calls(sides: dict[str, object], window: np.ndarray, runs: int, warmup: int,
                    budget_s: float) -> dict[str, list[float]]:
    """Milliseconds per ``score_waveform`` of each side, alternated call by call; fewer
    than ``runs`` rounds (at least 20) when they would take more than ``budget_s``."""
    start = time.perf_counter()
    for _ in range(warmup):
        for side in sides.values():
            side.score_waveform(window, SAMPLE_RATE)
    per_round = (time.perf_counter() - start) / max(warmup, 1)
    runs = min(runs, max(20, int(budget_s / max(per_round, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(runs):
        for name, side in sides.items():
            start = time.perf_counter_ns()
            side.score_waveform(window, SAMPLE_RATE)
            times[name].append((time.perf_counter_ns() - start) / 1e6)
    return times


def agreement(sides: dict[str, object], window: np.ndarray) -> float:
    scores = [side.score_waveform(window, SAMPLE_RATE)["score"] for side in sides.values()]
    return abs(scores[0] - scores[1]) / max(abs(scores[0]), 1e-12)


# ----------------------------------------------------------------------------- report
def report(stream_rows: list, runtime_rows: list, notes: list[str], args) -> str:
    stream_table = markdown_table(
        ["model file", "windows", "median ms", "p99 ms", "target (median)"], stream_rows)
    runtime_table = markdown_table(
        ["model", "threads", "calls", "PyTorch median ms", "onnxruntime median ms",
         "onnxruntime / PyTorch", "p99 ms (PyTorch / ORT)", "score rel. difference"],
        runtime_rows)
    return "\n".join([
        "## Compute per 10 s window when monitoring",
        "",
        machine_line({"onnxruntime": _version("onnxruntime")}),
        "",
        *notes,
        "",
        f"**`stethoscope stream` through a pipe** (`compute_ms` of each window, the default "
        f"model `{DEFAULT_MODEL}`):",
        "",
        stream_table,
        "",
        f"**PyTorch vs onnxruntime, one 10 s window** (up to {args.runs} calls each, fewer "
        f"where they would take over {args.budget:g} s, alternated call by call after "
        f"{args.warmup}; the ratio is of the medians):",
        "",
        runtime_table,
        "",
        f"Command: `{shown_command('streaming.py', args.argv)}`",
    ])


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="timed calls per runtime")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first")
    parser.add_argument("--windows", type=int, default=40,
                        help="10 s windows fed to each `stream` run")
    parser.add_argument("--models", default=None,
                        help="comma-separated models (default: every exportable one)")
    parser.add_argument("--threads", default=f"{usable_cores()},1",
                        help="comma-separated thread counts (default: all cores, 1)")
    parser.add_argument("--train-clips", type=int, default=60, help="clips to fit on")
    parser.add_argument("--budget", type=float, default=10.0,
                        help="seconds of timed calls per model and thread count at most")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the default model, 30 calls, 8 windows")
    add_common_arguments(parser)
    parser.set_defaults(doc=DOC)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.runs, args.warmup = min(args.runs, 30), min(args.warmup, 5)
        args.windows, args.train_clips = min(args.windows, 8), min(args.train_clips, 12)
        args.models = args.models or DEFAULT_MODEL
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = logger(args.quiet)
    names = args.models.split(",") if args.models else [
        n for n, reason in export_support().items() if reason is None]
    names = [DEFAULT_MODEL] + [n for n in names if n != DEFAULT_MODEL]
    thread_counts = list(dict.fromkeys(int(t) for t in args.threads.split(",") if t.strip()))
    with tempfile.TemporaryDirectory(prefix="stethoscope-bench-") as tmp:
        tmp = Path(tmp)
        clips, clip_desc = training_clips(tmp, args.train_clips)
        audio, audio_desc = test_audio(1)
        stream_audio, stream_desc = test_audio(args.windows)
        notes = [f"Models fitted on {clip_desc}; trained models for one epoch (latency does "
                 f"not depend on the weights). Windows cut from {audio_desc}; `stream` fed "
                 f"{stream_desc}."]
        runtime_rows, stream_rows = [], []
        for name in names:
            log(f"{name}: fitting, saving, exporting…")
            folder, onnx_file = fitted_model(name, clips, tmp)
            if name == DEFAULT_MODEL:
                pcm = (np.clip(stream_audio, -1, 1) * 32767).astype("<i2").tobytes()
                for label, path in (("model folder (PyTorch)", folder),
                                    ("ONNX export (onnxruntime)", onnx_file)):
                    log(f"  stream with the {label}…")
                    ms = stream_compute(path, pcm)
                    ok = median(ms) <= TARGET_STREAM_MS
                    stream_rows.append([label, len(ms), f"{median(ms):.2f}",
                                        f"{percentile(ms, 99):.2f}",
                                        f"≤ {TARGET_STREAM_MS:g} ms {'✓' if ok else '✗'}"])
            for threads in thread_counts:
                sides = scorers(folder, onnx_file, threads)
                window = audio[: sides["PyTorch"].window_samples][None]
                log(f"  {threads} thread(s): {args.runs} calls each…")
                times = alternate_calls(sides, window, args.runs, args.warmup,
                                        args.budget)
                pt, ort_ = median(times["PyTorch"]), median(times["onnxruntime"])
                runtime_rows.append([
                    name, threads, len(times["PyTorch"]), f"{pt:.2f}", f"{ort_:.2f}",
                    f"{ort_ / pt:.2f}×",
                    f"{percentile(times['PyTorch'], 99):.2f} / "
                    f"{percentile(times['onnxruntime'], 99):.2f}",
                    f"{agreement(sides, window):.1e}"])
    text = report(stream_rows, runtime_rows, notes, args)
    publish(SECTION, text, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
