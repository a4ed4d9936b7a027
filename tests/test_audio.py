import io
import wave

import numpy as np
import pytest
import soundfile as sf

from pipeline import audio as audio_io
from pipeline.audio import AudioDecodeError


def _tone(seconds=0.5, rate=16000, freq=220.0, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_sniff_and_probe_accepts_real_files(tmp_path, fmt):
    path = tmp_path / f"a.{fmt}"
    sf.write(path, _tone(rate=44100), 44100)
    assert audio_io.sniff_and_probe(path) == fmt


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_type_is_decided_by_content_not_name(tmp_path, fmt):
    real = tmp_path / f"real.{fmt}"
    sf.write(real, _tone(rate=44100), 44100)
    disguised = tmp_path / "upload.bin"
    disguised.write_bytes(real.read_bytes())
    assert audio_io.sniff_and_probe(disguised) == fmt


@pytest.mark.parametrize("content", [b"", b"hello world, not audio" * 10, b"RIFF\x00\x00\x00\x00WAVE",
                                     b"fLaC" + bytes(40), b"ID3" + bytes(100)])
def test_non_audio_and_header_only_are_refused(tmp_path, content):
    path = tmp_path / "x.wav"
    path.write_bytes(content)
    with pytest.raises(AudioDecodeError):
        audio_io.sniff_and_probe(path)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_truncated_files_are_refused(tmp_path, fmt):
    path = tmp_path / f"a.{fmt}"
    sf.write(path, _tone(seconds=3.0, rate=44100), 44100)
    data = path.read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: len(data) // 2] if fmt == "wav" else data[:200])
    with pytest.raises(AudioDecodeError):
        audio_io.sniff_and_probe(cut)
        audio_io.load_audio(cut)


def test_wav_declaring_absurd_rate_is_refused(tmp_path):
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(1_000_000)
        w.writeframes(np.zeros(1000, np.int16).tobytes())
    path = tmp_path / "fast.wav"
    path.write_bytes(buf.getvalue())
    with pytest.raises(AudioDecodeError, match="sample rate"):
        audio_io.sniff_and_probe(path)


def _silent_flac(path, seconds: float, rate: int = 8000):
    with sf.SoundFile(path, "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(seconds // 60)):
            f.write(np.zeros(60 * rate, np.int16))
    return path


def test_audio_longer_than_allowed_is_refused_before_and_while_decoding(tmp_path):
    # Two hours of silence in ~0.2 MB: the byte limit alone would let days of it in.
    path = _silent_flac(tmp_path / "long.flac", 7200)
    assert path.stat().st_size < 1_000_000
    assert audio_io.sniff_and_probe(path, max_seconds=7200) == "flac"
    with pytest.raises(audio_io.AudioTooLong, match="longer than 3600 s"):
        audio_io.sniff_and_probe(path, max_seconds=3600)
    # Decoding counts what it decodes, not what the header said, and stops at the limit.
    with pytest.raises(audio_io.AudioTooLong) as caught:
        audio_io.load_audio(path, max_seconds=120)
    assert caught.value.max_seconds == 120
    assert audio_io.load_audio(_silent_flac(tmp_path / "short.flac", 120), max_seconds=120).shape == (120 * 16000,)


def test_load_audio_downmixes_stereo_to_mid_and_resamples(tmp_path):
    left = _tone(rate=48000, freq=300)
    right = np.zeros_like(left)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 48000, subtype="FLOAT")
    out = audio_io.load_audio(path)
    assert out.dtype == np.float32
    assert abs(out.shape[0] - 8000) <= 1
    mid = audio_io.resample(left / 2, 48000, 16000)
    assert np.abs(out[200:-200] - mid[200:-200]).max() < 1e-3


def test_load_audio_8k_input_upsamples(tmp_path):
    path = tmp_path / "low.wav"
    sf.write(path, _tone(seconds=1.0, rate=8000), 8000)
    assert abs(audio_io.load_audio(path).shape[0] - 16000) <= 1


def test_peak_limit_only_scales_loud_audio():
    quiet = np.array([0.1, -0.5], np.float32)
    assert audio_io.peak_limit(quiet) is quiet
    loud = np.array([0.1, -1.9], np.float32)
    assert np.isclose(np.abs(audio_io.peak_limit(loud)).max(), 0.95)


def test_high_pass_removes_dc_and_keeps_speech_band():
    x = np.full(16000, 0.5) + _tone(seconds=1.0, freq=440)
    y = audio_io.high_pass(x)
    assert y.dtype == np.float64
    assert abs(y[4000:12000].mean()) < 1e-3
    assert np.isclose(np.abs(y[4000:12000]).max(), 0.5, atol=0.01)


def test_to_int16_normalises_only_when_clipping():
    assert audio_io.to_int16(np.array([0.5, -0.25]))[0] == 16384
    clipped = audio_io.to_int16(np.array([2.0, -1.0]))
    assert clipped[0] == int(0.99 * 32768) and clipped[1] == -int(0.99 * 32768 / 2)


@pytest.mark.parametrize("fmt,rate,expect_rate", [("wav", 40000, 40000), ("flac", 48000, 48000),
                                                  ("mp3", 40000, 44100), ("mp3", 32000, 32000)])
def test_write_audio_formats(tmp_path, fmt, rate, expect_rate):
    path = tmp_path / f"out.{fmt}"
    written = audio_io.write_audio(path, audio_io.to_int16(_tone(rate=rate)), rate)
    assert written == expect_rate
    data, sr = sf.read(path)
    assert sr == expect_rate
    assert abs(len(data) / sr - 0.5) < 0.06
    assert np.abs(data).max() > 0.3


def test_mp3_keeps_the_band_a_40_khz_voice_has(tmp_path):
    """LAME at its best VBR quality keeps what is above 15 kHz (libsndfile's default kept 9 % of
    it above 17 kHz, none above 18 kHz)."""
    from pipeline.demo import synthetic_speech

    source = audio_io.to_int16(synthetic_speech(3.0, sample_rate=40000, seed=0))
    assert audio_io.write_audio(tmp_path / "out.mp3", source, 40000) == 44100
    decoded, _ = sf.read(tmp_path / "out.mp3", dtype="float32")
    lossless = audio_io.resample(source.astype(np.float32) / 32768, 40000, 44100)  # what the MP3 encodes

    def share_above(x: np.ndarray, hz: float) -> float:
        power = np.abs(np.fft.rfft(x)) ** 2
        return power[np.fft.rfftfreq(len(x), 1 / 44100) >= hz].sum() / power.sum()

    for hz in (15000, 17000, 18000):
        assert share_above(lossless, hz) > 0.003
        assert share_above(decoded, hz) > 0.9 * share_above(lossless, hz), hz


def test_mp3_gives_back_exactly_the_samples_encoded(tmp_path):
    """The encoder's delay and padding are in the MP3's header, so a decoder returns the same
    number of samples, not shifted (a cover's vocal stays on its backing track)."""
    from pipeline.demo import synthetic_speech

    source = synthetic_speech(2.0, sample_rate=44100, seed=1).astype(np.float32)
    audio_io.write_audio(tmp_path / "out.mp3", audio_io.to_int16(source), 44100)
    decoded, rate = sf.read(tmp_path / "out.mp3", dtype="float32")
    assert rate == 44100 and len(decoded) == len(source)
    lags = range(-1200, 1201)
    best = max(lags, key=lambda lag: float(np.dot(np.roll(decoded, -lag), source)))
    assert best == 0
    assert np.abs(decoded - source).max() < 0.05
