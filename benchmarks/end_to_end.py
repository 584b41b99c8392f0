"""A folder of N WAVs → finished report through the command line: wall time and peak
memory of ``stethoscope train`` and ``stethoscope evaluate`` for several corpus sizes.

N = 200 is the real DCASE 2023 valve set (train on its 60 normal ``train/`` clips, evaluate
its 140 ``test/`` clips). Larger N keep the same 30 % / 70 % split and are made of hard
links to a pool of clips (the real ones when ``../shared/data`` is present, else clips from
``stethoscope.simulate.simulate_dataset``), so building a 5,000-clip corpus takes seconds
and no disk. Each command runs in its own process; its peak resident memory comes from
``os.wait4`` (the kernel's ``ru_maxrss``), and a poller of ``/proc/PID/status`` splits it
into anonymous memory (the program's own) and file pages (memory-mapped caches). Then the
training run is repeated twice with ``--cache DIR`` to time the on-disk feature cache,
cold (computes and writes the features) and warm (memory-maps them, reads no WAV).

    python benchmarks/end_to_end.py                    # N = 200 and 5,000, 2 epochs
    python benchmarks/end_to_end.py --sizes 200,1000,5000 --epochs 5
    python benchmarks/end_to_end.py --quick            # N = 200 and 400, 1 epoch
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from _common import (
    REPO,
    add_common_arguments,
    ensure_repo_on_path,
    logger,
    machine_line,
    markdown_table,
    publish,
    shown_command,
)

SECTION = "end_to_end"
DATA = REPO.parent / "shared" / "data" / "dcase2023_valve"
TRAIN_SHARE = 0.3  # the real set's 60 of 200
MEMORY_TARGET_MB = 2048


@dataclass
class Pool:
    """Clips to build corpora from: (file, path below the copy folder that keeps its label)."""

    train: list[tuple[Path, Path]]
    test: list[tuple[Path, Path]]
    description: str


@dataclass
class Step:
    name: str
    clips: int
    seconds: float
    peak_rss_mb: float
    peak_anon_mb: float | None
    returncode: int


# ----------------------------------------------------------------------------- corpora


def real_pool() -> Pool | None:
    train = sorted((DATA / "train").glob("*.wav")) if DATA.is_dir() else []
    test = sorted((DATA / "test").glob("*.wav")) if DATA.is_dir() else []
    if not train or not test:
        return None
    return Pool([(p, Path(p.name)) for p in train], [(p, Path(p.name)) for p in test],
                f"real DCASE 2023 valve clips ({len(train)} train, {len(test)} test)")


def simulated_pool(folder: Path, n_train: int, n_test_normal: int, n_test_abnormal: int,
                   log) -> Pool:
    """Simulate a small pool of valve clips (MIMII layout, labels in the folders)."""
    ensure_repo_on_path()
    from stethoscope.simulate import simulate_dataset

    total = n_train + n_test_normal + n_test_abnormal
    log(f"simulating a pool of {total} valve clips (about 0.1 s each)…")
    train_root = simulate_dataset("valve", n_train, 0, folder / "train", seed=1, progress=False)
    test_root = simulate_dataset("valve", n_test_normal, n_test_abnormal, folder / "test",
                                 seed=2, progress=False)

    def entries(root: Path) -> list[tuple[Path, Path]]:
        # keep "id_XX/normal/NNN.wav": parse_clip reads the label from those folders
        return [(p, p.relative_to(root.parent)) for p in sorted(root.rglob("*.wav"))]

    return Pool(entries(train_root), entries(test_root),
                f"simulated valve clips (pool of {n_train} train, "
                f"{n_test_normal + n_test_abnormal} test, repeated)")


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no disk, no dedup by path resolution), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def build_split(pool: list[tuple[Path, Path]], n: int, folder: Path) -> Path:
    """``n`` files in ``folder``: the pool cycled, copy k of a clip under ``copy_k/``."""
    for i in range(n):
        source, relative = pool[i % len(pool)]
        link_or_copy(source, folder / f"copy_{i // len(pool):03d}" / relative)
    return folder


def corpus(n: int, pool: Pool, root: Path) -> tuple[tuple[Path, int], tuple[Path, int], str]:
    """(train folder, clips) and (test folder, clips) holding ``n`` clips in all."""
    if n == len(pool.train) + len(pool.test) and pool.description.startswith("real"):
        return ((DATA / "train", len(pool.train)), (DATA / "test", len(pool.test)),
                "the real folders")
    n_train = max(2, round(n * TRAIN_SHARE))
    train = build_split(pool.train, n_train, root / f"n{n}" / "train")
    test = build_split(pool.test, n - n_train, root / f"n{n}" / "test")
    return (train, n_train), (test, n - n_train), f"{n_train} train + {n - n_train} test links"


# ----------------------------------------------------------------------------- measuring


def poll_memory(pid: int, peaks: dict, stop: threading.Event, every: float = 0.05) -> None:
    """Keep the highest RssAnon seen in /proc/PID/status until ``stop`` is set."""
    status = Path(f"/proc/{pid}/status")
    while not stop.is_set():
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peaks["anon_kb"] = max(peaks.get("anon_kb", 0), int(line.split()[1]))
        except (OSError, ValueError):
            return
        stop.wait(every)


def run_step(name: str, clips: int, argv: list[str], log_file: Path, env: dict) -> Step:
    """Run one CLI command; its wall time and peak memory (the kernel's and the poller's)."""
    with open(log_file, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=log_file.parent)
        peaks: dict = {}
        stop = threading.Event()
        poller = threading.Thread(target=poll_memory, args=(proc.pid, peaks, stop), daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
        seconds = time.perf_counter() - start
        stop.set()
        poller.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    anon = peaks.get("anon_kb")
    return Step(name, clips, seconds, usage.ru_maxrss / 1024, anon / 1024 if anon else None,
                proc.returncode)


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["STETHOSCOPE_PROGRESS"] = "0"
    return env


def run_corpus(n: int, train: tuple[Path, int], test: tuple[Path, int], work: Path, args,
               log) -> list[Step]:
    (train, n_train), (test, n_test) = train, test
    model, report = work / f"model-{n}", work / f"report-{n}"
    base = [sys.executable, "-m", "stethoscope"]
    train_argv = base + ["train", str(train), "--out", str(model), "--epochs", str(args.epochs)]
    if args.model:
        train_argv += ["--model", args.model]
    steps_argv = [("train", n_train, train_argv),
                  ("evaluate", n_test, base + ["evaluate", str(model), str(test), "--report",
                                               str(report)])]
    steps = []
    for name, clips, argv in steps_argv:
        log(f"N={n}: {name} on {clips} clips …")
        step = run_step(name, clips, argv, work / f"{name}-{n}.log", cli_env())
        log(f"N={n}: {name} {step.seconds:.1f} s, peak RSS {step.peak_rss_mb:.0f} MB")
        steps.append(step)
        if step.returncode != 0:
            tail = (work / f"{name}-{n}.log").read_text(errors="replace").splitlines()[-15:]
            print(f"`{' '.join(argv)}` failed (exit {step.returncode}):\n" + "\n".join(tail),
                  file=sys.stderr)
            break
    if steps[-1].returncode == 0 and not (report / "index.html").exists():
        log(f"N={n}: warning: no {report / 'index.html'} was written")
    return steps


def run_cache_steps(n: int, train: tuple[Path, int], work: Path, args, log) -> list[Step]:
    """``stethoscope train --cache DIR`` twice: the first run computes the features and
    writes the cache, the second memory-maps it and reads no WAV."""
    (train, n_train) = train
    argv = [sys.executable, "-m", "stethoscope", "train", str(train), "--out",
            str(work / f"model-cached-{n}"), "--epochs", str(args.epochs), "--cache",
            str(work / f"cache-{n}")]
    if args.model:
        argv += ["--model", args.model]
    steps = []
    for name in ("train, cache cold", "train, cache warm"):
        log(f"N={n}: {name} on {n_train} clips …")
        step = run_step(name, n_train, argv, work / f"{name.replace(', ', '-')}-{n}.log",
                        cli_env())
        log(f"N={n}: {name} {step.seconds:.1f} s, peak RSS {step.peak_rss_mb:.0f} MB")
        steps.append(step)
        if step.returncode != 0:
            break
    return steps


# ----------------------------------------------------------------------------- report


def report(results: dict[int, list[Step]], layouts: dict[int, str], pool: Pool, args,
           cached: dict[int, list[Step]] | None = None) -> str:
    cached = cached or {}
    rows = []
    for n, steps in results.items():
        for step in steps:
            rows.append([f"{n:,}", f"{step.name} ({step.clips:,} clips)", f"{step.seconds:.1f}",
                         f"{step.clips / step.seconds:.1f}",
                         f"{step.peak_rss_mb:,.0f}",
                         "n/a" if step.peak_anon_mb is None else f"{step.peak_anon_mb:,.0f}",
                         "ok" if step.returncode == 0 else f"exit {step.returncode}"])
        total = sum(s.seconds for s in steps)
        peak = max(s.peak_rss_mb for s in steps)
        ok = all(s.returncode == 0 for s in steps) and len(steps) == 2
        rows.append([f"{n:,}", "**total**", f"**{total:.1f}**", f"{n / total:.1f}",
                     f"**{peak:,.0f}**", "", "ok" if ok else "failed"])
    table = markdown_table(["N clips", "step", "wall s", "clips/s", "peak RSS MB",
                            "peak anon MB", "status"], rows)
    peaks = {n: max(s.peak_rss_mb for s in steps) for n, steps in results.items()}
    sizes = sorted(peaks)
    verdict = []
    if sizes:
        biggest = sizes[-1]
        verdict.append(f"Peak RSS at N = {biggest:,}: {peaks[biggest]:,.0f} MB (target ≤ "
                       f"{MEMORY_TARGET_MB:,} MB: {'✓' if peaks[biggest] <= MEMORY_TARGET_MB else '✗'}).")
    if len(sizes) > 1:
        growth = peaks[sizes[-1]] / peaks[sizes[0]]
        verdict.append(f"From N = {sizes[0]:,} to {sizes[-1]:,} ({sizes[-1] / sizes[0]:.0f}× the "
                       f"clips) the peak grows {growth:.2f}× (flat would be ≈ 1×).")
    cache_rows = []
    for n, steps in cached.items():
        for step in steps:
            cache_rows.append([f"{n:,}", f"{step.name} ({step.clips:,} clips)",
                               f"{step.seconds:.1f}", f"{step.peak_rss_mb:,.0f}",
                               "ok" if step.returncode == 0 else f"exit {step.returncode}"])
        if len(steps) == 2 and all(s.returncode == 0 for s in steps):
            cache_rows.append([f"{n:,}", "**warm ÷ cold time**",
                               f"**{steps[1].seconds / steps[0].seconds:.2f}×**", "", ""])
    cache_text = []
    if cache_rows:
        cache_text = [
            "",
            "The on-disk feature cache: the same training run twice with `--cache DIR`. The "
            "first (cold) computes the features and writes them to DIR; the second (warm) "
            "memory-maps them and reads no WAV file (start-up, model fitting and writing "
            "the model folder stay).",
            "",
            markdown_table(["N clips", "step", "wall s", "peak RSS MB", "status"], cache_rows),
        ]
    layout = "; ".join(f"N = {n:,}: {layouts[n]}" for n in sizes)
    model = args.model or "the default model"
    command = shown_command("end_to_end.py", args.argv)
    return "\n".join([
        "## End to end: folder of WAVs → report",
        "",
        machine_line(),
        "",
        f"`stethoscope train TRAIN --out MODEL --epochs {args.epochs}` ({model}) then "
        "`stethoscope evaluate MODEL TEST --report DIR`, each in a fresh process, as a user "
        f"runs them. Clips: {pool.description}; {layout}. Peak RSS is the kernel's "
        "`ru_maxrss` of the process (from `os.wait4`); peak anon is the largest `RssAnon` "
        "polled every 50 ms (memory the program allocated, without file pages such as "
        "memory-mapped feature caches). One run each: these are minutes-long steps, not "
        "micro-benchmarks.",
        "",
        table,
        "",
        " ".join(verdict),
        *cache_text,
        "",
        f"Command: `{command}`",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="200,5000",
                        help="comma-separated corpus sizes N (default 200,5000)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    parser.add_argument("--model", default=None, help="model name (default: the CLI's)")
    parser.add_argument("--source", choices=["auto", "real", "simulated"], default="auto",
                        help="clip pool: real shared data (auto when present) or simulated")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep corpora, models, reports and logs in this folder")
    parser.add_argument("--no-cache-steps", action="store_true",
                        help="skip timing the feature cache (training twice with --cache)")
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 200, 400; 1 epoch")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.sizes, args.epochs = "200,400", 1
    args.size_list = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not args.size_list or min(args.size_list) < 4:
        parser.error("--sizes needs corpus sizes of at least 4 clips")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = logger(args.quiet)
    work_root = args.keep or Path(tempfile.mkdtemp(prefix="stethoscope-e2e-"))
    work_root.mkdir(parents=True, exist_ok=True)
    try:
        pool = real_pool() if args.source in ("auto", "real") else None
        if pool is None:
            if args.source == "real":
                raise SystemExit(f"no real clips under {DATA}")
            pool = simulated_pool(work_root / "pool", 30, 20, 20, log)
        results, layouts, cached = {}, {}, {}
        for n in args.size_list:
            train, test, layouts[n] = corpus(n, pool, work_root / "corpora")
            results[n] = run_corpus(n, train, test, work_root, args, log)
            if not args.no_cache_steps:
                cached[n] = run_cache_steps(n, train, work_root, args, log)
    finally:
        if args.keep is None:
            shutil.rmtree(work_root, ignore_errors=True)
    text = report(results, layouts, pool, args, cached)
    publish(SECTION, text, args)
    failed = any(s.returncode != 0 for group in (results, cached) for steps in group.values()
                 for s in steps)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
