"""The two pictures of a kept recording: its log-mel spectrogram, and where it deviates
from normal (the model's error map beside the log-mel), as PNG bytes."""

from __future__ import annotations

import io
from pathlib import Path

from stethoscope.service.machines import MachineModel

KINDS = ("spectrogram", "deviation")


def render_png(machine: MachineModel, audio: Path, kind: str, title: str) -> bytes:
    """PNG of ``kind`` ("spectrogram" or "deviation") for the WAV at ``audio``, with the
    machine's model and features."""
    from stethoscope.audio import read_wav
    from stethoscope.features import crop_frames, logmel
    from stethoscope.plots import plot_error_maps, plot_spectrograms

    det = machine.detector
    cfg = det.feature_config_
    with machine.lock:  # the model's part only; drawing does not hold up the uploads
        wave, _ = read_wav(audio, channels=cfg.channels, sample_rate=cfg.sample_rate,
                           resample=cfg.resample)
        spec = crop_frames(logmel(wave, cfg), cfg.frames, audio)
        error = det.error_maps([audio])[0] if kind == "deviation" else None
    if kind == "spectrogram":
        fig = plot_spectrograms([spec], [title], ncols=1)
    else:
        fig = plot_error_maps([spec], [error], [title])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    return buffer.getvalue()
