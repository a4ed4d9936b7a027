"""Audio in and out: decode, down-mix, resample, the reference's input conditioning, encode.

The reference decodes with the ffmpeg CLI; we decode with soundfile (libsndfile reads wav, flac
and mp3, and writes wav and flac) and resample with soxr, so the 16 kHz signal differs from the
reference's from the first sample on. Everything after the 16 kHz signal follows the reference.
MP3 is written with pedalboard's LAME, 4x faster than libsndfile's build of the same encoder.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000  # what HuBERT and the pitch estimators take
FORMATS = ("wav", "mp3", "flac")
# MPEG-1 layer III rates, the only ones pedalboard writes; others are resampled to the next one up.
MP3_SAMPLE_RATES = (32000, 44100, 48000)
# LAME's best VBR quality: full band and ~0.4 dB log-spectral distance from the lossless output,
# ~150 kbit/s for speech (LAME's default V4 cuts everything above ~17 kHz, which 40/48 kHz voices
# have). Its Xing/LAME header carries the encoder delay and padding: decoders give back exactly
# the samples encoded, aligned (song covers are mixed back onto their backing track).
MP3_QUALITY = "V0"
# Inputs we agree to decode: real recordings, not headers that declare absurd sizes.
MIN_INPUT_RATE, MAX_INPUT_RATE, MAX_CHANNELS = 4000, 384000, 16
_BLOCK_FRAMES = 1 << 16
# Real wav files have a handful of chunks before their data; walking millions is a DoS.
_MAX_WAV_CHUNKS = 256


class AudioDecodeError(ValueError):
    """The bytes are not a wav, mp3 or flac file we can decode (wrong type, truncated, empty)."""


class AudioTooLong(ValueError):
    """A decodable file holding more audio than allowed. A few MB of FLAC can hold days of
    silence, and an 8 kbit/s MP3 hours, so the byte limit alone bounds neither work nor memory."""

    def __init__(self, max_seconds: float) -> None:
        super().__init__(f"audio is longer than {max_seconds:g} s")
        self.max_seconds = max_seconds


def sniff_format(head: bytes) -> str | None:
    """The container named by a file's first bytes, or None. Looks at content, never names."""
    if len(head) >= 12 and head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:3] == b"ID3":
        return "mp3"
    # A bare MPEG audio frame: 11 sync bits, layer III (bits 01), a valid bitrate index.
    if len(head) >= 3 and head[0] == 0xFF and (head[1] & 0xE6) == 0xE2 and (head[2] >> 4) not in (0, 15):
        return "mp3"
    return None


def sniff_and_probe(path: str | Path, max_seconds: float | None = None) -> str:
    """Decide a file's type by its bytes and prove it decodes; returns 'wav', 'mp3' or 'flac'.

    Reads the header, checks the declared shape is sane and that the declared data is present,
    and decodes the first and the last block, so a truncated or corrupt file fails here. A file
    whose header declares more than `max_seconds` raises AudioTooLong (`load_audio` counts
    again as it decodes: headers can lie).
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise AudioDecodeError("empty file")
    fmt = sniff_format(head)
    if fmt is None:
        raise AudioDecodeError("not a wav, mp3 or flac file")
    if fmt == "wav":
        _check_wav_data_present(path)
    try:
        with sf.SoundFile(path) as f:
            _check_shape(f.samplerate, f.channels, f.frames)
            if max_seconds is not None and f.frames > max_seconds * f.samplerate:
                raise AudioTooLong(max_seconds)
            block = min(f.frames, _BLOCK_FRAMES)
            first = f.read(block, dtype="float32", always_2d=True)
            if f.frames > _BLOCK_FRAMES:
                f.seek(f.frames - _BLOCK_FRAMES)
                last = f.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)
            else:
                last = first
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioDecodeError(f"cannot decode {fmt}: {e}") from None
    # A cut mp3 keeps the frame count its Xing/Info header declares; libmpg123 then just stops
    # early. Every declared frame must decode, up to the last one.
    if len(first) < block or len(last) < block:
        raise AudioDecodeError(f"truncated {fmt}: fewer frames decode than its header declares")
    if not (np.isfinite(first).all() and np.isfinite(last).all()):
        raise AudioDecodeError(f"{fmt} file has non-finite samples")
    return fmt


def duration_s(path: str | Path) -> float:
    """The seconds of audio a file's header declares; 0 when it cannot be read."""
    try:
        return sf.info(str(path)).duration
    except (sf.LibsndfileError, RuntimeError, OSError):
        return 0.0


def _check_shape(sample_rate: int, channels: int, frames: int) -> None:
    if not MIN_INPUT_RATE <= sample_rate <= MAX_INPUT_RATE:
        raise AudioDecodeError(f"unsupported sample rate {sample_rate} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioDecodeError(f"unsupported channel count {channels}")
    if frames <= 0:
        raise AudioDecodeError("no audio frames")


def _check_wav_data_present(path: Path) -> None:
    """libsndfile quietly reads a truncated wav; refuse one whose data chunk is cut short."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        riff = f.read(12)
        # RF64 keeps the real data size in its ds64 chunk (bytes 8-16 of its body) and puts
        # 0xFFFFFFFF in the data chunk's own 32-bit size.
        data_size_64 = None
        if riff[:4] == b"RF64":
            ds64 = f.read(24)
            if ds64[:4] != b"ds64":
                raise AudioDecodeError("RF64 file without a ds64 chunk")
            data_size_64 = int.from_bytes(ds64[16:24], "little")
        pos = 12
        for _ in range(_MAX_WAV_CHUNKS):
            if pos + 8 > size:
                break
            f.seek(pos)
            chunk = f.read(8)
            chunk_id, chunk_len = chunk[:4], int.from_bytes(chunk[4:8], "little")
            if chunk_id == b"data":
                if chunk_len == 0xFFFFFFFF and data_size_64 is not None:
                    chunk_len = data_size_64
                if chunk_len == 0:
                    raise AudioDecodeError("wav data chunk is empty")
                if pos + 8 + chunk_len > size:
                    raise AudioDecodeError(
                        f"truncated wav: data chunk declares {chunk_len} bytes, "
                        f"{size - pos - 8} present")
                return
            pos += 8 + chunk_len + (chunk_len & 1)
    raise AudioDecodeError("wav has no data chunk (among its first chunks)")


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Decode any supported file to mono float32 at `sample_rate`, block by block.

    Multi-channel input is down-mixed to the mid signal (mean of the channels), as ffmpeg's
    `-ac 1` does for stereo. Only the resampled mono signal is held, not the decoded file, and
    decoding stops with AudioTooLong as soon as it passes `max_seconds`, whatever the header said.
    """
    try:
        with sf.SoundFile(path) as f:
            _check_shape(f.samplerate, f.channels, f.frames)
            max_frames = None if max_seconds is None else max_seconds * f.samplerate
            resampler = None
            if f.samplerate != sample_rate:
                resampler = soxr.ResampleStream(f.samplerate, sample_rate, 1, dtype="float32",
                                                quality="HQ")
            pieces, frames = [], 0
            for block in f.blocks(blocksize=_BLOCK_FRAMES, dtype="float32", always_2d=True):
                frames += block.shape[0]
                if max_frames is not None and frames > max_frames:
                    raise AudioTooLong(max_seconds)
                mono = block.mean(axis=1, dtype=np.float32)
                pieces.append(resampler.resample_chunk(mono) if resampler else mono)
            if resampler is not None:
                pieces.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioDecodeError(f"cannot decode {path}: {e}") from None
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if audio.size == 0:
        raise AudioDecodeError(f"{path} has no audio")
    if not np.isfinite(audio).all():
        raise AudioDecodeError(f"{path} has non-finite samples")
    return audio


def peak_limit(audio: np.ndarray, peak: float = 0.95) -> np.ndarray:
    """Scale down so |x| <= peak; quieter audio is left alone (the reference's vc_single)."""
    m = np.abs(audio).max() / peak
    return audio / m if m > 1 else audio


# scipy.signal (~75 MB resident) and pedalboard are imported where they are used: the ingress and
# the job actor import this module to probe uploads and never filter or encode.
@functools.cache
def _high_pass_filter() -> tuple[np.ndarray, np.ndarray]:
    """5th-order Butterworth high-pass at 48 Hz (the reference's), as (b, a)."""
    from scipy import signal

    return signal.butter(N=5, Wn=48, btype="high", fs=SAMPLE_RATE)


def high_pass(audio: np.ndarray) -> np.ndarray:
    """48 Hz zero-phase high-pass, applied forward and backward; float64 out, as in the reference."""
    from scipy import signal

    return signal.filtfilt(*_high_pass_filter(), audio)


def to_int16(audio: np.ndarray) -> np.ndarray:
    """The reference's final step: normalise to 0.99 only if it clips, truncate to int16."""
    scale = 32768.0
    m = np.abs(audio).max() / 0.99 if audio.size else 0.0
    if m > 1:
        scale /= m
    return (audio * scale).astype(np.int16)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    if from_rate == to_rate:
        return audio
    return soxr.resample(audio, from_rate, to_rate, quality="VHQ")


def write_audio(path: str | Path, audio: np.ndarray, sample_rate: int, fmt: str | None = None) -> int:
    """Write mono audio (int16, or float in [-1, 1]) as wav, flac or mp3; returns the rate written.

    MP3 supports only some rates: a 40 kHz voice is resampled to 44.1 kHz for it.
    """
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(f"unsupported output format {fmt!r}; use one of {FORMATS}")
    if fmt == "mp3":
        from pedalboard.io import AudioFile

        if sample_rate not in MP3_SAMPLE_RATES:
            target = next((r for r in MP3_SAMPLE_RATES if r >= sample_rate), MP3_SAMPLE_RATES[-1])
            floats = audio.astype(np.float32) / 32768.0 if audio.dtype == np.int16 else audio
            audio, sample_rate = resample(floats, sample_rate, target), target
        # through a file object: the path may be a temporary name without the .mp3 suffix
        with open(path, "wb") as f, AudioFile(f, "w", sample_rate, 1, quality=MP3_QUALITY, format="mp3") as mp3:
            mp3.write(audio[None, :])  # (channels, samples)
        return sample_rate
    sf.write(path, audio, sample_rate, subtype="PCM_16", format=fmt.upper())
    return sample_rate
