"""Fleet throughput: train and score one model per machine of a simulated plant with 1 and 2
workers, on the local process pool and on a Dask LocalCluster, plus the per-recording costs
that docs/scale.md sizes large fleets from (decode, features, scoring, a database write).

    python benchmarks/fleet.py                        # 16 machines, 3 rounds
    python benchmarks/fleet.py --machines 32 --rounds 5
    python benchmarks/fleet.py --normal 40 --abnormal 10   # small machines: 30 train clips
    python benchmarks/fleet.py --quick                # smoke run: 4 machines, 1 round

A machine gets 150 normal and 50 abnormal clips by default: 100 train (enough for the
default model's mixture member, as a DCASE machine with its ~1,000 clips has) and 100 are
scored. Smaller machines make jobs of 0.1 s, whose fixed per-job cost weighs more.

Every configuration gets its engine opened once and warmed up (workers started, torch
imported), so that rounds time the work; start-up is reported apart. Rounds run every
configuration once, forward and backward in turn (local 1, local 2, dask 1, dask 2, then dask
2, dask 1, local 2, local 1), and the speed-up is the median over rounds of 1 worker's time
over 2 workers' in the same round. Each worker runs one job
at a time with one torch and one BLAS thread (``stethoscope.fleet.pin_threads``).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    REPO,
    add_common_arguments,
    ensure_repo_on_path,
    logger,
    machine_line,
    markdown_table,
    median,
    package_version,
    publish,
    shown_command,
    usable_cores,
)

ensure_repo_on_path()

from stethoscope import fleet  # noqa: E402

SECTION = "fleet"
DOC = REPO / "docs" / "scale.md"
TYPES = ("fan", "pump", "slider", "valve")
TARGET_SPEEDUP = 1.7


def _warm(job: fleet.TrainJob) -> int:
    """One small training job (every import and first-call cost of a real one), then hold
    the worker a moment so that each worker of the engine gets a warm-up job; returns the
    worker's pid."""
    result = fleet.train_machine(job)
    if not result.ok:
        raise RuntimeError(result.error)
    time.sleep(0.5)
    return os.getpid()


def simulate_plant(root: Path, machines: int, normal: int, abnormal: int, seconds: float,
                   log) -> fleet.Fleet:
    """``machines`` simulated machines (types in turn, ids 00, 02, ...) under ``root``;
    reused when already there."""
    from stethoscope.simulate import simulate_dataset

    for i in range(machines):
        machine, machine_id = TYPES[i % len(TYPES)], f"id_{2 * (i // len(TYPES)):02d}"
        folder = root / machine / machine_id
        if (folder / "faults.csv").exists():
            continue
        log(f"simulating {machine} {machine_id}: {normal} normal + {abnormal} abnormal "
            f"clips of {seconds:g} s")
        simulate_dataset(machine, normal, abnormal, root, machine_id=machine_id, seed=i,
                         duration=seconds, progress=False)
    return fleet.find_machines(root)


# ----------------------------------------------------------------------------- engines


def open_configs(names: list[str], plant: fleet.Fleet, settings: dict, log
                 ) -> dict[str, tuple[object, float]]:
    """Every configuration's engine, opened and warmed: name → (engine, start-up seconds)."""
    opened = {}
    sample = plant.machines[0]
    for name in names:
        engine_name, workers = name.rsplit(" ", 1)
        start = time.perf_counter()
        engine = fleet.open_engine(engine_name, int(workers)).__enter__()
        warm = [fleet.TrainJob(f"warm-{i}", tuple(map(str, sample.train)),
                               tuple(map(str, sample.held_out_normal)), settings)
                for i in range(int(workers))]
        pids = {pid for _, pid in engine.run(_warm, warm)}
        seconds = time.perf_counter() - start
        log(f"{name}: started and warmed in {seconds:.1f} s ({len(pids)} worker process(es) "
            "took the warm-up jobs)")
        opened[name] = (engine, seconds)
    return opened


def round_order(names: list[str], r: int) -> list[str]:
    """The configurations in round ``r``: forward in even rounds, backward in odd ones (an
    ABBA design), so that a machine whose speed drifts during the run favours the 1- and the
    2-worker passes alike."""
    return list(names) if r % 2 == 0 else list(reversed(names))


def stolen_jiffies() -> tuple[int, int] | None:
    """(steal, total) CPU jiffies of all cores since boot from ``/proc/stat``: time the host
    of this VM gave to others. None where there is no such file."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields[:8]]
    return (ticks[7], sum(ticks)) if len(ticks) == 8 else None


def stolen_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float:
    """The share of the cores' time the host stole between two :func:`stolen_jiffies`."""
    if before is None or after is None or after[1] <= before[1]:
        return 0.0
    return (after[0] - before[0]) / (after[1] - before[1])


def paired_speedups(one: list[dict], two: list[dict], phase: str) -> list[float]:
    """Per round, the 1-worker pass's time over the 2-worker pass's of the same round: each
    ratio compares passes run seconds apart, not the medians of passes that the VM's drift
    may have run at different speeds."""
    return [a[phase] / b[phase] for a, b in zip(one, two, strict=True)]


def models_folder(models: Path, name: str) -> Path:
    """Where configuration ``name`` ("dask 2") writes its machines' models under ``models``."""
    return models / name.replace(" ", "-")


def warm_up_passes(opened: dict, plant: fleet.Fleet, models: Path, settings: dict,
                   rounds: int, log) -> None:
    """Whole training and scoring passes on every engine that are not timed. The first pass
    of a run took up to 4x a later one (local 1: 42.9 s against a median of 10.3 s); the
    cause was not found (the WAVs were in the page cache)."""
    for r in range(rounds):
        for name, (engine, _) in opened.items():
            done = fleet_round(engine, plant, models_folder(models, name), settings)
            log(f"warm-up pass {r + 1}/{rounds} {name} (not counted): train "
                f"{done['train']:.2f} s, score {done['score']:.2f} s")


def fleet_round(engine, plant: fleet.Fleet, models: Path, settings: dict) -> dict[str, float]:
    """One training and one scoring pass over the whole plant; seconds of each, and the share
    of the cores the host stole meanwhile."""
    steal_before = stolen_jiffies()
    start = time.perf_counter()
    results = fleet.train_fleet(plant, models, settings=settings, engine=engine, force=True,
                                progress=False)
    train_s = time.perf_counter() - start
    failed = [r.machine for r in results if not r.ok]
    if failed:
        raise SystemExit(f"training failed for {', '.join(failed)}: {results[0].error}")
    start = time.perf_counter()
    rows, _ = fleet.score_fleet(plant, models, None, engine=engine, progress=False)
    score_s = time.perf_counter() - start
    if any(r["error"] for r in rows):
        raise SystemExit(f"scoring failed: {next(r['error'] for r in rows if r['error'])}")
    return {"train": train_s, "score": score_s,
            "stolen": stolen_share(steal_before, stolen_jiffies())}


def _kernel(iterations: int) -> float:
    """Single-threaded float64 matrix products: pure compute, no I/O, no Python overhead."""
    import numpy as np

    fleet.pin_threads(1)
    a = np.random.default_rng(0).standard_normal((192, 192))
    start = time.perf_counter()
    for _ in range(iterations):
        a = np.tanh(a @ a * 1e-2)
    return time.perf_counter() - start


def machine_ceiling(iterations: int = 3000, repeats: int = 3) -> tuple[float, float]:
    """What 2 processes get on this machine at best: the same compute kernel alone and as
    two processes at once (spawned, warmed); returns (seconds alone, speed-up of two)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    alone, together = [], []
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        list(pool.map(_kernel, [50, 50]))
        for _ in range(repeats):
            alone.append(pool.submit(_kernel, iterations).result())
            start = time.perf_counter()
            list(pool.map(_kernel, [iterations, iterations]))
            together.append(time.perf_counter() - start)
    return median(alone), 2 * median(alone) / median(together)


def descendant_peak_rss_mb() -> float:
    """Largest peak RSS (VmHWM) of this process's descendants: the worker processes."""
    peak, todo, seen = 0.0, [os.getpid()], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                todo += [int(c) for c in text.split()]
            if pid != os.getpid():
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
        except (OSError, ValueError):
            continue
    return peak


# ----------------------------------------------------------------------------- per clip


def per_clip_costs(plant: fleet.Fleet, models: Path, repeats: int, postgres: str | None,
                   log) -> list[list[str]]:
    """Single-threaded cost of each step one recording goes through, median of ``repeats``."""
    import soundfile as sf
    import torch

    from stethoscope import Detector
    from stethoscope.audio import read_wav
    from stethoscope.features import logmel

    torch.set_num_threads(1)
    machine = plant.machines[0]
    path = machine.test[0]
    det = Detector.load(models / machine.name, device="cpu", progress=False)
    cfg = det.feature_config_
    wave, sr = read_wav(path)
    spec = logmel(wave, cfg)[None]
    steps = {
        "read + decode the WAV (soundfile)": lambda: sf.read(path, dtype="float32"),
        "read_wav (decode, checks, channel choice)": lambda: read_wav(path),
        "log-mel features": lambda: logmel(wave, cfg),
        "model scoring (features in hand)": lambda: det.score_features(spec),
        "score_waveform (features + scoring)": lambda: det.score_waveform(wave[0], sr),
        "score_recordings, one path (all of it)": lambda: det.score_recordings([path]),
    }
    batch = [p for m in plant.machines for p in m.test][:16]  # distinct paths
    per_recording = {f"score_recordings, {len(batch)} paths, per recording":
                     lambda: det.score_recordings(batch)}
    rows = []
    for name, step in steps.items():
        step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        rows.append([name, f"{1000 * median(times):.2f}"])
        log(f"per clip: {name}: {1000 * median(times):.2f} ms")
    for name, step in per_recording.items():
        step()
        times = [_seconds(step) / len(batch) for _ in range(max(3, repeats // 8))]
        rows.append([name, f"{1000 * median(times):.2f}"])
        log(f"per clip: {name}: {1000 * median(times):.2f} ms")
    rows += database_costs(postgres, repeats, log)
    size = sum(f.stat().st_size for f in (models / machine.name).iterdir())
    rows.append([f"model folder on disk ({det.model})", f"{size / 1024:.0f} KiB"])
    rows.append(["one 10 s 16 kHz 16-bit mono WAV", f"{Path(path).stat().st_size / 1024:.0f} KiB"])
    return rows


def _seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def database_costs(postgres: str | None, repeats: int, log) -> list[list[str]]:
    """Storing scored recordings through the service's store (stethoscope.service.store):
    one per transaction, and 100 per transaction (its group commit)."""
    try:
        from stethoscope.service.store import NewRecording, Store
    except ImportError as error:
        return [["database write", f"n/a (service extra missing: {error})"]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="stethoscope-bench-db-") as tmp:
        urls = {"SQLite": f"sqlite:///{tmp}/bench.db"}
        schema = f"stethoscope_bench_fleet_{os.getpid()}"
        if postgres:  # a schema of its own, dropped afterwards: the tests' tables stay as they are
            urls["PostgreSQL"] = _private_schema(postgres, schema)
        for label, url in urls.items():
            try:
                store = Store(url)
            except Exception as error:  # noqa: BLE001 -- report, do not stop the benchmark
                rows.append([f"{label} write", f"n/a ({type(error).__name__})"])
                continue
            try:
                for batch in (1, 100):
                    times = []
                    for r in range(max(3, repeats // 4)):
                        items = _recordings(NewRecording, r, batch)
                        start = time.perf_counter()
                        store.commit_recordings(items)
                        times.append((time.perf_counter() - start) / batch)
                    rows.append([f"{label} write, {batch} recording(s) per transaction",
                                 f"{1000 * median(times):.2f}"])
                    log(f"per clip: {label} batch {batch}: {1000 * median(times):.2f} ms")
                before = _stored_bytes(store, label, tmp, schema)
                for r in range(20):
                    store.commit_recordings(_recordings(NewRecording, r, 100))
                per_row = (_stored_bytes(store, label, tmp, schema) - before) / 2000
                rows.append([f"{label} storage per recording (tables and indexes)",
                             f"{per_row:.0f} B"])
            except Exception as error:  # noqa: BLE001
                rows.append([f"{label} write", f"n/a ({type(error).__name__}: {error})"[:120]])
            finally:
                store.close()
        if postgres:
            _drop_schema(postgres, schema)
    return rows


def _recordings(new_recording, r: int, batch: int) -> list:
    """``batch`` scored recordings of one 10 s window each, spread over 7 machines."""
    now = int(time.time() * 1000)
    return [new_recording(machine=f"bench-{(r + i) % 7}", received_ms=now + i,
                          score=1.0 + i, threshold=5.0, anomalous=False,
                          windows=[{"start_s": 0.0, "end_s": 10.0, "score": 1.0 + i,
                                    "anomalous": False}],
                          duration_s=10.0, model_version="bench")
            for i in range(batch)]


def _stored_bytes(store, label: str, folder: str, schema: str) -> int:
    """Bytes the store occupies: SQLite's files (WAL checkpointed), or the PostgreSQL
    schema's tables with their indexes."""
    from sqlalchemy import text

    with store.engine.connect() as conn:
        if label == "SQLite":
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            return sum(f.stat().st_size for f in Path(folder).glob("bench.db*"))
        return int(conn.execute(text(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c JOIN "
            "pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = :schema AND "
            "c.relkind = 'r'"), {"schema": schema}).scalar())


def _plain_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _private_schema(url: str, schema: str) -> str:
    """Create ``schema`` and return ``url`` with it as the search path."""
    import psycopg

    with psycopg.connect(_plain_url(url), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    joiner = "&" if "?" in url else "?"
    return f"{url}{joiner}options=-csearch_path%3D{schema}"


def _drop_schema(url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(_plain_url(url), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# ----------------------------------------------------------------------------- report


def report(plant: fleet.Fleet, settings: dict, opened: dict, rounds: dict, clip_rows,
           peak_rss: float, ceiling: tuple[float, float], args) -> str:
    n_train = sum(len(m.train) for m in plant.machines)
    n_held = sum(len(m.held_out_normal) for m in plant.machines)
    n_test = sum(len(m.test) for m in plant.machines)
    rows = []
    for name in opened:
        engine_name = name.rsplit(" ", 1)[0]
        one = rounds.get(f"{engine_name} 1")
        for phase, clips in (("train", n_train + n_held), ("score", n_test)):
            seconds = median([r[phase] for r in rounds[name]])
            spread = (min(r[phase] for r in rounds[name]), max(r[phase] for r in rounds[name]))
            paired = of_medians = efficiency = verdict = ""
            if one is not None and not name.endswith(" 1"):
                workers = int(name.rsplit(" ", 1)[1])
                ratios = paired_speedups(one, rounds[name], phase)
                speedup = median(ratios)
                paired = f"{speedup:.2f}× ({min(ratios):.2f}-{max(ratios):.2f})"
                of_medians = f"{median([r[phase] for r in one]) / seconds:.2f}×"
                efficiency = f"{speedup / workers:.0%}"
                verdict = f"≥ {TARGET_SPEEDUP}× {'✓' if speedup >= TARGET_SPEEDUP else '✗'}"
            stolen = max(r["stolen"] for r in rounds[name])
            rows.append([name, phase, f"{seconds:.2f} ({spread[0]:.2f}-{spread[1]:.2f})",
                         f"{clips / seconds:.1f}", paired, of_medians, efficiency, verdict,
                         f"{stolen:.0%}", f"{opened[name][1]:.1f}" if phase == "train" else ""])
    table = markdown_table(["engine, workers", "work", "wall s (min-max)", "clips/s",
                            "speed-up vs 1 worker (median of rounds, min-max)",
                            "(ratio of medians)", "efficiency", "target",
                            "most stolen by host", "start-up s"], rows)
    clip_table = markdown_table(["step, one 10 s recording, 1 thread", "ms (or size)"],
                                clip_rows)
    from stethoscope.detector import DEFAULT_MODEL

    model = settings.get("model") or f"{DEFAULT_MODEL} (default)"
    load = os.getloadavg()
    start_load = args.start_load
    lines = [
        "## Measured: fleet throughput on this machine",
        "",
        machine_line({"dask": package_version("distributed")}),
        "",
        f"{len(plant.machines)} simulated machines ({', '.join(TYPES)}), {args.normal} normal + "
        f"{args.abnormal} abnormal clips of {args.seconds:g} s each: per machine "
        f"{len(plant.machines[0].train)} train, {len(plant.machines[0].test)} scored. Model "
        f"{model}{', ' + str(settings['epochs']) + ' epochs' if settings.get('epochs') else ''}."
        f" Training clips/s counts the {n_train} training clips and the {n_held} held-out "
        f"normal clips each job scores for its false-alarm rate; scoring counts the {n_test} "
        f"test clips. {args.rounds} rounds, each running every configuration once, in turn "
        f"forward and backward (ABBA), after {args.warmup_rounds} untimed pass(es) of every "
        "configuration; engines opened and warmed first (start-up column: opening plus one "
        "warm-up job per worker). The speed-up is the median over rounds of "
        "the 1-worker pass's time over the 2-worker pass's in the same round, so that the "
        "VM's drifting speed (the same pass has taken up to 1.5× as long in one round as in "
        "another) cancels; the ratio of the medians is beside it. 'Most stolen by host' is "
        "the largest share of the cores' time the VM's host took during one of the "
        "configuration's passes (/proc/stat). Peak RSS of one "
        f"worker process: {peak_rss:.0f} MB. Load average (1 min) at the start "
        f"{start_load:.1f}, at the end {load[0]:.1f}, on {usable_cores()} cores: anything above "
        "the workers' own 1-2 is other work on the machine, which slows the 1- and 2-worker "
        "rounds differently and makes the speed-up noisy.",
        "",
        f"The machine's own ceiling, measured in the same run: a pure compute kernel "
        f"(single-threaded NumPy matrix products, {ceiling[0]:.2f} s alone) runs as two "
        f"processes at once at **{ceiling[1]:.2f}×** one process's throughput; no work on "
        "this machine can scale better than that.",
        "",
        table,
        "",
        "### Per-recording costs",
        "",
        f"Median of {args.clip_repeats} calls after one warm-up, one thread, in the driver "
        "process. Database writes go through the service's store "
        "(`stethoscope.service.store.Store.commit_recordings`), per recording.",
        "",
        clip_table,
        "",
        f"Command: `{shown_command('fleet.py', args.argv)}`",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machines", type=int, default=16, help="machines (default 16)")
    parser.add_argument("--normal", type=int, default=150,
                        help="normal clips per machine (default 150: 100 train, 50 scored)")
    parser.add_argument("--abnormal", type=int, default=50,
                        help="abnormal clips per machine (default 50)")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--warmup-rounds", type=int, default=1,
                        help="untimed passes on every engine before the rounds (default 1)")
    parser.add_argument("--engines", default="local,dask", help="local and/or dask")
    parser.add_argument("--model", default=None, help="model (default: the default model)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of trained models")
    parser.add_argument("--data", type=Path, default=None,
                        help="keep the simulated plant here and reuse it (default: temporary)")
    parser.add_argument("--clip-repeats", type=int, default=50,
                        help="calls per per-recording step (default 50)")
    parser.add_argument("--postgres", default=os.environ.get("STETHOSCOPE_TEST_POSTGRES"),
                        help="PostgreSQL URL for the database write (default: "
                             "$STETHOSCOPE_TEST_POSTGRES; SQLite is always measured)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 machines, 1 round")
    add_common_arguments(parser)
    parser.set_defaults(doc=DOC)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.machines, args.rounds, args.clip_repeats = min(args.machines, 4), 1, 10
        args.warmup_rounds = 0
        args.normal, args.abnormal = min(args.normal, 20), min(args.abnormal, 5)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.start_load = os.getloadavg()[0]
    log = logger(args.quiet)
    os.environ.setdefault("STETHOSCOPE_PROGRESS", "0")
    with tempfile.TemporaryDirectory(prefix="stethoscope-bench-fleet-") as tmp:
        root = args.data or Path(tmp) / "plant"
        plant = simulate_plant(root, args.machines, args.normal, args.abnormal, args.seconds,
                               log)
        settings = {k: v for k, v in (("model", args.model), ("epochs", args.epochs))
                    if v is not None}
        names = [f"{e} {w}" for e in args.engines for w in (1, 2)]
        opened = open_configs(names, plant, settings, log)
        rounds: dict[str, list[dict]] = {name: [] for name in names}
        try:
            warm_up_passes(opened, plant, Path(tmp) / "models", settings, args.warmup_rounds,
                           log)
            for r in range(args.rounds):
                for name in round_order(names, r):
                    engine = opened[name][0]
                    rounds[name].append(fleet_round(
                        engine, plant, models_folder(Path(tmp) / "models", name), settings))
                    done = rounds[name][-1]
                    log(f"round {r + 1}/{args.rounds} {name}: train {done['train']:.2f} s, "
                        f"score {done['score']:.2f} s (CPU stolen by the host: "
                        f"{done['stolen']:.0%})")
            peak_rss = descendant_peak_rss_mb()
            ceiling = machine_ceiling()
            log(f"machine ceiling: 2 processes at {ceiling[1]:.2f}x one")
        finally:
            for engine, _ in opened.values():
                engine.__exit__(None, None, None)
        clip_rows = per_clip_costs(plant, models_folder(Path(tmp) / "models", names[0]),
                                   args.clip_repeats, args.postgres, log)
        text = report(plant, settings, opened, rounds, clip_rows, peak_rss, ceiling, args)
    print(f"driver peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB",
          file=sys.stderr)
    publish(SECTION, text, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
