"""Peak memory of scoring one long recording against one 10 s clip, each in a fresh process.

A recording is read and scored window by window, so memory should follow the window, not
the recording (target: a 60-minute WAV at most 2x the peak of a 10 s clip). The long WAV
repeats a real valve clip (../shared/data/dcase2023_valve) with a little noise, or a
simulated one where that folder is absent. Each side runs in its own subprocess; the
figure is its peak resident set (``ru_maxrss``) and wall time.

    python benchmarks/long_recording.py --minutes 60
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from _common import REPO, ensure_repo_on_path, markdown_table

ensure_repo_on_path()

SHARED = REPO.parent / "shared" / "data" / "dcase2023_valve"


def _child(model: str, wav: str) -> None:
    """Score ``wav`` with the model folder ``model``; print peak RSS and seconds as JSON."""
    from stethoscope import Detector

    det = Detector.load(model, progress=False)
    start = time.perf_counter()
    [result] = det.score_recordings([wav], on_error="raise")
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak_mb, "seconds": seconds, "windows": len(result.windows)}))


def _measure(model: Path, wav: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(model), str(wav)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _source_clips(folder: Path) -> tuple[list[Path], list[Path]]:
    if SHARED.exists():
        return sorted((SHARED / "train").glob("*.wav")), sorted((SHARED / "test").glob("*.wav"))
    from stethoscope.simulate import simulate_dataset

    root = Path(simulate_dataset("valve", 30, 0, folder / "sim", seed=0, progress=False))
    clips = sorted(root.rglob("*.wav"))
    return clips[:25], clips[25:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    from stethoscope import Detector

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, test = _source_clips(tmp)
        Detector(progress=False).fit(train).save(tmp / "model")
        clip, rate = sf.read(str(test[0]), dtype="float32")
        repeats = int(round(args.minutes * 60 / (len(clip) / rate)))
        rng = np.random.default_rng(0)
        long_wav = tmp / "long.wav"
        with sf.SoundFile(str(long_wav), "w", rate, 1, subtype="PCM_16") as handle:
            for _ in range(repeats):  # written block by block: this script stays small too
                handle.write(np.clip(clip + rng.normal(0, 1e-3, clip.shape), -1, 1))
        short = _measure(tmp / "model", test[0])
        long = _measure(tmp / "model", long_wav)
    rows = [["10 s clip", 1, f"{short['peak_mb']:.0f}", f"{short['seconds'] * 1e3:.1f} ms"],
            [f"{args.minutes:g} min recording", long["windows"], f"{long['peak_mb']:.0f}",
             f"{long['seconds']:.2f} s"]]
    print(markdown_table(["input", "windows", "peak RSS (MB)", "scoring time"], rows))
    print(f"\nratio of peaks: {long['peak_mb'] / short['peak_mb']:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
