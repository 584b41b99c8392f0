"""Detection quality of every stethoscope model on a labelled data set, over several seeds.

Each model is trained through ``stethoscope.Detector`` on the normal training clips, with
its registered defaults (features, training, pooling) and the default threshold
(mean + 2σ of the normal training scores; out-of-sample scores where the model gives them).
It then scores the test clips. Printed and written to ``docs/quality.md``: AUC, DCASE pAUC,
per-domain AUC (DCASE 2023 evaluator rule), TP/FP/FN/TN at the threshold and the false-alarm
rate on normal test clips, as mean ± standard deviation over seeds, plus times.

    python benchmarks/quality.py --data ../shared/data/dcase2023_valve --seeds 3
    python benchmarks/quality.py --data ../shared/data/mimii_8ch --models clip-stats,idnn
    python benchmarks/quality.py --data DIR_WITH_NPY        # train.npy, test.npy, test_labels.npy

Layouts of ``--data``:

* DCASE: ``train/`` (normal clips) and ``test/`` (labels and domains in the file names);
* MIMII: a folder with ``normal/`` and ``abnormal/`` (searched below ``--data``): the last
  ``min(#abnormal, #normal // 2)`` normal clips and every abnormal clip are the test set, as
  in DCASE 2020, the other normal clips train;
* clip pairs (``<machine>_normal.wav`` + ``<machine>_abnormal.wav``, e.g. ``mimii_8ch``):
  each channel of a clip is one recording; non-overlapping crops of ``--crop`` seconds from the first half of
  the normal clip train, crops of its second half and of the abnormal clip test;
* arrays: ``train.npy`` ``(N, C, M, F)`` or ``(N, M, F)`` log-mel, ``test.npy``,
  ``test_labels.npy`` (0/1) and optionally ``test_domains.npy``.

A model with no trainable parameters gives the same result for every seed; it runs once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _common import (
    REPO,
    add_common_arguments,
    ensure_repo_on_path,
    logger,
    machine_line,
    markdown_table,
    shown_command,
    update_doc_section,
)

ensure_repo_on_path()

from stethoscope.datasets import Clip, find_clips, groups_of, labels_of  # noqa: E402
from stethoscope.detector import Detector  # noqa: E402
from stethoscope.errors import DataError  # noqa: E402
from stethoscope.features import FeatureConfig, extract_features  # noqa: E402
from stethoscope.metrics import evaluate  # noqa: E402
from stethoscope.models import registry  # noqa: E402

QUALITY_DOC = REPO / "docs" / "quality.md"
DEFAULT_CACHE = Path.home() / ".cache" / "stethoscope" / "quality-features"


# ----------------------------------------------------------------------------- data sets


@dataclass
class Split:
    """One train/test task: normal training inputs, labelled test inputs, optional domains.

    ``train``/``test`` are clip lists (features computed per model) or, for arrays and
    crops, a function ``FeatureConfig -> (N, C, M, F)`` array.
    """

    name: str
    train: list[Clip] | object
    test: list[Clip] | object
    labels: np.ndarray
    domains: np.ndarray | None = None
    sections: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


def find_splits(data: Path, crop_seconds: float) -> list[Split]:
    """The train/test tasks of ``data`` (see the module docstring for the layouts)."""
    if not data.exists():
        raise DataError("no such data folder", data)
    if (data / "train.npy").exists():
        return [array_split(data)]
    if (data / "train").is_dir() and (data / "test").is_dir():
        return [dcase_split(data)]
    pairs = sorted(p for p in data.glob("*_normal.wav")
                   if (data / p.name.replace("_normal.wav", "_abnormal.wav")).exists())
    if pairs:
        return [pair_split(p, crop_seconds) for p in pairs]
    folders = sorted({p.parent for p in data.rglob("normal") if p.is_dir()
                      and (p.parent / "abnormal").is_dir()} | ({data} if (data / "normal").is_dir()
                                                                 and (data / "abnormal").is_dir() else set()))
    if folders:
        return [mimii_split(f, data) for f in folders]
    raise DataError("no DCASE (train/, test/), MIMII (normal/, abnormal/), clip-pair or .npy "
                    "layout found", data)


def dcase_split(data: Path) -> Split:
    train = find_clips(data / "train")
    test = find_clips(data / "test")
    if any(c.label == 1 for c in train):
        raise DataError("train/ holds anomalous clips", data / "train")
    labels = labels_of(test)
    return Split(data.name, train, test, labels, groups_of(test, "domain"),
                 groups_of(test, "section"))


def mimii_split(folder: Path, root: Path) -> Split:
    normal = find_clips(folder / "normal")
    abnormal = find_clips(folder / "abnormal")
    n_test = min(len(abnormal), len(normal) // 2)
    if n_test < 1 or len(normal) - n_test < 2:
        raise DataError(f"too few clips for a split: {len(normal)} normal, "
                        f"{len(abnormal)} abnormal", folder)
    test = normal[-n_test:] + abnormal
    labels = np.r_[np.zeros(n_test, int), np.ones(len(abnormal), int)]
    name = str(folder.relative_to(root.parent)) if folder != root else folder.name
    return Split(name, normal[:-n_test], test, labels,
                 notes=[f"{len(normal) - n_test} normal clips train; {n_test} normal + "
                        f"{len(abnormal)} abnormal test"])


def array_split(data: Path) -> Split:
    def loader(name: str):
        def load(_config: FeatureConfig) -> np.ndarray:
            array = np.load(data / name, mmap_mode="r")
            return np.asarray(array[:, None] if array.ndim == 3 else array, dtype=np.float32)
        return load

    labels = np.load(data / "test_labels.npy").astype(int).ravel()
    domains = np.load(data / "test_domains.npy", allow_pickle=False) \
        if (data / "test_domains.npy").exists() else None
    return Split(data.name, loader("train.npy"), loader("test.npy"), labels, domains)


def pair_split(normal_path: Path, crop_seconds: float) -> Split:
    """Crops of a multi-channel normal/abnormal clip pair; each channel is one recording."""
    machine = normal_path.name.replace("_normal.wav", "")
    abnormal_path = normal_path.with_name(f"{machine}_abnormal.wav")

    def channel_specs(path: Path, config: FeatureConfig) -> np.ndarray:
        specs = extract_features([path], config.replace(channels="all"), progress=False)
        return np.asarray(specs[0], dtype=np.float32)[:, None]  # (channels, 1, M, F)

    def crops(specs: np.ndarray, config: FeatureConfig, part: str) -> np.ndarray:
        frames = specs.shape[-1]
        length = max(2, int(round(crop_seconds * config.sample_rate / config.hop_length)))
        lo, hi = {"first": (0, frames // 2), "second": (frames // 2, frames),
                  "all": (0, frames)}[part]
        starts = range(lo, hi - length + 1, length)  # no overlap: held-out crops share no frame
        return np.concatenate([specs[..., s:s + length] for s in starts])

    cache: dict[tuple, np.ndarray] = {}

    def counted(part_path: Path, part: str):
        def load(config: FeatureConfig) -> np.ndarray:
            key = (part_path, config)
            if key not in cache:
                cache[key] = channel_specs(part_path, config)
            return crops(cache[key], config, part)
        return load

    normal_second = counted(normal_path, "second")
    abnormal_all = counted(abnormal_path, "all")

    def test(config: FeatureConfig) -> np.ndarray:
        return np.concatenate([normal_second(config), abnormal_all(config)])

    probe = FeatureConfig()
    n_normal = len(normal_second(probe))
    n_abnormal = len(abnormal_all(probe))
    labels = np.r_[np.zeros(n_normal, int), np.ones(n_abnormal, int)]
    return Split(f"{normal_path.parent.name}/{machine}", counted(normal_path, "first"), test,
                 labels, notes=[f"{crop_seconds:g} s crops of every channel, no overlap; train: "
                                "first half of the normal clip; test: its second half + the "
                                "abnormal clip. One recording per machine and 8 correlated "
                                "channels: an AUC sanity check; its false-alarm rate is not "
                                "an estimate for independent recordings"])


# ----------------------------------------------------------------------------- one run


@dataclass
class Run:
    metrics: dict
    fit_seconds: float
    score_seconds: float


def run_once(model: str, split: Split, seed: int, epochs: int | None,
             cache_dir: Path | None) -> Run:
    """Train ``model`` with ``seed`` on the split's normal clips and evaluate on its test set."""
    detector = Detector(model, seed=seed, epochs=epochs, cache_dir=cache_dir, progress=False)
    start = time.perf_counter()
    if isinstance(split.train, list):
        detector.fit(split.train)
    else:
        detector.fit(split.train(model_features(model)))
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if isinstance(split.test, list):
        specs, _ = detector.load_features(split.test)
    else:
        specs = split.test(detector.feature_config_)
    scores = detector.score_features(specs, split.name)
    score_seconds = time.perf_counter() - start
    metrics = evaluate(split.labels, scores, detector.threshold_.value_,
                       sections=split.sections, domains=split.domains)
    return Run(metrics, fit_seconds, score_seconds)


def model_features(model: str) -> FeatureConfig:
    """The model's default feature settings (what ``Detector(model)`` extracts)."""
    return FeatureConfig().replace(**registry.info(model).features)


def has_trainable_weights(model: str) -> bool:
    """Whether seeds matter: a model without trainable parameters is deterministic."""
    config = model_features(model)
    probe = registry.build(model, (1, config.n_mels, config.frames or 313))
    return any(p.requires_grad for p in probe.parameters())


# ----------------------------------------------------------------------------- summary


def mean_spread(values: list[float | None], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summary_row(model: str, runs: list[Run]) -> list[str]:
    overall = [r.metrics["overall"] for r in runs]
    by_domain = [r.metrics.get("by_domain", {}) for r in runs]
    counts = {k: statistics.fmean(o[k] for o in overall) for k in ("tp", "fp", "fn", "tn")}
    count_text = "/".join(f"{counts[k]:.0f}" if counts[k] == int(counts[k]) else f"{counts[k]:.1f}"
                          for k in ("tp", "fp", "fn", "tn"))
    far = [o["false_alarm_rate"] for o in overall]
    return [
        model,
        str(len(runs)),
        mean_spread([o["auc"] for o in overall]),
        mean_spread([o["pauc"] for o in overall]),
        mean_spread([d.get("source", {}).get("auc") for d in by_domain]),
        mean_spread([d.get("target", {}).get("auc") for d in by_domain]),
        count_text,
        mean_spread([100 * f if f is not None else None for f in far], 1) + " %",
        f"{statistics.fmean(r.fit_seconds for r in runs):.0f}",
        f"{statistics.fmean(r.score_seconds for r in runs):.1f}",
    ]


HEADERS = ["model", "runs", "AUC", "pAUC", "AUC source", "AUC target", "TP/FP/FN/TN",
           "false alarms (normal test clips)", "fit s", "score s"]


def split_table(split: Split, rows: list[list[str]]) -> str:
    n_anomalous = int(split.labels.sum())
    n_normal = int(len(split.labels) - n_anomalous)
    lines = [f"**{split.name}** — test: {n_normal} normal + {n_anomalous} anomalous clips."]
    lines += [f"{note}." for note in split.notes]
    return "\n".join(lines) + "\n\n" + markdown_table(HEADERS, rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="labelled data set folder")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per trainable model")
    parser.add_argument("--models", default=None,
                        help="comma-separated model names (default: every anomaly model)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="override the models' training epochs (default: registered)")
    parser.add_argument("--crop", type=float, default=1.0,
                        help="crop length in seconds for clip-pair data (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="feature cache folder (default ~/.cache/stethoscope/...)")
    parser.add_argument("--section", default=None,
                        help="name of the docs/quality.md section (default: data folder name)")
    add_common_arguments(parser)
    parser.set_defaults(doc=QUALITY_DOC)
    args = parser.parse_args(argv)
    log = logger(args.quiet)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models.split(",") if args.models else registry.names()
    for model in models:
        registry.info(model)  # unknown names fail before any work
    splits = find_splits(args.data, args.crop)

    tables = []
    for split in splits:
        rows = []
        for model in models:
            seeds = range(args.seeds) if has_trainable_weights(model) else range(1)
            runs = []
            for seed in seeds:
                log(f"{split.name}: {model} seed {seed} ...")
                try:
                    run = run_once(model, split, seed, args.epochs, args.cache)
                except DataError as error:  # a model that cannot take this data: say so
                    log(f"  skipped: {error}")
                    break
                overall = run.metrics["overall"]
                log(f"  AUC {overall['auc']:.3f} pAUC {overall['pauc']:.3f} "
                    f"TP/FP/FN/TN {overall['tp']}/{overall['fp']}/{overall['fn']}/"
                    f"{overall['tn']} ({run.fit_seconds:.0f} s fit)")
                runs.append(run)
            if runs:
                rows.append(summary_row(model, runs))
        table = split_table(split, rows)
        print(table + "\n", flush=True)
        tables.append(table)

    if not args.no_doc:
        command = shown_command("quality.py", argv)
        body = (f"Command: `{command}`\n\n{machine_line()}\n\n" + "\n\n".join(tables) +
                "\n\nmean ± standard deviation over seeds (runs); TP/FP/FN/TN are means; "
                "threshold: each detector's default (mean + 2σ of normal training scores, "
                "out-of-sample where the model provides them).")
        name = args.section or f"quality-{args.data.name}"
        update_doc_section(name, body, doc=args.doc, draft=args.draft)
        log(f"wrote section {name} of {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
