"""RMVPE: checkpoint layout and loading, log-mel conventions, the decode, random fixture weights."""
from __future__ import annotations

import warnings

import librosa
import numpy as np
import pytest
import torch
from scipy import signal

from pipeline.assets import AssetError
from pipeline.rmvpe import (
    CENTS_BIN0,
    N_BINS,
    Rmvpe,
    RmvpeNet,
    decode_f0,
    load_rmvpe,
    log_mel,
    random_rmvpe_state_dict,
    rmvpe_f0,
    rmvpe_f0_batch,
    save_rmvpe,
)

# Spot checks of the reference `E2E(4, 1, (2, 2))` layout (names and shapes of `rmvpe.pt`).
REFERENCE_KEYS = {
    "unet.encoder.bn.running_var": (1,),
    "unet.encoder.layers.0.conv.0.conv.0.weight": (16, 1, 3, 3),
    "unet.encoder.layers.0.conv.0.conv.4.num_batches_tracked": (),
    "unet.encoder.layers.0.conv.0.shortcut.weight": (16, 1, 1, 1),
    "unet.encoder.layers.4.conv.3.conv.3.weight": (256, 256, 3, 3),
    "unet.intermediate.layers.0.conv.0.shortcut.bias": (512,),
    "unet.intermediate.layers.3.conv.3.conv.4.running_mean": (512,),
    "unet.decoder.layers.0.conv1.0.weight": (512, 256, 3, 3),
    "unet.decoder.layers.4.conv1.1.weight": (16,),
    "unet.decoder.layers.4.conv2.0.shortcut.weight": (16, 32, 1, 1),
    "unet.decoder.layers.4.conv2.3.conv.3.weight": (16, 16, 3, 3),
    "cnn.weight": (3, 16, 3, 3),
    "cnn.bias": (3,),
    "fc.0.gru.weight_ih_l0": (768, 384),
    "fc.0.gru.bias_hh_l0_reverse": (768,),
    "fc.1.weight": (360, 512),
    "fc.1.bias": (360,),
}
N_TENSORS, N_VALUES = 741, 90_472_917  # counted on the reference module


def speechlike(n: int, seed: int = 0) -> np.ndarray:
    """Gliding 5-harmonic tone, sounding 60 % of the time, over faint noise; float64."""
    t = np.arange(n) / 16000
    f0 = 150 + 60 * np.sin(2 * np.pi * 0.8 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    tone = sum(np.sin(k * phase) / k for k in range(1, 6))
    gate = np.sin(2 * np.pi * 1.5 * t) > -0.3
    return 0.3 * tone * gate + 3e-3 * np.random.default_rng(seed).standard_normal(n)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_rmvpe_state_dict(0)


@pytest.fixture(scope="module")
def weights_path(state, tmp_path_factory):
    path = tmp_path_factory.mktemp("rmvpe") / "rmvpe.pt"
    save_rmvpe(state, path)
    return path


@pytest.fixture(scope="module")
def model(weights_path) -> Rmvpe:
    return load_rmvpe(weights_path)


# --- layout and loading ---------------------------------------------------------------------------


def test_state_dict_has_the_reference_layout(state):
    assert len(state) == N_TENSORS
    assert sum(t.numel() for t in state.values()) == N_VALUES
    for key, shape in REFERENCE_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    # a 1×1 skip conv exists only where a block changes width
    assert "unet.encoder.layers.0.conv.1.shortcut.weight" not in state
    assert "unet.decoder.layers.0.conv2.1.shortcut.weight" not in state
    with torch.device("meta"):
        assert list(state) == list(RmvpeNet().state_dict())


def test_random_state_dict_is_fp16_and_deterministic(state):
    """The same weights again, with another torch thread count: the calibration's sums split
    differently then, as they do in another CPU's kernels (in float32 that moved 138 of the
    tensors' last fp16 bits, and the goldens' f0 on another CPU)."""
    rng_before = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads == 1 else 1)
    try:
        again = random_rmvpe_state_dict(0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # no global RNG used
    assert list(again) == list(state)
    for key, tensor in state.items():
        expected = torch.int64 if key.endswith("num_batches_tracked") else torch.float16
        assert tensor.dtype == expected, key
        assert torch.equal(again[key], tensor), key


def test_fp16_file_loads_strict_into_float32_model(state, model):
    assert model.device == torch.device("cpu")
    assert not model.net.training
    loaded = model.net.state_dict()
    assert list(loaded) == list(state)
    for key, tensor in state.items():
        if tensor.is_floating_point():
            assert loaded[key].dtype == torch.float32, key
            assert torch.equal(loaded[key], tensor.float()), key


def test_missing_file(tmp_path):
    with pytest.raises(AssetError, match="not found"):
        load_rmvpe(tmp_path / "absent.pt")


def test_truncated_file(weights_path, tmp_path):
    path = tmp_path / "cut.pt"
    with open(weights_path, "rb") as f:
        path.write_bytes(f.read(1 << 20))
    with pytest.raises(AssetError):
        load_rmvpe(path)


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "text.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(AssetError):
        load_rmvpe(path)


@pytest.mark.parametrize("content", [[torch.zeros(3)], {"weight": [1.0, 2.0]}])
def test_not_a_state_dict(tmp_path, content):
    path = tmp_path / "odd.pt"
    torch.save(content, path)
    with pytest.raises(AssetError, match="state dict"):
        load_rmvpe(path)


@pytest.mark.parametrize("change", ["drop", "extra", "shape"])
def test_wrong_keys_or_shapes(state, tmp_path, change):
    bad = dict(state)
    if change == "drop":
        del bad["fc.1.bias"]
    elif change == "extra":
        bad["fc.2.weight"] = torch.zeros(1)
    else:
        bad["cnn.bias"] = torch.zeros(4, dtype=torch.float16)
    path = tmp_path / "bad.pt"
    save_rmvpe(bad, path)
    with pytest.raises(AssetError, match="not RMVPE weights"):
        load_rmvpe(path)


# --- log-mel --------------------------------------------------------------------------------------


def test_log_mel_matches_numpy_stft(model):
    audio = speechlike(8000).astype(np.float32)
    ours = log_mel(torch.from_numpy(audio), model.mel_basis, model.window).numpy()
    # centred frames (reflect padding), periodic Hann, magnitude, HTK-spaced mel 30-8000 Hz
    padded = np.pad(audio.astype(np.float64), 512, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, 1024)[::160]
    spec = np.abs(np.fft.rfft(frames * signal.get_window("hann", 1024), axis=1)).T
    basis = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=128, fmin=30, fmax=8000, htk=True)
    expected = np.log(np.maximum(basis @ spec, 1e-5))
    assert ours.shape == (128, 8000 // 160 + 1)
    np.testing.assert_allclose(ours, expected, atol=1e-3)


def test_log_mel_floor_is_log_1e5(model):
    mel = log_mel(torch.zeros(1600), model.mel_basis, model.window)
    assert torch.allclose(mel, torch.full_like(mel, np.log(1e-5)))


# --- decode ---------------------------------------------------------------------------------------


def cents(b: int) -> float:
    return 20 * b + CENTS_BIN0


def hz(c: float) -> float:
    return 10 * 2 ** (c / 1200)


def decode_by_loop(salience: np.ndarray, threshold: float) -> np.ndarray:
    """The decode written out per frame in float64, as the spec states it."""
    out = []
    for row in salience.astype(np.float64):
        peak = int(np.argmax(row))
        if row.max() <= np.float32(threshold):
            out.append(0.0)
            continue
        window = [b for b in range(peak - 4, peak + 5) if 0 <= b < N_BINS]
        weights = row[window]
        out.append(hz(float(np.dot(weights, [cents(b) for b in window]) / weights.sum())))
    return np.array(out)


def test_single_peak_gives_its_bin_frequency():
    sal = np.zeros((3, N_BINS), np.float32)
    for frame, b in enumerate([0, 100, 359]):
        sal[frame, b] = 0.9
    f0 = decode_f0(sal)
    assert f0.dtype == np.float64
    np.testing.assert_allclose(f0, [hz(cents(0)), hz(cents(100)), hz(cents(359))], rtol=1e-12)
    np.testing.assert_allclose(f0[0], 31.70, atol=0.01)  # lowest bin
    np.testing.assert_allclose(f0[1], 100.6, atol=0.1)


def test_weighted_average_over_nine_bins_around_the_peak():
    sal = np.zeros((4, N_BINS), np.float32)
    sal[0, [99, 100, 101]] = [0.25, 0.5, 0.25]  # symmetric: the peak's own cents
    sal[1, [100, 101]] = [0.5, 0.25]  # pulled a third of a bin up
    sal[2, [100, 104, 105]] = [0.5, 0.25, 0.4]  # bin 105 is outside the window: ignored
    sal[3, [0, 1]] = [0.75, 0.375]  # bottom edge: the 4 missing bins weigh nothing
    f0 = decode_f0(sal)
    np.testing.assert_allclose(f0[0], hz(cents(100)), rtol=1e-9)
    np.testing.assert_allclose(f0[1], hz(cents(100) + 20 / 3), rtol=1e-9)
    np.testing.assert_allclose(f0[2], hz((0.5 * cents(100) + 0.25 * cents(104)) / 0.75), rtol=1e-9)
    np.testing.assert_allclose(f0[3], hz((0.75 * cents(0) + 0.375 * cents(1)) / 1.125), rtol=1e-9)


def test_first_of_equal_peaks_wins():
    sal = np.zeros((1, N_BINS), np.float32)
    sal[0, [50, 200]] = 0.7
    np.testing.assert_allclose(decode_f0(sal), [hz(cents(50))], rtol=1e-12)


def test_threshold_is_exclusive_and_silence_is_zero():
    sal = np.zeros((4, N_BINS), np.float32)
    sal[0, 120] = 0.03  # exactly at the threshold: unvoiced
    sal[1, 120] = 0.0301
    sal[2, 120] = 0.2  # all-zero row 3: unvoiced, no NaN, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f0 = decode_f0(sal)
    assert f0[0] == 0 and f0[3] == 0
    assert f0[1] == pytest.approx(hz(cents(120))) and f0[2] == pytest.approx(hz(cents(120)))
    assert decode_f0(sal, threshold=0.25)[2] == 0


def test_decode_matches_per_frame_loop_on_random_salience():
    rng = np.random.default_rng(3)
    sal = (0.02 * rng.random((300, N_BINS)) ** 4).astype(np.float32)  # below the threshold
    peaks = rng.integers(0, N_BINS, 300)
    heights = rng.uniform(0.005, 0.3, 300)
    peaks[:20] = np.r_[np.arange(10), N_BINS - 1 - np.arange(10)]  # at both edges
    heights[:20] = 0.5
    sal[np.arange(300), peaks] = heights
    np.testing.assert_allclose(decode_f0(sal), decode_by_loop(sal, 0.03), rtol=1e-6)
    assert 0 < (decode_f0(sal) == 0).sum() < 300


# --- end to end with the random weights -----------------------------------------------------------


@pytest.mark.parametrize("n_samples", [3200, 3359, 16000])
def test_f0_has_one_value_per_hop_plus_one(model, n_samples):
    f0 = rmvpe_f0(model, speechlike(n_samples))
    assert f0.shape == (n_samples // 160 + 1,)
    assert f0.dtype == np.float64
    voiced = f0[f0 > 0]
    assert np.all((voiced > 31.7) & (voiced < 2006))


def test_batch_gives_each_input_its_own_track(model):
    # frames 20 and 21 (both padded to 32), 101 (to 128), 20
    audios = [speechlike(3100, seed=1), speechlike(16000, seed=2), speechlike(3359, seed=3), speechlike(3100, seed=4)]
    mels = [log_mel(torch.from_numpy(a.astype(np.float32)), model.mel_basis, model.window) for a in audios]
    alone = [model.salience(mel) for mel in mels]
    together = model.salience_batch(mels)  # padded to 128, the shorter ones masked
    assert [t.shape for t in together] == [(20, N_BINS), (101, N_BINS), (21, N_BINS), (20, N_BINS)]
    for got, expected in zip(together, alone):
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
    tracks = rmvpe_f0_batch(model, audios)
    for audio, track in zip(audios, tracks):
        np.testing.assert_allclose(track, rmvpe_f0(model, audio), rtol=1e-6)
    assert not np.allclose(tracks[0], tracks[3])  # each its own input


def test_unmasked_padding_would_change_the_shorter_inputs(model):
    """Why the mask: the same batch with the padding left in changes the values near the end."""
    short, long = (log_mel(torch.from_numpy(speechlike(n, seed=5).astype(np.float32)), model.mel_basis, model.window)
                   for n in (3100, 16000))
    batch = torch.stack([torch.nn.functional.pad(short, (0, 128 - short.shape[-1])),
                         torch.nn.functional.pad(long, (0, 128 - long.shape[-1]))])
    with torch.inference_mode():
        unmasked = model.net(batch)[0, :20].numpy()
        masked = model.net(batch, [32, 128])[0, :20].numpy()
    np.testing.assert_allclose(masked, model.salience(short), rtol=0, atol=2e-6)
    assert np.abs(unmasked - masked).max() > 1e-3


def test_a_long_input_runs_in_segments_with_the_values_of_one_pass(model, monkeypatch):
    """Segments of 1,024 frames (the real ones are 8,192) with 1,600 frames of context each side
    give the whole pass's values; with too little context they would not."""
    import pipeline.rmvpe as rmvpe

    mel = torch.randn(1, 128, 4800, generator=torch.Generator().manual_seed(0)) - 4  # 48 s
    with torch.inference_mode():
        whole, whole_salience = model.net._local_features(mel, None), model.net(mel)
        monkeypatch.setattr(rmvpe, "SEGMENT_FRAMES", 1024)  # 4,800 > 1,024 + 2 × 1,600: segments
        segmented, segmented_salience = model.net._local_features(mel, None), model.net(mel)
        monkeypatch.setattr(rmvpe, "HALO_FRAMES", 128)
        short_context = model.net._local_features(mel, None)
    torch.testing.assert_close(segmented, whole, rtol=0, atol=2e-5)  # values up to ~6
    torch.testing.assert_close(segmented_salience, whole_salience, rtol=0, atol=2e-6)
    assert (short_context - whole).abs().max() > 1e-3


def test_the_network_runs_in_float32_under_a_callers_reduced_precision(model):
    """rmvpe's voicing threshold flips frames on small errors: a caller's autocast (fp16 on
    GPUs, here the CPU's bfloat16, which would move the saliences by ~1e-2) does not reach it."""
    audio = speechlike(16000, seed=3)
    mel = log_mel(torch.from_numpy(audio.astype(np.float32)), model.mel_basis, model.window)
    plain, plain_f0 = model.salience(mel), rmvpe_f0(model, audio)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        np.testing.assert_array_equal(model.salience(mel), plain)
        np.testing.assert_array_equal(rmvpe_f0(model, audio), plain_f0)
        with torch.inference_mode():  # the bare network follows the autocast
            reduced = model.net(torch.nn.functional.pad(mel, (0, 128 - mel.shape[-1]))[None]).float()[0].numpy()
    assert np.abs(reduced[:mel.shape[-1]] - plain).max() > 1e-3


def test_random_model_gives_a_usable_pitch_track(model):
    audio = speechlike(24000, seed=1)
    mel = log_mel(torch.from_numpy(audio.astype(np.float32)), model.mel_basis, model.window)
    sal = model.salience(mel)
    assert sal.shape == (151, N_BINS) and sal.dtype == np.float32
    peak = sal.max(axis=1)
    assert 0.3 < np.mean(peak > 0.03) < 0.95
    assert np.mean(np.abs(peak - 0.03) < 1e-3) < 0.05  # few frames a rounding away from flipping
    assert len(np.unique(sal.argmax(axis=1))) > 10  # the pitch moves
    np.testing.assert_array_equal(rmvpe_f0(model, audio), decode_f0(sal))
