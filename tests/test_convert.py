"""Every conversion parameter's effect and the edges of the input, on the fixture voices."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from deployments.cli import main as cli_main
from pipeline import audio as audio_io
from pipeline.demo import synthetic_speech
from pipeline.convert import (ChunkingConfig, ChunkSynthesis, ConversionParams, ConversionRequest, Converter,
                              chunk_features, chunk_features_batch, chunk_noise, estimate_input_pitch,
                              change_rms, fastest_precision, has_bf16_arithmetic, network_precision, per_group,
                              prepare_input, split_points, stretch_linear, synthesize_chunks)
from pipeline import synthesizer
from pipeline.index import load_index
from pipeline.synthesizer import load_voice

FAST = dict(f0_method="crepe-tiny")


@pytest.fixture(scope="module")
def converter(fixture_set):
    return Converter.from_paths(fixture_set["hubert"], rmvpe_path=fixture_set["rmvpe"])


@pytest.fixture(scope="module")
def voice(fixture_set):
    return load_voice(fixture_set["voices"]["v2-40k-f0"]["pth"])


@pytest.fixture(scope="module")
def index(fixture_set):
    return load_index(fixture_set["voices"]["v2-40k-f0"]["index"])


@pytest.fixture(scope="module")
def speech():
    # not one of the inputs whose near-twins the fixture indexes hold: retrieval matters here
    return synthetic_speech(1.5, sample_rate=16000, seed=77)


def _run(converter, voice, index, audio, **params):
    return converter.convert(audio, voice, index, ConversionParams(**{**FAST, **params}))


def expected_length(samples16k: int, sample_rate: int, x_pad: int = 1) -> int:
    """The reference's output length for a single chunk (HuBERT drops the last 1–2 frames)."""
    padded = samples16k + 2 * 16000 * x_pad
    frames = padded // 160
    hubert_frames = (padded - 400) // 320 + 1
    p_len = min(frames, 2 * hubert_frames)
    return p_len * sample_rate // 100 - 2 * sample_rate * x_pad


def test_output_length_and_rate(converter, voice, index, speech):
    out = _run(converter, voice, index, speech)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert out.shape[0] == expected_length(speech.shape[0], 40000)
    assert 0 < speech.shape[0] / 16000 - out.shape[0] / 40000 <= 0.021


def test_seed_makes_conversion_reproducible(converter, voice, index, speech):
    a = _run(converter, voice, index, speech, seed=5)
    b = _run(converter, voice, index, speech, seed=5)
    c = _run(converter, voice, index, speech, seed=6)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_index_rate_zero_equals_no_index(converter, voice, index, speech):
    without = _run(converter, voice, None, speech)
    np.testing.assert_array_equal(_run(converter, voice, index, speech, index_rate=0.0), without)
    assert np.abs(_run(converter, voice, index, speech, index_rate=1.0) - without).max() > 1e-3


def test_protect_acts_only_on_index_blended_features(converter, voice, index, speech):
    # without retrieval there is nothing to protect from
    np.testing.assert_array_equal(_run(converter, voice, None, speech, protect=0.0),
                                  _run(converter, voice, None, speech, protect=0.5))
    off = _run(converter, voice, index, speech, protect=0.5)
    assert np.abs(_run(converter, voice, index, speech, protect=0.0) - off).max() > 1e-3


def test_rms_mix_rate(converter, voice, index, speech):
    own = _run(converter, voice, index, speech, rms_mix_rate=1.0)
    imposed = _run(converter, voice, index, speech, rms_mix_rate=0.0)
    assert np.abs(own - imposed).max() > 1e-3
    # rate 0: the output's 0.5 s envelope follows the input's
    def envelope(x, rate):
        hop = rate // 2
        return np.array([np.sqrt(np.mean(x[i:i + hop] ** 2)) for i in range(0, len(x) - hop, hop)])
    env_in = envelope(speech.astype(np.float64), 16000)
    env_out = envelope(imposed, 40000)
    n = min(len(env_in), len(env_out))
    ratio = env_out[:n] / np.maximum(env_in[:n], 1e-6)
    assert ratio.std() / ratio.mean() < 0.35


def _reference_change_rms(source, source_rate, target, target_rate, rate):
    """The reference's change_rms: librosa-style RMS, whole-length float32 interpolations."""
    def rms(y, frame, hop):
        frames = np.lib.stride_tricks.sliding_window_view(np.pad(y, frame // 2), frame)[::hop]
        return torch.from_numpy(np.sqrt(np.mean(np.abs(frames) ** 2, axis=-1)))
    n = target.shape[0]
    env_in = F.interpolate(rms(source, source_rate // 2 * 2, source_rate // 2)[None, None], size=n,
                           mode="linear").squeeze()
    env_out = F.interpolate(rms(target, target_rate // 2 * 2, target_rate // 2)[None, None], size=n,
                            mode="linear").squeeze()
    env_out = torch.clamp_min(env_out, 1e-6)
    gain = torch.pow(env_in, torch.tensor(1 - rate)) * torch.pow(env_out, torch.tensor(rate - 1))
    return (target * gain.numpy()).astype(target.dtype)


def test_rms_mix_in_blocks_is_the_reference_exactly():
    # 70 s at 40 kHz: three blocks, and positions float32 alone would round (it drifts by ~1e-6 here)
    rng = np.random.default_rng(3)
    source = (rng.standard_normal(70 * 16000) * np.linspace(0.01, 0.5, 70 * 16000)).astype(np.float32)
    target = (rng.standard_normal(70 * 40000) * 0.2).astype(np.float32)
    for rate in (0.0, 0.25):
        np.testing.assert_array_equal(change_rms(source, 16000, target, 40000, rate),
                                      _reference_change_rms(source, 16000, target, 40000, rate))


@pytest.mark.parametrize("m, n", [(37, 12345), (1201, 3_000_001), (5, 3), (1, 7)])
def test_stretch_linear_is_torchs_linear_interpolation(m, n):
    values = torch.rand(m, generator=torch.Generator().manual_seed(m))
    whole = F.interpolate(values[None, None], size=n, mode="linear").squeeze(0).squeeze(0)
    pieces = [stretch_linear(values, n, a, min(a + 100_003, n)) for a in range(0, n, 100_003)]
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=0, atol=0)


def test_filter_radius(converter, voice, index, speech):
    base = _run(converter, voice, index, speech, filter_radius=0)
    for r in (1, 2):
        np.testing.assert_array_equal(_run(converter, voice, index, speech, filter_radius=r), base)
    outs = {r: _run(converter, voice, index, speech, filter_radius=r) for r in (3, 7)}
    assert np.abs(outs[3] - base).max() > 1e-4
    assert np.abs(outs[7] - outs[3]).max() > 1e-4


def test_f0_up_key_changes_output(converter, voice, index, speech):
    assert np.abs(_run(converter, voice, index, speech, f0_up_key=12) - _run(converter, voice, index, speech)).max() > 1e-3


@pytest.mark.parametrize("name,audio", [
    ("silence", np.zeros(16000, np.float32)),
    ("tenth_of_a_second", (0.3 * np.sin(np.arange(1600) / 8)).astype(np.float32)),
    ("clipped", np.clip(3 * np.sin(np.arange(16000) / 12), -1.5, 1.5).astype(np.float32)),
])
def test_edge_inputs_convert_to_finite_audio(converter, voice, index, name, audio):
    out = _run(converter, voice, index, audio)
    assert np.isfinite(out).all()
    assert out.shape[0] == expected_length(audio.shape[0], 40000)


def test_too_short_input_is_a_clear_error(converter, voice, index):
    with pytest.raises(ValueError, match="too short"):
        _run(converter, voice, index, np.zeros(100, np.float32))


def test_no_f0_voice_ignores_pitch(converter, fixture_set, speech):
    voice = load_voice(fixture_set["voices"]["v2-48k-nof0"]["pth"])
    out = converter.convert(speech, voice, None, ConversionParams(**FAST))
    assert out.shape[0] == expected_length(speech.shape[0], 48000)


def test_index_of_wrong_dimension_is_refused(converter, fixture_set, speech):
    voice = load_voice(fixture_set["voices"]["v1-32k-f0"]["pth"])
    wrong = load_index(fixture_set["voices"]["v2-40k-f0"]["index"])
    with pytest.raises(ValueError, match="768-d"):
        converter.convert(speech, voice, wrong, ConversionParams(**FAST))


def test_split_points_match_brute_force_reference_sum():
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(16000 * 9) * np.repeat(rng.uniform(0, 1, 90), 1600)
    chunking = ChunkingConfig(x_pad=1, x_query=1, x_center=3, x_max=4)
    padded = np.pad(audio, (80, 80), mode="reflect")
    full_sum = np.zeros_like(audio)
    for i in range(160):  # the reference's whole-signal sum
        full_sum += np.abs(padded[i:i - 160])
    expected = []
    for t in range(16000 * 3, len(audio), 16000 * 3):
        w = full_sum[t - 16000:t + 16000]
        expected.append(t - 16000 + np.where(w == w.min())[0][0])
    assert split_points(audio, chunking) == expected
    prepared = prepare_input(audio.astype(np.float32), chunking)
    assert len(prepared.chunks) == len(expected) + 1
    assert all(c.start % 160 == 0 for c in prepared.chunks)


def test_chunked_conversion_length(fixture_set, voice, index):
    small = ChunkingConfig(x_pad=1, x_query=1, x_center=3, x_max=4)
    converter = Converter.from_paths(fixture_set["hubert"], chunking=small)
    audio = sf.read(fixture_set["audio"]["speech_7s"], dtype="float32")[0]
    prepared = prepare_input(audio, small)
    assert len(prepared.chunks) >= 3
    out = converter.convert(audio, voice, index, ConversionParams(**FAST))
    assert np.isfinite(out).all()
    # each chunk's output ends 1-2 frames early: shorter than the input by 10-20 ms per chunk at most
    missing = audio.shape[0] / 16000 - out.shape[0] / 40000
    assert 0 < missing <= 0.021 * len(prepared.chunks)


@pytest.mark.parametrize("rate,channels", [(48000, 2), (8000, 1), (44100, 1)])
def test_cli_converts_other_rates_and_stereo(tmp_path, fixture_set, speech, rate, channels):
    wav = audio_io.resample(speech, 16000, rate)
    data = np.stack([wav, 0.5 * wav], axis=1) if channels == 2 else wav
    src = tmp_path / "in.flac"
    sf.write(src, data, rate)
    dst = tmp_path / "out.mp3"
    v = fixture_set["voices"]["v2-40k-f0"]
    code = cli_main(["convert", str(src), "-o", str(dst), "--model", v["pth"], "--index", v["index"],
                     "--hubert", fixture_set["hubert"], "--f0-method", "crepe-tiny", "-q"])
    assert code == 0
    out, sr = sf.read(dst)
    assert sr == 44100 and abs(len(out) / sr - 1.5) < 0.1


def test_cli_refuses_corrupt_input_and_model(tmp_path, fixture_set, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEjunk")
    v = fixture_set["voices"]["v2-40k-f0"]
    code = cli_main(["convert", str(bad), "-o", str(tmp_path / "o.wav"), "--model", v["pth"],
                     "--hubert", fixture_set["hubert"], "-q"])
    assert code == 2 and "error:" in capsys.readouterr().err
    bad_model = tmp_path / "model.pth"
    bad_model.write_bytes(b"\x00" * 100)
    code = cli_main(["convert", fixture_set["audio"]["speech_2s"], "-o", str(tmp_path / "o.wav"),
                     "--model", str(bad_model), "--hubert", fixture_set["hubert"], "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "model.pth" in err
    assert not (tmp_path / "o.wav").exists()


def test_api_ranges_and_pipeline_ranges_agree():
    """The ingress words its 422s from deployments.params; the pipeline guards the same bounds."""
    from dataclasses import fields

    from deployments.params import CREATE_PARAMS

    pipeline_fields = {f.name for f in fields(ConversionParams)}
    checked = 0
    for p in CREATE_PARAMS:
        if p.field not in pipeline_fields or p.ge is None:
            continue
        step = 1 if p.kind == "integer" else 1e-6
        ConversionParams(**{p.field: p.ge})
        ConversionParams(**{p.field: p.le})
        for bad in (p.ge - step, p.le + step):
            with pytest.raises(ValueError, match=p.field):
                ConversionParams(**{p.field: bad})
        checked += 1
    assert checked == 5


def test_a_batch_of_requests_equals_each_converted_alone(fixture_set, converter, voice, index, speech):
    """convert_batch mixes voices (v2 and v1), chunked and whole inputs, equal and unequal
    lengths, index or none, and per-request seeds and parameters; each output is its own."""
    v1 = fixture_set["voices"]["v1-32k-f0"]
    voice1, index1 = load_voice(v1["pth"]), load_index(v1["index"])
    chunked = Converter(converter.hubert, converter.pitch_models, ChunkingConfig(1, 1, 2, 2))
    other = synthetic_speech(2.5, sample_rate=16000, seed=5)  # 2 chunks with this chunking
    requests = [ConversionRequest(other, voice, index, ConversionParams(**FAST, seed=3)),
                ConversionRequest(speech, voice, None, ConversionParams(**FAST, seed=4, protect=0.5)),
                ConversionRequest(speech, voice1, index1, ConversionParams(**FAST, seed=5, f0_up_key=3)),
                ConversionRequest(speech, voice, index, ConversionParams(**FAST, seed=6))]
    batch = chunked.convert_batch(requests, max_batch=4)
    for r, out in zip(requests, batch):
        alone = chunked.convert(r.audio16k, r.voice, r.index, r.params)
        assert out.shape == alone.shape
        np.testing.assert_allclose(out, alone, atol=2e-5, rtol=0)
    assert np.abs(batch[1] - batch[3]).max() > 1e-3  # same input, other seed and index: differs


def test_a_host_pitch_method_runs_while_the_chunks_features_are_computed(converter, voice, index, monkeypatch):
    """pm and harvest (no network) run in a thread while the next chunks' features are computed
    ahead; the output is the one of pitch first, then chunk after chunk."""
    from pipeline import convert

    chunked = Converter(converter.hubert, converter.pitch_models, ChunkingConfig(1, 1, 2, 2))
    audio = synthetic_speech(6.0, sample_rate=16000, seed=8)
    params = ConversionParams(f0_method="pm", seed=2)
    n_chunks = len(prepare_input(audio, chunked.chunking).chunks)
    assert n_chunks >= 3
    with monkeypatch.context() as m:
        m.setattr(convert, "HOST_METHODS", ())  # pitch first, as for the networks
        in_order = chunked.convert(audio, voice, index, params)

    features_done, seen_by_pitch = [], []
    chunk_features, estimate_input_pitch = convert.chunk_features, convert.estimate_input_pitch

    def counted_features(*args):
        features_done.append(chunk_features(*args))
        return features_done[-1]

    def pitch_after_the_features(*args):  # a pitch slower than every chunk's features
        deadline = time.monotonic() + 10
        while len(features_done) < n_chunks and time.monotonic() < deadline:
            time.sleep(0.01)
        seen_by_pitch.append(len(features_done))
        return estimate_input_pitch(*args)
    monkeypatch.setattr(convert, "chunk_features", counted_features)
    monkeypatch.setattr(convert, "estimate_input_pitch", pitch_after_the_features)
    overlapped = chunked.convert(audio, voice, index, params)
    assert seen_by_pitch == [n_chunks] and len(features_done) == n_chunks  # all ahead, each once
    np.testing.assert_array_equal(overlapped, in_order)


def test_a_failed_conversion_does_not_wait_for_its_host_pitch(converter, voice, index, monkeypatch):
    """A chunk's features fail while harvest or pm still runs: the error comes at once (a batch of
    files goes on to the next), not when the pitch thread ends."""
    from pipeline import convert

    release = threading.Event()

    def slow_pitch(*args):
        release.wait(30)
        return np.zeros(1), np.zeros(1)

    def failing_features(*args):
        raise RuntimeError("features failed")

    monkeypatch.setattr(convert, "estimate_input_pitch", slow_pitch)
    monkeypatch.setattr(convert, "chunk_features", failing_features)
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="features failed"):
            converter.convert(synthetic_speech(1.0, sample_rate=16000, seed=1), voice, index,
                              ConversionParams(f0_method="pm"))
        assert time.monotonic() - started < 10
    finally:
        release.set()


def test_precisions_on_a_cpu(converter, voice, index, speech):
    """fp16 is CUDA's (a CPU runs it as fp32); bf16 rounds the decoder's residual-block
    convolutions on CPUs with bfloat16 arithmetic, within 1e-2 of fp32 (the issue's bound)."""
    with pytest.raises(ValueError, match="precision"), network_precision("cpu", "fp8"):
        pass
    with pytest.raises(ValueError, match="precision"):
        Converter(converter.hubert, converter.pitch_models, precision="fp8")
    assert fastest_precision("cuda") == "fp16"
    assert fastest_precision("cpu") == ("bf16" if has_bf16_arithmetic(torch.device("cpu")) else "fp32")
    exact = _run(converter, voice, index, speech, seed=3)
    as_fp16 = _run(Converter(converter.hubert, converter.pitch_models, precision="fp16"), voice, index, speech, seed=3)
    np.testing.assert_array_equal(as_fp16, exact)
    as_bf16 = _run(Converter(converter.hubert, converter.pitch_models, precision="bf16"), voice, index, speech, seed=3)
    error = np.linalg.norm(as_bf16 - exact) / np.linalg.norm(exact)
    if has_bf16_arithmetic(torch.device("cpu")):
        assert 1e-6 < error < 5e-3
    else:
        assert error == 0


def test_a_precision_holds_only_inside_its_context(fixture_set, monkeypatch):
    """Making a converter enters no precision context: one entered on creation and never left
    (torch.autocast is not closed when dropped) made every later pass of that thread run in
    fp16 on GPUs, the fp32 ones included."""
    entered = []

    @contextmanager
    def spy(dtype):
        entered.append(dtype)
        with synthesizer.resblock_precision(dtype):
            yield

    monkeypatch.setattr("pipeline.convert.has_bf16_arithmetic", lambda device: True)
    monkeypatch.setattr("pipeline.convert.resblock_precision", spy)
    Converter.from_paths(fixture_set["hubert"], precision="bf16")
    assert entered == []
    with network_precision("cpu", "bf16"):
        assert synthesizer._RESBLOCK_DTYPE.get() is torch.bfloat16
    assert entered == [torch.bfloat16] and synthesizer._RESBLOCK_DTYPE.get() is None


@pytest.mark.parametrize("padding", [0.0, 0.5])
def test_chunk_features_in_batches_equal_each_chunk_alone(converter, speech, monkeypatch, padding):
    """Equal lengths batch as they are; with padding allowed (GPUs) different lengths batch too,
    each chunk's padding masked out."""
    monkeypatch.setattr("pipeline.convert.max_padding", lambda device: padding)
    chunks = [speech[:n].astype(np.float64) for n in (16000, 12000, 16000, 14400)]
    together = chunk_features_batch(converter.hubert, chunks, "v2")
    for chunk, got in zip(chunks, together):
        alone = chunk_features(converter.hubert, chunk, "v2")
        assert got.shape == alone.shape
        torch.testing.assert_close(got, alone, rtol=0, atol=5e-5)


def test_the_decoder_glue_is_compiled_only_where_it_runs(monkeypatch):
    """bf16 on a CPU with bfloat16 arithmetic mixes dtypes in the decoder; fp32, fp16 and
    emulated bf16 do not, so compiling there would only cost seconds."""
    from pipeline import convert

    compiled = []
    monkeypatch.setattr(convert, "compile_pointwise", lambda: compiled.append(True))
    monkeypatch.setattr(convert, "has_bf16_arithmetic", lambda device: True)
    assert not convert.compile_decoder_glue("cpu", "fp32")
    assert not convert.compile_decoder_glue("cuda", "bf16")
    assert not compiled
    assert convert.compile_decoder_glue("cpu", "bf16") and compiled == [True]
    monkeypatch.setattr(convert, "has_bf16_arithmetic", lambda device: False)
    assert not convert.compile_decoder_glue("cpu", "bf16") and compiled == [True]


def test_a_synthesis_batch_out_of_device_memory_runs_again_in_halves_with_the_same_draws(
        converter, voice, speech, monkeypatch):
    """The decoder runs out of memory on a batch of two after both chunks drew their noise;
    per_group runs each alone, and each draws what it would have drawn in the batch."""
    prepared = prepare_input(speech, ChunkingConfig())
    samples = prepared.audio_pad[prepared.chunks[0].start:prepared.chunks[0].end]
    feats0 = chunk_features(converter.hubert, samples, voice.version)

    def item(seed: int) -> ChunkSynthesis:
        params = ConversionParams(**FAST, seed=seed)
        coarse, pitchf = estimate_input_pitch(prepared, params, converter.pitch_models)
        return ChunkSynthesis(feats0, feats0, coarse, pitchf, samples.shape[0], params, chunk_noise(seed, [], voice))

    trim = voice.sample_rate  # x_pad 1 s
    alone = [synthesize_chunks(voice, [item(seed)], trim)[0] for seed in (1, 2)]
    decoder = synthesizer.Generator.forward

    def out_of_memory_on_batches(self, z, g, f0=None, noise=None, keep=None):
        if z.shape[0] > 1:
            self.m_source(f0, self.upp, noise)  # the source's draws, as the decoder makes them first
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return decoder(self, z, g, f0, noise, keep)

    monkeypatch.setattr(synthesizer.Generator, "forward", out_of_memory_on_batches)
    items = [item(1), item(2)]
    with pytest.warns(RuntimeWarning, match="batch of 2 ran out of device memory"):
        retried = per_group([0, 0], lambda _key, mine: synthesize_chunks(voice, [items[i] for i in mine], trim))
    for got, expected in zip(retried, alone):
        np.testing.assert_array_equal(got, expected)
