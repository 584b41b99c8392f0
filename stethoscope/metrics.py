"""How well scores separate normal from anomalous clips: confusion counts, precision,
recall, F1, AUC and DCASE's pAUC, overall and per section and domain.

scikit-learn computes the curves and counts; this module only groups clips the way the
DCASE 2023 Task 2 official evaluator does (nttcslab/dcase2023_task2_evaluator).
Labels: 0 = normal, 1 = anomalous; higher scores = more anomalous.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats
from sklearn.metrics import confusion_matrix, roc_auc_score

from stethoscope.errors import DataError

MAX_FPR = 0.1  # DCASE's pAUC: area under the ROC curve for FPR in [0, 0.1], McClish-standardised
EPS = sys.float_info.epsilon  # the evaluator floors metrics at this before harmonic means
TABLE_KEYS = ("n_normal", "n_anomalous", "auc", "pauc", "precision", "recall", "f1",
              "false_alarm_rate", "accuracy", "tp", "fp", "fn", "tn")


def _labels(y_true: Any) -> np.ndarray:
    y = np.asarray(y_true).ravel()
    if y.size and not np.isin(y, (0, 1)).all():
        raise DataError(f"labels must be 0 (normal) or 1 (anomalous), got values "
                        f"{sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}")
    return y.astype(int)


def _scores(scores: Any, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size != n:
        raise DataError(f"{s.size} scores for {n} labels")
    if not np.isfinite(s).all():
        raise DataError(f"{int(np.count_nonzero(~np.isfinite(s)))} scores are NaN or infinite")
    return s


def _ratio(num: float, den: float) -> float:
    """The evaluator's guard: 0 when the denominator is 0 (it divides by max(den, eps))."""
    return float(num / den) if den > 0 else 0.0


def confusion(y_true: Any, y_pred: Any) -> dict[str, int]:
    """Counts of true/false positives/negatives, anomalous being the positive class."""
    y = _labels(y_true)
    p = _labels(y_pred)
    if y.size != p.size:
        raise DataError(f"{p.size} predictions for {y.size} labels")
    tn, fp, fn, tp = confusion_matrix(y, p, labels=[0, 1]).ravel()
    return {"tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn)}


def auc_pauc(y_true: Any, scores: Any) -> tuple[float | None, float | None]:
    """ROC AUC and DCASE pAUC (``roc_auc_score(max_fpr=0.1)``); None when one class is absent."""
    y = _labels(y_true)
    s = _scores(scores, y.size)
    if np.unique(y).size < 2:
        return None, None
    return float(roc_auc_score(y, s)), float(roc_auc_score(y, s, max_fpr=MAX_FPR))


def classification_metrics(y_true: Any, scores: Any, threshold: float) -> dict[str, Any]:
    """Counts, precision, recall, F1, false-alarm rate, accuracy, AUC and pAUC of ``scores``
    with verdict ``score > threshold``."""
    y = _labels(y_true)
    s = _scores(scores, y.size)
    counts = confusion(y, (s > threshold).astype(int))
    tp, fp, fn, tn = counts["tp"], counts["fp"], counts["fn"], counts["tn"]
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    auc, pauc = auc_pauc(y, s)
    return {
        **counts,
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "false_alarm_rate": _ratio(fp, fp + tn) if fp + tn else None,
        "accuracy": _ratio(tp + tn, y.size),
        "auc": auc,
        "pauc": pauc,
        "n_normal": int(np.count_nonzero(y == 0)),
        "n_anomalous": int(np.count_nonzero(y == 1)),
    }


def _groups(values: Sequence[Any] | np.ndarray | None, n: int, name: str) -> np.ndarray | None:
    if values is None:
        return None
    array = np.asarray([str(v) for v in values], dtype=object)
    if array.size != n:
        raise DataError(f"{array.size} {name} labels for {n} clips")
    return array


def domain_metrics(y: np.ndarray, s: np.ndarray, threshold: float, in_domain: np.ndarray
                   ) -> dict[str, Any]:
    """Metrics of one domain within one section, by the DCASE 2023 official evaluator's rule.

    nttcslab/dcase2023_task2_evaluator, ``output_result``: the domain's AUC is computed on
    ``(y_domain == domain) | (y_true != 0)``, i.e. the domain's normal clips plus the
    anomalous clips of *both* domains; precision, recall and F1 use the domain's clips only;
    pAUC is not computed per domain (only per section over both domains), so it is None.
    """
    result = classification_metrics(y[in_domain], s[in_domain], threshold)
    auc_mask = in_domain | (y != 0)
    result["auc"], _ = auc_pauc(y[auc_mask], s[auc_mask])
    result["pauc"] = None
    return result


def _by_domain(y: np.ndarray, s: np.ndarray, threshold: float, domains: np.ndarray,
               sections: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per domain: counts and rates over all its clips; AUC is the evaluator's per-section
    domain AUC, averaged over sections (its "arithmetic mean" row) when there are several."""
    result: dict[str, dict[str, Any]] = {}
    for domain in sorted(set(domains)):
        in_domain = domains == domain
        entry = classification_metrics(y[in_domain], s[in_domain], threshold)
        aucs = []
        for section in sorted(set(sections)):
            in_section = sections == section
            if not (in_domain & in_section).any():
                continue
            auc = domain_metrics(y[in_section], s[in_section], threshold,
                                 in_domain[in_section])["auc"]
            if auc is not None:
                aucs.append(auc)
        entry["auc"] = float(np.mean(aucs)) if aucs else None
        entry["pauc"] = None
        result[domain] = entry
    return result


def evaluate(y_true: Any, scores: Any, threshold: float, *,
             sections: Sequence[Any] | np.ndarray | None = None,
             domains: Sequence[Any] | np.ndarray | None = None) -> dict[str, Any]:
    """All metrics of a test run: ``"overall"``, plus ``"by_section"`` (each with its own
    ``"by_domain"`` when domains are given) and ``"by_domain"`` when those labels are given,
    plus ``"dcase"`` (:func:`dcase_official_score`) when both source and target are present.

    Domain AUCs follow the DCASE 2023 evaluator (see :func:`domain_metrics`).
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    if y.size == 0:
        raise DataError("no clips to evaluate")
    threshold = float(threshold)
    section_labels = _groups(sections, y.size, "section")
    domain_labels = _groups(domains, y.size, "domain")
    result: dict[str, Any] = {"threshold": threshold,
                              "overall": classification_metrics(y, s, threshold)}
    if section_labels is not None:
        result["by_section"] = {}
        for section in sorted(set(section_labels)):
            in_section = section_labels == section
            entry = classification_metrics(y[in_section], s[in_section], threshold)
            if domain_labels is not None:
                entry["by_domain"] = {
                    domain: domain_metrics(y[in_section], s[in_section], threshold,
                                           domain_labels[in_section] == domain)
                    for domain in sorted(set(domain_labels[in_section]))
                }
            result["by_section"][section] = entry
    if domain_labels is not None:
        one_section = np.full(y.size, "", dtype=object)
        result["by_domain"] = _by_domain(y, s, threshold, domain_labels,
                                         section_labels if section_labels is not None
                                         else one_section)
        if {"source", "target"} <= set(domain_labels):
            try:
                result["dcase"] = dcase_official_score(y, s, sections=section_labels,
                                                       domains=domain_labels)
            except DataError:  # some section lacks a domain or anomalies: no official score
                pass
    return result


def dcase_official_score(y_true: Any, scores: Any, *,
                         sections: Sequence[Any] | np.ndarray | None = None,
                         domains: Sequence[Any] | np.ndarray) -> dict[str, Any]:
    """The DCASE 2023 Task 2 ranking score: the harmonic mean, over every section, of
    AUC (source), AUC (target) and pAUC, each floored at machine epsilon as the official
    evaluator does. Sections of several machine types can be passed as e.g. ``"valve/00"``.

    Returns ``{"score", "hmean_auc_source", "hmean_auc_target", "hmean_pauc",
    "per_section": {section: {"auc_source", "auc_target", "pauc"}}}``.
    """
    y = _labels(y_true)
    s = _scores(scores, y.size)
    domain_labels = _groups(domains, y.size, "domain")
    section_labels = _groups(sections, y.size, "section")
    if section_labels is None:
        section_labels = np.full(y.size, "00", dtype=object)
    per_section: dict[str, dict[str, float]] = {}
    for section in sorted(set(section_labels)):
        m = section_labels == section
        ys, ss, ds = y[m], s[m], domain_labels[m]
        row: dict[str, float] = {}
        for domain in ("source", "target"):
            if not ((ds == domain) & (ys == 0)).any() or not (ys == 1).any():
                raise DataError(f"section {section}: DCASE score needs normal {domain} clips "
                                "and anomalous clips")
            auc_mask = (ds == domain) | (ys != 0)
            row[f"auc_{domain}"] = float(roc_auc_score(ys[auc_mask], ss[auc_mask]))
        row["pauc"] = float(roc_auc_score(ys, ss, max_fpr=MAX_FPR))
        per_section[section] = row

    def hmean(values: list[float]) -> float:
        return float(scipy.stats.hmean(np.maximum(values, EPS)))

    rows = list(per_section.values())
    everything = ([r["auc_source"] for r in rows] + [r["auc_target"] for r in rows]
                  + [r["pauc"] for r in rows])
    return {
        "score": hmean(everything),
        "hmean_auc_source": hmean([r["auc_source"] for r in rows]),
        "hmean_auc_target": hmean([r["auc_target"] for r in rows]),
        "hmean_pauc": hmean([r["pauc"] for r in rows]),
        "per_section": per_section,
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def metric_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flat rows (``group`` plus the metrics) from :func:`evaluate`'s result, for tables."""
    if "overall" not in metrics:  # a single classification_metrics dict
        return [{"group": "all", **{k: metrics.get(k) for k in TABLE_KEYS}}]
    rows = [{"group": "overall", **{k: metrics["overall"].get(k) for k in TABLE_KEYS}}]
    for section, entry in metrics.get("by_section", {}).items():
        rows.append({"group": f"section {section}", **{k: entry.get(k) for k in TABLE_KEYS}})
        for domain, sub in entry.get("by_domain", {}).items():
            rows.append({"group": f"section {section} {domain}",
                         **{k: sub.get(k) for k in TABLE_KEYS}})
    for domain, entry in metrics.get("by_domain", {}).items():
        rows.append({"group": f"domain {domain}", **{k: entry.get(k) for k in TABLE_KEYS}})
    return rows


def format_table(metrics: Mapping[str, Any]) -> str:
    """A short plain-text table of :func:`evaluate` (or :func:`classification_metrics`)
    output for the terminal."""
    columns = ("group", "n_normal", "n_anomalous", "auc", "pauc", "precision", "recall", "f1",
               "false_alarm_rate")
    headers = ("", "normal", "anomalous", "AUC", "pAUC", "precision", "recall", "F1",
               "false alarms")
    rows = [[_cell(row[c]) for c in columns] for row in metric_rows(metrics)]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(headers, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    if "threshold" in metrics:
        lines.append(f"threshold {metrics['threshold']:.4g}: anomalous when score > threshold")
    if "dcase" in metrics:
        d = metrics["dcase"]
        lines.append(f"DCASE 2023 official score {d['score']:.3f} (h-mean AUC source "
                     f"{d['hmean_auc_source']:.3f}, target {d['hmean_auc_target']:.3f}, "
                     f"pAUC {d['hmean_pauc']:.3f})")
    return "\n".join(lines)
