"""simulate.py: determinism, output contract, machine consistency and fault physics.

Fault tests compare a faulty clip with the normal clip of the same seed: the simulator draws
the healthy machine and the fault from separate random streams, so the difference between the
two is the fault alone, and each test measures what an engineer would look for.
"""

from __future__ import annotations

import csv
import hashlib
import time

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import butter, hilbert, sosfiltfilt

from stethoscope.errors import DataError
from stethoscope.simulate import (
    FAULTS,
    MACHINES,
    clip_events,
    machine_params,
    simulate_clip,
    simulate_dataset,
)

FS = 16000


def _power_spectrum(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = wave[0].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size))) ** 2
    return np.fft.rfftfreq(x.size, 1 / FS), spectrum


def _band(freqs, spectrum, lo, hi) -> float:
    return float(spectrum[(freqs >= lo) & (freqs < hi)].sum())


def _mean_logmel(wave: np.ndarray) -> np.ndarray:
    librosa = pytest.importorskip("librosa", reason="librosa (test extra) computes log-mels")
    mel = librosa.feature.melspectrogram(y=wave[0], sr=FS, n_fft=1024, hop_length=512,
                                         n_mels=64)
    return np.log(mel + 1e-10).mean(axis=1)


# ---------------------------------------------------------------- contract


def test_same_seed_is_bit_identical_and_other_seed_differs():
    for machine in MACHINES:
        a = simulate_clip(machine, fault=None, seed=7, duration=1.0)
        b = simulate_clip(machine, fault=None, seed=7, duration=1.0)
        c = simulate_clip(machine, fault=None, seed=8, duration=1.0)
        assert np.array_equal(a, b)
        assert not np.allclose(a, c)


def test_machine_ids_are_different_machines():
    fan0, fan2 = machine_params("fan", "id_00"), machine_params("fan", "id_02")
    assert fan0 == machine_params("fan", "id_00")
    assert fan0 != fan2
    assert not np.allclose(simulate_clip("fan", seed=1, duration=1.0, params=fan0),
                           simulate_clip("fan", seed=1, duration=1.0, params=fan2))


@pytest.mark.parametrize("machine", MACHINES)
@pytest.mark.parametrize("channels", [1, 8])
def test_output_shape_range_and_finiteness(machine, channels):
    fault = FAULTS[machine][0]
    for wave in (simulate_clip(machine, seed=3, duration=2.0, channels=channels),
                 simulate_clip(machine, fault=fault, seed=3, duration=2.0, channels=channels,
                               snr_db=-6.0, severity=3.0)):
        assert wave.dtype == np.float32 and wave.shape == (channels, 2 * FS)
        assert np.isfinite(wave).all()
        assert np.abs(wave).max() < 1.0  # never clipped
        assert np.sqrt(np.mean(wave ** 2)) > 0.01  # not silent
    other_rate = simulate_clip(machine, seed=3, duration=0.5, sample_rate=8000)
    assert other_rate.shape == (1, 4000) and np.isfinite(other_rate).all()


def test_array_channels_carry_the_inter_microphone_delay():
    """Opposite microphones of the circular array hear the machine 2r/c apart."""
    params = machine_params("pump", "id_00")
    wave = simulate_clip("pump", seed=0, duration=4.0, channels=8, snr_db=40.0, params=params)
    assert not np.allclose(wave[0], wave[4])
    cross = np.fft.rfft(wave[0].astype(float)) * np.conj(np.fft.rfft(wave[4].astype(float)))
    freqs = np.fft.rfftfreq(wave.shape[1], 1 / FS)
    use = (freqs > 100) & (freqs < 2000)
    # Weighted least-squares slope of the cross-spectrum phase: phase = 2 pi f (t4 - t0).
    phase, weight = np.angle(cross[use]), np.abs(cross[use])
    omega = 2 * np.pi * freqs[use]
    measured = np.sum(weight * omega * phase) / np.sum(weight * omega ** 2)
    angle = np.deg2rad(params.azimuth_deg)
    expected = 2 * 0.045 / 343.0 * np.cos(angle)  # t4 - t0 for mics at 0 and 180 degrees
    assert measured == pytest.approx(expected, abs=0.2 * 2 * 0.045 / 343.0)


def test_bad_arguments_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="unknown machine"):
        simulate_clip("toaster", seed=0)
    with pytest.raises(DataError, match="unknown fault 'leak' for fan"):
        simulate_clip("fan", fault="leak", seed=0)
    with pytest.raises(DataError, match="params describe a pump"):
        simulate_clip("fan", seed=0, params=machine_params("pump"))
    with pytest.raises(DataError, match="unknown fault"):
        simulate_dataset("valve", 1, 1, tmp_path, faults=["imbalance"])


def test_generation_speed():
    simulate_clip("fan", seed=0, duration=10.0)  # warm up
    start = time.process_time()
    for seed in range(3):
        simulate_clip("fan", seed=seed, duration=10.0)
    per_clip = (time.process_time() - start) / 3
    assert per_clip < 0.5, f"a 10 s clip took {per_clip:.3f} s of CPU"  # ~0.05 s unloaded


# ---------------------------------------------------------------- realism


def test_normal_clips_of_a_machine_are_consistent_but_not_identical():
    spectra = {m: [_mean_logmel(simulate_clip(m, seed=s, duration=3.0)) for s in (1, 2)]
               for m in MACHINES}
    for machine, (a, b) in spectra.items():
        within = np.linalg.norm(a - b)
        assert within > 0  # clips vary (speed, load, timing)
        for other in MACHINES:
            if other != machine:
                assert within < np.linalg.norm(a - spectra[other][0]), (machine, other)


def test_machine_ids_sound_more_alike_within_than_across_ids():
    p0, p2 = machine_params("fan", "id_00"), machine_params("fan", "id_02")
    a, b = (_mean_logmel(simulate_clip("fan", seed=s, duration=3.0, params=p0)) for s in (1, 2))
    c = _mean_logmel(simulate_clip("fan", seed=1, duration=3.0, params=p2))
    assert np.linalg.norm(a - b) < np.linalg.norm(a - c)


def test_slider_strokes_are_periodic_with_end_stop_impacts():
    params = machine_params("slider", "id_00")
    events = clip_events("slider", seed=4, duration=10.0, params=params)
    ends = np.array([t for t, kind in events if kind == "end"])
    assert len(ends) >= int(10.0 / params.cycle_s)  # two strokes per cycle
    gaps = np.diff(ends)
    assert np.allclose(gaps, params.cycle_s / 2, rtol=0.05)
    # Each end stop is an impact: a burst of high-frequency energy at that moment.
    wave = simulate_clip("slider", seed=4, duration=10.0, params=params, snr_db=30.0)
    energy = _band_envelope(wave, 400, 6000, frame=0.01)
    for t in ends[(ends > 0.1) & (ends < 9.9)]:
        i = int(t / 0.01)
        assert energy[i: i + 2].max() > 3 * energy[i - 2]  # a clunk as the carriage stops
    at_ends = np.mean([energy[int(t / 0.01): int(t / 0.01) + 2].max() for t in ends if t < 9.9])
    assert at_ends > 1.5 * np.median(energy)  # louder than the running noise


def _band_envelope(wave: np.ndarray, lo: float, hi: float, frame: float) -> np.ndarray:
    sos = butter(4, [lo, hi], btype="band", fs=FS, output="sos")
    x = sosfiltfilt(sos, wave[0].astype(np.float64))
    hop = int(frame * FS)
    return np.sqrt(np.mean(x[: x.size // hop * hop].reshape(-1, hop) ** 2, axis=1))


def test_valve_clicks_happen_at_the_reported_events():
    params = machine_params("valve", "id_00")
    events = clip_events("valve", seed=5, duration=6.0, params=params)
    assert {kind for _, kind in events} == {"open", "close"}
    wave = simulate_clip("valve", seed=5, duration=6.0, params=params, snr_db=30.0)
    energy = _band_envelope(wave, 1000, 7000, frame=0.005)
    for t, _ in events:
        i = int(t / 0.005)
        if 2 <= i < energy.size - 2:
            assert energy[i - 1: i + 3].max() > 3 * np.median(energy)


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize("machine", MACHINES)
def test_every_fault_changes_the_clip_by_a_realistic_amount(machine):
    normal = simulate_clip(machine, seed=11, duration=4.0)
    level = np.sqrt(np.mean(normal ** 2))
    for fault in FAULTS[machine]:
        faulty = simulate_clip(machine, fault=fault, seed=11, duration=4.0)
        change = np.sqrt(np.mean((faulty - normal) ** 2)) / level
        assert 0.02 < change < 1.5, (fault, change)  # audible, but not a different machine


def test_severity_scales_an_additive_fault():
    normal = simulate_clip("fan", seed=2, duration=3.0)
    mild = simulate_clip("fan", fault="bearing", seed=2, duration=3.0, severity=0.5) - normal
    strong = simulate_clip("fan", fault="bearing", seed=2, duration=3.0, severity=2.0) - normal
    ratio = np.sqrt(np.mean(strong ** 2) / np.mean(mild ** 2))
    assert ratio == pytest.approx(4.0, rel=0.05)


@pytest.mark.parametrize("machine", ["fan", "pump"])
def test_imbalance_raises_sidebands_around_the_blade_pass_tone(machine):
    params = machine_params(machine, "id_00")
    freqs, normal = _power_spectrum(simulate_clip(machine, seed=1, duration=4.0, params=params))
    _, faulty = _power_spectrum(simulate_clip(machine, fault="imbalance", seed=1, duration=4.0,
                                              params=params))
    nominal = params.blade_pass_hz()
    near = (freqs > nominal * 0.97) & (freqs < nominal * 1.03)
    bpf = freqs[near][np.argmax(normal[near])]  # this clip's actual speed
    shaft = bpf / params.blades

    # BPF - 1x coincides with a shaft harmonic when there are few blades: leave it out then.
    sides = [bpf + shaft] + ([bpf - shaft] if params.blades - 1 > len(params.shaft_amps) else [])

    def sideband_ratio(spectrum):  # +-3 Hz: the tones wander with the speed wobble
        power = sum(_band(freqs, spectrum, f - 3, f + 3) for f in sides)
        return power / _band(freqs, spectrum, bpf - 3, bpf + 3)

    # Same seed, same noise: any rise is the modulation (flow noise fills the +-3 Hz windows).
    assert sideband_ratio(faulty) > 1.2 * sideband_ratio(normal)
    def one_x(spectrum):
        return _band(freqs, spectrum, shaft - 1, shaft + 1)

    assert one_x(faulty) > 2 * one_x(normal)  # the 1x shaft component rises too


@pytest.mark.parametrize("machine", ["fan", "pump", "slider"])
def test_bearing_defect_shows_in_the_envelope_spectrum(machine):
    """Classic envelope analysis: band-pass around the resonance, demodulate, find BPFO."""
    params = machine_params(machine, "id_00")
    normal = simulate_clip(machine, seed=3, duration=8.0, params=params)
    faulty = simulate_clip(machine, fault="bearing", seed=3, duration=8.0, params=params)
    centre = params.bearing_resonance_hz  # an analyst finds it as the band that rings
    sos = butter(4, [centre * 0.85, centre * 1.15], btype="band", fs=FS, output="sos")

    def peak_at_defect(wave):
        envelope = np.abs(hilbert(sosfiltfilt(sos, wave[0].astype(np.float64))))
        spectrum = np.abs(np.fft.rfft(envelope - envelope.mean()))
        freqs = np.fft.rfftfreq(envelope.size, 1 / FS)
        defect = params.defect_hz()  # slider: at cruising speed
        near = (freqs > defect * 0.95) & (freqs < defect * 1.05)
        return spectrum[near].max() / np.median(spectrum[(freqs > 10) & (freqs < 500)])

    normal_peak, fault_peak = peak_at_defect(normal), peak_at_defect(faulty)
    assert fault_peak > 4 and fault_peak > 1.5 * normal_peak


def test_pump_leak_adds_high_frequency_hiss():
    normal = simulate_clip("pump", seed=4, duration=3.0)
    faulty = simulate_clip("pump", fault="leak", seed=4, duration=3.0)
    freqs, added = _power_spectrum(faulty - normal)
    assert _band(freqs, added, 2500, 8000) > 0.8 * _band(freqs, added, 0, 8000)
    _, before = _power_spectrum(normal)
    _, after = _power_spectrum(faulty)
    assert _band(freqs, after, 3000, 8000) > 1.05 * _band(freqs, before, 3000, 8000)


def test_valve_leak_hisses_while_the_valve_is_closed():
    params = machine_params("valve", "id_00")
    events = clip_events("valve", seed=6, duration=6.0, params=params)
    normal = simulate_clip("valve", seed=6, duration=6.0, params=params, snr_db=20.0)
    faulty = simulate_clip("valve", fault="leak", seed=6, duration=6.0, params=params,
                           snr_db=20.0)
    closed = np.ones(normal.shape[1], bool)
    opens = [t for t, k in events if k == "open"]
    for t0 in opens:
        closes = [t for t, k in events if k == "close" and t > t0]
        closed[int(t0 * FS): int((closes[0] if closes else 6.0) * FS) + 800] = False
    for t, _ in events:  # keep away from the clicks
        closed[max(int(t * FS) - 800, 0): int(t * FS) + 1600] = False
    high_pass = butter(4, 3000, "high", fs=FS, output="sos")

    def hiss_while_closed(wave):
        return np.mean(sosfiltfilt(high_pass, wave[0].astype(np.float64))[closed] ** 2)

    assert closed.mean() > 0.2
    assert hiss_while_closed(faulty) > 2 * hiss_while_closed(normal)


def test_clogging_tilts_the_flow_noise_and_shifts_the_pitch():
    params = machine_params("fan", "id_00")
    freqs, normal = _power_spectrum(simulate_clip("fan", seed=5, duration=4.0, params=params))
    _, faulty = _power_spectrum(simulate_clip("fan", fault="clogging", seed=5, duration=4.0,
                                              params=params))
    def high_share(spectrum):
        return _band(freqs, spectrum, 2000, 8000) / _band(freqs, spectrum, 50, 8000)

    assert high_share(faulty) < 0.85 * high_share(normal)
    near = (freqs > params.blade_pass_hz() * 0.97) & (freqs < params.blade_pass_hz() * 1.03)
    ratio = freqs[near][np.argmax(faulty[near])] / freqs[near][np.argmax(normal[near])]
    assert 1.002 < ratio < 1.02  # the lightly loaded motor runs slightly faster


@pytest.mark.parametrize("machine, fault, band, rate", [
    ("fan", "rubbing", (800, 5000), lambda p: p.shaft_hz),
    ("slider", "looseness", (150, 2500), lambda p: p.shaft_hz),
])
def test_rubbing_and_looseness_add_irregular_impacts_and_a_half_order_tone(machine, fault, band,
                                                                           rate):
    """The added sound (faulty minus normal, same seed) is impulsive and has a 1/2x line."""
    from scipy.stats import kurtosis

    params = machine_params(machine, "id_00")
    normal = simulate_clip(machine, seed=8, duration=4.0, params=params)
    added = simulate_clip(machine, fault=fault, seed=8, duration=4.0, params=params) - normal
    sos = butter(4, band, btype="band", fs=FS, output="sos")
    assert kurtosis(sosfiltfilt(sos, added[0].astype(np.float64))) > 3  # impacts, not hiss
    freqs, spectrum = _power_spectrum(added)
    half = rate(params) / 2
    line = _band(freqs, spectrum, half * 0.97, half * 1.03)
    around = _band(freqs, spectrum, half * 1.2, half * 1.8) / (0.6 / 0.06)
    assert line > 10 * around


@pytest.mark.parametrize("machine", ["valve", "slider"])
def test_timing_fault_moves_events(machine):
    params = machine_params(machine, "id_00")
    moved = 0
    for seed in range(3):
        normal = clip_events(machine, seed=seed, duration=10.0, params=params)
        faulty = clip_events(machine, fault="timing", seed=seed, duration=10.0, params=params)
        moved += normal != faulty
        # The schedule is the same machine's: most events are still where they were.
        same = {round(t, 4) for t, _ in normal} & {round(t, 4) for t, _ in faulty}
        assert len(same) >= len(normal) // 3
    assert moved == 3


def test_chatter_adds_clicks():
    params = machine_params("valve", "id_00")
    normal = clip_events("valve", seed=2, duration=10.0, params=params)
    faulty = clip_events("valve", fault="chatter", seed=2, duration=10.0, params=params)
    assert len(faulty) > len(normal)
    gaps = np.diff([t for t, _ in faulty])
    assert (gaps < 0.05).sum() > (np.diff([t for t, _ in normal]) < 0.05).sum()


# ---------------------------------------------------------------- data sets


def test_simulate_dataset_writes_the_mimii_layout(tmp_path):
    root = simulate_dataset("valve", 3, 4, tmp_path / "a", seed=1, machine_id="id_02",
                            duration=1.0, channels=2, progress=False)
    assert root == tmp_path / "a" / "valve" / "id_02"
    normal = sorted(p.name for p in (root / "normal").glob("*.wav"))
    abnormal = sorted(p.name for p in (root / "abnormal").glob("*.wav"))
    assert normal == [f"{i:08d}.wav" for i in range(3)]
    assert abnormal == [f"{i:08d}.wav" for i in range(4)]
    info = sf.info(root / "abnormal" / "00000000.wav")
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 2, 16000,
                                                                          "PCM_16")
    with (root / "faults.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 7
    assert {r["fault"] for r in rows if r["label"] == "normal"} == {"normal"}
    assert [r["fault"] for r in rows if r["label"] == "abnormal"] == list(
        FAULTS["valve"] + FAULTS["valve"][:1])
    assert all((root / r["file"]).is_file() for r in rows)
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes left nothing behind


def test_simulate_dataset_is_deterministic_and_normal_clips_differ(tmp_path):
    def digests(folder):
        return {p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    a = simulate_dataset("fan", 2, 2, tmp_path / "a", duration=0.5, progress=False)
    b = simulate_dataset("fan", 2, 2, tmp_path / "b", duration=0.5, progress=False)
    c = simulate_dataset("fan", 2, 2, tmp_path / "c", duration=0.5, seed=1, progress=False)
    assert digests(a) == digests(b)
    assert digests(a) != digests(c)
    first, second = (sf.read(a / "normal" / f"0000000{i}.wav")[0] for i in range(2))
    assert not np.array_equal(first, second)


def test_simulated_dataset_is_read_like_real_mimii(tmp_path):
    datasets = pytest.importorskip("stethoscope.datasets",
                                   reason="stethoscope.datasets is written by another module")
    root = simulate_dataset("pump", 2, 3, tmp_path, machine_id="id_04", duration=0.5,
                            progress=False)
    clips = datasets.find_clips(root)
    assert len(clips) == 5
    assert sorted(c.label for c in clips) == [0, 0, 1, 1, 1]
    assert {(c.machine, c.machine_id) for c in clips} == {("pump", "id_04")}
