"""Evaluate a fitted Detector on labelled recordings, and run an autoencoder's halves apart.

This is the glue behind ``stethoscope evaluate``, ``encode`` and ``decode``: the detector
scores, :mod:`metrics` counts, :mod:`report` draws.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np

from stethoscope.atomic import atomic_write_bytes
from stethoscope.datasets import groups_of, labels_of
from stethoscope.detector import Detector, Inputs
from stethoscope.errors import DataError
from stethoscope.features import clip_features, input_kind
from stethoscope.metrics import evaluate
from stethoscope.report import write_evaluation_report


def evaluate_detector(detector: Detector, data: Inputs, *, report_dir: str | Path | None = None,
                      title: str | None = None, extra_groups: dict | None = None) -> dict:
    """Score labelled recordings, compute the metrics, and optionally write the HTML report.

    Every readable recording is scored; the ones that cannot be are left out of the metrics
    and returned (and listed in the report) with their one-line errors.

    Returns
    -------
    dict with ``"metrics"``, ``"scores"`` ``(N,)`` and ``"labels"`` ``(N,)`` of the scored
    recordings, ``"clips"`` (those recordings), ``"recordings"`` (their
    :class:`~stethoscope.scoring.RecordingScore`, windows included) and ``"errors"`` (the
    RecordingScores of the recordings that could not be scored). ``extra_groups`` maps a
    name to per-recording group values (e.g. simulated fault type, in the order of the
    recordings found) whose AUCs are added under ``metrics["by_<name>"]``.

    Raises
    ------
    DataError
        when the inputs are not recordings, or the first error when none could be scored.
    """
    if input_kind(data) != "recordings":
        raise DataError("evaluation needs labelled recordings (MIMII or DCASE layout)")
    all_clips = detector.featurizer().clips(data)
    results = detector.score_recordings(all_clips, on_error="collect")
    scored = [i for i, r in enumerate(results) if r.ok]
    failed = [r for r in results if not r.ok]
    if not scored:
        raise DataError(f"none of the {len(results)} recordings could be scored; the first: "
                        f"{failed[0].error}")
    clips = [all_clips[i] for i in scored]
    recordings = [results[i] for i in scored]
    labels = labels_of(clips)
    scores = np.array([r.score for r in recordings], dtype=np.float64)
    sections, domains = groups_of(clips, "section"), groups_of(clips, "domain")
    metrics = evaluate(labels, scores, detector.threshold_.value_, sections=sections,
                       domains=domains)
    for name, values in (extra_groups or {}).items():
        metrics[f"by_{name}"] = _group_aucs(labels, scores, np.asarray(values)[scored])
    if report_dir is not None:
        spectrogram = lru_cache(maxsize=None)(lambda i: _spectrogram(detector, clips[i]))
        write_evaluation_report(
            report_dir, title=title or f"stethoscope evaluation: {detector.model}",
            scores=scores, threshold=detector.threshold_, clip_names=[c.path for c in clips],
            y_true=labels, sections=sections, domains=domains, metrics=metrics,
            history=detector.history_, spectrograms=spectrogram,
            error_maps=lambda i: _error_map(detector, spectrogram(i)),
            model_description=detector.describe(), features=detector.feature_config_,
            held_out_scores=detector.train_scores_,
            timelines=[(r.path, r.windows) for r in recordings],
            errors=[(r.path, r.error) for r in failed])
    return {"metrics": metrics, "scores": scores, "labels": labels, "clips": clips,
            "recordings": recordings, "errors": failed}


def _group_aucs(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> dict:
    """AUC of each anomaly group (e.g. fault type) against all normal clips."""
    from stethoscope.metrics import auc_pauc

    normal = labels == 0
    out = {}
    for group in sorted({g for g, lab in zip(groups, labels, strict=True) if lab == 1}):
        pick = normal | ((groups == group) & (labels == 1))
        auc, pauc = auc_pauc(labels[pick], scores[pick])
        out[str(group)] = {"auc": auc, "pauc": pauc, "n_anomalous": int((pick & ~normal).sum())}
    return out


def _spectrogram(detector: Detector, clip) -> np.ndarray:
    """One clip's features (its first window), computed on demand for the few clips a
    report shows."""
    return clip_features(clip.path, detector.featurizer().config)


def _error_map(detector: Detector, spec: np.ndarray) -> np.ndarray:
    return detector.explain_features(np.asarray(spec, dtype=np.float32)[None])[0]


def load_npy(path: str | Path) -> np.ndarray:
    """Read a ``.npy`` array (never unpickles), or a one-line error naming the file."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the array ({err})", path) from None


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` atomically."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def encode(detector: Detector, data: Inputs, out: str | Path | None = None) -> np.ndarray:
    """Codes of the encoder half for every clip (frame models: every stacked frame)."""
    codes = detector.encode(data)
    if out is not None:
        save_npy(out, codes)
    return codes


def decode(detector: Detector, codes: str | Path | np.ndarray, out: str | Path | None = None
           ) -> np.ndarray:
    """Outputs of the decoder half for codes written by :func:`encode`."""
    source = str(codes) if not isinstance(codes, np.ndarray) else "codes array"
    outputs = detector.decode(codes if isinstance(codes, np.ndarray) else load_npy(codes), source)
    if out is not None:
        save_npy(out, outputs)
    return outputs
