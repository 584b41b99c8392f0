"""Reports: HTML and Markdown written, figures referenced exist, text escaped, atomic."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from stethoscope import plots
from stethoscope.errors import DataError
from stethoscope.report import Report, write_evaluation_report
from stethoscope.scoring import Threshold
from stethoscope.training import History


def _html_sources(html_text: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html_text)


def _md_sources(md_text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_text)


def test_report_writes_html_and_markdown_with_escaping(tmp_path) -> None:
    fig_path = plots.save_figure(plots.plot_confusion_matrix(1, 2, 3, 4), tmp_path / "f" / "c.png")
    report = Report("Pump <script>alert(1)</script>")
    report.add_heading("Results & notes")
    report.add_text("score < threshold means <b>normal</b>\n\nsecond paragraph")
    report.add_figure(fig_path, 'caption with "quotes" & <tags>')
    report.add_table([{"clip": "a|b.wav", "score": 1.234567}, {"clip": "<c>", "score": None}],
                     caption="Scores")
    report.add_metrics({"auc": 0.91234, "nested": {"skip": 1}})
    paths = report.write(tmp_path)

    assert set(paths) == {"html", "markdown"}
    page = paths["html"].read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "&lt;b&gt;normal&lt;/b&gt;" in page and "Results &amp; notes" in page
    assert page.count("<p>") == 2
    assert "<td>1.235</td>" in page and "<td>—</td>" in page and "<td>0.9123</td>" in page
    assert "skip" not in page
    assert _html_sources(page) == ["f/c.png"]
    assert all((tmp_path / src).is_file() for src in _html_sources(page))
    assert "<style>" in page  # self-contained styling

    md = paths["markdown"].read_text()
    assert md.startswith("# Pump &lt;script&gt;")
    assert "a\\|b.wav" in md  # a pipe would break the table
    assert _md_sources(md) == ["f/c.png"]


def test_report_write_only_one_format(tmp_path) -> None:
    paths = Report("t").add_text("x").write(tmp_path, html=False)
    assert list(paths) == ["markdown"] and not (tmp_path / "index.html").exists()


def test_table_from_headers_and_rows() -> None:
    report = Report("t").add_table([[1, 2.5], [3, float("nan")]], headers=["a", "b"])
    md = report.to_markdown()
    assert "| a | b |" in md and "| 1 | 2.5 |" in md and "| 3 | — |" in md


# ---- evaluation report ----------------------------------------------------------------


@pytest.fixture
def evaluation_inputs() -> dict:
    rng = np.random.default_rng(0)
    n_normal, n_anomalous = 12, 18
    y = np.r_[np.zeros(n_normal), np.ones(n_anomalous)].astype(int)
    scores = rng.gamma(2.0, 1.0, y.size) + 2.0 * y
    threshold = Threshold("meanstd", k=2.0).fit(rng.gamma(2.0, 1.0, 20))
    history = History()
    for epoch in range(5):
        history.append({"loss": 1 / (epoch + 1), "val_loss": 1.1 / (epoch + 1)}, 0.1)
    history.best_epoch = 5
    specs = rng.normal(size=(y.size, 1, 16, 40)).astype(np.float32)
    calls: list[int] = []

    def error_map(i: int) -> np.ndarray:
        calls.append(i)
        return rng.random((16, 36))

    return dict(
        title="Valve <evaluation>",
        scores=scores,
        threshold=threshold,
        clip_names=[f"test/section_00_{'target' if i % 3 else 'source'}_test_{i:04d}.wav"
                    for i in range(y.size)],
        y_true=y,
        sections=["00"] * y.size,
        domains=["target" if i % 3 else "source" for i in range(y.size)],
        history=history,
        spectrograms=specs,
        error_maps=error_map,
        model_description="seed-conv-ae, 64 mels",
        _calls=calls,
    )


def test_evaluation_report_contents(tmp_path, evaluation_inputs) -> None:
    calls = evaluation_inputs.pop("_calls")
    out = write_evaluation_report(tmp_path / "report", n_top=3, **evaluation_inputs)
    page = (out / "index.html").read_text()
    md = (out / "report.md").read_text()
    sources = _html_sources(page)
    assert {Path(s).name for s in sources} == {
        "loss.png", "score_histogram.png", "confusion_matrix.png", "roc.png",
        "spectrograms.png", "error_maps.png"}
    assert _md_sources(md) == sources
    for src in sources:
        assert (out / src).read_bytes().startswith(b"\x89PNG")
    assert "Valve &lt;evaluation&gt;" in page
    assert "mean + 2·std of 20 normal training scores" in page

    scores = evaluation_inputs["scores"]
    top3 = sorted(np.argsort(scores)[::-1][:3].tolist())
    assert sorted(calls) == top3  # the callable is asked only for the clips shown

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold"]["value_"] == pytest.approx(evaluation_inputs["threshold"].value_)
    assert set(metrics["metrics"]["by_domain"]) == {"source", "target"}
    assert metrics["metrics"]["overall"]["n_anomalous"] == 18

    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "score", "prediction", "label", "section", "domain"]
    assert len(rows) == scores.size
    assert float(rows[4]["score"]) == scores[4]
    predicted = [int(r["prediction"]) for r in rows]
    assert predicted == (scores > evaluation_inputs["threshold"].value_).astype(int).tolist()
    assert (out / "history.json").is_file()


def test_evaluation_report_without_labels_or_arrays(tmp_path, evaluation_inputs) -> None:
    evaluation_inputs.pop("_calls")
    for key in ("y_true", "history", "spectrograms", "error_maps", "sections", "domains"):
        evaluation_inputs[key] = None
    out = write_evaluation_report(tmp_path / "r", **evaluation_inputs)
    names = {Path(s).name for s in _html_sources((out / "index.html").read_text())}
    assert names == {"score_histogram.png"}
    assert json.loads((out / "metrics.json").read_text())["metrics"] is None
    rows = list(csv.DictReader(open(out / "scores.csv", newline="")))
    assert rows[0]["label"] == "" and rows[0]["domain"] == ""


def test_failing_figure_leaves_no_half_written_directory(tmp_path, evaluation_inputs,
                                                          monkeypatch) -> None:
    evaluation_inputs.pop("_calls")
    target = tmp_path / "report"

    def broken(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(plots, "plot_roc", broken)
    with pytest.raises(RuntimeError, match="figure failed"):
        write_evaluation_report(target, **evaluation_inputs)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one

    monkeypatch.undo()
    write_evaluation_report(target, **evaluation_inputs)
    before = (target / "index.html").read_text()
    monkeypatch.setattr(plots, "plot_error_maps", broken)
    with pytest.raises(RuntimeError):
        write_evaluation_report(target, **{**evaluation_inputs, "title": "second"})
    assert (target / "index.html").read_text() == before  # the old report is kept whole
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


def test_evaluation_report_checks_lengths(tmp_path, evaluation_inputs) -> None:
    evaluation_inputs.pop("_calls")
    evaluation_inputs["clip_names"] = evaluation_inputs["clip_names"][:-1]
    with pytest.raises(DataError, match="clip names"):
        write_evaluation_report(tmp_path / "r", **evaluation_inputs)
    assert not (tmp_path / "r").exists()


def test_figures_are_linked_relative_to_the_page_from_any_working_directory(
        tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    plots.save_figure(plots.plot_confusion_matrix(1, 2, 3, 4), Path("out/figures/c.png"))
    report = Report("t").add_figure(Path("out/figures/c.png"))
    page = report.write(Path("out"))["html"].read_text()
    assert _html_sources(page) == ["figures/c.png"]
    assert _md_sources(report.to_markdown(tmp_path / "out")) == ["figures/c.png"]


def test_evaluation_report_states_its_threshold_and_compares_others(
        tmp_path, evaluation_inputs) -> None:
    evaluation_inputs.pop("_calls")
    held_out = np.random.default_rng(1).gamma(2.0, 1.0, 40)
    evaluation_inputs["threshold"] = Threshold("fpr", q=0.05).fit(held_out)
    out = write_evaluation_report(tmp_path / "r", held_out_scores=held_out, **evaluation_inputs)
    page = (out / "index.html").read_text()
    rate = evaluation_inputs["threshold"].stats_["false_alarm_rate"]
    assert rate <= 0.05
    assert f"flags {100 * rate:.1f} % (measured false-alarm rate)" in page
    assert "Threshold rule: fpr:0.05" in page and "<h2>Threshold choices</h2>" in page
    assert "fpr:0.05 (used)" in page and "mean+3std" in page
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold"]["stats_"]["false_alarm_rate"] == pytest.approx(rate)


def test_threshold_statement_suggests_other_rules_when_few_anomalies_are_found() -> None:
    from stethoscope.report import threshold_statement

    threshold = Threshold("fixed", value=10.0)
    scores, labels = np.r_[np.zeros(5), np.arange(10.0)], np.r_[np.zeros(5), np.ones(10)]
    text = threshold_statement(threshold, scores, labels.astype(int))
    assert "finds 0 of 10 anomalies" in text and "--threshold" in text


def test_a_report_never_replaces_a_folder_of_other_files(tmp_path, evaluation_inputs) -> None:
    from stethoscope.atomic import OutputError

    evaluation_inputs.pop("_calls")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "mine.txt").write_text("keep")
    with pytest.raises(OutputError, match="refusing"):
        write_evaluation_report(tmp_path / "r", **evaluation_inputs)
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["mine.txt"]
