"""The offline demo, and the default detector on every simulated machine and fault."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from stethoscope import Detector
from stethoscope.datasets import find_clips
from stethoscope.demo import _fault_types, run_demo
from stethoscope.simulate import FAULTS, simulate_dataset


def test_demo_writes_report_model_and_summary(tmp_path):
    report = run_demo(tmp_path / "demo", machine="pump", n_train=24, n_test_normal=12,
                      n_abnormal=16)
    assert report.is_file() and report.name == "index.html"
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["by_fault"]) == set(FAULTS["pump"])
    assert summary["overall"]["tp"] + summary["overall"]["fn"] == 16
    assert (tmp_path / "demo" / "model" / "model.safetensors").is_file()




def _fault_aucs(det: Detector, root, normal, abnormal) -> dict[str, float]:
    held_out = det.score_samples(normal)
    faults = _fault_types(root)
    scores = det.score_samples(abnormal)
    aucs = {}
    for fault in sorted({faults[c.path.resolve()] for c in abnormal}):
        mine = np.array([faults[c.path.resolve()] == fault for c in abnormal])
        y = np.r_[np.zeros(len(held_out)), np.ones(mine.sum())]
        aucs[fault] = roc_auc_score(y, np.r_[held_out, scores[mine]])
    return aucs


@pytest.mark.slow
@pytest.mark.parametrize("machine", sorted(FAULTS))
def test_default_detector_finds_every_fault_and_keeps_its_false_alarm_promise(tmp_path, machine):
    n_faults = len(FAULTS[machine])
    root = simulate_dataset(machine, 60, 6 * n_faults, tmp_path / "sim", seed=1, progress=False)
    clips = find_clips(root)
    normal = [c for c in clips if c.label == 0]
    abnormal = [c for c in clips if c.label == 1]
    det = Detector(progress=False).fit(normal[:40])  # slide rails: with the rhythm expert
    assert ("gauss_rhythm" in det.model_.members) == (machine == "slider")
    for fault, auc in _fault_aucs(det, root, normal[40:], abnormal).items():
        assert auc > 0.7, f"{machine}/{fault}: AUC {auc:.2f}"

    # A second, independent set of normal clips is flagged no more than the rule allows
    # (mean + 2σ promises a few per cent; allow sampling noise on 40 clips).
    second = simulate_dataset(machine, 40, 0, tmp_path / "second", seed=7, progress=False)
    flagged = det.predict(second).mean()
    assert flagged <= 0.15, f"{machine}: {flagged:.0%} of new normal clips flagged"
