"""Log-mel spectrograms of 10 s 16 kHz clips (clips/s): stethoscope's batched ``LogMel``
against ``librosa.feature.melspectrogram`` + ``librosa.power_to_db`` clip by clip, with the
largest difference between the two in dB.

Uses the real DCASE valve clips from ``../shared/data`` when present (else seeded noise), at
the feature settings of the built-in models, once from waveforms already in memory and once
from WAV files (stethoscope's ``extract_features`` against ``soundfile.read`` + librosa).

    python benchmarks/features.py            # 64 clips, 5 rounds
    python benchmarks/features.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _common import (
    REPO,
    add_common_arguments,
    alternate,
    ensure_repo_on_path,
    fmt_rate,
    fmt_ratio,
    logger,
    machine_line,
    markdown_table,
    median,
    package_version,
    publish,
    shown_command,
    timed,
    usable_cores,
)

ensure_repo_on_path()

import soundfile  # noqa: E402
import torch  # noqa: E402

from stethoscope.audio import read_wav  # noqa: E402
from stethoscope.features import (  # noqa: E402
    CLIPS_PER_CHUNK,
    FeatureConfig,
    LogMel,
    extract_features,
)

SECTION = "features"
DATA = REPO.parent / "shared" / "data" / "dcase2023_valve"
SAMPLE_RATE, CLIP_SECONDS = 16_000, 10.0
TARGET = 5.0  # LogMel ÷ librosa, 64 mels, in memory
SETTINGS = {  # label → FeatureConfig overrides (the built-in models' features)
    "64 mels (seed-conv-ae)": {"n_mels": 64},
    "128 mels (dcase-ae)": {"n_mels": 128},
}


@dataclass
class Row:
    label: str
    source: str
    stethoscope: float  # clips/s
    librosa: float
    max_db: float
    serial: float | None = None  # extract_features' work without its read-ahead thread


def real_clip_paths() -> list[Path]:
    return sorted(DATA.glob("*/*.wav")) if DATA.is_dir() else []


def load_waves(n: int, log) -> tuple[np.ndarray, str]:
    """``n`` float32 10 s waveforms: the real valve clips (cycled), else seeded noise."""
    paths = real_clip_paths()
    if paths:
        waves = [soundfile.read(p, dtype="float32", always_2d=True)[0][:, 0]
                 for p in paths[:n]]
        waves = [waves[i % len(waves)] for i in range(n)]
        log(f"{n} clips from {DATA}")
        return np.stack(waves), f"{min(n, len(paths))} real DCASE valve clips"
    log("shared data absent: using seeded noise clips")
    rng = np.random.default_rng(0)
    samples = int(SAMPLE_RATE * CLIP_SECONDS)
    return (0.1 * rng.standard_normal((n, samples))).astype(np.float32), "seeded noise"


def librosa_logmel(wave: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """The usual librosa pipeline with the same conventions as stethoscope's LogMel."""
    import librosa

    mel = librosa.feature.melspectrogram(
        y=wave, sr=config.sample_rate, n_fft=config.n_fft, hop_length=config.hop_length,
        n_mels=config.n_mels, fmin=config.fmin, fmax=config.fmax, power=config.power,
        center=True, pad_mode="constant", window="hann", htk=False, norm="slaney")
    return librosa.power_to_db(mel, ref=1.0, amin=config.eps, top_db=None)


def in_memory_row(label: str, config: FeatureConfig, waves: np.ndarray, args, log) -> Row:
    module = LogMel(config)
    batch = torch.from_numpy(waves)

    def ours() -> float:
        with torch.inference_mode():
            return timed(lambda: [module(batch) for _ in range(args.passes)])

    def theirs() -> float:
        return timed(lambda: [librosa_logmel(w, config) for _ in range(args.passes)
                              for w in waves])

    with torch.inference_mode():
        mine = module(batch).numpy()
    reference = np.stack([librosa_logmel(w, config) for w in waves])
    log(f"{label}, in memory:")
    times = alternate({"stethoscope": ours, "librosa": theirs}, args.repeats, args.warmup, log,
                      settle=args.settle)
    n = len(waves) * args.passes
    return Row(label, "waveforms in memory", n / median(times["stethoscope"]),
               n / median(times["librosa"]), float(np.abs(mine - reference).max()))


def from_files_row(label: str, config: FeatureConfig, waves: np.ndarray, args, log) -> Row:
    """Folder of WAVs → features: ``extract_features`` against soundfile + librosa per file."""
    with tempfile.TemporaryDirectory(prefix="stethoscope-bench-") as tmp:
        paths = []
        for i, wave in enumerate(waves):  # fresh files, so both sides read the same bytes
            path = Path(tmp) / f"clip_{i:04d}.wav"
            soundfile.write(path, (wave * 32767).astype(np.int16), config.sample_rate)
            paths.append(path)

        def ours() -> float:
            return timed(lambda: extract_features(paths, config))

        def theirs() -> float:
            return timed(lambda: [
                librosa_logmel(soundfile.read(p, dtype="float32")[0], config) for p in paths])

        module = LogMel(config)

        def no_read_ahead() -> float:
            """The same chunks as extract_features, read and transformed in turn."""
            def run() -> None:
                for i in range(0, len(paths), CLIPS_PER_CHUNK):
                    chunk = [read_wav(p, sample_rate=config.sample_rate)[0]
                             for p in paths[i:i + CLIPS_PER_CHUNK]]
                    with torch.inference_mode():
                        module(torch.from_numpy(np.stack(chunk)))
            return timed(run)

        mine = extract_features(paths, config)
        reference = np.stack([librosa_logmel(soundfile.read(p, dtype="float32")[0], config)
                              for p in paths])
        log(f"{label}, from WAV files:")
        times = alternate({"stethoscope": ours, "no read-ahead": no_read_ahead,
                           "librosa": theirs}, args.repeats, args.warmup, log,
                          settle=args.settle)
    n = len(waves)
    return Row(label, "WAV files", n / median(times["stethoscope"]),
               n / median(times["librosa"]), float(np.abs(mine[:, 0] - reference).max()),
               serial=n / median(times["no read-ahead"]))


def report(rows: list[Row], data_desc: str, args) -> str:
    table_rows = []
    for row in rows:
        ratio = row.stethoscope / row.librosa
        target = ""
        if row.label.startswith("64") and row.source == "waveforms in memory":
            target = f"≥ {TARGET:g}× {'✓' if ratio >= TARGET else '✗'}"
        serial = "" if row.serial is None else (
            f"{fmt_rate(row.serial)} ({fmt_ratio(row.stethoscope / row.serial)} with it)")
        table_rows.append([row.label, row.source, fmt_rate(row.stethoscope),
                           fmt_rate(row.librosa), fmt_ratio(ratio), f"{row.max_db:.2g}",
                           target, serial])
    table = markdown_table(["features", "from", "stethoscope clips/s", "librosa clips/s",
                            "ratio", "max Δ (dB)", "target",
                            "stethoscope without read-ahead"], table_rows)
    command = shown_command("features.py", args.argv)
    return "\n".join([
        "## Log-mel features",
        "",
        machine_line({"librosa": package_version("librosa"), "scipy": package_version("scipy"),
                      "soundfile": package_version("soundfile")}),
        "",
        f"10 s, 16 kHz mono clips ({args.clips} per batch, {args.passes} passes over the batch "
        f"per timed round from memory, one pass from files; {data_desc}), n_fft 1024, hop 512, "
        "Slaney mel bank, power 2, dB. stethoscope: `LogMel` on the whole batch "
        f"({args.threads} torch threads), or `extract_features` on the files; librosa: "
        "`librosa.feature.melspectrogram` + `librosa.power_to_db(ref=1, amin=1e-10, "
        "top_db=None)` clip by clip (numpy's defaults), or `soundfile.read` first. Median of "
        f"{args.repeats} alternating rounds after {args.warmup} warm-up round(s), each "
        f"after {args.settle:g} s idle (both sides). max Δ is "
        "the largest difference of any cell between the two outputs. The last column times "
        f"`extract_features`' work ({CLIPS_PER_CHUNK} files read, then transformed, chunk "
        "after chunk) without the thread that reads the next chunk while this one is "
        "transformed: the effect of overlapping loading with computing.",
        "",
        table,
        "",
        f"Command: `{command}`",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=64, help="clips per round (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds (default 1)")
    parser.add_argument("--threads", type=int, default=usable_cores(),
                        help="torch threads (default: all usable cores)")
    parser.add_argument("--no-files", action="store_true", help="skip the WAV-file rows")
    parser.add_argument("--settle", type=float, default=0.5,
                        help="idle seconds before every timed round, both sides alike "
                             "(default 0.5): the other side's BLAS threads go back to sleep")
    parser.add_argument("--passes", type=int, default=8,
                        help="passes over the in-memory clips per timed round (default 8): "
                             "rounds of a fraction of a second, not a few milliseconds")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 clips, 2 rounds")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.clips, args.repeats, args.passes = min(args.clips, 8), min(args.repeats, 2), 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = logger(args.quiet)
    torch.set_num_threads(args.threads)
    waves, data_desc = load_waves(args.clips, log)
    rows = []
    for label, overrides in SETTINGS.items():
        config = FeatureConfig(**overrides)
        rows.append(in_memory_row(label, config, waves, args, log))
        if not args.no_files:
            rows.append(from_files_row(label, config, waves, args, log))
    text = report(rows, data_desc, args)
    publish(SECTION, text, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
