"""Confusion counts, AUC/pAUC against scikit-learn, and the DCASE 2023 domain rule."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import roc_auc_score

from stethoscope.errors import DataError
from stethoscope.metrics import (
    classification_metrics,
    confusion,
    dcase_official_score,
    evaluate,
    format_table,
)


def test_confusion_on_a_hand_case() -> None:
    y_true = [0, 0, 0, 1, 1, 1, 1]
    y_pred = [0, 1, 0, 1, 1, 0, 1]
    assert confusion(y_true, y_pred) == {"tp": 3, "fp": 1, "fn": 1, "tn": 2}


def test_classification_metrics_by_hand() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.6, 0.3, 0.7, 0.8, 0.4, 0.9])
    m = classification_metrics(y, s, threshold=0.5)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 1, 3)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    assert m["false_alarm_rate"] == pytest.approx(1 / 4)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert (m["n_normal"], m["n_anomalous"]) == (4, 4)


def test_auc_and_pauc_equal_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40), np.ones(100)].astype(int)
    s = rng.normal(size=140) + 1.2 * y
    m = classification_metrics(y, s, threshold=0.0)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s))
    assert m["pauc"] == pytest.approx(roc_auc_score(y, s, max_fpr=0.1))
    assert m["pauc"] != pytest.approx(m["auc"])


def test_one_class_gives_none_not_a_crash() -> None:
    m = classification_metrics([0, 0, 0], [0.1, 0.5, 0.9], threshold=0.4)
    assert m["auc"] is None and m["pauc"] is None
    assert m["fp"] == 2 and m["recall"] == 0.0
    only_anomalous = classification_metrics([1, 1], [0.1, 0.9], threshold=0.5)
    assert only_anomalous["false_alarm_rate"] is None


def test_bad_inputs_raise_data_error() -> None:
    with pytest.raises(DataError, match="scores for"):
        classification_metrics([0, 1], [0.1], 0.5)
    with pytest.raises(DataError, match="NaN"):
        classification_metrics([0, 1], [0.1, np.nan], 0.5)
    with pytest.raises(DataError, match="labels must be 0"):
        classification_metrics([0, 2], [0.1, 0.2], 0.5)


@pytest.fixture
def two_domains():
    """One section. Source normals score low; target normals overlap the anomalies.

    Official domain AUC (domain normals vs anomalies of both domains):
      source: {0.1, 0.2} vs {0.9, 0.55} -> 4/4 = 1.0
      target: {0.5, 0.6} vs {0.9, 0.55} -> (2 + 1) / 4 = 0.75
    A naive within-domain AUC would give target {0.5, 0.6} vs {0.55} = 0.5.
    """
    y = np.array([0, 0, 1, 0, 0, 1])
    s = np.array([0.1, 0.2, 0.9, 0.5, 0.6, 0.55])
    d = np.array(["source", "source", "source", "target", "target", "target"])
    return y, s, d


def test_by_domain_follows_the_official_rule(two_domains) -> None:
    y, s, d = two_domains
    result = evaluate(y, s, 0.52, domains=d)
    assert result["by_domain"]["source"]["auc"] == pytest.approx(1.0)
    assert result["by_domain"]["target"]["auc"] == pytest.approx(0.75)
    assert result["by_domain"]["target"]["pauc"] is None  # pAUC only per section
    # precision/recall per domain use that domain's clips only (target: 0.6 and 0.55 flagged)
    target = result["by_domain"]["target"]
    assert (target["tp"], target["fp"], target["fn"], target["tn"]) == (1, 1, 0, 1)
    assert (target["n_normal"], target["n_anomalous"]) == (2, 1)


def test_by_section_holds_per_section_pauc_and_domains(two_domains) -> None:
    y, s, d = two_domains
    y2, s2, d2 = np.r_[y, y], np.r_[s, s[::-1]], np.r_[d, d]
    sections = ["00"] * 6 + ["01"] * 6
    result = evaluate(y2, s2, 0.5, sections=sections, domains=d2)
    assert set(result["by_section"]) == {"00", "01"}
    sec0 = result["by_section"]["00"]
    assert sec0["pauc"] == pytest.approx(roc_auc_score(y, s, max_fpr=0.1))
    assert sec0["by_domain"]["target"]["auc"] == pytest.approx(0.75)
    sec1_target = result["by_section"]["01"]["by_domain"]["target"]["auc"]
    # across sections, a domain's AUC is the mean of its per-section AUCs (evaluator's a-mean)
    assert result["by_domain"]["target"]["auc"] == pytest.approx((0.75 + sec1_target) / 2)
    assert result["overall"]["n_normal"] == 8


def test_dcase_official_score_is_harmonic_mean(two_domains) -> None:
    y, s, d = two_domains
    official = dcase_official_score(y, s, domains=d)
    pauc = roc_auc_score(y, s, max_fpr=0.1)
    assert official["score"] == pytest.approx(scipy.stats.hmean([1.0, 0.75, pauc]))
    assert official["hmean_pauc"] == pytest.approx(pauc)
    assert evaluate(y, s, 0.5, domains=d)["dcase"]["score"] == pytest.approx(official["score"])


def test_dcase_score_needs_both_domains() -> None:
    with pytest.raises(DataError, match="target"):
        dcase_official_score([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], domains=["source"] * 4)


def test_mismatched_group_lengths() -> None:
    with pytest.raises(DataError, match="section"):
        evaluate([0, 1], [0.1, 0.9], 0.5, sections=["00"])


def test_format_table_lists_groups_and_numbers(two_domains) -> None:
    y, s, d = two_domains
    result = evaluate(y, s, 0.52, sections=["00"] * 6, domains=d)
    text = format_table(result)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["normal", "anomalous", "AUC"]
    assert any(line.startswith("domain target") and "0.750" in line for line in lines)
    assert "DCASE 2023 official score" in text
    assert "-" in next(line for line in lines if line.startswith("domain source"))  # no pAUC
