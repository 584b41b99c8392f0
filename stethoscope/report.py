"""HTML and Markdown pages that assemble figures, tables and numbers.

:class:`Report` collects blocks (headings, paragraphs, figures, tables) and writes them as
a self-contained ``index.html`` (inline CSS, figures referenced by paths relative to the
page, so the folder works wherever it is moved or opened from) and a ``report.md``.
:func:`write_evaluation_report` builds the detector's evaluation page.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stethoscope import plots
from stethoscope.atomic import atomic_directory, atomic_write_text
from stethoscope.errors import DataError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from stethoscope.plots import SpectrogramAxes
    from stethoscope.scoring import Threshold
    from stethoscope.training import History

REPORT_KIND = "report"
THRESHOLD_CHOICES = ("mean+2std", "mean+3std", "p95", "p99", "gamma:0.9", "fpr:0.01",
                     "fpr:0.05", "fpr:0.1")
LOW_RECALL = 0.5  # below this share of anomalies found, the report suggests other rules

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1000px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
figure { margin: 1.2em 0; text-align: center; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #555; margin-top: .3em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; font-weight: 600; padding-bottom: .3em; text-align: left; }
""".strip()


def format_value(value: Any) -> str:
    """A table cell: floats to 4 significant digits, None/NaN as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.4g}"
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalar
        return format_value(value.item())
    return str(value)


def _md_cell(text: str) -> str:
    """Escape what would break a Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_text(text: str) -> str:
    """Escape HTML in Markdown text (renderers pass raw HTML through)."""
    return html.escape(text, quote=False)


@dataclass
class _Block:
    kind: str  # "heading", "text", "figure", "table"
    data: dict[str, Any] = field(default_factory=dict)


class Report:
    """A page of headings, paragraphs, figures and tables, written as HTML and Markdown."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.blocks: list[_Block] = []

    def add_heading(self, text: str, level: int = 2) -> Report:
        if not 1 <= level <= 6:
            raise ValueError(f"heading level must be 1..6, not {level}")
        self.blocks.append(_Block("heading", {"text": str(text), "level": level}))
        return self

    def add_text(self, text: str) -> Report:
        """Plain text; blank lines separate paragraphs. Never interpreted as markup."""
        for paragraph in str(text).strip().split("\n\n"):
            if paragraph.strip():
                self.blocks.append(_Block("text", {"text": paragraph.strip()}))
        return self

    def add_figure(self, png_path: str | Path, caption: str = "") -> Report:
        """A figure by path (absolute, or relative to the working directory); written pages
        refer to it relative to the folder they are written to."""
        self.blocks.append(_Block("figure", {"path": Path(png_path), "caption": str(caption)}))
        return self

    def add_table(self, rows: Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]],
                  headers: Sequence[str] | None = None, caption: str | None = None) -> Report:
        """A table from a list of dicts (headers = union of keys, in order) or from
        ``headers`` plus a list of row sequences."""
        rows = list(rows)
        if headers is None:
            headers = []
            for row in rows:
                if not isinstance(row, Mapping):
                    raise TypeError("rows must be dicts unless headers are given")
                headers += [key for key in row if key not in headers]
            cells = [[row.get(h) for h in headers] for row in rows]
        else:
            cells = [[row.get(h) for h in headers] if isinstance(row, Mapping) else list(row)
                     for row in rows]
        self.blocks.append(_Block("table", {
            "headers": [str(h) for h in headers],
            "rows": [[format_value(v) for v in row] for row in cells],
            "caption": caption,
        }))
        return self

    def add_metrics(self, metrics: Mapping[str, Any], caption: str | None = None) -> Report:
        """A two-column metric/value table; nested dicts are skipped (add them separately)."""
        rows = [[key, value] for key, value in metrics.items()
                if not isinstance(value, Mapping | list | tuple)]
        return self.add_table(rows, headers=["metric", "value"], caption=caption)

    # ---- rendering -------------------------------------------------------------------

    @staticmethod
    def _relative(path: Path, directory: Path) -> str:
        """``path`` as seen from a page in ``directory``, both taken from the working
        directory when relative, so the link holds wherever the folder is opened from."""
        return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(directory))
                    ).as_posix()

    def to_html(self, directory: str | Path = ".") -> str:
        directory = Path(directory)
        esc = html.escape
        parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                 f"<title>{esc(self.title)}</title>", f"<style>\n{CSS}\n</style>", "</head>",
                 "<body>", f"<h1>{esc(self.title)}</h1>"]
        for block in self.blocks:
            d = block.data
            if block.kind == "heading":
                parts.append(f"<h{d['level']}>{esc(d['text'])}</h{d['level']}>")
            elif block.kind == "text":
                parts.append(f"<p>{esc(d['text'])}</p>")
            elif block.kind == "figure":
                src = esc(self._relative(d["path"], directory), quote=True)
                parts.append(f'<figure><img src="{src}" alt="{esc(d["caption"], quote=True)}">'
                             f"<figcaption>{esc(d['caption'])}</figcaption></figure>")
            elif block.kind == "table":
                parts.append("<table>")
                if d["caption"]:
                    parts.append(f"<caption>{esc(d['caption'])}</caption>")
                parts.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in d["headers"])
                             + "</tr>")
                for row in d["rows"]:
                    parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
                parts.append("</table>")
        parts += ["</body>", "</html>", ""]
        return "\n".join(parts)

    def to_markdown(self, directory: str | Path = ".") -> str:
        directory = Path(directory)
        parts = [f"# {_md_text(self.title)}", ""]
        for block in self.blocks:
            d = block.data
            if block.kind == "heading":
                parts += ["#" * d["level"] + " " + _md_text(d["text"]), ""]
            elif block.kind == "text":
                parts += [_md_text(d["text"]), ""]
            elif block.kind == "figure":
                src = self._relative(d["path"], directory).replace(" ", "%20")
                alt = _md_text(d["caption"]).replace("[", "\\[").replace("]", "\\]")
                parts += [f"![{alt}]({src})", ""]
                if d["caption"]:
                    parts += [f"*{_md_text(d['caption'])}*", ""]
            elif block.kind == "table":
                if d["caption"]:
                    parts += [f"**{_md_text(d['caption'])}**", ""]
                parts.append("| " + " | ".join(_md_cell(_md_text(h)) for h in d["headers"])
                             + " |")
                parts.append("|" + "|".join("---" for _ in d["headers"]) + "|")
                for row in d["rows"]:
                    parts.append("| " + " | ".join(_md_cell(_md_text(c)) for c in row) + " |")
                parts.append("")
        return "\n".join(parts)

    def write(self, directory: str | Path, *, html: bool = True,
              markdown: bool = True) -> dict[str, Path]:
        """Write ``index.html`` and/or ``report.md`` into ``directory`` (each atomically).

        Returns ``{"html": path, "markdown": path}`` for what was written.
        """
        directory = Path(directory)
        written: dict[str, Path] = {}
        if html:
            written["html"] = atomic_write_text(directory / "index.html",
                                                self.to_html(directory))
        if markdown:
            written["markdown"] = atomic_write_text(directory / "report.md",
                                                    self.to_markdown(directory))
        return written


# ---- the detector's evaluation report -------------------------------------------------

ArrayLookup = Callable[[int], Any] | Mapping[int, Any] | Sequence[Any] | np.ndarray
SCORES_COLUMNS = ("path", "score", "prediction", "label", "section", "domain")


def _lookup(source: ArrayLookup | None, index: int) -> np.ndarray | None:
    """The array for clip ``index`` from a callable, a mapping or an indexable array."""
    if source is None:
        return None
    if callable(source):
        item = source(index)
    elif isinstance(source, Mapping):
        item = source.get(index)
    else:
        item = source[index]
    if item is None:
        return None
    if hasattr(item, "detach"):
        item = item.detach().cpu().numpy()
    return np.asarray(item, dtype=np.float32)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _json_clean(value: Any) -> Any:
    """NaN/inf become null so that metrics.json is strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_clean(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(float(value)):
        return None
    return value


def scores_csv(clip_names: Sequence[Any], scores: np.ndarray, predictions: np.ndarray,
               labels: np.ndarray | None, sections: Sequence[Any] | None,
               domains: Sequence[Any] | None) -> str:
    """One row per clip: path, score, prediction, label, section, domain (blank if unknown)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SCORES_COLUMNS)
    for i, name in enumerate(clip_names):
        writer.writerow([
            str(name), repr(float(scores[i])), int(predictions[i]),
            "" if labels is None else int(labels[i]),
            "" if sections is None else sections[i],
            "" if domains is None else domains[i],
        ])
    return out.getvalue()


def _example_indices(scores: np.ndarray, labels: np.ndarray | None, per_class: int
                     ) -> list[tuple[int, str]]:
    """Typical clips to show: the median-scoring normal and anomalous ones (by label), or
    the lowest and highest scoring clips when labels are unknown."""
    picks: list[tuple[int, str]] = []
    if labels is None:
        order = np.argsort(scores)
        picks += [(int(i), "low score") for i in order[:per_class]]
        picks += [(int(i), "high score") for i in order[::-1][:per_class]]
        return picks
    for label, name in ((0, "normal"), (1, "anomalous")):
        members = np.flatnonzero(labels == label)
        if members.size == 0:
            continue
        ranked = members[np.argsort(scores[members])]
        middle = ranked.size // 2
        start = max(0, middle - per_class // 2)
        picks += [(int(i), name) for i in ranked[start:start + per_class]]
    return picks


def _short(name: Any) -> str:
    return Path(str(name)).name


def write_evaluation_report(
    directory: str | Path,
    *,
    title: str,
    scores: Any,
    threshold: Threshold,
    clip_names: Sequence[Any],
    y_true: Any | None = None,
    sections: Sequence[Any] | None = None,
    domains: Sequence[Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    history: History | None = None,
    spectrograms: ArrayLookup | None = None,
    error_maps: ArrayLookup | None = None,
    model_description: str = "",
    n_examples: int = 2,
    n_top: int = 3,
    features: SpectrogramAxes | None = None,
    held_out_scores: Any | None = None,
    timelines: Sequence[tuple[Any, Sequence[Any]]] | None = None,
    errors: Sequence[tuple[Any, str]] | None = None,
) -> Path:
    """Write the detector's evaluation report folder and return its path.

    The folder (replaced atomically, never half-written) holds ``index.html``,
    ``report.md``, ``figures/*.png``, ``metrics.json``, ``scores.csv`` (path, score,
    prediction, label, section, domain) and ``history.json``/``.csv`` when a history is given.

    ``scores``: one score per clip, in ``clip_names`` order; ``y_true``: 0/1 labels or None
    when unknown; ``threshold``: a fitted :class:`~stethoscope.scoring.Threshold` (its
    ``stats_`` give the histogram's mean and ±k·std lines); ``metrics``: the result of
    :func:`stethoscope.metrics.evaluate`, computed here when None and labels are known.
    ``spectrograms`` / ``error_maps`` give the arrays of clip ``i`` (``(M, F)`` or
    ``(C, M, F)``; the error map ``(M', F')``) as a callable ``i -> array`` (only called for
    the few clips shown), a mapping ``{i: array}`` or an indexable array; either may be None
    to leave those figures out. ``n_examples`` normal and anomalous example spectrograms and
    the ``n_top`` highest-scoring clips' error maps are drawn. ``features`` (the model's
    FeatureConfig) puts those figures' axes in seconds and Hz. ``held_out_scores``: the
    normal scores the threshold was fitted on (``Detector.train_scores_``); with them the
    report compares other threshold rules on the same clips. ``timelines``: ``(name,
    windows)`` of recordings scored in several windows (:class:`~stethoscope.scoring.WindowScore`);
    the highest-scoring ones are drawn as timelines with their anomalous stretches marked.
    ``errors``: ``(name, one-line error)`` of recordings that could not be scored, listed.

    The folder is a stethoscope ``report`` artefact: an existing ``directory`` is replaced
    only when it is an empty folder or such a report (OutputError otherwise).
    """
    from stethoscope import metrics as metrics_module

    scores = np.asarray(scores, dtype=np.float64).ravel()
    names = list(clip_names)
    if len(names) != scores.size:
        raise DataError(f"{scores.size} scores for {len(names)} clip names", directory)
    labels = None if y_true is None else np.asarray(y_true).astype(int).ravel()
    if labels is not None and labels.size != scores.size:
        raise DataError(f"{labels.size} labels for {scores.size} scores", directory)
    if not threshold.fitted:
        raise ValueError("the threshold must be fitted before writing a report")
    predictions = threshold.predict(scores)
    if metrics is None and labels is not None:
        metrics = metrics_module.evaluate(labels, scores, threshold.value_,
                                          sections=sections, domains=domains)

    report = Report(title)
    report.add_heading("Summary")
    if model_description:
        report.add_text(model_description)
    report.add_text(f"{scores.size} clips scored; {int(predictions.sum())} flagged anomalous. "
                    f"Threshold: {threshold.describe()}. A clip is anomalous when its score "
                    "(how far it is from the normal training clips) is above the threshold.")
    report.add_text(threshold_statement(threshold, scores, labels))
    with atomic_directory(directory, kind=REPORT_KIND) as tmp:
        figures = tmp / "figures"

        def figure(fig: Figure, name: str, caption: str) -> None:
            report.add_figure(plots.save_figure(fig, figures / f"{name}.png"), caption)

        if metrics is not None:
            _add_metric_tables(report, metrics, metrics_module)
        if held_out_scores is not None and labels is not None:
            _add_threshold_table(report, threshold, held_out_scores, scores, labels)
        if history is not None and history.metrics.get("loss"):
            report.add_heading("Training")
            figure(plots.plot_history(history, title="Training loss"), "loss",
                   "Training and validation loss per epoch; the dotted line marks the epoch "
                   "whose weights were kept.")
            history.save(tmp)
        report.add_heading("Scores")
        stats = {**threshold.stats_, "value": threshold.value_,
                 "k": threshold.k if threshold.rule == "meanstd" else None}
        normal = scores if labels is None else scores[labels == 0]
        anomalous = None if labels is None else scores[labels == 1]
        figure(plots.plot_score_histogram(normal, anomalous, stats), "score_histogram",
               "Scores of test clips. Green: mean and mean ± k·std of the normal training "
               "scores; black: the decision threshold.")
        if labels is not None:
            counts = metrics_module.confusion(labels, predictions)
            figure(plots.plot_confusion_matrix(**counts), "confusion_matrix",
                   f"Verdicts at threshold {threshold.value_:.4g}.")
            if np.unique(labels).size == 2:
                figure(plots.plot_roc(labels, scores), "roc",
                       "ROC curve; the shaded band (false-positive rate ≤ 0.1) is what pAUC "
                       "measures.")
        _add_clip_figures(report, figure, scores, labels, names, spectrograms, error_maps,
                          n_examples, n_top, features)
        _add_timelines(report, figure, timelines or [], threshold.value_, n_top)
        if errors:
            report.add_heading("Recordings that could not be scored")
            report.add_table([{"recording": str(name), "problem": problem}
                              for name, problem in errors])
        _add_top_clips_table(report, scores, predictions, labels, names, n_top=10)

        atomic_write_text(tmp / "metrics.json", json.dumps(_json_clean({
            "title": title,
            "threshold": threshold.to_dict(),
            "n_clips": int(scores.size),
            "n_flagged": int(predictions.sum()),
            "metrics": metrics,
        }), indent=2, default=_json_default, allow_nan=False))
        atomic_write_text(tmp / "scores.csv",
                          scores_csv(names, scores, predictions, labels, sections, domains))
        report.write(tmp)
    return Path(directory)


def threshold_statement(threshold: Threshold, scores: np.ndarray,
                        labels: np.ndarray | None) -> str:
    """What the threshold rule is and what it does, measured: its false-alarm rate on the
    held-out normal scores it was fitted on and, with labels, on the test clips."""
    stats = threshold.stats_
    parts = [f"Threshold rule: {threshold.spec()} (value {threshold.value_:.4g})."]
    if stats.get("false_alarm_rate") is not None:
        parts.append(f"On the {stats.get('n', '?')} held-out normal scores it was fitted on "
                     f"it flags {100 * stats['false_alarm_rate']:.1f} % (measured false-alarm "
                     "rate).")
    elif threshold.rule != "fixed":
        parts.append("Its false-alarm rate on the held-out normal scores was not recorded "
                     "(a model saved by an older version; refit with --threshold).")
    if labels is not None:
        flagged = scores > threshold.value_
        normal, anomalous = labels == 0, labels == 1
        if normal.any():
            parts.append(f"On this test set it flags {int(flagged[normal].sum())} of "
                         f"{int(normal.sum())} normal clips "
                         f"({100 * flagged[normal].mean():.1f} %)")
        if anomalous.any():
            found = int(flagged[anomalous].sum())
            parts.append(f"{'and' if normal.any() else 'It'} finds {found} of "
                         f"{int(anomalous.sum())} anomalies "
                         f"({100 * flagged[anomalous].mean():.0f} %).")
            if flagged[anomalous].mean() < LOW_RECALL:
                parts.append("That is fewer than half: a lower threshold finds more anomalies "
                             "at more false alarms; another rule can be chosen without "
                             "retraining (--threshold, e.g. fpr:0.05 or fpr:0.1).")
        elif normal.any():
            parts[-1] += "."
    return " ".join(parts)


def threshold_choices(threshold: Threshold, held_out: Any, scores: Any,
                      labels: Any) -> list[dict[str, Any]]:
    """The rule in use and :data:`THRESHOLD_CHOICES`, each fitted on the same held-out normal
    scores, with what each does there and on labelled test ``scores``: one dict per rule
    (``rule``, ``value``, false-alarm rates on held-out and test normals, share of test
    anomalies found)."""
    from stethoscope.errors import StethoscopeError
    from stethoscope.scoring import parse_threshold

    held_out = np.asarray(held_out, dtype=np.float64).ravel()
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    normal, anomalous = scores[labels == 0], scores[labels == 1]
    rows = []
    for spec in dict.fromkeys([threshold.spec(), *THRESHOLD_CHOICES]):
        try:
            rule = threshold if spec == threshold.spec() else parse_threshold(spec).fit(held_out)
        except (StethoscopeError, ValueError):
            continue
        value = rule.value_
        rows.append({
            "rule": spec + (" (used)" if spec == threshold.spec() else ""),
            "value": value,
            "false alarms, held-out normals": float(np.mean(held_out > value)),
            "false alarms, test normals": float(np.mean(normal > value)) if normal.size
            else None,
            "anomalies found": float(np.mean(anomalous > value)) if anomalous.size else None,
        })
    return rows


def _add_threshold_table(report: Report, threshold: Threshold, held_out: Any,
                         scores: np.ndarray, labels: np.ndarray) -> None:
    """Other rules fitted on the same held-out normal scores, and what each would do here."""
    rows = threshold_choices(threshold, held_out, scores, labels)
    held_out = np.asarray(held_out).ravel()
    report.add_heading("Threshold choices")
    report.add_table(rows, caption=f"Rules fitted on the same {held_out.size} held-out normal "
                                   "scores; rates as fractions. Change the rule without "
                                   "retraining: --threshold RULE")


def unique_metric_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Metric rows without repeats: a row whose numbers equal an earlier row's (one section
    is the whole set; its domains are the set's domains) is folded into that row, whose
    group then names both (``overall = section 00``)."""
    kept: list[dict[str, Any]] = []
    seen: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = tuple(_row_key(v) for k, v in row.items() if k != "group")
        if key in seen:
            seen[key]["group"] = f"{seen[key]['group']} = {row['group']}"
            continue
        seen[key] = dict(row)
        kept.append(seen[key])
    return kept


def _row_key(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        return "nan" if math.isnan(float(value)) else round(float(value), 12)
    return value


def _add_metric_tables(report: Report, metrics: Mapping[str, Any], metrics_module: Any) -> None:
    report.add_heading("Metrics")
    rows = unique_metric_rows(metrics_module.metric_rows(metrics))
    report.add_table(rows, caption="Overall, per section and per domain (domain AUC as the "
                                   "DCASE 2023 evaluator computes it); groups with the same "
                                   "clips share a row")
    if metrics.get("dcase"):
        d = metrics["dcase"]
        report.add_metrics({"DCASE 2023 official score": d["score"],
                            "h-mean AUC (source)": d["hmean_auc_source"],
                            "h-mean AUC (target)": d["hmean_auc_target"],
                            "h-mean pAUC": d["hmean_pauc"]}, caption="DCASE ranking score")


def _add_timelines(report: Report, figure: Callable[[Figure, str, str], None],
                   timelines: Sequence[tuple[Any, Sequence[Any]]], threshold: float,
                   n_top: int) -> None:
    """Timelines of the highest-scoring recordings that have several windows."""
    long = [(name, windows) for name, windows in timelines if len(windows) > 1]
    if not long:
        return
    long.sort(key=lambda item: -max(w.score for w in item[1]))
    report.add_heading("Where along the recordings they sound wrong")
    for k, (name, windows) in enumerate(long[:n_top]):
        bad = sum(w.anomalous for w in windows)
        figure(plots.plot_timeline(windows, threshold, title=f"{_short(name)}: {bad} of "
                                   f"{len(windows)} windows anomalous"), f"timeline_{k}",
               "Score of every window along the recording; shaded: windows above the "
               "threshold (dashed).")


def _add_clip_figures(report: Report, figure: Callable[[Figure, str, str], None],
                      scores: np.ndarray, labels: np.ndarray | None, names: list[Any],
                      spectrograms: ArrayLookup | None, error_maps: ArrayLookup | None,
                      n_examples: int, n_top: int,
                      features: SpectrogramAxes | None = None) -> None:
    if spectrograms is not None and n_examples > 0:
        picks = [(i, kind, _lookup(spectrograms, i))
                 for i, kind in _example_indices(scores, labels, n_examples)]
        picks = [p for p in picks if p[2] is not None]
        if picks:
            report.add_heading("Example spectrograms")
            figure(plots.plot_spectrograms(
                [spec for _, _, spec in picks],
                [f"{kind}: {_short(names[i])} (score {scores[i]:.3g})" for i, kind, _ in picks],
                features=features),
                "spectrograms", "Log-mel spectrograms of typical normal and anomalous clips.")
    if spectrograms is not None and error_maps is not None and n_top > 0:
        top = [int(i) for i in np.argsort(scores)[::-1][:n_top]]
        pairs = [(i, _lookup(spectrograms, i), _lookup(error_maps, i)) for i in top]
        pairs = [p for p in pairs if p[1] is not None and p[2] is not None]
        if pairs:
            report.add_heading("Where the highest-scoring clips sound wrong")
            figure(plots.plot_error_maps(
                [spec for _, spec, _ in pairs], [err for _, _, err in pairs],
                [f"{_short(names[i])} (score {scores[i]:.3g})" for i, _, _ in pairs],
                features=features),
                "error_maps", "Left: log-mel spectrogram; right: the model's deviation map per band "
                "and frame (squared reconstruction error for autoencoders; squared z-score "
                "against the normal clips for statistics models). Bright areas are where the "
                "clip differs from what the model learned as normal.")


def _add_top_clips_table(report: Report, scores: np.ndarray, predictions: np.ndarray,
                         labels: np.ndarray | None, names: list[Any], n_top: int) -> None:
    report.add_heading("Highest-scoring clips")
    rows = []
    for i in np.argsort(scores)[::-1][:n_top]:
        row = {"clip": str(names[i]), "score": float(scores[i]),
               "verdict": "anomalous" if predictions[i] else "normal"}
        if labels is not None:
            row["label"] = "anomalous" if labels[i] else "normal"
        rows.append(row)
    report.add_table(rows, caption="All scores are in scores.csv")
