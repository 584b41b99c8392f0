"""The one training loop: it learns, stops early, restores the best weights, repeats exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from stethoscope.training import History, TrainConfig, fit, predict


def _regression_data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    return x, x @ w + 0.01 * torch.randn(n, 1, generator=g)


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 5, "batch_size": 32, "lr": 1e-2, "progress": False,
                          "patience": None, **kw})


def test_fit_lowers_the_loss_and_records_history():
    x, y = _regression_data()
    history = fit(nn.Linear(8, 1), (x, y), (x[:64], y[:64]), config=_config(epochs=20))
    assert history.epochs == 20
    assert history["loss"][-1] < 0.2 * history["loss"][0]
    assert len(history["val_loss"]) == 20


def test_early_stopping_stops_when_validation_stops_improving():
    x, y = _regression_data()
    model = nn.Linear(8, 1)
    history = fit(model, (x, y), (x, y), config=_config(epochs=50, lr=0.0, patience=3))
    assert history.stopped_early
    assert history.epochs == 4  # best at epoch 1, then 3 epochs without improvement


def test_best_weights_are_restored():
    x, y = _regression_data()
    model = nn.Linear(8, 1)
    # A learning rate this large diverges after a good first step or two.
    history = fit(model, (x, y), (x, y), config=_config(epochs=8, lr=0.9, optimizer="rmsprop"))
    with torch.no_grad():
        final = float(nn.functional.mse_loss(model(x), y))
    assert history.best_epoch is not None
    assert final == pytest.approx(min(history["val_loss"]), rel=1e-4)


def test_same_seed_gives_identical_weights():
    x, y = _regression_data()
    torch.manual_seed(0)
    a = nn.Linear(8, 1)
    torch.manual_seed(0)
    b = nn.Linear(8, 1)
    torch.manual_seed(1)
    fit(a, (x, y), config=_config(seed=3))
    torch.manual_seed(2)  # a different global state before the call must not matter
    fit(b, (x, y), config=_config(seed=3))
    assert torch.equal(a.weight, b.weight)


def test_batch_transform_and_example_batches():
    x = torch.randn(10, 4, 6)
    steps = []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, v):
            steps.append(v.shape[0])
            return self.lin(v)

    def frames(batch):  # (B, 4, 6) -> (B*6, 4): one example per frame
        v = batch[0].transpose(1, 2).reshape(-1, 4)
        return v, v

    fit(Counting(), x, config=_config(epochs=1, batch_size=5, example_batch_size=8),
        batch_transform=frames)
    assert sum(steps) == 60 and max(steps) == 8


def test_metrics_and_autoencoder_default():
    x = torch.randn(40, 3)
    history = fit(nn.Linear(3, 3), x, x, config=_config(epochs=2),
                  metrics={"mae": lambda out, y: float((out - y).abs().mean())})
    assert set(history.metrics) == {"loss", "mae", "val_loss", "val_mae"}


def test_history_round_trip(tmp_path):
    history = History()
    history.append({"loss": 1.0, "val_loss": 2.0}, 0.5)
    history.append({"loss": 0.5, "val_loss": 1.5}, 0.4)
    history.best_epoch = 2
    history.save(tmp_path)
    again = History.load(tmp_path)
    assert again.to_dict() == history.to_dict()
    lines = (tmp_path / "history.csv").read_text().splitlines()
    assert lines[0] == "epoch,loss,val_loss,seconds" and lines[2].startswith("2,0.5,1.5")


def test_predict_keeps_order():
    model = nn.Identity()
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    out = torch.cat(list(predict(model, x, batch_size=4)))
    assert torch.equal(out, torch.from_numpy(x))


def test_bad_optimizer_name():
    with pytest.raises(ValueError, match="optimizer"):
        fit(nn.Linear(2, 2), torch.randn(4, 2), config=_config(optimizer="sgdx"))
