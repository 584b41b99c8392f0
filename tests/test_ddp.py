"""Data-parallel training (stethoscope.distributed) on CPU with gloo: two ranks give the
weights, losses and scores of one process up to floating-point order; CUDA absent is a
one-line error.

Tolerances, and why: the ranks add the same numbers in another order (a sum over two
shares, then over ranks), so values agree to float32 rounding (about 1e-7 relative per
step). Adam amplifies rounding where the true gradient is zero: a linear bias in front of
batch norm (batch norm removes it, so its gradient is rounding noise) moves by up to lr per
step either way. Those biases, and the running means that follow them, are left out of the
weight comparison; they do not change the output. Everything else: 1e-5 (in-process, 3
epochs) and 1e-4 (torchrun, 2 epochs of idnn), scores 2e-4 relative. Without synced batch
norm, the same runs differ by 1e-2 in the weights and 6e-4 in the losses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from stethoscope import Detector, distributed
from stethoscope.cli import main
from stethoscope.errors import StethoscopeError
from stethoscope.simulate import simulate_dataset
from stethoscope.training import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _threads_restored():
    """The references run with one torch thread, as each rank does; put the count back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_torchrun_environment_is_read_only_when_complete():
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29500"}
    assert distributed.torchrun_rank(env) == distributed.Rank(1, 1, 2)
    assert not distributed.torchrun_rank(env).is_main
    assert distributed.torchrun_rank({k: v for k, v in env.items() if k != "MASTER_PORT"}) \
        is None
    with pytest.raises(StethoscopeError, match="must be integers"):
        distributed.torchrun_rank({**env, "RANK": "one"})
    with distributed.process_group("cpu", environ={}) as rank:
        assert rank is None and not distributed.is_active()


def test_backend_is_nccl_on_gpus_and_gloo_on_cpus():
    assert distributed.backend_for(torch.device("cuda", 1)) == "nccl"
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.rank_device("cpu", 3) == "cpu"
    if not torch.cuda.is_available():
        assert distributed.rank_device("auto", 1) == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path, capsys):
    data = simulate_dataset("fan", 3, 0, tmp_path / "data", duration=1.0, progress=False)
    out = tmp_path / "model"
    code = main(["train", str(data / "normal"), "--out", str(out), "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cuda" in err[0] and "Traceback" not in err[0]
    assert not out.exists()
    with pytest.raises(StethoscopeError, match="cuda"):
        distributed.rank_device("cuda", 0)  # a torchrun rank asking for its GPU


# ----------------------------------------------------------------------------- in process


def _tiny_runs() -> dict[str, np.ndarray]:
    """Two small fits through ``training.fit``: an MLP with batch norm on 45 examples
    (steps of 8, a last step of 5: shares 4+4 and 2+3) and one without on 17 (a last step of
    1: an empty share on rank 0). Returns weights, losses and the step sizes each saw."""
    out = {}
    for name, n, with_bn in (("bn", 45, True), ("plain", 17, False)):
        torch.manual_seed(0)
        layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if with_bn else []) + [
            nn.ReLU(), nn.Linear(8, 6)]
        model = nn.Sequential(*layers)
        data = torch.randn(n, 6, generator=torch.Generator().manual_seed(1))
        sizes: list[int] = []

        def loss_fn(pred, target, sizes=sizes):
            sizes.append(pred.shape[0])
            return nn.functional.mse_loss(pred, target)

        config = TrainConfig(epochs=3, batch_size=8, lr=1e-2, patience=None, progress=False,
                             device="cpu")
        history = fit(model, data, config=config, loss_fn=loss_fn)
        out.update({f"{name}/{k}": v.detach().numpy().copy()
                    for k, v in model.state_dict().items()})
        out[f"{name}/loss"] = np.array(history["loss"])
        out[f"{name}/sizes"] = np.array(sizes)
    return out


def _rank_main(rank: int, world: int, rendezvous: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    try:
        np.savez(Path(folder) / f"rank{rank}.npz", **_tiny_runs())
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_fit_like_one_process(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2,
             join=True)
    torch.set_num_threads(1)
    single = _tiny_runs()
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in (0, 1)]
    # every step was split between the ranks; together they saw the single-process steps
    np.testing.assert_array_equal(ranks[0]["bn/sizes"] + ranks[1]["bn/sizes"],
                                  single["bn/sizes"])
    assert set(ranks[0]["bn/sizes"]) == {4, 2} and set(ranks[1]["bn/sizes"]) == {4, 3}
    assert 0 in ranks[0]["plain/sizes"]  # the step of one example left rank 0 nothing
    for key, value in single.items():
        if key.endswith("sizes"):
            continue
        assert np.array_equal(ranks[0][key], ranks[1][key]), key  # ranks agree exactly
        if key in ("bn/0.bias", "bn/1.running_mean"):  # the bias in front of batch norm
            continue
        np.testing.assert_allclose(ranks[0][key], value, rtol=1e-5, atol=1e-5, err_msg=key)


# ----------------------------------------------------------------------------- torchrun


def _feeds_batch_norm(key: str, keys: set[str]) -> bool:
    """``encoder.3.bias`` of a linear layer followed by batch norm ``encoder.4``, or a batch
    norm's running mean, which follows that bias."""
    parts = key.split(".")
    if parts[-1] == "running_mean":
        return True
    if parts[-1] != "bias" or len(parts) < 2 or not parts[-2].isdigit():
        return False
    return ".".join([*parts[:-2], str(int(parts[-2]) + 1), "running_mean"]) in keys


def test_torchrun_two_ranks_train_like_one_process(tmp_path):
    data = simulate_dataset("fan", 12, 0, tmp_path / "data", duration=4.0, progress=False)
    env = {**os.environ, "STETHOSCOPE_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "stethoscope", "train",
                          str(data / "normal"), "--model", "idnn", "--epochs", "2",
                          "--device", "cpu", "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("trained idnn") == 1  # rank 0 alone prints and saves
    # the same command in one process (one thread, like each rank)
    torch.set_num_threads(1)
    code = main(["train", str(data / "normal"), "--model", "idnn", "--epochs", "2",
                 "--device", "cpu", "--out", str(tmp_path / "one")])
    assert code == 0

    a, b = Detector.load(tmp_path / "one"), Detector.load(tmp_path / "two")
    np.testing.assert_allclose(b.history_["loss"], a.history_["loss"], rtol=1e-5)
    weights_a = load_file(str(tmp_path / "one" / "model.safetensors"))
    weights_b = load_file(str(tmp_path / "two" / "model.safetensors"))
    compared = 0
    for key, value in weights_a.items():
        if value.dtype.is_floating_point and not _feeds_batch_norm(key, set(weights_a)):
            scale = max(1.0, float(value.abs().max()))
            assert float((weights_b[key] - value).abs().max()) <= 1e-4 * scale, key
            compared += 1
    assert compared >= 10
    scores_a, scores_b = a.score_samples(data / "normal"), b.score_samples(data / "normal")
    np.testing.assert_allclose(scores_b, scores_a, rtol=2e-4)
    assert b.threshold_.value_ == pytest.approx(a.threshold_.value_, rel=2e-4)
