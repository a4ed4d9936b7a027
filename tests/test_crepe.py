"""Our CREPE against torchcrepe 0.0.22 (imported here only), its filters and librosa's viterbi."""

import librosa
import numpy as np
import pytest
import torch
import torchcrepe

from pipeline.crepe import (
    CENTS_OFFSET,
    _network_outputs,
    _packed_groups,
    HOP_LENGTH,
    PITCH_BINS,
    Crepe,
    crepe_f0,
    crepe_f0_batch,
    load_crepe,
    mean_filter,
    median_filter,
    rvc_crepe_postprocess,
    viterbi,
)

SR = 16000


def voiced_signal(seconds: float, seed: int = 0, voiced_until: float | None = None) -> np.ndarray:
    """Harmonic tone gliding 120 -> 300 Hz from 0.3 s to `voiced_until` (default 0.3 s before the
    end), a stretch of digital silence and a low noise floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(120 * 2.5 ** (t / seconds)) / SR
    tone = sum(0.3 / k * np.sin(k * phase) for k in range(1, 5))
    end = seconds - 0.3 if voiced_until is None else voiced_until
    x = tone * ((t > 0.3) & (t < end)) + 1e-3 * rng.standard_normal(t.size)
    x[int(0.1 * SR) : int(0.2 * SR)] = 0
    return x.astype(np.float32)


def torchcrepe_f0(audio: np.ndarray, capacity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What RVC's get_f0 asks torchcrepe for (the capacity aside)."""
    f0, pd = torchcrepe.predict(
        torch.from_numpy(audio)[None], SR, HOP_LENGTH, 50.0, 1100.0, capacity,
        batch_size=512, device="cpu", return_periodicity=True,
    )  # fmt: skip
    return f0[0], pd[0]


def to_bins(f0: torch.Tensor, dither: np.ndarray) -> np.ndarray:
    cents = 1200 * np.log2(f0.double().numpy() / 10) - dither
    return np.rint((cents - CENTS_OFFSET) / 20).astype(np.int64)


@pytest.mark.parametrize("capacity", ["tiny", "full"])
def test_weights_load_strict_with_torchcrepe_key_names(capacity):
    model = load_crepe(capacity, "cpu")
    assert list(model.state_dict()) == list(torchcrepe.Crepe(capacity).state_dict())
    assert not model.training


@pytest.mark.parametrize("capacity", ["tiny", "full"])
def test_the_cpu_network_equals_torchcrepes_up_to_summation_order(capacity, monkeypatch):
    """On CPUs the convolutions run in a time-major layout (matrix products; mkldnn channels-last
    for tiny's narrow layers); the activations must be torchcrepe's (same weights, NCHW
    convolutions) but for float rounding. A CPU without mkldnn runs the GPU's layout."""
    ours = load_crepe(capacity, "cpu")
    theirs = torchcrepe.Crepe(capacity).eval()
    theirs.load_state_dict(ours.state_dict())
    frames = torch.from_numpy(np.random.default_rng(5).standard_normal((37, 1024)).astype(np.float32))
    frames = (frames - frames.mean(1, keepdim=True)) / frames.std(1, keepdim=True)
    with torch.inference_mode():
        expected, got = theirs(frames), ours(frames)
    assert got.shape == expected.shape == (37, PITCH_BINS)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", None)  # the GPU's layout never calls it
    with torch.inference_mode():
        torch.testing.assert_close(ours(frames), expected, rtol=0, atol=1e-5)


def test_packed_groups_fill_each_group_across_inputs():
    assert _packed_groups([5, 3, 9], 4) == [[(0, 0, 4)], [(0, 4, 5), (1, 0, 3)], [(2, 0, 4)], [(2, 4, 8)], [(2, 8, 9)]]
    assert _packed_groups([4, 4], 4) == [[(0, 0, 4)], [(1, 0, 4)]]
    assert _packed_groups([2, 1], 8) == [[(0, 0, 2), (1, 0, 1)]]


def test_packing_frames_of_several_inputs_changes_no_output():
    """The GPU packs all inputs' frames into full network calls; each frame's output is the one
    it gets in its own input's batches (up to the matrix products' summation order)."""
    model = load_crepe("tiny", "cpu")
    rng = np.random.default_rng(2)
    windows = [torch.from_numpy(rng.standard_normal((n, 1024)).astype(np.float32)) for n in (37, 5, 60)]
    with torch.inference_mode():
        alone = _network_outputs(model, windows, 16, pack=False)
        packed = _network_outputs(model, windows, 16, pack=True)
    assert [p.shape for p in packed] == [(37, PITCH_BINS), (5, PITCH_BINS), (60, PITCH_BINS)]
    for got, expected in zip(packed, alone):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_unknown_capacity():
    with pytest.raises(ValueError, match="tiny"):
        Crepe("medium")


def check_against_torchcrepe(audio: np.ndarray, capacity: str, draws: list) -> np.ndarray:
    """Asserts equality and returns the path."""
    f0_ref, pd_ref = torchcrepe_f0(audio, capacity)
    dither = np.concatenate(draws)
    f0, pd = crepe_f0(load_crepe(capacity, "cpu"), torch.from_numpy(audio), dither=dither)

    assert f0.shape == pd.shape == f0_ref.shape == (1 + audio.size // HOP_LENGTH,)
    path = to_bins(f0, dither)
    np.testing.assert_array_equal(path, to_bins(f0_ref, dither))
    torch.testing.assert_close(f0, f0_ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(pd, pd_ref, rtol=0, atol=1e-5)
    return path


def test_tiny_matches_torchcrepe_across_batch_boundary(recorded_dither):
    # 601 frames: a 512-frame batch and an 89-frame one, noise only around the boundary, so the
    # restart of the viterbi path there changes the result
    audio = voiced_signal(6.0, voiced_until=4.9)
    path = check_against_torchcrepe(audio, "tiny", recorded_dither)
    assert [draw.size for draw in recorded_dither] == [512, 89]

    dither = np.concatenate(recorded_dither)
    unbatched, _ = crepe_f0(load_crepe("tiny", "cpu"), torch.from_numpy(audio), batch_size=601, dither=dither)
    assert np.any(to_bins(unbatched, dither) != path)


@pytest.mark.slow
def test_full_matches_torchcrepe(recorded_dither):
    check_against_torchcrepe(voiced_signal(1.0, seed=1), "full", recorded_dither)


def test_voiced_pitch_is_tracked():
    """Sanity of the network on a steady 220 Hz tone, independent of torchcrepe."""
    t = np.arange(SR) / SR
    tone = torch.from_numpy((0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
    f0, pd = crepe_f0(load_crepe("tiny", "cpu"), tone, dither=np.zeros(1 + SR // HOP_LENGTH))
    middle = slice(10, -10)
    assert torch.all((f0[middle] / 220 - 1).abs() < 0.02)
    assert torch.all(pd[middle] > 0.5)


def test_dither_from_generator_is_reproducible_and_within_20_cents():
    model = load_crepe("tiny", "cpu")
    audio = torch.from_numpy(voiced_signal(0.8))
    n_frames = 1 + audio.numel() // HOP_LENGTH
    plain, _ = crepe_f0(model, audio, dither=np.zeros(n_frames))
    first, _ = crepe_f0(model, audio, dither=np.random.default_rng(7))
    again, _ = crepe_f0(model, audio, dither=np.random.default_rng(7))
    other, _ = crepe_f0(model, audio, dither=np.random.default_rng(8))

    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    cents = 1200 * torch.log2(first.double() / plain.double())
    assert cents.abs().max() <= 20 + 1e-3
    assert cents.abs().max() > 10  # really dithered
    assert abs(cents.mean()) < 3  # symmetric around 0
    with pytest.raises(ValueError, match="shape"):
        crepe_f0(model, audio, dither=np.zeros(n_frames - 1))


@pytest.mark.parametrize("width", [3, 5])
def test_filters_equal_torchcrepe_filters(width):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random(200).astype(np.float32))
    x[rng.random(200) < 0.2] = float("nan")
    x[:2] = float("nan")  # an edge window with no valid value
    x[50:55] = 0.0  # zero-valued windows for the mean's 0 -> NaN rule
    torch.testing.assert_close(median_filter(x, width), torchcrepe.filter.median(x[None], width)[0], equal_nan=True)
    torch.testing.assert_close(mean_filter(x, width), torchcrepe.filter.mean(x[None], width)[0], equal_nan=True)


def test_rvc_postprocess_equals_reference_steps():
    rng = np.random.default_rng(1)
    f0 = torch.from_numpy(rng.uniform(80, 400, 300).astype(np.float32))
    pd = torch.from_numpy(rng.uniform(0, 0.25, 300).astype(np.float32))  # many frames near 0.1

    ref_pd = torchcrepe.filter.median(pd[None], 3)
    ref_f0 = torchcrepe.filter.mean(f0[None], 3)
    ref_f0[ref_pd < 0.1] = 0
    ours = rvc_crepe_postprocess(f0, pd)
    torch.testing.assert_close(ours, ref_f0[0], rtol=0, atol=0)
    assert 50 < int((ours == 0).sum()) < 250


def crepe_transition() -> np.ndarray:
    distance = np.abs(np.arange(PITCH_BINS)[:, None] - np.arange(PITCH_BINS)[None, :])
    transition = np.maximum(12 - distance, 0)
    return transition / transition.sum(axis=1, keepdims=True)


def librosa_path(prob: np.ndarray) -> np.ndarray:
    """torchcrepe's decoding call: prob [360, T] float32."""
    return librosa.sequence.viterbi(prob, crepe_transition()).astype(np.int64)


def probability_matrices(rng) -> dict[str, np.ndarray]:
    """[360, T] float32 observation probabilities of several kinds."""
    smooth = rng.random((PITCH_BINS, 200)).astype(np.float32)
    # powers of two: exact ties everywhere and masked (0) bins
    coarse = (2.0 ** -rng.integers(0, 3, (PITCH_BINS, 200))).astype(np.float32)
    coarse[rng.random(coarse.shape) < 0.3] = 0
    flat = np.full((PITCH_BINS, 120), 1 / PITCH_BINS, dtype=np.float32)
    flat[:39], flat[308:] = 0, 0  # torchcrepe's fmin/fmax mask
    flat[150:160, 40:60] = 0.5
    # one bin per frame at random: forces jumps beyond the 11-bin transition reach
    jumps = np.zeros((PITCH_BINS, 60), dtype=np.float32)
    jumps[rng.integers(0, PITCH_BINS, 60), np.arange(60)] = 1
    return {"smooth": smooth / smooth.sum(0), "coarse": coarse, "flat": flat, "jumps": jumps}


def test_viterbi_equals_librosa_including_ties_and_far_jumps():
    mats = probability_matrices(np.random.default_rng(0))
    for name, prob in mats.items():
        expected = librosa_path(prob)
        # The log as librosa takes it, so that only the decoding is compared.
        log_prob = torch.from_numpy(np.log(prob + np.finfo(np.float32).tiny)).T[None]
        np.testing.assert_array_equal(viterbi(log_prob)[0].numpy(), expected, err_msg=name)
    assert np.abs(np.diff(librosa_path(mats["jumps"]))).max() > 11


@pytest.mark.parametrize("high_bin, end_bin", [(300, 100), (20, 100)])
def test_viterbi_breaks_near_far_ties_like_librosa(high_bin, end_bin):
    """Scores of about -2**59.6 are spaced 128 apart in float64: one bin 128 above the rest
    makes its far move (-87) round to the same score as the near moves of the rest, and
    librosa takes the lower bin of the tie (the near one for high_bin 300, the far one for 20)."""
    log_prob = np.zeros((4, PITCH_BINS), np.float32)
    log_prob[0] = -(2.0**59 + 2.0**58)
    log_prob[1, high_bin] = 100.0  # rounds to +128
    log_prob[2, end_bin] = 1e6
    tiny = np.finfo(np.float32).tiny
    # librosa's decoder core on log-probabilities (its public function takes probabilities)
    expected, _ = librosa.sequence._viterbi(
        log_prob, np.log(crepe_transition() + tiny), np.log(np.full(PITCH_BINS, 1 / PITCH_BINS) + tiny)
    )
    path = viterbi(torch.from_numpy(log_prob)[None])[0].numpy()
    np.testing.assert_array_equal(path, expected.astype(np.int64))
    assert (path[1] == high_bin) == (high_bin < end_bin - 11)


def test_viterbi_decodes_a_batch_like_single_sequences():
    rng = np.random.default_rng(1)
    prob = rng.random((3, 50, PITCH_BINS)).astype(np.float32)
    log_prob = torch.log(torch.from_numpy(prob))
    batch = viterbi(log_prob)
    for i in range(3):
        torch.testing.assert_close(batch[i], viterbi(log_prob[i : i + 1])[0], rtol=0, atol=0)


def test_long_files_are_processed_in_groups_with_the_same_result(monkeypatch):
    """Memory is bounded by a group of batches; grouping must not change a single value."""
    import pipeline.crepe as crepe_module

    model = load_crepe("tiny", "cpu")
    audio = torch.from_numpy(voiced_signal(2.0, seed=3))
    dither = np.random.default_rng(0).triangular(-20, 0, 20, 1 + audio.numel() // 160)
    whole_f0, whole_pd = crepe_f0(model, audio, batch_size=32, dither=dither)
    monkeypatch.setattr(crepe_module, "BATCHES_PER_GROUP", 2)  # 201 frames → 4 groups
    f0, pd = crepe_f0(model, audio, batch_size=32, dither=dither)
    assert torch.equal(f0, whole_f0) and torch.equal(pd, whole_pd)


def test_viterbi_of_sequences_of_different_lengths_in_one_pass():
    mats = probability_matrices(np.random.default_rng(1))
    lengths = [60, 17, 1, 42]
    probs = [mats["smooth"][:, :n] for n in lengths[:2]] + [mats["jumps"][:, :n] for n in lengths[2:]]
    log_prob = torch.zeros(len(lengths), max(lengths), PITCH_BINS)
    for row, prob in enumerate(probs):
        log_prob[row, : prob.shape[1]] = torch.from_numpy(np.log(prob + np.finfo(np.float32).tiny)).T
    paths = viterbi(log_prob, torch.tensor(lengths))
    for row, (prob, n) in enumerate(zip(probs, lengths)):
        np.testing.assert_array_equal(paths[row, :n].numpy(), librosa_path(prob), err_msg=f"row {row}")


def test_several_inputs_decode_as_each_alone():
    model = load_crepe("tiny", "cpu")
    audios = [voiced_signal(s, seed=k) for k, s in enumerate((1.3, 0.4, 6.2))]  # 6.2 s: two 512-frame pieces
    dithers = [np.random.default_rng(k).uniform(-20, 20, 1 + a.size // HOP_LENGTH) for k, a in enumerate(audios)]
    together = crepe_f0_batch(model, [torch.from_numpy(a) for a in audios], dithers=dithers)
    for a, d, (f0, pd) in zip(audios, dithers, together):
        alone_f0, alone_pd = crepe_f0(model, torch.from_numpy(a), dither=d)
        torch.testing.assert_close(f0, alone_f0, rtol=0, atol=0)
        torch.testing.assert_close(pd, alone_pd, rtol=0, atol=0)


def test_the_fixed_shape_viterbi_pass_equals_the_direct_one():
    """What a GPU replays as one CUDA graph: pieces copied into fixed [rows, frames] buffers
    (rows past them one frame long, earlier passes' values left past each length) decode to the
    direct pass's paths. (The capture itself needs CUDA: bench/pitch_gpu.py checks it.)"""
    from pipeline.crepe import _StaticViterbi

    mats = probability_matrices(np.random.default_rng(2))
    static = _StaticViterbi(rows=6, frames=64, device=torch.device("cpu"))
    for lengths in ([60, 17, 1, 42], [64, 3], [5, 64, 64, 30, 2, 9]):
        probs = [mats["smooth" if i % 2 else "coarse"][:, :n] for i, n in enumerate(lengths)]
        log_prob = torch.zeros(len(lengths), max(lengths), PITCH_BINS)
        for row, prob in enumerate(probs):
            log_prob[row, : prob.shape[1]] = torch.from_numpy(np.log(prob + np.finfo(np.float32).tiny)).T
        direct = viterbi(log_prob, torch.tensor(lengths))
        fixed = static(log_prob, torch.tensor(lengths))
        assert fixed.shape == direct.shape
        for row, n in enumerate(lengths):
            assert torch.equal(fixed[row, :n], direct[row, :n]), (lengths, row)
