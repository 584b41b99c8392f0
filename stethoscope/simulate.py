"""Physically motivated machine sounds with realistic faults, written like MIMII recordings.

Four machine models (fan, pump, slide rail, solenoid valve) are built from the mechanisms a
vibration or acoustic engineer listens for: shaft-rate harmonics, blade/vane-pass tones,
filtered flow noise, stroke cycles with end-stop impacts, valve clicks and flow hiss. Faults
change those mechanisms (imbalance modulates the blade-pass tone at shaft rate, a bearing
defect rings a structural resonance at its defect frequency, a leak adds a jet hiss, …)
rather than pasting a beep on white noise. Factory background noise is mixed at a chosen
SNR, optionally on a small circular microphone array. ``docs/simulator.md`` explains each
model and its parameters.

Randomness is split into independent streams (machine instance, clip, fault, background), so
the same seed gives bit-identical output, and a faulty clip with seed ``s`` is the normal clip
``s`` plus the fault: the difference is the fault alone.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.fft
import soundfile as sf
from scipy.signal import oaconvolve

from stethoscope.atomic import atomic_write_bytes, atomic_write_text
from stethoscope.errors import DataError
from stethoscope.progress import progress_bar

__all__ = [
    "FAULTS",
    "MACHINES",
    "MachineParams",
    "clip_events",
    "machine_params",
    "simulate_clip",
    "simulate_dataset",
]

SAMPLE_RATE = 16000
SPEED_OF_SOUND = 343.0  # m/s
ARRAY_RADIUS = 0.045  # m; MIMII's TAMAGO-03 circular array has 8 microphones about this far out
OUTPUT_RMS = 0.05  # about -26 dBFS for a normal clip, leaving headroom for impacts and faults

MACHINES = ("fan", "pump", "slider", "valve")

FAULTS: dict[str, tuple[str, ...]] = {
    "fan": ("imbalance", "bearing", "rubbing", "clogging"),
    "pump": ("bearing", "leak", "clogging", "imbalance"),
    "slider": ("rubbing", "looseness", "bearing", "timing"),
    "valve": ("timing", "leak", "chatter"),
}


# --------------------------------------------------------------------------------------
# Machine instances
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineParams:
    """The characteristic, fixed properties of one machine instance (one MIMII machine id).

    Frequencies in Hz, levels as linear amplitude ratios. Fields that a machine type does not
    use are ignored by its model (e.g. ``cycle_s`` for a fan).
    """

    machine: str
    machine_id: str = "id_00"
    shaft_hz: float = 20.0  # fan/pump shaft rate; slider: motor rate at full stroke speed
    blades: int = 7  # fan blades, pump impeller vanes, slider belt/gear teeth per motor turn
    line_hz: float = 50.0  # mains frequency; motors and AC coils hum at twice this
    shaft_amps: tuple[float, ...] = (0.15, 0.08, 0.04, 0.02)  # 1x, 2x, 3x, 4x shaft
    blade_amps: tuple[float, ...] = (1.0, 0.45, 0.25, 0.12, 0.06)  # blade-pass harmonics
    tonal_level: float = 0.4  # RMS of the tonal part relative to the flow noise
    hum_level: float = 0.05  # electrical hum relative to the flow noise
    flow_centre_hz: float = 450.0  # peak of the broadband flow-noise hump
    flow_rise_db: float = 6.0  # dB/octave below the peak
    flow_fall_db: float = 5.0  # dB/octave above the peak
    resonances_hz: tuple[float, ...] = (1200.0, 2600.0)  # casing / rail / valve-body modes
    resonance_gains: tuple[float, ...] = (1.0, 0.6)
    resonance_q: tuple[float, ...] = (8.0, 10.0)
    wobble_depth: float = 0.004  # relative slow speed variation (frequency modulation)
    wobble_hz: float = 0.6
    bearing_ratio: float = 3.4  # outer-race defect frequency / shaft rate (BPFO)
    bearing_resonance_hz: float = 3400.0  # structural resonance rung by bearing impacts
    cycle_s: float = 1.6  # slider stroke cycle / valve switching cycle
    duty: float = 0.7  # slider: moving share of each half cycle; valve: unused
    pulses: tuple[tuple[float, float], ...] = ((0.0, 0.25),)  # valve: (open at, seconds open)
    click_hz: tuple[float, ...] = (2500.0, 5200.0, 300.0)  # impact modes (end stop / click)
    click_decay_s: tuple[float, ...] = (0.004, 0.002, 0.012)
    click_gains: tuple[float, ...] = (1.0, 0.4, 0.5)
    ac_coil: bool = True  # valve: AC solenoid buzzes while energised
    pwm_hz: float = 6000.0  # slider: drive switching whine while the motor is powered
    azimuth_deg: float = 30.0  # direction of the machine seen from the microphone array
    background_tilt: float = 1.0  # background noise spectrum ~ 1/f**tilt
    background_hum_hz: float = 110.0  # a distant machine's fundamental

    def defect_hz(self) -> float:
        """Bearing outer-race defect frequency (BPFO) at nominal speed."""
        return self.bearing_ratio * self.shaft_hz

    def blade_pass_hz(self) -> float:
        """Blade-pass (fan) or vane-pass (pump) frequency at nominal speed."""
        return self.blades * self.shaft_hz


def _key(value) -> int:
    if isinstance(value, str):
        return zlib.crc32(value.encode("utf-8"))
    return int(value) % (1 << 63)


def _rng(*keys) -> np.random.Generator:
    """An independent random stream named by ``keys`` (strings and integers)."""
    return np.random.default_rng([_key(k) for k in keys])


def _check_machine(machine: str) -> str:
    if machine not in MACHINES:
        raise DataError(f"unknown machine {machine!r}; the simulator knows "
                        f"{', '.join(MACHINES)}")
    return machine


def machine_params(machine: str, machine_id: str = "id_00") -> MachineParams:
    """Draw the fixed characteristics of one machine instance from its name and id.

    The same ``(machine, machine_id)`` always gives the same machine, like a MIMII id.
    """
    _check_machine(machine)
    rng = _rng("instance", machine, machine_id)
    draw = {"fan": _fan_instance, "pump": _pump_instance, "slider": _slider_instance,
            "valve": _valve_instance}[machine]
    common = dict(
        machine=machine, machine_id=machine_id,
        line_hz=float(rng.choice([50.0, 60.0])),
        azimuth_deg=float(rng.uniform(0, 360)),
        background_tilt=float(rng.uniform(1.2, 1.8)),
        background_hum_hz=float(rng.uniform(70, 260)),
    )
    return MachineParams(**common, **draw(rng))


def _modes(rng, n: int, lo: float, hi: float) -> dict:
    return dict(resonances_hz=tuple(np.sort(rng.uniform(lo, hi, n)).round(1)),
                resonance_gains=tuple(rng.uniform(0.4, 1.5, n).round(3)),
                resonance_q=tuple(rng.uniform(5, 15, n).round(2)))


def _fan_instance(rng) -> dict:
    blades = int(rng.choice([5, 6, 7, 9, 11]))
    fall = rng.uniform(1.0, 1.8)
    return dict(
        shaft_hz=rng.uniform(13, 25), blades=blades,
        shaft_amps=tuple((rng.uniform(0.05, 0.2) * np.arange(1, 5) ** -1.0).round(4)),
        blade_amps=tuple((rng.uniform(0.7, 1.0, 6) * np.arange(1, 7) ** -fall).round(4)),
        tonal_level=rng.uniform(0.25, 0.6), hum_level=rng.uniform(0.02, 0.08),
        flow_centre_hz=rng.uniform(250, 700), flow_rise_db=rng.uniform(4, 8),
        flow_fall_db=rng.uniform(5, 8),
        wobble_depth=rng.uniform(0.002, 0.008), wobble_hz=rng.uniform(0.2, 1.5),
        bearing_ratio=rng.uniform(3.05, 3.6), bearing_resonance_hz=rng.uniform(2000, 5000),
        **_modes(rng, 3, 700, 4500),
    )


def _pump_instance(rng) -> dict:
    fall = rng.uniform(1.0, 1.6)
    return dict(
        shaft_hz=rng.uniform(24, 49), blades=int(rng.choice([5, 6, 7])),
        shaft_amps=tuple((rng.uniform(0.2, 0.5) * np.arange(1, 5) ** -0.8).round(4)),
        blade_amps=tuple((rng.uniform(0.7, 1.0, 5) * np.arange(1, 6) ** -fall).round(4)),
        tonal_level=rng.uniform(0.3, 0.7), hum_level=rng.uniform(0.05, 0.15),
        flow_centre_hz=rng.uniform(250, 800), flow_rise_db=rng.uniform(3, 6),
        flow_fall_db=rng.uniform(5, 8),
        wobble_depth=rng.uniform(0.001, 0.004), wobble_hz=rng.uniform(0.5, 2.0),
        bearing_ratio=rng.uniform(3.05, 3.6), bearing_resonance_hz=rng.uniform(2000, 5000),
        cycle_s=rng.uniform(0.4, 2.0),  # period of the slow pressure pulsation in the pipes
        **_modes(rng, 3, 600, 4000),
    )


def _slider_instance(rng) -> dict:
    return dict(
        shaft_hz=rng.uniform(30, 60), blades=int(rng.integers(12, 31)),
        shaft_amps=tuple((rng.uniform(0.1, 0.3) * np.arange(1, 5) ** -1.0).round(4)),
        blade_amps=tuple((rng.uniform(0.7, 1.0, 3) * np.arange(1, 4) ** -1.2).round(4)),
        tonal_level=rng.uniform(0.5, 1.0), hum_level=rng.uniform(0.02, 0.06),
        flow_centre_hz=rng.uniform(800, 2000), flow_rise_db=rng.uniform(3, 6),
        flow_fall_db=rng.uniform(4, 7),
        wobble_depth=rng.uniform(0.002, 0.006), wobble_hz=rng.uniform(1, 4),
        bearing_ratio=rng.uniform(2.8, 4.2), bearing_resonance_hz=rng.uniform(2000, 5000),
        cycle_s=rng.uniform(1.0, 2.0), duty=rng.uniform(0.55, 0.8),
        click_hz=(rng.uniform(600, 2500), rng.uniform(2500, 5000), rng.uniform(120, 400)),
        click_decay_s=(rng.uniform(0.006, 0.02), rng.uniform(0.002, 0.006),
                       rng.uniform(0.02, 0.05)),
        click_gains=(1.0, rng.uniform(0.3, 0.7), rng.uniform(0.4, 1.0)),
        pwm_hz=rng.uniform(3000, 7500),
        **_modes(rng, 2, 500, 3000),
    )


def _valve_instance(rng) -> dict:
    cycle = rng.uniform(0.8, 2.5)
    n_pulses = int(rng.integers(1, 4))
    starts = np.sort(rng.uniform(0, 0.8, n_pulses)) * cycle
    pulses = []
    for start in starts:  # keep pulses apart: a valve cannot reopen before it closed
        if pulses and start < pulses[-1][0] + pulses[-1][1] + 0.08:
            continue
        pulses.append((round(float(start), 4), round(float(rng.uniform(0.06, 0.35)), 4)))
    return dict(
        cycle_s=cycle, pulses=tuple(pulses),
        click_hz=(rng.uniform(1500, 4000), rng.uniform(4000, 7000), rng.uniform(150, 450)),
        click_decay_s=(rng.uniform(0.002, 0.006), rng.uniform(0.001, 0.003),
                       rng.uniform(0.008, 0.025)),
        click_gains=(1.0, rng.uniform(0.2, 0.6), rng.uniform(0.3, 0.9)),
        flow_centre_hz=rng.uniform(1500, 4500), flow_rise_db=rng.uniform(3, 6),
        flow_fall_db=rng.uniform(3, 6), tonal_level=rng.uniform(0.3, 0.8),
        hum_level=rng.uniform(0.05, 0.2), ac_coil=bool(rng.random() < 0.5),
        bearing_ratio=0.0, **_modes(rng, 2, 800, 5000),
    )


# --------------------------------------------------------------------------------------
# Signal building blocks
# --------------------------------------------------------------------------------------


@dataclass
class _Clip:
    """Everything one rendering needs: time base, random streams and the fault."""

    params: MachineParams
    n: int
    fs: int
    rng: np.random.Generator  # normal variation of this clip (load, speed, timing)
    fault_rng: np.random.Generator
    fault: str | None
    severity: float
    events: list = field(default_factory=list)  # (time_s, kind) of clicks, impacts, strokes

    @property
    def t(self) -> np.ndarray:
        return np.arange(self.n) / self.fs

    @property
    def nyquist(self) -> float:
        return self.fs / 2


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) or 1.0


def _unit(x: np.ndarray) -> np.ndarray:
    return x / _rms(x)


def _phase(freq: np.ndarray, fs: int, start: float = 0.0) -> np.ndarray:
    """Instantaneous phase (radians) of a tone whose frequency follows ``freq``."""
    return start + 2 * np.pi * np.cumsum(freq) / fs


def _phasor(phase: np.ndarray) -> np.ndarray:
    """``exp(1j * phase)``, built from cos and sin (about twice as fast as complex exp)."""
    z = np.empty(phase.shape, dtype=np.complex128)
    z.real, z.imag = np.cos(phase), np.sin(phase)
    return z


def _tone_phasor(freq_hz: float, n: int, fs: int, block: int = 512) -> np.ndarray:
    """``exp(2j pi f t)`` for a steady tone: an outer product of block starts and one block,
    so only ``n / block + block`` complex exponentials are evaluated."""
    w = 2 * np.pi * freq_hz / fs
    inner = np.exp(1j * w * np.arange(block))
    starts = np.exp(1j * w * block * np.arange(-(-n // block)))
    return (starts[:, None] * inner[None, :]).ravel()[:n]


def _integer_power(z: np.ndarray, k: int) -> np.ndarray:
    """``z ** k`` for a positive integer by repeated squaring (numpy's complex power is slow)."""
    result, square = None, z
    while k:
        if k & 1:
            result = square.copy() if result is None else result * square
        k >>= 1
        if k:
            square = square * square
    return result


def _harmonics(base: np.ndarray, amps: Sequence[float], offsets: Sequence[float],
               top_hz: float, fundamental_hz: float) -> np.ndarray:
    """Sum of ``amps[k] * sin((k+1) * phase + offsets[k])`` for harmonics below ``top_hz``,
    where ``base = exp(1j * phase)``: harmonic k+1 is the (k+1)-th power of the phasor, one
    complex multiplication each instead of a sine."""
    out = np.zeros(base.shape)
    power = np.ones_like(base)
    for k, (amp, offset) in enumerate(zip(amps, offsets, strict=False), start=1):
        power *= base
        if amp and k * fundamental_hz < top_hz:
            out += amp * (power * np.exp(1j * offset)).imag
    return out


def _slow_variation(rng, t: np.ndarray, depth: float, rate_hz: float) -> np.ndarray:
    """Relative speed fluctuation: a periodic wobble plus a random slow drift."""
    phases = rng.uniform(0, 2 * np.pi, 4)
    rates = rng.uniform(0.05, 0.4, 3)
    coarse = t[::32]  # slow: evaluate on a coarse grid and interpolate
    drift = sum(np.sin(2 * np.pi * r * coarse + p)
                for r, p in zip(rates, phases[1:], strict=True))
    slow = depth * (np.sin(2 * np.pi * rate_hz * coarse + phases[0]) + 0.4 * drift)
    return np.interp(t, coarse, slow)


def _hump(freqs: np.ndarray, centre: float, rise_db: float, fall_db: float) -> np.ndarray:
    """Amplitude response rising ``rise_db``/octave below ``centre``, falling above."""
    x = np.maximum(freqs, 1.0) / centre
    rise, fall = rise_db / 6.02, fall_db / 6.02
    return x ** rise / (1 + x ** (rise + fall))


def _peaks(freqs: np.ndarray, centres, gains, qs) -> np.ndarray:
    """Sum of resonance peaks (magnitude of second-order band-pass responses)."""
    out = np.zeros_like(freqs)
    for fc, gain, q in zip(centres, gains, qs, strict=False):
        out += gain / np.sqrt(1 + (q * (freqs / fc - fc / np.maximum(freqs, 1.0))) ** 2)
    return out


def _shaped(white: np.ndarray, fs: int, response) -> np.ndarray:
    """Filter white noise (last axis) by an amplitude response ``response(freqs)``."""
    n = white.shape[-1]
    spectrum = scipy.fft.rfft(white, axis=-1)
    spectrum *= response(scipy.fft.rfftfreq(n, 1 / fs))
    return scipy.fft.irfft(spectrum, n, axis=-1)


def _noise(rng, n: int) -> np.ndarray:
    return rng.standard_normal(n)


def _kernel(fs: int, freqs: Sequence[float], decays: Sequence[float],
            gains: Sequence[float]) -> np.ndarray:
    """Impulse response of a few damped structural modes: sum g e^(-t/tau) sin(2 pi f t)."""
    usable = [(f, d, g) for f, d, g in zip(freqs, decays, gains, strict=False) if f < 0.45 * fs]
    length = int(fs * 6 * max(d for _, d, _ in usable)) + 1
    t = np.arange(length) / fs
    h = sum(g * np.exp(-t / d) * np.sin(2 * np.pi * f * t) for f, d, g in usable)
    return h / np.max(np.abs(h))


def _ring(n: int, times_s: np.ndarray, amps: np.ndarray, kernel: np.ndarray,
          fs: int) -> np.ndarray:
    """Impacts at ``times_s`` with amplitudes ``amps``, each ringing ``kernel``."""
    train = np.zeros(n)
    idx = np.round(np.asarray(times_s) * fs).astype(int)
    keep = (idx >= 0) & (idx < n)
    np.add.at(train, idx[keep], np.asarray(amps, dtype=float)[keep])
    if not keep.any():
        return train
    return oaconvolve(train, kernel)[:n]


def _crossings(cycles: np.ndarray) -> np.ndarray:
    """Sample indices where a running cycle count passes a whole number."""
    whole = np.floor(cycles)
    return np.flatnonzero(np.diff(whole) > 0) + 1


def _envelope(n: int, fs: int, spans: Iterable[tuple[float, float]], attack: float,
              release: float) -> np.ndarray:
    """0..1 gate that is on during each ``(start_s, end_s)`` with smooth edges."""
    env = np.zeros(n)
    for start, end in spans:
        lo, hi = max(int(start * fs), 0), min(int((end + release) * fs) + 1, n)
        if end <= start or hi <= lo:
            continue
        t = np.arange(lo, hi) / fs
        rise = np.clip((t - start) / attack, 0, 1)
        fall = np.clip((end + release - t) / release, 0, 1)
        env[lo:hi] = np.maximum(env[lo:hi], np.minimum(rise, fall))
    return 0.5 - 0.5 * np.cos(np.pi * env)


# --------------------------------------------------------------------------------------
# Rotating machines: fan and pump
# --------------------------------------------------------------------------------------


def _rotating(clip: _Clip, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Fan or pump: shaft harmonics, blade/vane-pass tones, flow noise; returns (normal, extra).

    ``extra`` holds additive fault sounds (bearing impacts, rub, leak hiss); faults that change
    how the machine runs (imbalance, clogging) act inside the normal components.
    """
    p, rng, fs, n, t = clip.params, clip.rng, clip.fs, clip.n, clip.t
    fault, sev = clip.fault, clip.severity
    # Per-clip operating point: small speed and load differences between recordings.
    speed = 1 + rng.normal(0, 0.004)
    load = 1 + rng.normal(0, 0.06)
    tone_offsets = rng.uniform(0, 2 * np.pi, 16)
    start_phase = rng.uniform(0, 2 * np.pi)
    variation = _slow_variation(rng, t, p.wobble_depth, p.wobble_hz)
    flow_white = _noise(rng, n)
    operating = _operating_point(p, rng)
    pulsation_phase = rng.uniform(0, 2 * np.pi)

    if fault == "clogging":
        speed *= 1 + 0.008 * sev  # less flow, less load: the motor slips less and speeds up
    shaft_hz = p.shaft_hz * speed
    f_shaft = shaft_hz * (1 + variation)
    phi = _phase(f_shaft, fs, start_phase)
    top = 0.95 * clip.nyquist

    turn = _phasor(phi)
    shaft = _harmonics(turn, p.shaft_amps, tone_offsets[:4], top, shaft_hz)
    blade = _harmonics(_integer_power(turn, p.blades), p.blade_amps, tone_offsets[4:10], top,
                       p.blades * shaft_hz)
    hum = _harmonics(_tone_phasor(2 * p.line_hz, n, fs), (1.0, 0.35, 0.12), tone_offsets[10:13],
                     top, 2 * p.line_hz)
    # Turbulence is stronger while a blade passes: the flow noise is cyclostationary.
    flow_mod = 1 + 0.15 * np.sin(p.blades * phi)
    tilt = 0.0
    if kind == "pump":
        # Pressure pulsation in the pipes: slow swell of the flow noise at the system period.
        flow_mod *= 1 + 0.12 * np.sin(2 * np.pi * t / p.cycle_s + pulsation_phase)
    if fault == "clogging":
        tilt = 1.5 * sev  # dB/octave lost above the flow peak: a blocked, quieter flow
    response = _flow_response(operating, tilt)
    flow = _unit(_shaped(flow_white, fs, response)) * flow_mod

    blade_gain = 1.0
    if fault == "clogging":
        blade_gain = 1 + 0.15 * sev  # flow separation at the blockage sharpens the tone
    tonal = p.tonal_level * load * (0.35 * _unit(shaft) + blade_gain * _unit(blade))
    if fault == "imbalance":
        # The rotor's centre of mass orbits at shaft rate: blade-pass tone and flow noise are
        # amplitude-modulated at 1x (sidebands at BPF +- shaft rate), and 1x itself rises.
        depth = 0.25 * sev
        am = 1 + depth * np.sin(phi + clip.fault_rng.uniform(0, 2 * np.pi))
        tonal = tonal * am
        flow = flow * (1 + 0.5 * depth * np.sin(phi + 1.0))
        # The new unbalance adds to the residual one (same phase): the 1x line grows.
        tonal += p.tonal_level * 0.6 * sev * np.sin(phi + tone_offsets[0])
    normal = flow + tonal + p.hum_level * _unit(hum)

    extra = np.zeros(n)
    if fault == "bearing":
        extra = _bearing_impacts(clip, phi, f_shaft)
    elif fault == "rubbing":
        extra = _rub(clip, phi, shaft_hz)
    elif fault == "leak":
        extra = _leak_hiss(clip, centre=_fault_frequency(clip, 3500, 6500), level=0.22)
    elif fault == "clogging" and kind == "pump":
        extra = _cavitation(clip)
    return normal, extra


def _cavitation(clip: _Clip) -> np.ndarray:
    """A clogged suction lowers the inlet pressure until vapour bubbles form and collapse:
    a random crackle of very short broadband clicks (Poisson, ~150/s)."""
    rng, fs, n = clip.fault_rng, clip.fs, clip.n
    count = rng.poisson(150 * n / fs)
    kernel = _kernel(fs, (_fault_frequency(clip, 3000, 6000), _fault_frequency(clip, 1500, 3000)),
                     (0.0003, 0.0005), (1.0, 0.5))
    crackle = _ring(n, rng.uniform(0, n / fs, count), rng.exponential(1.0, count), kernel, fs)
    return 0.05 * clip.severity * _unit(crackle)


def _fault_frequency(clip: _Clip, lo: float, hi: float) -> float:
    """A fault-specific frequency, drawn from the fault stream and kept below Nyquist."""
    return min(clip.fault_rng.uniform(lo, hi), 0.42 * clip.fs)


def _operating_point(p: MachineParams, rng: np.random.Generator) -> MachineParams:
    """This recording's flow conditions: the noise peak and slopes vary a little per clip
    (temperature, pressure, load), as they do between real recordings of one machine."""
    centre, rise, fall = rng.normal(0, 1, 3)
    return dataclasses.replace(p, flow_centre_hz=p.flow_centre_hz * (1 + 0.05 * centre),
                               flow_rise_db=p.flow_rise_db + 0.3 * rise,
                               flow_fall_db=p.flow_fall_db + 0.3 * fall)


def _flow_response(p: MachineParams, tilt_db: float = 0.0):
    def response(freqs: np.ndarray) -> np.ndarray:
        base = _hump(freqs, p.flow_centre_hz, p.flow_rise_db, p.flow_fall_db)
        resonant = 1 + 0.5 * _peaks(freqs, p.resonances_hz, p.resonance_gains, p.resonance_q)
        lowcut = 1 / np.sqrt(1 + (30 / np.maximum(freqs, 1.0)) ** 4)
        out = base * resonant * lowcut
        if tilt_db:
            octaves = np.log2(np.maximum(freqs, p.flow_centre_hz) / p.flow_centre_hz)
            out = out * 10 ** (-tilt_db * octaves / 20)
        return out
    return response


def _bearing_impacts(clip: _Clip, phi: np.ndarray, f_shaft: np.ndarray) -> np.ndarray:
    """Outer-race defect: an impact each time a rolling element passes the spall.

    The impact rate is BPFO = ratio x shaft rate (following the speed), with 1-2 % random
    slip of the rolling elements; each impact rings a structural resonance of 2-5 kHz.
    """
    p, rng, fs, n = clip.params, clip.fault_rng, clip.fs, clip.n
    cycles = p.bearing_ratio * phi / (2 * np.pi)
    idx = _crossings(cycles)
    period = fs / (p.bearing_ratio * f_shaft[idx])
    jitter = rng.normal(0, 0.015, idx.size) * period
    amps = np.clip(rng.normal(1.0, 0.25, idx.size), 0.2, None)
    resonance = min(p.bearing_resonance_hz, 0.42 * fs)
    kernel = _kernel(fs, (resonance, resonance * 1.37), (0.0015, 0.001), (1.0, 0.4))
    impacts = _ring(n, (idx + jitter) / fs, amps, kernel, fs)
    return 0.14 * clip.severity * _unit(impacts)


def _rub(clip: _Clip, phi: np.ndarray, shaft_hz: float) -> np.ndarray:
    """Rotor rubbing on the casing: irregular once-per-turn impacts with friction bursts and
    a half-order sub-harmonic (the rotor bounces every other turn)."""
    rng, fs, n = clip.fault_rng, clip.fs, clip.n
    turns = _crossings(phi / (2 * np.pi) + rng.uniform(0, 1))
    contact = turns[rng.random(turns.size) < 0.35]  # partial rub: not every revolution
    amps = rng.uniform(0.3, 1.0, contact.size)
    kernel = _kernel(fs, (_fault_frequency(clip, 900, 2500), _fault_frequency(clip, 2500, 4500)),
                     (0.004, 0.002), (1.0, 0.6))
    impacts = _ring(n, contact / fs + rng.normal(0, 0.002, contact.size), amps, kernel, fs)
    burst_kernel = np.hanning(max(int(fs / shaft_hz * 0.25), 8))
    bursts = oaconvolve(_ring(n, contact / fs, amps, np.ones(1), fs), burst_kernel)[:n]
    friction = _shaped(_noise(rng, n), fs, lambda f: _hump(f, 2500, 6, 8)) * bursts
    sub = np.sin(0.5 * phi + rng.uniform(0, 2 * np.pi)) + 0.5 * np.sin(1.5 * phi)
    rub = _unit(impacts) + 0.7 * _unit(friction) + 0.5 * _unit(sub)
    return 0.12 * clip.severity * _unit(rub)


def _leak_hiss(clip: _Clip, centre: float, level: float,
               gate: np.ndarray | None = None) -> np.ndarray:
    """Jet noise from a leak: broadband hiss peaking at a few kHz, slowly fluctuating."""
    rng, fs, n, t = clip.fault_rng, clip.fs, clip.n, clip.t
    hiss = _unit(_shaped(_noise(rng, n), fs, lambda f: _hump(f, centre, 9, 6)))
    flutter = 1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t + rng.uniform(0, 6.3))
    if gate is not None:
        hiss = hiss * gate
    return level * clip.severity * hiss * flutter


# --------------------------------------------------------------------------------------
# Slide rail
# --------------------------------------------------------------------------------------


def _stroke_schedule(clip: _Clip, duration: float) -> list[dict]:
    """Strokes of one clip: each moves for ``duty`` of a half cycle, then dwells."""
    p, rng = clip.params, clip.rng
    half = p.cycle_s / 2
    offset = rng.uniform(0, p.cycle_s)
    strokes = []
    k = -2
    while True:
        start = k * half - offset + rng.normal(0, 0.003)
        if start > duration:
            break
        strokes.append(dict(start=start, length=half * p.duty * (1 + rng.normal(0, 0.01)),
                            impact=float(np.clip(rng.normal(1, 0.12), 0.5, 1.5))))
        k += 1
    return strokes


def _slider_timing_fault(clip: _Clip, strokes: list[dict], duration: float) -> list[dict]:
    """Timing faults: a few strokes start late or early, stop short, or hesitate midway
    (the controller or a sticking carriage interrupts the motion)."""
    rng, sev = clip.fault_rng, clip.severity
    half = clip.params.cycle_s / 2
    inside = [i for i, s in enumerate(strokes) if 0.2 < s["start"] < duration - half]
    strokes = [dict(s) for s in strokes]
    count = min(len(inside), int(rng.integers(2, 5)))
    for i in rng.choice(inside, size=count, replace=False):
        kind = rng.choice(["late", "early", "short", "hesitate"])
        shift = rng.uniform(0.1, 0.25) * sev * half
        s = strokes[i]
        if kind == "late":
            s["start"] += shift
        elif kind == "early":
            s["start"] -= shift
        elif kind == "short":
            s["length"] *= 1 - rng.uniform(0.2, 0.4) * min(sev, 2)
        else:  # stop partway, pause, then finish the stroke
            first = s["length"] * rng.uniform(0.3, 0.6)
            strokes.append(dict(start=s["start"] + first + shift, length=s["length"] - first,
                                impact=s["impact"]))
            s["length"], s["impact"] = first, s["impact"] * 0.3
    return sorted(strokes, key=lambda s: s["start"])


def _stroke_profile(t: np.ndarray, strokes: list[dict]) -> np.ndarray:
    """Motor speed 0..1: raised-cosine acceleration, cruise, deceleration for each stroke."""
    profile = np.zeros_like(t)
    fs = 1 / (t[1] - t[0])
    for s in strokes:
        lo = max(int(s["start"] * fs), 0)
        hi = min(int((s["start"] + s["length"]) * fs) + 1, t.size)
        if hi <= lo:
            continue
        u = np.clip((t[lo:hi] - s["start"]) / s["length"], 0, 1)
        shape = np.minimum(np.minimum(u, 1 - u) / 0.22, 1.0)  # 22 % of a stroke to ramp
        profile[lo:hi] = np.maximum(profile[lo:hi], 0.5 - 0.5 * np.cos(np.pi * shape))
    return profile


def _slider(clip: _Clip) -> tuple[np.ndarray, np.ndarray]:
    """Slide rail: motor whine sweeping with each stroke, rolling noise, end-stop impacts."""
    p, rng, fs, n, t = clip.params, clip.rng, clip.fs, clip.n, clip.t
    duration = n / fs
    fault, sev = clip.fault, clip.severity
    load = 1 + rng.normal(0, 0.06)
    offsets = rng.uniform(0, 2 * np.pi, 12)
    variation = _slow_variation(rng, t, p.wobble_depth, p.wobble_hz)
    rolling_white = _noise(rng, n)
    operating = _operating_point(p, rng)
    strokes = _stroke_schedule(clip, duration)
    if fault == "timing":
        strokes = _slider_timing_fault(clip, strokes, duration)
    profile = _stroke_profile(t, strokes)
    f_motor = p.shaft_hz * profile * (1 + variation)
    phi = _phase(f_motor, fs)
    top = 0.95 * clip.nyquist
    turn = _phasor(phi)
    motor = _harmonics(turn, p.shaft_amps, offsets[:4], top, p.shaft_hz)
    mesh = _harmonics(_integer_power(turn, p.blades), p.blade_amps, offsets[4:7], top,
                      p.blades * p.shaft_hz)
    gate = np.clip(profile * 4, 0, 1)  # the drive is energised while the motor turns
    pwm = np.sin(2 * np.pi * min(p.pwm_hz, 0.45 * fs) * t + offsets[7]) * gate
    rolling = _unit(_shaped(rolling_white, fs, _flow_response(operating))) * profile
    whine = p.tonal_level * load * (0.5 * _unit(motor) * profile + _unit(mesh) * profile)
    ends = np.array([s["start"] + s["length"] for s in strokes])
    kernel = _kernel(fs, p.click_hz, p.click_decay_s, p.click_gains)
    impact_amps = np.array([s["impact"] for s in strokes]) * 10.0
    clip.events = sorted([(float(s["start"]), "start") for s in strokes if 0 <= s["start"] < duration]
                         + [(float(e), "end") for e in ends if 0 <= e < duration])
    impacts = _ring(n, ends, impact_amps, kernel, fs)
    normal = rolling + whine + 0.03 * pwm + impacts * 0.6

    extra = np.zeros(n)
    if fault == "rubbing":
        extra = _slider_friction(clip, profile)
    elif fault == "looseness":
        extra = _belt_slap(clip, profile, phi, ends, kernel)
    elif fault == "bearing":
        cycles = p.bearing_ratio * phi / (2 * np.pi)
        idx = _crossings(cycles)
        amps = np.clip(clip.fault_rng.normal(1, 0.25, idx.size), 0.2, None)
        res = min(p.bearing_resonance_hz, 0.42 * fs)
        ring = _ring(n, idx / fs, amps * profile[idx],
                     _kernel(fs, (res, res * 1.37), (0.0015, 0.001), (1.0, 0.4)), fs)
        extra = 0.2 * sev * _unit(ring)
    return normal, extra


def _slider_friction(clip: _Clip, profile: np.ndarray) -> np.ndarray:
    """Dry sliding (no grease): stick-slip squeal with a wandering pitch, stronger with speed."""
    rng, fs, n, t = clip.fault_rng, clip.fs, clip.n, clip.t
    squeal_hz = _fault_frequency(clip, 1500, 3500)
    wander = 1 + 0.01 * np.sin(2 * np.pi * rng.uniform(3, 8) * t) + \
        0.004 * np.cumsum(rng.standard_normal(n)) / np.sqrt(n)
    squeal = np.sin(_phase(squeal_hz * wander, fs)) + 0.3 * np.sin(2 * _phase(squeal_hz * wander, fs))
    bursts = np.clip(0.5 + 0.6 * _unit(_shaped(_noise(rng, n), fs, lambda f: 1.0 * (f < 6))),
                     0, 1)  # stick-slip comes and goes a few times a second
    grind = _unit(_shaped(_noise(rng, n), fs, lambda f: _hump(f, squeal_hz * 0.8, 6, 6)))
    rub = (0.6 * _unit(squeal) * bursts + grind) * profile
    return 0.3 * clip.severity * rub


def _belt_slap(clip: _Clip, profile: np.ndarray, phi: np.ndarray, ends: np.ndarray,
               kernel: np.ndarray) -> np.ndarray:
    """Loose belt: random slaps while moving, a half-order tone and a rebound at end stops."""
    rng, fs, n = clip.fault_rng, clip.fs, clip.n
    moving = np.flatnonzero(profile > 0.3)
    count = int(moving.size / fs * 12)
    slaps = rng.choice(moving, size=count, replace=False) if count and moving.size else []
    low = _kernel(fs, (_fault_frequency(clip, 250, 700), _fault_frequency(clip, 1200, 2200)),
                  (0.01, 0.004), (1.0, 0.5))
    slap = _ring(n, np.asarray(slaps) / fs, rng.uniform(0.3, 1, len(slaps)), low, fs)
    sub = np.sin(0.5 * phi) * profile
    rebound = _ring(n, ends + rng.uniform(0.03, 0.06, ends.size), np.full(ends.size, 0.5),
                    kernel, fs)
    return 0.2 * clip.severity * _unit(_unit(slap) + 0.4 * _unit(sub) + 0.6 * _unit(rebound))


# --------------------------------------------------------------------------------------
# Solenoid valve
# --------------------------------------------------------------------------------------


def _valve_schedule(clip: _Clip, duration: float) -> list[dict]:
    """Open/close windows of one clip: the instance's pulse pattern repeated every cycle."""
    p, rng = clip.params, clip.rng
    offset = rng.uniform(0, p.cycle_s)
    windows = []
    k = -1
    while k * p.cycle_s - offset < duration:
        for start, length in p.pulses:
            t0 = k * p.cycle_s - offset + start + rng.normal(0, 0.002)
            windows.append(dict(open=t0, close=t0 + length * (1 + rng.normal(0, 0.01)),
                                amp_open=float(np.clip(rng.normal(1, 0.1), 0.6, 1.4)),
                                amp_close=float(np.clip(rng.normal(0.75, 0.08), 0.4, 1.2))))
        k += 1
    return windows


def _valve_timing_fault(clip: _Clip, windows: list[dict], duration: float) -> list[dict]:
    """Valve timing faults: an event early/late, a missing event, or an extra pulse."""
    rng, sev = clip.fault_rng, clip.severity
    windows = [dict(w) for w in windows]
    inside = [i for i, w in enumerate(windows) if 0.1 < w["open"] < duration - 0.5]
    if not inside:
        return windows
    for i in rng.choice(inside, size=min(len(inside), int(rng.integers(2, 5))), replace=False):
        w = windows[i]
        kind = rng.choice(["late", "early", "sticking", "missing", "extra"])
        shift = rng.uniform(0.05, 0.2) * sev
        if kind == "late":
            w["open"] += shift
        elif kind == "early":
            w["open"] -= shift
            w["close"] -= shift * rng.uniform(0, 1)
        elif kind == "sticking":  # the plunger sticks: the valve closes much too late
            w["close"] += shift * 3
            w["amp_close"] *= 0.6
        elif kind == "missing":  # the coil did not pull: no opening at all this time
            w["skip"] = True
        else:
            start = w["close"] + rng.uniform(0.08, 0.2)
            windows.append(dict(open=start, close=start + rng.uniform(0.04, 0.12),
                                amp_open=w["amp_open"] * 0.8, amp_close=w["amp_close"] * 0.8))
    return sorted((w for w in windows if not w.get("skip")), key=lambda w: w["open"])


def _valve(clip: _Clip) -> tuple[np.ndarray, np.ndarray]:
    """Solenoid valve: click on opening and closing, flow hiss while open, coil buzz."""
    p, rng, fs, n = clip.params, clip.rng, clip.fs, clip.n
    duration = n / fs
    fault = clip.fault
    hiss_white = _noise(rng, n)
    load = 1 + rng.normal(0, 0.06)
    buzz_offsets = rng.uniform(0, 2 * np.pi, 3)
    operating = _operating_point(p, rng)
    windows = _valve_schedule(clip, duration)
    if fault == "timing":
        windows = _valve_timing_fault(clip, windows, duration)
    if fault == "chatter":
        windows = _chatter(clip, windows)
    spans = [(w["open"], w["close"]) for w in windows]
    gate = _envelope(n, fs, spans, attack=0.006, release=0.012)
    hiss = _unit(_shaped(hiss_white, fs, _flow_response(operating))) * gate * p.tonal_level * load
    open_kernel = _kernel(fs, p.click_hz, p.click_decay_s, p.click_gains)
    close_kernel = _kernel(fs, [f * 0.92 for f in p.click_hz], p.click_decay_s,
                           p.click_gains[:1] + tuple(g * 1.3 for g in p.click_gains[1:]))
    opens = np.array([w["open"] for w in windows])
    closes = np.array([w["close"] for w in windows])
    clicks = (_ring(n, opens, [w["amp_open"] for w in windows], open_kernel, fs)
              + _ring(n, closes, [w["amp_close"] for w in windows], close_kernel, fs))
    clip.events = sorted([(float(x), "open") for x in opens if 0 <= x < duration]
                         + [(float(x), "close") for x in closes if 0 <= x < duration])
    normal = clicks * 1.5 + hiss
    if p.ac_coil:
        buzz = _harmonics(_tone_phasor(2 * p.line_hz, n, fs), (1.0, 0.5, 0.3), buzz_offsets,
                          0.95 * clip.nyquist, 2 * p.line_hz)
        normal += p.hum_level * _unit(buzz) * gate
    extra = np.zeros(n)
    if fault == "leak":
        # Seat leak: a thin high-pitched jet while the valve should be closed.
        centre = _fault_frequency(clip, 4000, 7000)
        extra = _leak_hiss(clip, centre, level=0.12 * p.tonal_level, gate=1 - 0.8 * gate)
    return normal, extra


def _chatter(clip: _Clip, windows: list[dict]) -> list[dict]:
    """Chatter: the plunger bounces after opening, so the flow stops and restarts a few times
    in quick succession (each bounce is a close click followed by an open click)."""
    rng, sev = clip.fault_rng, clip.severity
    out = []
    for w in windows:
        if rng.random() > min(0.5 * sev + 0.3, 1.0):
            out.append(w)
            continue
        start, amp = w["open"], w["amp_open"]
        t = start
        for _ in range(int(rng.integers(2, 5))):
            t += rng.uniform(0.015, 0.04)
            gap = rng.uniform(0.004, 0.01)
            if t + gap + 0.02 >= w["close"]:
                break
            amp *= 0.7
            out.append(dict(open=start, close=t, amp_open=w["amp_open"] if start == w["open"]
                            else amp, amp_close=amp))
            start = t + gap
            t = start
        out.append(dict(w, open=start, amp_open=w["amp_open"] if start == w["open"] else amp))
    return out


# --------------------------------------------------------------------------------------
# Background, microphone array, mixing
# --------------------------------------------------------------------------------------


def _background(p: MachineParams, rng: np.random.Generator, n: int, fs: int,
                channels: int) -> np.ndarray:
    """Factory background (C, n): pink-ish noise, distant hum, occasional far impacts.

    Part of it arrives as one wave from a direction (coherent across microphones), the rest
    is diffuse (independent per microphone).
    """
    def pink(freqs):  # 1/f**tilt power, microphone high-pass at 25 Hz and roll-off at 7 kHz
        f = np.maximum(freqs, 1.0)
        return f ** (-p.background_tilt / 2) / np.sqrt(1 + (25 / f) ** 4) / (1 + (f / 7000) ** 4)

    shaped = _shaped(rng.standard_normal((channels + 1, n)), fs, pink)
    shaped /= np.sqrt(np.mean(shaped ** 2, axis=-1, keepdims=True))
    coherent, diffuse = shaped[0], shaped[1:]
    offsets = rng.uniform(0, 2 * np.pi, 9)
    hum = _harmonics(_tone_phasor(p.line_hz, n, fs), (0.3, 1.0, 0.3, 0.5, 0.15, 0.2),
                     offsets[:6], 0.45 * fs, p.line_hz)
    other_hz = p.background_hum_hz * (1 + rng.normal(0, 0.003))  # its speed varies too
    other = _harmonics(_tone_phasor(other_hz, n, fs), (1.0, 0.5, 0.25), offsets[6:9], 0.45 * fs,
                       other_hz)
    count = rng.poisson(0.4 * n / fs)
    kernel = _kernel(fs, (rng.uniform(200, 1500), rng.uniform(1500, 4000)),
                     (rng.uniform(0.02, 0.08), 0.01), (1.0, 0.3))
    knocks = _ring(n, rng.uniform(0, n / fs, count), rng.uniform(0.5, 4.0, count), kernel, fs)
    source = coherent + 0.25 * _unit(hum) + 0.15 * _unit(other) + 0.5 * knocks
    direction = rng.uniform(0, 360)
    mix = np.sqrt(0.5) * _array(source, fs, channels, direction) + np.sqrt(0.5) * diffuse
    return mix / np.sqrt(np.mean(mix ** 2))


def _array(x: np.ndarray, fs: int, channels: int, azimuth_deg: float) -> np.ndarray:
    """Plane wave from ``azimuth_deg`` on a circular array: (C, n) with fractional delays.

    The delays (at most 2 x 4.5 cm / c, ~4 samples) are applied in the frequency domain.
    """
    if channels == 1:
        return x[None, :]
    mic_angles = 2 * np.pi * np.arange(channels) / channels
    delays = -ARRAY_RADIUS / SPEED_OF_SOUND * np.cos(np.deg2rad(azimuth_deg) - mic_angles)
    n = x.shape[-1]
    spectrum = scipy.fft.rfft(x)
    freqs = scipy.fft.rfftfreq(n, 1 / fs)
    shifts = np.exp(-2j * np.pi * freqs[None, :] * delays[:, None])
    return scipy.fft.irfft(spectrum[None, :] * shifts, n, axis=-1)


def _render(machine: str, fault: str | None, seed: int, duration: float, sample_rate: int,
            snr_db: float, channels: int, params: MachineParams | None,
            severity: float) -> tuple[np.ndarray, _Clip]:
    _check_machine(machine)
    if fault is not None and fault not in FAULTS[machine]:
        raise DataError(f"unknown fault {fault!r} for {machine}; choose from "
                        f"{', '.join(FAULTS[machine])}")
    if duration <= 0 or sample_rate < 4000 or channels < 1:
        raise DataError(f"cannot simulate duration={duration} s, sample_rate={sample_rate} Hz, "
                        f"channels={channels}")
    p = params or machine_params(machine)
    if p.machine != machine:
        raise DataError(f"params describe a {p.machine}, not a {machine}")
    n = int(round(duration * sample_rate))
    clip = _Clip(params=p, n=n, fs=sample_rate,
                 rng=_rng("clip", machine, p.machine_id, seed),
                 fault_rng=_rng("fault", machine, p.machine_id, seed, fault or "none"),
                 fault=fault, severity=float(severity))
    if machine in ("fan", "pump"):
        normal, extra = _rotating(clip, machine)
    elif machine == "slider":
        normal, extra = _slider(clip)
    else:
        normal, extra = _valve(clip)
    # Fault sounds are defined relative to the healthy machine's RMS, and so is the noise:
    # a fault makes the clip louder, it does not turn the background down.
    source = normal / _rms(normal) + extra
    wave = _array(source, sample_rate, channels, p.azimuth_deg)
    background = _background(p, _rng("background", machine, p.machine_id, seed), n,
                             sample_rate, channels)
    wave = wave + background * 10 ** (-snr_db / 20)
    level = OUTPUT_RMS * 10 ** (clip.rng.normal(0, 0.5) / 20) / np.sqrt(1 + 10 ** (-snr_db / 10))
    wave *= level
    peak = np.max(np.abs(wave))
    if peak > 0.99:  # a recorder's gain would have been set lower: no digital clipping
        wave *= 0.99 / peak
    return wave.astype(np.float32), clip


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def simulate_clip(machine: str, *, fault: str | None = None, seed: int, duration: float = 10.0,
                  sample_rate: int = SAMPLE_RATE, snr_db: float = 6.0, channels: int = 1,
                  params: MachineParams | None = None, severity: float = 1.0) -> np.ndarray:
    """One recording of ``machine`` as float32 ``(channels, n)`` in [-1, 1].

    ``fault`` is None (healthy) or one of ``FAULTS[machine]``; ``severity`` scales it (1.0:
    detectable but not blatant). ``params`` is the machine instance (default
    ``machine_params(machine, "id_00")``). The same arguments give bit-identical output.
    """
    wave, _ = _render(machine, fault, seed, duration, sample_rate, snr_db, channels, params,
                      severity)
    return wave


def clip_events(machine: str, *, fault: str | None = None, seed: int, duration: float = 10.0,
                params: MachineParams | None = None, severity: float = 1.0
                ) -> list[tuple[float, str]]:
    """``(time_s, kind)`` of the valve clicks or slider stroke starts/ends of a clip."""
    _, clip = _render(machine, fault, seed, duration, SAMPLE_RATE, 6.0, 1, params, severity)
    return clip.events


def _clip_seed(seed: int, machine_id: str, label: int, index: int) -> int:
    state = np.random.SeedSequence([_key(seed), _key(machine_id), label, index])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> 1)


def _wav_bytes(wave: np.ndarray, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave.T, sample_rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def simulate_dataset(machine: str, n_normal: int, n_abnormal: int, out: str | Path, *,
                     snr_db: float = 6.0, channels: int = 1, seed: int = 0,
                     machine_id: str = "id_00", faults: Sequence[str] | None = None,
                     severity: float = 1.0, duration: float = 10.0,
                     sample_rate: int = SAMPLE_RATE, progress: bool = True) -> Path:
    """Write a MIMII-layout data set and return the machine-id folder.

    Files: ``<out>/<machine>/<machine_id>/{normal,abnormal}/NNNNNNNN.wav`` (16-bit PCM) and
    ``faults.csv`` (file, label, fault, severity) in the machine-id folder. Abnormal clips
    cycle through ``faults`` (default: every fault of the machine) with severities spread
    around ``severity`` (x0.6 to x1.4), like real faults of different stages.
    """
    _check_machine(machine)
    faults = tuple(faults) if faults is not None else FAULTS[machine]
    for fault in faults:
        if fault not in FAULTS[machine]:
            raise DataError(f"unknown fault {fault!r} for {machine}; choose from "
                            f"{', '.join(FAULTS[machine])}")
    if n_normal < 0 or n_abnormal < 0 or (n_abnormal and not faults):
        raise DataError("need non-negative clip counts and at least one fault for "
                        "abnormal clips")
    params = machine_params(machine, machine_id)
    folder = Path(out) / machine / machine_id
    plan = [("normal", i, None, 0.0) for i in range(n_normal)]
    spread = _rng("severity", machine, machine_id, seed)
    plan += [("abnormal", j, faults[j % len(faults)], severity * spread.uniform(0.6, 1.4))
             for j in range(n_abnormal)]
    rows = []
    with _progress(progress, f"simulating {machine} {machine_id}", len(plan)) as advance:
        for label, index, fault, sev in plan:
            clip_seed = _clip_seed(seed, machine_id, int(label == "abnormal"), index)
            wave = simulate_clip(machine, fault=fault, seed=clip_seed, duration=duration,
                                 sample_rate=sample_rate, snr_db=snr_db, channels=channels,
                                 params=params, severity=sev)
            path = folder / label / f"{index:08d}.wav"
            atomic_write_bytes(path, _wav_bytes(wave, sample_rate))
            rows.append((f"{label}/{path.name}", label, fault or "normal", round(sev, 3)))
            advance()
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(("file", "label", "fault", "severity"))
    writer.writerows(rows)
    atomic_write_text(folder / "faults.csv", table.getvalue())
    return folder


@contextlib.contextmanager
def _progress(enabled: bool, description: str, total: int) -> Iterator[Callable[[], None]]:
    """Yield ``advance()`` for a bar over clips (:mod:`stethoscope.progress`)."""
    with progress_bar(total, description, enabled=enabled) as bar:
        yield bar.advance
