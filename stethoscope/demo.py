"""The offline demo: simulate a machine, train the default detector, evaluate, write the report.

It needs no data at hand, so it is the README's first command after installing. The demo
folder is a stethoscope ``demo`` artefact (:mod:`stethoscope.atomic`): ``data/`` (the
simulated recordings), ``model/``, ``report/`` and ``summary.json``, each written atomically.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

from rich.console import Console

from stethoscope.atomic import atomic_directory, atomic_write_text, claim_folder
from stethoscope.datasets import find_clips
from stethoscope.detector import DEFAULT_MODEL, Detector
from stethoscope.evaluation import evaluate_detector
from stethoscope.progress import progress_enabled

DEMO_KIND = "demo"
SIMULATION_KIND = "simulation"


def simulate_into(folder: str | Path, machine: str, n_normal: int, n_abnormal: int,
                  **options) -> Path:
    """Simulate one machine id into ``folder`` (``normal/``, ``abnormal/``, ``faults.csv``)
    atomically: ``folder`` is absent, empty, or a simulation stethoscope wrote, which is
    replaced whole (OutputError for anything else). ``options`` go to
    :func:`stethoscope.simulate.simulate_dataset`. Returns ``folder``."""
    from stethoscope.simulate import simulate_dataset

    folder = Path(folder)
    with atomic_directory(folder, kind=SIMULATION_KIND) as tmp:
        written = simulate_dataset(machine, n_normal, n_abnormal, tmp / "staging", **options)
        for item in os.listdir(written):  # lift <machine>/<id>/ up into the folder itself
            os.replace(written / item, tmp / item)
        for empty in (written, written.parent, tmp / "staging"):
            empty.rmdir()
    return folder


def _fault_types(root: Path) -> dict[Path, str]:
    """Fault type of each clip (resolved path → fault), from the simulator's faults.csv."""
    faults: dict[Path, str] = {}
    for table in root.rglob("faults.csv"):
        with table.open(newline="") as handle:
            for row in csv.DictReader(handle):
                faults[(table.parent / row["file"]).resolve()] = row["fault"]
    return faults


def run_demo(out: str | Path = "stethoscope-demo", *, machine: str = "fan",
             model: str | None = None, epochs: int | None = None, seed: int = 0,
             n_train: int = 60, n_test_normal: int = 40, n_abnormal: int = 60) -> Path:
    """Simulate ``machine``, train on normal clips, evaluate on held-out ones; return the
    report's ``index.html``. Also writes ``data/``, ``model/`` and ``summary.json`` under
    ``out``, which must be new, empty or an earlier demo folder (OutputError otherwise)."""
    from stethoscope.models import registry

    registry.info(model or DEFAULT_MODEL)  # an unknown name fails before any work
    out = claim_folder(out, DEMO_KIND)
    console = Console(stderr=True, quiet=not progress_enabled())
    start = time.perf_counter()
    console.print(f"[bold]1/4[/] simulating a {machine}: {n_train + n_test_normal} normal and "
                  f"{n_abnormal} abnormal 10 s clips → {out / 'data'}")
    root = simulate_into(out / "data" / machine / "id_00", machine, n_train + n_test_normal,
                         n_abnormal, seed=seed)
    clips = find_clips(root)
    normal = [c for c in clips if c.label == 0]
    train, test = normal[:n_train], normal[n_train:] + [c for c in clips if c.label == 1]

    console.print(f"[bold]2/4[/] training {model or DEFAULT_MODEL} on {len(train)} normal clips")
    det = Detector(model or DEFAULT_MODEL, epochs=epochs, seed=seed).fit(train)
    det.save(out / "model")
    det.save(out / "models" / machine)  # the layout `stethoscope serve --models` reads

    console.print(f"[bold]3/4[/] scoring {len(test)} held-out clips")
    faults = _fault_types(Path(root))
    groups = [faults.get(c.path.resolve(), "normal") for c in test]
    report_dir = out / "report"
    result = evaluate_detector(det, test, report_dir=report_dir,
                               title=f"stethoscope demo: simulated {machine}",
                               extra_groups={"fault": groups})

    seconds = time.perf_counter() - start
    overall = result["metrics"]["overall"]
    summary = {"machine": machine, "model": det.model, "seconds": round(seconds, 1),
               "overall": overall, "by_fault": result["metrics"].get("by_fault", {})}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    console.print(f"[bold]4/4[/] AUC {overall['auc']:.3f}, pAUC {overall['pauc']:.3f}; "
                  f"TP {overall['tp']} FP {overall['fp']} FN {overall['fn']} TN {overall['tn']}"
                  f" at {det.threshold_.describe()}")
    for fault, values in summary["by_fault"].items():
        console.print(f"      {fault:<12} AUC {values['auc']:.3f}")
    console.print(f"done in {seconds:.0f} s")
    return report_dir / "index.html"
