"""One conversion, stage by stage, as the reference pipeline does it.

    16 kHz mono → peak limit 0.95 → 48 Hz high-pass → reflect pad → f0 of the whole padded
    signal → split at quiet points into chunks → per chunk: content features → index blend →
    ×2 to 100 fps → protect → synthesizer → trim the padding → join → RMS mix.

The stages are separate functions so the service can run them on separate replicas and the
result is the same as `Converter.convert` for the same input, parameters and seed.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import audio as audio_io
from .batching import batches_by_length, halving_on_device_oom, max_padding
from .hubert import Hubert, HubertConfig, content_features, load_hubert
from .index import RetrievalIndex, blend, blend_on_device
from .memory import model_pass, to_device
from .pitch import CREPE_METHODS, HOST_METHODS, PitchModels, PitchRequest, finish_pitch, pitch_tracks_batch
from .pitch_methods import HOP_LENGTH
from .synthesizer import SynthNoise, Voice, compile_pointwise, resblock_precision

SR = audio_io.SAMPLE_RATE
MIN_INPUT_SAMPLES = HOP_LENGTH  # 10 ms: anything shorter has no frame to convert


@dataclass(frozen=True)
class ChunkingConfig:
    """Seconds; the reference's fp32/CPU values. x_pad is the context each chunk gets on both
    sides, chunks are cut near multiples of x_center at the quietest point within ±x_query,
    and only inputs longer than x_max are cut at all."""

    x_pad: int = 1
    x_query: int = 6
    x_center: int = 38
    x_max: int = 41

    def __post_init__(self) -> None:
        if not (0 < self.x_pad and 0 < self.x_query < self.x_center <= self.x_max):
            raise ValueError(f"invalid chunking {self}: need 0 < x_pad, 0 < x_query < x_center <= x_max")


@dataclass(frozen=True)
class ConversionParams:
    index_rate: float = 0.76
    rms_mix_rate: float = 1.0
    filter_radius: int = 3
    protect: float = 0.33
    f0_up_key: int = 0
    f0_method: str = "crepe"
    seed: int = 0
    sid: int = 0

    def __post_init__(self) -> None:
        checks = {
            "index_rate": 0 <= self.index_rate <= 1,
            "rms_mix_rate": 0 <= self.rms_mix_rate <= 1,
            "filter_radius": 0 <= self.filter_radius <= 7,
            "protect": 0 <= self.protect <= 0.5,
            "f0_up_key": -24 <= self.f0_up_key <= 24,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"out of range: {', '.join(bad)}")


@dataclass(frozen=True)
class ChunkSpec:
    """A chunk of `audio_pad[start:end]` and its f0 frames `[f0_start:f0_end]` (None = to the end)."""

    start: int
    end: int | None
    f0_start: int
    f0_end: int | None


@dataclass
class PreparedInput:
    audio_pad: np.ndarray  # [L + 2·t_pad] float64, the high-passed input reflect-padded
    p_len: int  # f0 frames of audio_pad
    chunks: list[ChunkSpec]
    t_pad: int  # padding in 16 kHz samples

    @property
    def audio_hp(self) -> np.ndarray:
        """[L] the high-passed input itself (a view: long files are held once)."""
        return self.audio_pad[self.t_pad:self.audio_pad.shape[0] - self.t_pad]


def prepare_input(audio16k: np.ndarray, chunking: ChunkingConfig = ChunkingConfig()) -> PreparedInput:
    if audio16k.ndim != 1:
        raise ValueError(f"expected mono audio, got shape {audio16k.shape}")
    if audio16k.shape[0] < MIN_INPUT_SAMPLES:
        raise ValueError(f"input too short: {audio16k.shape[0]} samples at 16 kHz, need {MIN_INPUT_SAMPLES}")
    audio_hp = audio_io.high_pass(audio_io.peak_limit(audio16k))
    t_pad = SR * chunking.x_pad
    audio_pad = np.pad(audio_hp, (t_pad, t_pad), mode="reflect")
    chunks = []
    start = 0
    split = None
    for point in split_points(audio_hp, chunking):
        split = point // HOP_LENGTH * HOP_LENGTH
        end = split + 2 * t_pad
        chunks.append(ChunkSpec(start, end + HOP_LENGTH, start // HOP_LENGTH, end // HOP_LENGTH))
        start = split
    if split is None:
        chunks.append(ChunkSpec(0, None, 0, None))
    else:
        chunks.append(ChunkSpec(split, None, split // HOP_LENGTH, None))
    return PreparedInput(audio_pad, audio_pad.shape[0] // HOP_LENGTH, chunks, t_pad)


def split_points(audio_hp: np.ndarray, chunking: ChunkingConfig) -> list[int]:
    """The reference's cut points: near every multiple of x_center, the first minimum of the
    160-sample sum of |x| within ±x_query. Only the searched windows are summed, in the
    reference's order, so the chosen points are identical at a fraction of the cost."""
    n = audio_hp.shape[0]
    if n + HOP_LENGTH <= SR * chunking.x_max:
        return []
    t_query, t_center = SR * chunking.x_query, SR * chunking.x_center
    padded = np.pad(audio_hp, (HOP_LENGTH // 2, HOP_LENGTH // 2), mode="reflect")
    points = []
    for t in range(t_center, n, t_center):
        lo, hi = t - t_query, min(t + t_query, n)
        window_sum = np.zeros(hi - lo)
        for i in range(HOP_LENGTH):
            window_sum += np.abs(padded[lo + i:hi + i])
        points.append(lo + int(np.argmin(window_sum)))
    return points


def dither_for(seed: int, frames: int) -> np.ndarray:
    """crepe's ±20-cent triangular dither for `frames` f0 frames of a whole file.

    Drawn from our own generator seeded with `seed`, as scipy's `triang(c=0.5, loc=-20,
    scale=40)` draws it: the values a reference run gets after `np.random.seed(seed)`. Frame i
    always gets the same value, so pieces of a file computed apart reproduce the whole track."""
    return np.random.RandomState(seed).triangular(0.0, 0.5, 1.0, frames) * 40.0 + -20.0


def chunk_p_len(chunk_samples: int) -> int:
    """Frames the synthesizer makes for a chunk: the f0 frames, cut to twice the content frames."""
    return min(chunk_samples // HOP_LENGTH, 2 * HubertConfig().num_frames(chunk_samples))


def chunk_noise(seed: int, preceding_chunks: Sequence[int], voice: Voice) -> SynthNoise:
    """The synthesizer's random draws for a chunk that follows chunks of `preceding_chunks`
    samples, as `Converter.convert` draws them for the whole file: one CPU generator seeded with
    `seed`, chunk after chunk, which is also what a reference run gets after
    `torch.manual_seed(seed)`. The earlier chunks' draws are replayed (a few ms per minute of
    audio) so any replica can synthesize any chunk with the same result."""
    noise = SynthNoise.from_generator(torch.Generator().manual_seed(seed))
    for samples in preceding_chunks:
        draw_chunk_noise(noise, samples, voice)
    return noise


def draw_chunk_noise(noise: SynthNoise, chunk_samples: int, voice: Voice) -> SynthNoise:
    """The next chunk's draws from the stream `noise`, made now: a pass that drew as it went would
    keep the GPU waiting on the host's generator twice per chunk; drawn beforehand (outside the
    batch), they are only copied."""
    p_len = chunk_p_len(chunk_samples)
    prior = noise.prior(torch.empty(1, voice.config.inter_channels, p_len))
    source = noise.source(torch.empty(1, p_len * voice.upsample_factor, 1)) if voice.f0 else None
    return SynthNoise.injected(prior, source)


def estimate_input_pitch(prepared: PreparedInput, params: ConversionParams,
                         models: PitchModels) -> tuple[np.ndarray, np.ndarray]:
    """(coarse [p_len] int64, pitchf [p_len] float32) over the whole padded input."""
    return estimate_input_pitch_batch([(prepared, params)], models)[0]


def input_pitch_request(prepared: PreparedInput, params: ConversionParams) -> PitchRequest:
    """The pitch estimation of a whole padded input, dithered from the job's seed (crepe's)."""
    dither = (dither_for(params.seed, prepared.audio_pad.shape[0] // HOP_LENGTH + 1)
              if params.f0_method in CREPE_METHODS else None)
    return PitchRequest(prepared.audio_pad, prepared.p_len, params.f0_up_key, params.filter_radius, dither)


def per_group(keys: Sequence, run: Callable[[object, list[int]], Sequence]) -> list:
    """Results of a batch of calls in call order, computed group by group: `run(key, indices)`
    returns the results of the calls at `indices`, which share `key` (a method, a length, a voice).
    A group that runs out of device memory runs again in halves (`halving_on_device_oom`)."""
    out = [None] * len(keys)
    for key in dict.fromkeys(keys):
        mine = [i for i, k in enumerate(keys) if k == key]
        for i, result in zip(mine, halving_on_device_oom(lambda indices: run(key, indices), mine)):
            out[i] = result
    return out


def estimate_input_pitch_batch(inputs: Sequence[tuple[PreparedInput, ConversionParams]],
                               models: PitchModels) -> list[tuple[np.ndarray, np.ndarray]]:
    """`estimate_input_pitch` of several inputs; those of one f0 method run together."""
    tracks = input_pitch_tracks_batch(inputs, models)
    return [finish_input_pitch(track, *item) for item, track in zip(inputs, tracks)]


def finish_input_pitch(track: np.ndarray, prepared: PreparedInput,
                       params: ConversionParams) -> tuple[np.ndarray, np.ndarray]:
    """(coarse, pitchf) of an input's f0 track: the job's filter radius and key, cut to p_len
    (`finish_pitch`; no dither is drawn, the track has it already)."""
    return finish_pitch(track, PitchRequest(prepared.audio_pad, prepared.p_len, params.f0_up_key,
                                            params.filter_radius))


def input_pitch_tracks_batch(inputs: Sequence[tuple[PreparedInput, ConversionParams]],
                             models: PitchModels) -> list[np.ndarray]:
    """The f0 tracks of whole padded inputs before `finish_pitch` (the job's filter radius and
    key; `finish_input_pitch`): what depends only on the audio, the f0 method and the seed. One
    method's run together."""
    return per_group([params.f0_method for _, params in inputs], lambda method, mine: pitch_tracks_batch(
        [input_pitch_request(*inputs[i]) for i in mine], method, models))


@torch.inference_mode()
def chunk_features(hubert: Hubert, chunk_audio: np.ndarray, version: str) -> torch.Tensor:
    """Content features [T50, C] float32 of one chunk of audio_pad (float64 → float32 as the reference)."""
    return chunk_features_batch(hubert, [chunk_audio], version)[0]


# 160 s of audio per HuBERT batch (16 chunks of 10 s, or 3 of the longest, 46 s): the first
# convolution's output, 512 channels at 3,200 frames per second, is ~1 GB of fp32 for 160 s, and
# its normalisation and GELU make two more at once (the attention keeps no [T, T] scores).
FEATURE_BATCH_SAMPLES = 160 * SR


@torch.inference_mode()
def chunk_features_batch(hubert: Hubert, chunks: Sequence[np.ndarray], version: str,
                         max_batch: int = 16) -> list[torch.Tensor]:
    """`chunk_features` of several chunks, as batches (`pipeline.batching`: on GPUs of different
    lengths, zero-padded with each chunk's padding masked out, on CPUs of equal lengths) of at
    most FEATURE_BATCH_SAMPLES padded samples."""
    device = next(hubert.parameters()).device
    lengths = [chunk.shape[0] for chunk in chunks]
    out: list[torch.Tensor | None] = [None] * len(chunks)
    for batch in batches_by_length(lengths, max_batch, max_padding(device), FEATURE_BATCH_SAMPLES):
        longest = lengths[batch[0]]
        wav = np.stack([np.pad(chunks[i], (0, longest - lengths[i])) for i in batch])
        mine = [lengths[i] for i in batch]
        feats = content_features(hubert, to_device(wav, device, torch.float32), version,
                                 None if min(mine) == longest else mine)
        for i, f in zip(batch, feats.float().unbind()):  # [B, T50, C] -> B × [T50, C]
            out[i] = f[:hubert.config.num_frames(lengths[i])]
    return out


def retrieve(feats: torch.Tensor, index: RetrievalIndex | None, params: ConversionParams) -> torch.Tensor:
    """Blend content features [T50, C] with the voice's retrieved training features: by faiss on
    CPUs (2.6x faster there than the torch search), on the features' GPU otherwise."""
    if index is None or params.index_rate == 0:
        return feats
    if feats.device.type != "cpu":
        return blend_on_device(feats, index, params.index_rate)
    return torch.from_numpy(blend(feats.numpy(), index, params.index_rate))


@dataclass
class ChunkSynthesis:
    """One chunk's synthesizer inputs: index-blended features `feats` [T50, C], the features
    before the blend `feats0` (for protect), its f0 slices (f0 voices) and its random draws."""

    feats: torch.Tensor
    feats0: torch.Tensor
    coarse: np.ndarray | None
    pitchf: np.ndarray | None
    chunk_samples: int
    params: ConversionParams
    noise: SynthNoise


def chunk_synthesis(voice: Voice, index: RetrievalIndex | None, feats0: torch.Tensor, coarse: np.ndarray | None,
                    pitchf: np.ndarray | None, chunk_samples: int, preceding_chunks: Sequence[int],
                    params: ConversionParams) -> ChunkSynthesis:
    """A chunk's synthesizer inputs, ready for a batch: features [T50, C] on the voice's device
    blended with its index, and the chunk's draws (`chunk_noise`) made now."""
    return ChunkSynthesis(retrieve(feats0, index, params), feats0, coarse, pitchf, chunk_samples, params,
                          draw_chunk_noise(chunk_noise(params.seed, preceding_chunks, voice), chunk_samples, voice))


def _synth_inputs(voice: Voice, item: ChunkSynthesis) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """phone [p_len, C], pitch [p_len], nsff0 [p_len] at 100 fps for one chunk."""
    device = item.feats.device
    # nearest ×2: each 20 ms vector covers two 10 ms f0 frames
    feats = item.feats.repeat_interleave(2, dim=0)
    p_len = min(item.chunk_samples // HOP_LENGTH, feats.shape[0])
    feats = feats[:p_len]
    if not voice.f0:
        return feats, None, None
    pitch = to_device(np.ascontiguousarray(item.coarse[:p_len]), device)
    nsff0 = to_device(np.ascontiguousarray(item.pitchf[:p_len]), device)
    if item.params.protect < 0.5:
        feats0 = item.feats0.repeat_interleave(2, dim=0)[:p_len]
        # the reference sets voiced frames (f0 > 0) to 1, then every f0 < 1 to protect
        weight = torch.where(nsff0 < 1, item.params.protect, 1.0)[:, None]
        feats = feats * weight + feats0 * (1 - weight)
    return feats, pitch, nsff0


@torch.inference_mode()
def synthesize_chunks(voice: Voice, items: Sequence[ChunkSynthesis], trim: int) -> list[np.ndarray]:
    """Synthesize chunks of one voice as one batch (padded to the longest); returns each chunk's
    float32 audio at the voice's rate with `trim` samples (the padding) cut from both ends, the
    same as synthesizing it alone."""
    inputs = [_synth_inputs(voice, item) for item in items]
    lengths = [phone.shape[0] for phone, _, _ in inputs]
    t = max(lengths)

    def batch(k: int) -> torch.Tensor | None:
        if inputs[0][k] is None:
            return None
        return torch.stack([F.pad(x[k], (0, 0, 0, t - n) if k == 0 else (0, t - n)) for x, n in zip(inputs, lengths)])

    noise = items[0].noise if len(items) == 1 else SynthNoise.stacked([item.noise for item in items], lengths)
    upp = voice.upsample_factor
    trim_frames, trim_rest = divmod(trim, upp)
    rewind = noise.rewind_point()
    try:
        out = voice.model.infer(batch(0), batch(1), batch(2), sid=[item.params.sid for item in items],
                                noise=noise, lengths=lengths if len(items) > 1 else None,
                                trim_frames=trim_frames)  # [B, 1, (t − 2·trim_frames)·upp]
    except BaseException:
        rewind()  # the chunks tried again (halving_on_device_oom) draw what they would have
        raise
    out = out[:, 0].float().cpu().numpy()
    return [out[i, trim_rest:(n - 2 * trim_frames) * upp - trim_rest] for i, n in enumerate(lengths)]


def synthesize_chunk(voice: Voice, feats: torch.Tensor, feats0: torch.Tensor, coarse: np.ndarray | None,
                     pitchf: np.ndarray | None, chunk_samples: int, params: ConversionParams,
                     noise: SynthNoise, trim: int) -> np.ndarray:
    """`synthesize_chunks` of one chunk."""
    return synthesize_chunks(voice, [ChunkSynthesis(feats, feats0, coarse, pitchf, chunk_samples, params, noise)],
                             trim)[0]


RMS_BLOCK = 1 << 20  # output samples per block of the RMS mix: its memory is bounded by this, not the input


def change_rms(source: np.ndarray, source_rate: int, target: np.ndarray, target_rate: int,
               rate: float) -> np.ndarray:
    """Impose the input's loudness envelope on the output by (rms_in / rms_out)^(1 − rate).

    Envelopes are RMS over 1 s windows every 0.5 s (zero-padded, centred), each stretched
    linearly to the output length, as the reference's `change_rms` (float32, torch's linear
    interpolation); computed a block of output at a time so an hour of output needs no
    hour-long temporaries (the reference's way peaks at ~40 bytes per output sample)."""
    rms_in = torch.from_numpy(_frame_rms(source, source_rate // 2 * 2, source_rate // 2))
    rms_out = torch.from_numpy(_frame_rms(target, target_rate // 2 * 2, target_rate // 2))
    n = target.shape[0]
    mixed = np.empty_like(target)
    for start in range(0, n, RMS_BLOCK):
        stop = min(start + RMS_BLOCK, n)
        env_in = stretch_linear(rms_in, n, start, stop)
        env_out = torch.clamp_min(stretch_linear(rms_out, n, start, stop), 1e-6)
        gain = torch.pow(env_in, torch.tensor(1 - rate)) * torch.pow(env_out, torch.tensor(rate - 1))
        mixed[start:stop] = target[start:stop] * gain.numpy()
    return mixed


def stretch_linear(values: torch.Tensor, n: int, start: int, stop: int) -> torch.Tensor:
    """Samples [start, stop) of `F.interpolate(values[None, None], size=n, mode="linear")`
    for float32 `values` [m], without the other n − (stop − start).

    The same arithmetic as torch's CPU kernel, whose fused multiply-adds are emulated in
    float64 (a float32 product is exact there): source position scale·(i + ½) − ½ in float32,
    then w0·x0 + w1·x1 with w1·x1 rounded first. Plain float32 steps drift from torch's by up to
    5e-5 at an hour of 40 kHz output, whose positions float32 cannot hold exactly."""
    m = values.shape[0]
    scale = torch.tensor(m, dtype=torch.float32) / n
    position = torch.arange(start, stop, dtype=torch.int64).to(torch.float32) + 0.5
    position = (position.double() * scale.double() - 0.5).float().clamp_min(0)
    left = position.to(torch.int64).clamp_max(m - 1)
    right_weight = (position - left.to(torch.float32)).clamp(0, 1)
    right = torch.where(left < m - 1, left + 1, left)
    left_weight = 1 - right_weight
    return ((right_weight * values[right]).double() + left_weight.double() * values[left].double()).float()


def _frame_rms(y: np.ndarray, frame_length: int, hop_length: int) -> np.ndarray:
    """librosa's `feature.rms` (centred, zero-padded) a few frames at a time: each frame's
    squares are summed as librosa sums them, without all frames' squares at once (2× the
    signal)."""
    padded = np.pad(y, frame_length // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame_length)[::hop_length]
    step = max(1, RMS_BLOCK // frame_length)
    return np.concatenate([np.sqrt(np.mean(np.abs(frames[i:i + step]) ** 2, axis=-1))
                           for i in range(0, len(frames), step)])


def finish_output(pieces: list[np.ndarray], prepared: PreparedInput, params: ConversionParams,
                  sample_rate: int) -> np.ndarray:
    """Join the trimmed chunk outputs and apply the RMS mix; float32 at the voice's rate."""
    out = np.concatenate(pieces)
    if params.rms_mix_rate != 1:
        out = change_rms(prepared.audio_hp, SR, out, sample_rate, params.rms_mix_rate)
    return out


PRECISIONS = ("fp32", "fp16", "bf16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")


@contextmanager
def network_precision(device: torch.device | str, precision: str) -> Iterator[None]:
    """A context in which the networks run in `precision`; DSP and decoding keep their own
    float32/float64 (see crepe_f0). Measured errors: docs/performance.md.

    - fp32: exact. On CUDA true fp32: cuDNN's default TF32 convolutions flip rmvpe's voicing
      decisions (output error 0.45 relative on an H200, 1.1e-3 without TF32; bench/gpu.py).
    - fp16: CUDA only, every network under fp16 autocast but rmvpe's, which runs in float32
      whatever the caller's precision (`rmvpe.full_float32`: in fp16 it flipped a voicing
      decision, 2.4e-1); on CPUs the same as fp32. 4.4e-3 (crepe) and 6.0e-3 (rmvpe) on an H100
      in session 14; 1.6e-2 once with crepe in session 13 (docs/performance.md).
    - bf16: the synthesizer's residual-block convolutions in bfloat16 (`resblock_precision`),
      the rest fp32; for CPUs with AMX or AVX512-BF16, where synthesis is 2x faster (1.3e-3). bfloat16
      autocast of every network fails the 1e-2 bound (0.5-0.9), so it is not offered. Where the
      hardware has no bfloat16 arithmetic it runs as fp32.

    It is a `model_pass`: the memory passes free goes back to the kernel once none has run
    for a moment.
    """
    check_precision(precision)
    device = torch.device(device)
    with ExitStack() as stack:
        stack.enter_context(model_pass())
        if device.type == "cuda":
            if precision == "fp16":
                stack.enter_context(torch.autocast("cuda", dtype=torch.float16))
            else:
                stack.enter_context(torch.backends.cudnn.flags(enabled=True, allow_tf32=False))
        if precision == "bf16" and has_bf16_arithmetic(device):
            stack.enter_context(resblock_precision(torch.bfloat16))
        yield


def fastest_precision(device: torch.device | str) -> str:
    """The fastest precision within 1e-2 of fp32 on `device`: fp16 on CUDA, bf16 on CPUs with
    bfloat16 arithmetic, fp32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return "fp16"
    return "bf16" if has_bf16_arithmetic(device) else "fp32"


def has_bf16_arithmetic(device: torch.device) -> bool:
    """Whether bfloat16 convolutions run natively (not emulated, which is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(getattr(torch.cpu, check, lambda: False)()
               for check in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def runs_decoder_glue(device: torch.device | str, precision: str) -> bool:
    """Whether passes under `network_precision(device, precision)` run the decoder's mixed-dtype
    CPU glue (bf16 on a CPU with bfloat16 arithmetic), which `compile_decoder_glue` compiles."""
    device = torch.device(device)
    return device.type == "cpu" and precision == "bf16" and has_bf16_arithmetic(device)


def compile_decoder_glue(device: torch.device | str, precision: str) -> bool:
    """`synthesizer.compile_pointwise()` where the decoder's mixed-dtype glue runs
    (`runs_decoder_glue`); whether it did. For long-lived processes: seconds of compiling, then a
    faster synthesis. Raises as compile_pointwise does (the eager glue then stays)."""
    if not runs_decoder_glue(device, precision):
        return False
    compile_pointwise()
    return True


@dataclass(frozen=True)
class ConversionRequest:
    """One input of `Converter.convert_batch`: mono 16 kHz audio and how to convert it."""

    audio16k: np.ndarray
    voice: Voice
    index: RetrievalIndex | None
    params: ConversionParams = ConversionParams()


@dataclass
class Converter:
    """The models one conversion needs besides the voice: the content encoder and pitch models."""

    hubert: Hubert
    pitch_models: PitchModels
    chunking: ChunkingConfig = ChunkingConfig()
    precision: str = "fp32"  # of the networks: fp32, fp16 or bf16 (see network_precision)

    def __post_init__(self) -> None:
        check_precision(self.precision)

    @classmethod
    def from_paths(cls, hubert_path: str | Path, rmvpe_path: str | Path | None = None,
                   device: str | torch.device = "cpu", chunking: ChunkingConfig = ChunkingConfig(),
                   precision: str = "fp32") -> "Converter":
        check_precision(precision)  # before loading the models (__post_init__ checks again, cheaply)
        device = torch.device(device)
        return cls(load_hubert(hubert_path, device=device), PitchModels(device=device, rmvpe_path=rmvpe_path),
                   chunking, precision)

    @property
    def device(self) -> torch.device:
        return next(self.hubert.parameters()).device

    def _networks(self):
        return network_precision(self.device, self.precision)

    def convert(self, audio16k: np.ndarray, voice: Voice, index: RetrievalIndex | None,
                params: ConversionParams = ConversionParams(),
                progress: Callable[[int, int], None] | None = None,
                timings: dict[str, float] | None = None) -> np.ndarray:
        """Convert mono 16 kHz float audio; float32 output at `voice.sample_rate`.

        With the same seed this is the reference's output after seeding torch and numpy.
        `progress(done, total)` is called after each chunk; `timings` (if given) accumulates
        seconds per stage: prepare, pitch, features, retrieval, synthesis, finish (pm and harvest
        run in a thread while the chunks' features are computed ahead: their pitch time is the
        wait that was left)."""
        if index is not None and index.dim != voice.feature_dim:
            raise ValueError(f"index has {index.dim}-d vectors, the {voice.version} voice uses {voice.feature_dim}")
        clock = _StageClock(timings)
        with clock("prepare"):
            prepared = prepare_input(audio16k, self.chunking)
        pool = ThreadPoolExecutor(1)  # its thread starts only for a host pitch method
        try:
            return self._convert_prepared(prepared, voice, index, params, progress, clock, pool)
        finally:
            # A conversion that failed while pm or harvest ran raises now; the pitch thread ends
            # on its own (it cannot be stopped) and its result is dropped.
            pool.shutdown(wait=False, cancel_futures=True)

    def _convert_prepared(self, prepared: PreparedInput, voice: Voice, index: RetrievalIndex | None,
                          params: ConversionParams, progress: Callable[[int, int], None] | None,
                          clock: "_StageClock", pool: ThreadPoolExecutor) -> np.ndarray:
        pitch: Future | None = None
        coarse = pitchf = None
        if voice.f0 and params.f0_method in HOST_METHODS:
            # No network: it runs in `pool` while the next chunks' features are computed ahead.
            pitch = pool.submit(estimate_input_pitch, prepared, params, self.pitch_models)
        elif voice.f0:
            with clock("pitch"), self._networks():
                coarse, pitchf = estimate_input_pitch(prepared, params, self.pitch_models)

        def chunk_audio_of(i: int) -> np.ndarray:
            return prepared.audio_pad[prepared.chunks[i].start:prepared.chunks[i].end]

        def features_of(i: int) -> torch.Tensor:
            with clock("features"), self._networks():
                return chunk_features(self.hubert, chunk_audio_of(i), voice.version)

        ahead: dict[int, torch.Tensor] = {}  # chunks i+1.. whose features were computed early
        trim = voice.sample_rate * self.chunking.x_pad
        noise = chunk_noise(params.seed, [], voice)  # one stream, chunk after chunk
        pieces = []
        for i, chunk in enumerate(prepared.chunks):
            chunk_audio = chunk_audio_of(i)
            feats0 = ahead.pop(i) if i in ahead else features_of(i)
            if pitch is not None:
                while not pitch.done() and (j := i + 1 + len(ahead)) < len(prepared.chunks):
                    ahead[j] = features_of(j)
                with clock("pitch"):  # what is left of it
                    coarse, pitchf = pitch.result()
                pitch = None
            with clock("retrieval"):
                feats = retrieve(feats0, index, params)
            f0_slice = slice(chunk.f0_start, chunk.f0_end)
            with clock("synthesis"), self._networks():
                pieces.append(synthesize_chunk(
                    voice, feats, feats0,
                    coarse[f0_slice] if coarse is not None else None,
                    pitchf[f0_slice] if pitchf is not None else None,
                    chunk_audio.shape[0], params, draw_chunk_noise(noise, chunk_audio.shape[0], voice), trim))
            if progress is not None:
                progress(i + 1, len(prepared.chunks))
        with clock("finish"):
            return finish_output(pieces, prepared, params, voice.sample_rate)

    def convert_batch(self, requests: Sequence[ConversionRequest], max_batch: int = 16,
                      max_batch_seconds: float = 240.0,
                      timings: dict[str, float] | None = None) -> list[np.ndarray]:
        """Convert several inputs together, each output equal to its `convert` output: content
        features of chunks (see chunk_features_batch) and the synthesis of chunks that share a voice run as
        batches of up to `max_batch` chunks and `max_batch_seconds` of padded audio (which bounds
        the decoder's memory: about 0.1 GB per second in fp32). The GPU's throughput mode; on the
        CPU batching gains little. `timings` as in `convert`, the chunks' noise draws in
        retrieval (in `convert` they are in synthesis)."""
        clock = _StageClock(timings)
        for r in requests:
            if r.index is not None and r.index.dim != r.voice.feature_dim:
                raise ValueError(f"index has {r.index.dim}-d vectors, the {r.voice.version} voice uses "
                                 f"{r.voice.feature_dim}")
        with clock("prepare"):
            prepared = [prepare_input(r.audio16k, self.chunking) for r in requests]
        pitches: list[tuple[np.ndarray | None, np.ndarray | None]] = [(None, None)] * len(requests)
        voiced = [i for i, r in enumerate(requests) if r.voice.f0]
        with clock("pitch"), self._networks():
            tracks = estimate_input_pitch_batch([(prepared[i], requests[i].params) for i in voiced], self.pitch_models)
        for i, track in zip(voiced, tracks):
            pitches[i] = track
        # every chunk of every request: (request, chunk number, audio)
        chunks = [(ri, ci, p.audio_pad[c.start:c.end])
                  for ri, p in enumerate(prepared) for ci, c in enumerate(p.chunks)]
        feats0: dict[tuple[int, int], torch.Tensor] = {}
        for version in {r.voice.version for r in requests}:
            mine = [(ri, ci, a) for ri, ci, a in chunks if requests[ri].voice.version == version]
            with clock("features"), self._networks():
                for (ri, ci, _), f in zip(mine, chunk_features_batch(self.hubert, [a for _, _, a in mine], version,
                                                                        max_batch)):
                    feats0[ri, ci] = f
        items: dict[tuple[int, int], ChunkSynthesis] = {}
        with clock("retrieval"):
            for ri, ci, a in chunks:
                r, spec = requests[ri], prepared[ri].chunks[ci]
                coarse, pitchf = pitches[ri]
                f0_slice = slice(spec.f0_start, spec.f0_end)
                preceding = [c.end - c.start for c in prepared[ri].chunks[:ci]]  # never the open-ended last
                items[ri, ci] = chunk_synthesis(
                    r.voice, r.index, feats0[ri, ci],
                    coarse[f0_slice] if coarse is not None else None,
                    pitchf[f0_slice] if pitchf is not None else None,
                    a.shape[0], preceding, r.params)
        pieces: dict[tuple[int, int], np.ndarray] = {}
        for voice_id in {id(r.voice) for r in requests}:
            # longest first, so each batch pads its chunks to similar lengths
            mine = sorted((key for key in items if id(requests[key[0]].voice) == voice_id),
                          key=lambda key: -items[key].chunk_samples)
            voice = requests[mine[0][0]].voice
            trim = voice.sample_rate * self.chunking.x_pad
            max_items = lambda longest: min(max_batch, max(1, int(max_batch_seconds * SR // longest)))  # noqa: E731
            groups, start = [], 0
            while start < len(mine):
                n = max_items(items[mine[start]].chunk_samples)
                groups.append(mine[start:start + n])
                start += n
            for group in groups:
                with clock("synthesis"), self._networks():
                    for key, out in zip(group, synthesize_chunks(voice, [items[k] for k in group], trim)):
                        pieces[key] = out
        with clock("finish"):
            return [finish_output([pieces[ri, ci] for ci in range(len(p.chunks))], p, r.params, r.voice.sample_rate)
                    for ri, (r, p) in enumerate(zip(requests, prepared))]


class _StageClock:
    """Adds each stage's wall time to a dict, synchronising CUDA so GPU time lands in its stage."""

    def __init__(self, timings: dict[str, float] | None):
        self.timings = timings

    @contextmanager
    def __call__(self, stage: str):
        if self.timings is None:
            yield
            return
        started = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - started
