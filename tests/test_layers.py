"""Tests for the faster layers (same function as the stock ones) and the allocator setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from stethoscope.models import build
from stethoscope.models.layers import Dropout, SubpixelSequential, unfused, upsample_conv3x3


@pytest.mark.parametrize("c_in,c_out", [(32, 1), (16, 32), (3, 5)])
def test_subpixel_conv_equals_upsample_then_conv_with_gradients(c_in, c_out):
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1).double()
    x = torch.randn(2, c_in, 7, 11, dtype=torch.float64, requires_grad=True)
    reference = conv(nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
    fused = upsample_conv3x3(x, conv)
    assert fused.shape == reference.shape == (2, c_out, 14, 22)
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-12)
    grad = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, [x, conv.weight, conv.bias], grad)
    got = torch.autograd.grad(fused, [x, conv.weight, conv.bias], grad)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_subpixel_sequential_fuses_only_channel_shrinking_pairs():
    torch.manual_seed(0)
    net = SubpixelSequential(nn.Upsample(scale_factor=2), nn.Conv2d(8, 2, 3, padding=1),
                             nn.Upsample(scale_factor=2), nn.Conv2d(2, 4, 3, padding=1))
    seen = []
    for module in net:
        module.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    x = torch.randn(1, 8, 5, 6)
    fused = net(x)
    assert seen == ["Upsample", "Conv2d"]  # the first pair ran as one sub-pixel conv
    seen.clear()
    with unfused():
        plain = net(x)
    assert seen == ["Upsample", "Conv2d", "Upsample", "Conv2d"]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_seed_conv_ae_fused_and_layer_by_layer_agree():
    torch.manual_seed(0)
    model = build("seed-conv-ae", (1, 64, 312)).eval()
    x = torch.randn(3, 1, 64, 312) * 12 - 40
    with torch.no_grad():
        fused = model(x)
        with unfused():
            plain = model(x)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


def test_dropout_keeps_the_rate_scale_seed_and_layout():
    layer = Dropout(0.3).train()
    x = torch.ones(4, 8, 64, 64).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(1)
    first = layer(x)
    torch.manual_seed(1)
    again = layer(x)
    assert torch.equal(first, again)  # the torch seed fixes the mask
    kept = first != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    torch.testing.assert_close(first[kept], torch.full_like(first[kept], 1 / 0.7))
    assert first.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


def test_dropout_gradient_is_the_mask():
    layer = Dropout(0.5).train()
    x = torch.randn(1000, requires_grad=True)
    out = layer(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, (out != 0).float() * 2.0)


def test_bf16_dropout_stays_bf16():
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    assert Dropout(0.3).train()(x).dtype == torch.bfloat16


def _malloc_probe(env: dict) -> str:
    code = ("from stethoscope.runtime import keep_freed_memory; "
            "print(keep_freed_memory())")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
def test_allocator_setting_applies_once_and_respects_the_users_choice():
    base = {k: v for k, v in os.environ.items()
            if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_",
                         "MALLOC_MMAP_THRESHOLD_", "STETHOSCOPE_SYSTEM_MALLOC")}
    assert _malloc_probe(base) == "True"
    assert _malloc_probe({**base, "STETHOSCOPE_SYSTEM_MALLOC": "1"}) == "False"
    assert _malloc_probe({**base, "MALLOC_TRIM_THRESHOLD_": "1000000"}) == "False"
