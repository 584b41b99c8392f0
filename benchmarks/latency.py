"""Scoring latency of one 10 s clip on the CPU, warm: median and 99th percentile.

The default detector (trained for one epoch on random spectrograms — latency does not
depend on the weights — then saved and loaded back, as a deployed scorer would be) scores
one clip in four ways, alternated call by call:

* waveform in memory → score: ``features.logmel`` + ``Detector.score_features``
  (features, model, pooling): what a live monitor holding audio buffers pays;
* WAV path → score: ``Detector.score_samples(path)`` (reading, features, model, pooling);
* the two halves apart: log-mel only, and model + pooling only.

    python benchmarks/latency.py              # 200 calls each, all cores and 1 thread
    python benchmarks/latency.py --quick
"""

from __future__ import annotations

import argparse
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
from stethoscope.features import FeatureConfig, crop_frames, logmel  # noqa: E402
from stethoscope.models import registry  # noqa: E402

SECTION = "latency"
CLIP = REPO.parent / "shared" / "data" / "dcase2023_valve" / "test"
SAMPLE_RATE = 16_000
TARGET_MS = 2.0  # waveform → score, median


def default_detector(folder: Path, model: str) -> Detector:
    """A fitted detector of the default model, saved and loaded back (weights: 1 epoch on noise)."""
    config = FeatureConfig().replace(**registry.info(model).features)
    frames = config.frames or 1 + 10 * config.sample_rate // config.hop_length
    channels = 1
    rng = np.random.default_rng(0)
    specs = (rng.standard_normal((8, channels, config.n_mels, frames)) * 10 - 60).astype(
        np.float32)
    Detector(model, epochs=1, device="cpu", progress=False).fit(specs).save(folder / "model")
    return Detector.load(folder / "model", device="cpu", progress=False)


def test_clip(folder: Path) -> tuple[np.ndarray, Path, str]:
    """A real 10 s clip when the shared data is there, else seeded noise; as array and WAV."""
    real = sorted(CLIP.glob("*.wav")) if CLIP.is_dir() else []
    if real:
        wave = soundfile.read(real[0], dtype="float32", always_2d=True)[0][:, 0]
        return wave, real[0], f"real clip `{real[0].name}`"
    wave = (0.1 * np.random.default_rng(1).standard_normal(10 * SAMPLE_RATE)).astype(np.float32)
    path = folder / "noise.wav"
    soundfile.write(path, wave, SAMPLE_RATE, subtype="PCM_16")
    return wave, path, "seeded noise clip"


def paths_to_time(det: Detector, wave: np.ndarray, path: Path,
                  reference: Detector | None = None) -> dict:
    """The callables to time, each scoring (or half-scoring) the one clip; with a reference
    detector, its model + pooling too (the same features), timed in the same rounds."""
    config = det.feature_config_
    spec = crop_frames(logmel(wave[None], config), config.frames, None)[None]
    extra = {}
    if reference is not None:
        ref_config = reference.feature_config_
        ref_spec = crop_frames(logmel(wave[None], ref_config), ref_config.frames, None)[None]
        extra[f"model + pooling only, reference `{reference.model}`"] = \
            lambda: float(reference.score_features(ref_spec)[0])

    def from_waveform() -> float:
        features = crop_frames(logmel(wave[None], config), config.frames, None)
        return float(det.score_features(features[None])[0])

    return {
        "waveform → score (features + model + pooling)": from_waveform,
        "WAV path → score (`score_samples(path)`)": lambda: float(det.score_samples(path)[0]),
        "log-mel only": lambda: logmel(wave[None], config),
        "model + pooling only": lambda: float(det.score_features(spec)[0]),
        **extra,
    }


def measure(calls: dict, runs: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds of every call, alternating the callables call by call after a warm-up."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, fn in calls.items():
            start = time.perf_counter_ns()
            fn()
            times[name].append((time.perf_counter_ns() - start) / 1e6)
    return times


def report(results: dict[int, dict[str, list[float]]], clip_desc: str, det: Detector,
           args) -> str:
    rows = []
    for threads, times in results.items():
        for name, ms in times.items():
            target = ""
            if name.startswith("waveform"):
                target = f"≤ {TARGET_MS:g} ms {'✓' if median(ms) <= TARGET_MS else '✗'}"
            rows.append([threads, name, f"{median(ms):.2f}", f"{percentile(ms, 99):.2f}",
                         f"{float(np.mean(ms)):.2f}", target])
    table = markdown_table(["threads", "path", "median ms", "p99 ms", "mean ms",
                            "target (median)"], rows)
    shape = "×".join(map(str, det.input_shape_))
    command = shown_command("latency.py", args.argv)
    return "\n".join([
        "## Scoring latency of one clip",
        "",
        machine_line(),
        "",
        f"The default detector (`{det.model}`, input {shape}, pooling "
        f"`{det.get_config()['pooling']}`) loaded from its model folder, scoring one 10 s 16 kHz clip "
        f"({clip_desc}) on the CPU, warm ({args.warmup} calls first). {args.runs} calls of "
        "each path, alternated call by call.",
        "",
        table,
        "",
        f"Command: `{command}`",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="timed calls per path")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first")
    parser.add_argument("--threads", default=f"{usable_cores()},1",
                        help="comma-separated torch thread counts (default: all cores, 1)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model (default: the default)")
    parser.add_argument("--reference", default="clip-stats",
                        help="a second model whose model + pooling is timed in the same run "
                             "(default clip-stats, the previous default; 'none' for none)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 calls")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.runs, args.warmup = min(args.runs, 20), min(args.warmup, 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = logger(args.quiet)
    thread_counts = list(dict.fromkeys(int(t) for t in args.threads.split(",") if t.strip()))
    with tempfile.TemporaryDirectory(prefix="stethoscope-bench-") as tmp:
        log("training the default detector for one epoch on random spectrograms…")
        det = default_detector(Path(tmp), args.model)
        reference = None
        if args.reference not in ("none", args.model):
            (Path(tmp) / "reference").mkdir()
            reference = default_detector(Path(tmp) / "reference", args.reference)
        wave, path, clip_desc = test_clip(Path(tmp))
        calls = paths_to_time(det, wave, path, reference)
        results = {}
        for threads in thread_counts:
            torch.set_num_threads(threads)
            log(f"{threads} thread(s): {args.runs} calls of each path…")
            results[threads] = measure(calls, args.runs, args.warmup)
    text = report(results, clip_desc, det, args)
    publish(SECTION, text, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
