"""Pitch post-processing and the get_f0 orchestration."""

import sys
import types

import numpy as np
import pytest
import scipy.signal
import scipy.stats
import torch
import torchcrepe

from pipeline.pitch_methods import harvest_f0, pm_f0
from pipeline.pitch import (
    HOP_LENGTH,
    PITCH_METHODS,
    PitchModels,
    PitchRequest,
    coarse_pitch,
    crepe_piece_batch,
    crepe_pieces,
    crepe_track,
    estimate_pitch,
    finish_pitch,
    median_filter_f0,
    shift_f0,
)

SR = 16000


def voiced_signal(seconds: float, seed: int = 0) -> np.ndarray:
    """A 150 -> 250 Hz harmonic glide between quiet edges, float64 like the reference's audio_pad."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(150 * (5 / 3) ** (t / seconds)) / SR
    tone = 0.3 * np.sin(phase) + 0.1 * np.sin(2 * phase)
    return tone * ((t > 0.2) & (t < seconds - 0.2)) + 1e-3 * rng.standard_normal(t.size)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_coarse_pitch_reference_values(dtype):
    f0 = np.array([0, 50, 100, 200, 440, 1100, 2000, 30], dtype=dtype)
    coarse = coarse_pitch(f0)
    assert coarse.dtype == np.int64
    np.testing.assert_array_equal(coarse, [1, 1, 20, 54, 122, 255, 255, 1])


def test_coarse_pitch_is_monotonic_and_spans_1_to_255():
    coarse = coarse_pitch(np.geomspace(50, 1100, 5000).astype(np.float32))
    assert coarse[0] == 1 and coarse[-1] == 255
    assert np.all(np.diff(coarse) >= 0)
    assert set(np.unique(coarse)) == set(range(1, 256))


def test_shift_f0_keeps_dtype_and_unvoiced():
    f0 = np.array([0.0, 110.0, 220.0], dtype=np.float32)
    up = shift_f0(f0, 12)
    assert up.dtype == np.float32
    np.testing.assert_allclose(up, [0, 220, 440])
    np.testing.assert_allclose(shift_f0(f0, -7), f0 * 2 ** (-7 / 12))
    assert shift_f0(f0, 0) is not f0  # the caller's array is never changed in place


@pytest.mark.parametrize("radius", range(8))
def test_median_filter_radius(radius):
    rng = np.random.default_rng(radius)
    f0 = rng.uniform(100, 300, 80).astype(np.float32)
    if radius <= 2:
        np.testing.assert_array_equal(median_filter_f0(f0, radius), f0)
        return
    kernel = 2 * radius - 3
    filtered = median_filter_f0(f0, radius)
    assert filtered.dtype == f0.dtype
    np.testing.assert_array_equal(filtered, scipy.signal.medfilt(f0, kernel))

    # a spike (or gap) of width < r - 1 frames is removed, one of width r - 1 survives
    flat = np.full(60, 200.0)
    for width, survives in [(radius - 2, False), (radius - 1, True)]:
        for value in (400.0, 0.0):
            spiky = flat.copy()
            spiky[30 : 30 + width] = value
            out = median_filter_f0(spiky, radius)
            assert (out[30] == value) == survives, (width, value)
            np.testing.assert_array_equal(out[10:25], flat[10:25])


def test_radius_3_is_the_reference_harvest_filter():
    f0 = np.random.default_rng(0).uniform(0, 300, 100)
    np.testing.assert_array_equal(median_filter_f0(f0, 3), scipy.signal.medfilt(f0, 3))


def reference_get_f0_crepe(audio_pad, p_len, f0_up_key, capacity, draws):
    """The reference get_f0 (crepe branch) and its p_len cut, written from its source; torchcrepe
    draws the dither from the global RNG, recorded into `draws`."""
    audio = torch.tensor(np.copy(audio_pad))[None].float()
    f0, pd = torchcrepe.predict(
        audio, SR, HOP_LENGTH, 50, 1100, capacity, batch_size=512, device="cpu", return_periodicity=True
    )
    pd = torchcrepe.filter.median(pd, 3)
    f0 = torchcrepe.filter.mean(f0, 3)
    f0[pd < 0.1] = 0
    f0 = f0[0].cpu().numpy()
    f0 *= pow(2, f0_up_key / 12)
    f0bak = f0.copy()
    mel_min, mel_max = 1127 * np.log(1 + 50 / 700), 1127 * np.log(1 + 1100 / 700)
    f0_mel = 1127 * np.log(1 + f0 / 700)
    f0_mel[f0_mel > 0] = (f0_mel[f0_mel > 0] - mel_min) * 254 / (mel_max - mel_min) + 1
    f0_mel[f0_mel <= 1] = 1
    f0_mel[f0_mel > 255] = 255
    return np.rint(f0_mel).astype(np.int32)[:p_len], f0bak[:p_len].astype(np.float32)


@pytest.mark.parametrize("filter_radius", [0, 2])
def test_crepe_tiny_matches_reference_get_f0(recorded_dither, filter_radius):
    audio_pad = voiced_signal(1.2)
    p_len = audio_pad.shape[0] // HOP_LENGTH
    ref_coarse, ref_pitchf = reference_get_f0_crepe(audio_pad, p_len, 4, "tiny", recorded_dither)

    coarse, pitchf = estimate_pitch(
        audio_pad, p_len, "crepe-tiny", PitchModels(), f0_up_key=4, filter_radius=filter_radius,
        dither=np.concatenate(recorded_dither),
    )  # fmt: skip
    assert coarse.shape == pitchf.shape == (p_len,)
    assert coarse.dtype == np.int64 and pitchf.dtype == np.float32
    np.testing.assert_array_equal(coarse, ref_coarse)
    np.testing.assert_allclose(pitchf, ref_pitchf, rtol=1e-6, atol=0)
    voiced = pitchf > 0
    assert 40 < voiced.sum() < p_len - 20
    assert np.all(pitchf[voiced] > 150 * 2 ** (4 / 12) * 0.9)


def test_filter_radius_smooths_crepe_output():
    models, audio_pad = PitchModels(), voiced_signal(1.0)
    p_len = audio_pad.shape[0] // HOP_LENGTH
    plain = estimate_pitch(audio_pad, p_len, "crepe-tiny", models, filter_radius=0, dither=np.random.default_rng(0))
    smooth = estimate_pitch(audio_pad, p_len, "crepe-tiny", models, filter_radius=5, dither=np.random.default_rng(0))
    # the filter runs on the full track (p_len + 1 frames) before the cut
    full = estimate_pitch(audio_pad, p_len + 1, "crepe-tiny", models, filter_radius=0, dither=np.random.default_rng(0))
    np.testing.assert_array_equal(plain[1], full[1][:p_len])
    np.testing.assert_array_equal(smooth[1], scipy.signal.medfilt(full[1], 7)[:p_len])
    np.testing.assert_array_equal(smooth[0], coarse_pitch(smooth[1]))


def test_crepe_without_dither_argument_is_random():
    models, audio_pad = PitchModels(), voiced_signal(0.8)
    p_len = audio_pad.shape[0] // HOP_LENGTH
    first = estimate_pitch(audio_pad, p_len, "crepe-tiny", models)[1]
    second = estimate_pitch(audio_pad, p_len, "crepe-tiny", models)[1]
    voiced = (first > 0) & (second > 0)
    assert voiced.any() and not np.array_equal(first[voiced], second[voiced])


@pytest.fixture
def fake_rmvpe(monkeypatch):
    """Stands in for pipeline.rmvpe: a fixed f0 track with a one-frame spike, and a call log."""
    calls = []
    module = types.ModuleType("pipeline.rmvpe")

    def load_rmvpe(path, device):
        calls.append(("load", path, device))
        return torch.nn.Identity()

    def rmvpe_f0_batch(model, audios, threshold=0.03):
        tracks = []
        for audio16k in audios:
            calls.append(("f0", audio16k.shape, threshold))
            f0 = np.full(1 + audio16k.shape[0] // HOP_LENGTH, 200.0)  # float64, as the real one
            f0[5], f0[:3] = 800.0, 0.0
            tracks.append(f0)
        return tracks

    module.load_rmvpe, module.rmvpe_f0_batch = load_rmvpe, rmvpe_f0_batch
    monkeypatch.setitem(sys.modules, "pipeline.rmvpe", module)
    return calls


def test_rmvpe_path_through_helpers(fake_rmvpe):
    models = PitchModels(device="cpu", rmvpe_path="/weights/rmvpe.pt")
    audio_pad = np.zeros(16000)
    coarse, pitchf = estimate_pitch(audio_pad, 100, "rmvpe", models, f0_up_key=12, filter_radius=3)
    estimate_pitch(audio_pad, 100, "rmvpe", models, filter_radius=0)

    assert fake_rmvpe == [("load", "/weights/rmvpe.pt", "cpu"), ("f0", (16000,), 0.03), ("f0", (16000,), 0.03)]
    assert pitchf.shape == coarse.shape == (100,) and pitchf.dtype == np.float32
    np.testing.assert_array_equal(pitchf[:3], 0)
    np.testing.assert_array_equal(pitchf[3:], 400)  # spike filtered, then +12 semitones
    np.testing.assert_array_equal(coarse, coarse_pitch(pitchf))


def test_rmvpe_without_path_is_a_clear_error(fake_rmvpe):
    with pytest.raises(ValueError, match="rmvpe.pt"):
        estimate_pitch(np.zeros(1600), 10, "rmvpe", PitchModels())


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(ValueError) as error:
        estimate_pitch(np.zeros(1600), 10, "yin", PitchModels())
    assert all(method in str(error.value) for method in PITCH_METHODS)


def test_models_are_loaded_once():
    models = PitchModels()
    assert models.get("crepe-tiny") is models.get("crepe-tiny")


def test_crepe_pieces_computed_apart_join_into_the_whole_track():
    """512-frame-aligned pieces with their real neighbouring samples (as the service fans a long
    input out over pitch replicas) give exactly the whole input's pitch."""
    models = PitchModels()
    audio_pad = voiced_signal(12.3, seed=4)  # 1231 frames: pieces of 512, 512, 207
    dither = np.random.default_rng(5).uniform(-20, 20, 1 + audio_pad.size // HOP_LENGTH)
    pieces = crepe_pieces(audio_pad, dither, piece_frames=512)
    assert [(p.start, p.end) for p in pieces] == [(0, 512), (512, 1024), (1024, 1231)]
    assert pieces[0].pad == (512, 0) and pieces[1].pad == (0, 0) and pieces[2].pad[0] == 0
    raw = [crepe_piece_batch([p], "crepe-tiny", models)[0] for p in reversed(pieces)][::-1]  # each apart
    joined = crepe_track(np.concatenate([f for f, _ in raw]), np.concatenate([d for _, d in raw]))
    request = PitchRequest(audio_pad, audio_pad.size // HOP_LENGTH, f0_up_key=2, filter_radius=5, dither=dither)
    coarse, pitchf = finish_pitch(joined, request)
    whole = estimate_pitch(audio_pad, request.p_len, "crepe-tiny", models, f0_up_key=2, filter_radius=5, dither=dither)
    np.testing.assert_array_equal(coarse, whole[0])
    np.testing.assert_array_equal(pitchf, whole[1])
    assert (pitchf > 0).mean() > 0.5  # voiced: the comparison covers real pitch values


def test_crepe_pieces_must_follow_the_viterbi_period():
    with pytest.raises(ValueError, match="multiple of 512"):
        crepe_pieces(np.zeros(16000 * 12), np.zeros(1201), piece_frames=500)


def reference_get_f0_host(method: str, audio_pad: np.ndarray, p_len: int, f0_up_key: int, filter_radius: int):
    """The reference get_f0's pm and harvest branches and its tail, on the libraries themselves."""
    import parselmouth
    import pyworld

    if method == "pm":
        f0 = parselmouth.Sound(audio_pad, SR).to_pitch_ac(
            time_step=160 / SR * 1000 / 1000, voicing_threshold=0.6, pitch_floor=50, pitch_ceiling=1100,
        ).selected_array["frequency"]
        pad_size = (p_len - len(f0) + 1) // 2
        if pad_size > 0 or p_len - len(f0) - pad_size > 0:
            f0 = np.pad(f0, [[pad_size, p_len - len(f0) - pad_size]], mode="constant")
    else:
        x = audio_pad.astype(np.double)
        f0, t = pyworld.harvest(x, fs=SR, f0_ceil=1100, f0_floor=50, frame_period=10)
        f0 = pyworld.stonemask(x, f0, t, SR)
        if filter_radius > 2:
            f0 = scipy.signal.medfilt(f0, 3)
    f0 = f0 * pow(2, f0_up_key / 12)
    f0bak = f0.copy()
    f0_mel = 1127 * np.log(1 + f0 / 700)
    mel_min, mel_max = 1127 * np.log(1 + 50 / 700), 1127 * np.log(1 + 1100 / 700)
    f0_mel[f0_mel > 0] = (f0_mel[f0_mel > 0] - mel_min) * 254 / (mel_max - mel_min) + 1
    f0_mel[f0_mel <= 1] = 1
    f0_mel[f0_mel > 255] = 255
    return np.rint(f0_mel).astype(np.int32)[:p_len], f0bak[:p_len].astype(np.float32)


@pytest.mark.parametrize("method,filter_radius", [("pm", 2), ("harvest", 3), ("harvest", 0)])
@pytest.mark.parametrize("f0_up_key", [0, -5])
def test_host_methods_match_reference_get_f0(method, filter_radius, f0_up_key):
    audio_pad = voiced_signal(1.5)
    p_len = audio_pad.shape[0] // HOP_LENGTH
    coarse, pitchf = estimate_pitch(audio_pad, p_len, method, PitchModels(), f0_up_key=f0_up_key,
                                    filter_radius=filter_radius)
    ref_coarse, ref_pitchf = reference_get_f0_host(method, audio_pad, p_len, f0_up_key, filter_radius)
    assert (pitchf > 0).mean() > 0.5  # the glide is found voiced
    np.testing.assert_array_equal(coarse, ref_coarse)
    np.testing.assert_array_equal(pitchf, ref_pitchf)


@pytest.mark.parametrize("method", ["pm", "harvest"])
def test_host_methods_follow_the_glide(method):
    seconds = 2.0
    audio_pad = voiced_signal(seconds)
    f0 = estimate_pitch(audio_pad, audio_pad.shape[0] // HOP_LENGTH, method, PitchModels(), filter_radius=0)[1]
    t = np.arange(f0.shape[0]) * HOP_LENGTH / SR
    inner = (t > 0.3) & (t < seconds - 0.3)
    expected = 150 * (5 / 3) ** (t / seconds)
    assert (f0[inner] > 0).mean() > 0.95
    voiced = inner & (f0 > 0)
    assert np.median(np.abs(f0[voiced] / expected[voiced] - 1)) < 0.02


def test_pm_track_is_padded_to_p_len_larger_half_left():
    audio_pad = voiced_signal(1.0)
    natural = pm_f0(audio_pad, 0)
    padded = pm_f0(audio_pad, natural.shape[0] + 3)
    np.testing.assert_array_equal(padded[2:-1], natural)
    assert padded[:2].tolist() == [0, 0] and padded[-1] == 0
    assert pm_f0(audio_pad, natural.shape[0] - 2).shape == natural.shape  # longer: cut later, by p_len


def test_harvest_track_has_one_frame_per_hop_plus_one():
    audio_pad = voiced_signal(1.0)
    assert harvest_f0(audio_pad).shape == (audio_pad.shape[0] // HOP_LENGTH + 1,)
    assert harvest_f0(audio_pad).dtype == np.float64


def test_host_methods_have_no_network_to_load():
    with pytest.raises(ValueError, match="no network"):
        PitchModels().get("harvest")
