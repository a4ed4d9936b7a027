"""RVC voice synthesizer (VITS-style text encoder → prior → reverse flow → NSF-HiFi-GAN) and its
`.pth` voice files.

Module and parameter names reproduce the reference's state-dict keys exactly (`emb_g`, `enc_p`,
`flow.flows.{0,2,4,6}`, `dec`, weight norm as `weight_g`/`weight_v`), so real voice files load
with strict checking; the training-only posterior encoder `enc_q` is not built. A file pipeline
synthesizes one chunk at a time at its full length, so the reference's padding masks are all ones
and are left out here (multiplying by one changes nothing).
"""
from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.assets import AssetError, torch_load_checked
from pipeline.memory import to_device

LRELU_SLOPE = 0.1
PRIOR_NOISE_SCALE = 0.66666  # the reference's sampling temperature of the prior
SINE_AMP = 0.1
NSF_NOISE_STD = 0.003  # voiced; unvoiced samples get SINE_AMP / 3
ATTENTION_WINDOW = 10  # relative positions −10..10 have an embedding
FLOW_KERNEL, FLOW_LAYERS, FLOW_COUPLINGS = 5, 3, 4
CPU_DECODE_SEGMENT_FRAMES = 400  # 4 s (measured: 200 and 1000 are slower)
FEATURE_DIM = {"v1": 256, "v2": 768}
_RATE_NAMES = {"32k": 32000, "40k": 40000, "48k": 48000}
_APPLIO_WEIGHT_NORM = {".parametrizations.weight.original0": ".weight_g",
                       ".parametrizations.weight.original1": ".weight_v"}


@dataclass(frozen=True)
class SynthesizerConfig:
    """The 18-element `config` list of a voice file, in file order."""

    spec_channels: int  # only used by the training-time posterior encoder
    segment_size: int  # training only
    inter_channels: int
    hidden_channels: int
    filter_channels: int
    n_heads: int
    n_layers: int
    kernel_size: int
    p_dropout: float
    resblock: str  # "1" or "2"
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    upsample_rates: tuple[int, ...]
    upsample_initial_channel: int
    upsample_kernel_sizes: tuple[int, ...]
    spk_embed_dim: int
    gin_channels: int
    sample_rate: int

    @classmethod
    def from_list(cls, config: list | tuple) -> SynthesizerConfig:
        if not isinstance(config, (list, tuple)) or len(config) != 18:
            raise AssetError(f"config must be a list of 18 values, got {config!r:.200}")
        c = list(config)
        try:
            sample_rate = _RATE_NAMES[c[17]] if isinstance(c[17], str) else int(c[17])
            parsed = cls(
                *(int(v) for v in c[:8]), float(c[8]), str(c[9]),
                tuple(int(v) for v in c[10]), tuple(tuple(int(d) for d in ds) for ds in c[11]),
                tuple(int(v) for v in c[12]), int(c[13]), tuple(int(v) for v in c[14]),
                int(c[15]), int(c[16]), sample_rate)
        except (TypeError, ValueError, KeyError) as e:
            raise AssetError(f"config has a value of the wrong type ({e}): {config!r:.200}") from None
        if parsed.resblock not in ("1", "2"):
            raise AssetError(f"config resblock must be '1' or '2', got {parsed.resblock!r}")
        return parsed

    @property
    def upsample_factor(self) -> int:
        """Output samples per 10 ms frame."""
        return math.prod(self.upsample_rates)

    @property
    def decoder_stage_margins(self) -> tuple[int, ...]:
        """For each upsampling stage, how many of its output samples on each side of those the
        kept output stands on the later stages read (an upper bound, see `_decoder_reach`)."""
        return tuple(math.ceil(margin) + 1 for margin in self._decoder_reach()[:-1])

    @property
    def decoder_context_frames(self) -> int:
        """How many frames of the decoder's input on each side an output frame depends on (an
        upper bound, see `_decoder_reach`)."""
        return math.ceil(self._decoder_reach()[-1] + 3) + 1  # + conv_pre (kernel 7)

    def _decoder_reach(self) -> list[float]:
        """How far the decoder's later convolutions read: after each upsampling stage in its
        output samples, and last in frames before the first stage. From conv_post (kernel 7)
        back through each stage: its residual blocks and source conv (+ 2), then its transposed
        conv, into the stage's input samples."""
        reach = max(_resblock_reach(self.resblock, k, ds)
                    for k, ds in zip(self.resblock_kernel_sizes, self.resblock_dilation_sizes))
        margins = [3.0]  # built from the last stage back
        for rate, kernel in zip(reversed(self.upsample_rates), reversed(self.upsample_kernel_sizes)):
            margins.append((margins[-1] + reach + 2) / rate + math.ceil(kernel / rate))
        return margins[-2::-1] + margins[-1:]


def _resblock_reach(kind: str, kernel: int, dilations: Sequence[int]) -> int:
    """Samples on each side that one residual block's output depends on."""
    half = (kernel - 1) // 2 + 1
    if kind == "1":  # each dilated conv is followed by an undilated one
        return sum(half * d + half for d in dilations)
    return sum(half * d for d in dilations[:2])


# ---------------------------------------------------------------------------------------------
# weight norm under the legacy names that voice files use
# ---------------------------------------------------------------------------------------------

def _weight_norm(module: nn.Module) -> nn.Module:
    """Store `module.weight` as `weight_g` (norm over all dims but 0) and `weight_v`, recomputed
    before every forward: the layout of the reference's `torch.nn.utils.weight_norm` (deprecated
    in torch, and with a different key layout in its replacement)."""
    weight = module.weight.detach()
    del module.weight
    # g is always loaded from a file; 1 keeps a fresh module valid without a norm on meta tensors
    module.weight_g = nn.Parameter(weight.new_ones((weight.shape[0],) + (1,) * (weight.dim() - 1)))
    module.weight_v = nn.Parameter(weight)
    module._weight_norm_hook = module.register_forward_pre_hook(_set_normed_weight)
    return module


def _normed_weight(module: nn.Module) -> Tensor:
    # the kernel torch's weight-norm hooks use, so folded and per-forward weights agree bitwise
    return torch._weight_norm(module.weight_v, module.weight_g, 0)


def _set_normed_weight(module: nn.Module, _inputs) -> None:
    module.weight = _normed_weight(module)


def _weight(module: nn.Module) -> Tensor:
    """The module's weight, folded or not (for callers that bypass its forward and its hook)."""
    return _normed_weight(module) if "weight_v" in module._parameters else module.weight


def _fold_weight_norm(module: nn.Module) -> None:
    weight = _normed_weight(module).detach()
    module._weight_norm_hook.remove()
    del module._weight_norm_hook, module.weight_g, module.weight_v
    module.__dict__.pop("weight", None)
    module.weight = nn.Parameter(weight, requires_grad=False)


# ---------------------------------------------------------------------------------------------
# text encoder (enc_p)
# ---------------------------------------------------------------------------------------------

def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    """x [B, C, T] with the padding of shorter batch items zeroed (mask [B, 1, T]); a lone item
    has no padding and no mask."""
    return x if mask is None else x * mask


def _embedding(num: int, dim: int) -> nn.Embedding:
    # without nn.Embedding's random init: on meta tensors it imports sympy (seconds, first call)
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of [B, C, T]."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.transpose(1, -1), self.gamma.shape, self.gamma, self.beta, self.eps)
        return x.transpose(1, -1)


class RelativeSelfAttention(nn.Module):
    """Multi-head self-attention with learned relative-position terms for keys and values
    (offsets within ±window, one table shared by all heads)."""

    def __init__(self, channels: int, n_heads: int, window: int = ATTENTION_WINDOW):
        super().__init__()
        self.n_heads, self.window = n_heads, window
        head_dim = channels // n_heads
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, channels, 1)
        self.emb_rel_k = nn.Parameter(torch.zeros(1, 2 * window + 1, head_dim))
        self.emb_rel_v = nn.Parameter(torch.zeros(1, 2 * window + 1, head_dim))

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:  # [B, C, T], [B, 1, T]
        b, c, t = x.shape
        w = self.window

        def heads(y: Tensor) -> Tensor:  # [B, C, T] -> [B, H, T, C/H]
            return y.view(b, self.n_heads, c // self.n_heads, t).transpose(2, 3)

        q = heads(self.conv_q(x)) / math.sqrt(c // self.n_heads)
        k, v = heads(self.conv_k(x)), heads(self.conv_v(x))
        scores = q @ k.transpose(-2, -1)  # [B, H, T, T]
        # Only offsets within the window carry a relative term: add them diagonal by diagonal
        # instead of building the reference's [T, 2T−1] relative matrices (same values).
        offsets = range(-min(w, t - 1), min(w, t - 1) + 1)
        rel_logits = q @ self.emb_rel_k.transpose(-2, -1)  # [B, H, T, 2w+1]
        for o in offsets:
            rows = slice(max(0, -o), t - max(0, o))
            scores.diagonal(o, -2, -1).add_(rel_logits[..., rows, o + w])
        if key_mask is not None:  # padding of a shorter item in a batch: the reference's -1e4 fill
            scores = scores.masked_fill(key_mask[:, None] == 0, -1e4)
        p = torch.softmax(scores, dim=-1)
        rel_p = p.new_zeros(b, self.n_heads, t, 2 * w + 1)  # p regrouped by offset
        for o in offsets:
            rel_p[..., max(0, -o):t - max(0, o), o + w] = p.diagonal(o, -2, -1)
        out = p @ v + rel_p @ self.emb_rel_v  # [B, H, T, C/H]
        return self.conv_o(out.transpose(2, 3).reshape(b, c, t))


class FeedForward(nn.Module):
    def __init__(self, channels: int, filter_channels: int, kernel_size: int):
        super().__init__()
        self.conv_1 = nn.Conv1d(channels, filter_channels, kernel_size, padding="same")
        self.conv_2 = nn.Conv1d(filter_channels, channels, kernel_size, padding="same")

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return _masked(self.conv_2(_masked(torch.relu(self.conv_1(_masked(x, mask))), mask)), mask)


class Encoder(nn.Module):
    """Post-LN transformer encoder on [B, C, T]."""

    def __init__(self, config: SynthesizerConfig):
        super().__init__()
        h = config.hidden_channels
        self.attn_layers = nn.ModuleList(RelativeSelfAttention(h, config.n_heads) for _ in range(config.n_layers))
        self.norm_layers_1 = nn.ModuleList(ChannelLayerNorm(h) for _ in range(config.n_layers))
        self.ffn_layers = nn.ModuleList(FeedForward(h, config.filter_channels, config.kernel_size)
                                        for _ in range(config.n_layers))
        self.norm_layers_2 = nn.ModuleList(ChannelLayerNorm(h) for _ in range(config.n_layers))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = _masked(x, mask)
        for attn, norm_1, ffn, norm_2 in zip(self.attn_layers, self.norm_layers_1, self.ffn_layers, self.norm_layers_2):
            x = norm_1(x + attn(x, mask))
            x = norm_2(x + ffn(x, mask))
        return _masked(x, mask)


class TextEncoder(nn.Module):
    """Content features (+ coarse pitch) → prior mean and log-scale, each [B, inter, T]."""

    def __init__(self, config: SynthesizerConfig, feature_dim: int, f0: bool):
        super().__init__()
        self.emb_phone = nn.Linear(feature_dim, config.hidden_channels)
        if f0:
            self.emb_pitch = _embedding(256, config.hidden_channels)
        self.encoder = Encoder(config)
        self.proj = nn.Conv1d(config.hidden_channels, 2 * config.inter_channels, 1)

    def forward(self, phone: Tensor, pitch: Tensor | None, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = self.emb_phone(phone)  # [B, T, H]
        if pitch is not None:
            x = x + self.emb_pitch(pitch)
        x = F.leaky_relu(x * math.sqrt(x.shape[-1]), LRELU_SLOPE)
        stats = _masked(self.proj(self.encoder(x.transpose(1, 2), mask)), mask)
        m, logs = stats.chunk(2, dim=1)
        return m, logs


# ---------------------------------------------------------------------------------------------
# flow
# ---------------------------------------------------------------------------------------------

class WaveNet(nn.Module):
    """Gated dilated-conv stack with speaker conditioning (the reference's `WN`, dilation 1)."""

    def __init__(self, channels: int, kernel_size: int, n_layers: int, gin_channels: int):
        super().__init__()
        self.channels = channels
        self.cond_layer = _weight_norm(nn.Conv1d(gin_channels, 2 * channels * n_layers, 1))
        self.in_layers = nn.ModuleList(
            _weight_norm(nn.Conv1d(channels, 2 * channels, kernel_size, padding=kernel_size // 2))
            for _ in range(n_layers))
        # the last layer only feeds the skip sum
        self.res_skip_layers = nn.ModuleList(
            _weight_norm(nn.Conv1d(channels, 2 * channels if i < n_layers - 1 else channels, 1))
            for i in range(n_layers))

    def forward(self, x: Tensor, g: Tensor, mask: Tensor | None = None) -> Tensor:
        c = self.channels
        cond = self.cond_layer(g).split(2 * c, dim=1)  # per layer [B, 2C, 1]
        skip = torch.zeros_like(x)
        last = len(self.in_layers) - 1
        for i, (in_layer, res_skip_layer) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            a = in_layer(x) + cond[i]
            y = res_skip_layer(torch.tanh(a[:, :c]) * torch.sigmoid(a[:, c:]))
            if i < last:
                x = _masked(x + y[:, :c], mask)
                skip = skip + y[:, c:]
            else:
                skip = skip + y
        return _masked(skip, mask)


class Coupling(nn.Module):
    """Mean-only affine coupling: the second half of the channels is shifted by a function of the
    first half."""

    def __init__(self, channels: int, hidden_channels: int, gin_channels: int):
        super().__init__()
        self.half = channels // 2
        self.pre = nn.Conv1d(self.half, hidden_channels, 1)
        self.enc = WaveNet(hidden_channels, FLOW_KERNEL, FLOW_LAYERS, gin_channels)
        self.post = nn.Conv1d(hidden_channels, self.half, 1)

    def reverse(self, x: Tensor, g: Tensor, mask: Tensor | None = None) -> Tensor:
        x0, x1 = x.split(self.half, dim=1)
        shift = _masked(self.post(self.enc(_masked(self.pre(x0), mask), g, mask)), mask)
        return torch.cat([x0, _masked(x1 - shift, mask)], dim=1)


class Flip(nn.Module):
    """Channel reversal between couplings (no parameters; it takes the odd `flows` slots)."""

    def reverse(self, x: Tensor, g: Tensor, mask: Tensor | None = None) -> Tensor:
        return torch.flip(x, [1])


class Flow(nn.Module):
    def __init__(self, config: SynthesizerConfig):
        super().__init__()
        self.flows = nn.ModuleList()
        for _ in range(FLOW_COUPLINGS):
            self.flows.append(Coupling(config.inter_channels, config.hidden_channels, config.gin_channels))
            self.flows.append(Flip())

    def reverse(self, z: Tensor, g: Tensor, mask: Tensor | None = None) -> Tensor:
        for flow in reversed(self.flows):
            z = flow.reverse(z, g, mask)
        return z


# ---------------------------------------------------------------------------------------------
# decoder (dec)
# ---------------------------------------------------------------------------------------------

_RESBLOCK_DTYPE: ContextVar[torch.dtype | None] = ContextVar("resblock_dtype", default=None)


@contextmanager
def resblock_precision(dtype: torch.dtype | None) -> Iterator[None]:
    """Within it, the decoder's residual-block convolutions (95 % of the synthesizer's FLOPs) take
    their inputs and weights in `dtype` (None: the model's own). With bfloat16 they run on the
    CPU's AMX units (about 4x the fp32 rate) and accumulate in fp32; the residual sums, the
    upsampling and the source convolutions stay fp32, which keeps the output within ~1.3e-3
    relative of fp32 (rounding the upsampling's inputs too costs 7e-3; docs/performance.md)."""
    token = _RESBLOCK_DTYPE.set(dtype)
    try:
        yield
    finally:
        _RESBLOCK_DTYPE.reset(token)


def _derived_weight(module: nn.Module, key: object, make: Callable[[Tensor], Tensor]) -> Tensor:
    """`make(_weight(module))`, made once per key and kept while the weight stays the same tensor
    unchanged (a weight-normed one is recomputed each call: nothing to keep; nor is an inference
    tensor's, which has no version to tell a change by)."""
    weight = _weight(module)
    if "weight_v" in module._parameters or weight.is_inference():
        return make(weight)
    cache = module.__dict__.setdefault("_derived_weights", {})
    stamp = (weight.data_ptr(), weight.dtype, weight.device, weight._version)
    hit = cache.get(key)
    if hit is None or hit[0] != stamp:
        hit = cache[key] = (stamp, make(weight))
    return hit[1]


def _weight_in(module: nn.Module, dtype: torch.dtype | None) -> Tensor:
    """`_weight(module)` in `dtype`."""
    weight = _weight(module)
    if dtype is None or dtype == weight.dtype:
        return weight
    return _derived_weight(module, dtype, lambda w: w.to(dtype))


# The decoder's pointwise glue on CPUs: converting a bfloat16 convolution's output into the
# fp32 residual sum, and a leaky ReLU of that sum into the next convolution's bfloat16 input.
# Eager torch takes two or three passes for each (a conversion copy, then a slow mixed-dtype or
# bfloat16 kernel); compiled by inductor each is one C++ loop, 4-5x faster, and a 10 s bf16
# synthesis on one thread takes ~2.1 s instead of ~2.6 (~40 % of it was this glue). Compiling
# takes seconds per process, so long-lived model processes opt in (`compile_pointwise`, through
# `convert.compile_decoder_glue`, which knows when the glue runs).

def _leaky_into(out: Tensor, x: Tensor, slope: float) -> None:
    """out = leaky_relu(x, slope), in out's dtype."""
    out.copy_(F.leaky_relu(x, slope))


def _add_converted(total: Tensor, y: Tensor) -> Tensor:
    return total + y.to(total.dtype)


def _add_converted_(total: Tensor, y: Tensor) -> Tensor:
    return total.add_(y.to(total.dtype))


_COMPILED: dict[Callable, Callable] = {}  # eager glue function -> its compiled version


def _flat(x: Tensor) -> Tensor | None:
    """The decoder's channels-last [1, C, L, 1] as the 1-D view of its memory ([L, C] rows: a
    crop along L is a contiguous range too), or None where it is not one block. The compiled
    glue sees only such views, so one compilation serves every stage, length and crop."""
    if x.dim() != 4 or x.shape[0] != 1 or x.shape[3] != 1:
        return None
    try:
        return x.permute(0, 2, 3, 1).view(-1)
    except RuntimeError:
        return None


def _compiled_glue(fn: Callable, *tensors: Tensor) -> tuple[Callable, list[Tensor]] | None:
    """fn's compiled version and flat views of `tensors`, when compiled and all are flat."""
    compiled = _COMPILED.get(fn)
    if compiled is None:
        return None
    flats = [_flat(t) for t in tensors]
    return None if any(f is None for f in flats) else (compiled, flats)


def compile_pointwise() -> None:
    """Compile the decoder's CPU pointwise glue (above) for this process and run each compiled
    function once (4-8 s, once per process). Raises where inductor cannot build its kernels (no
    C++ compiler, no writable cache directory): the eager functions then stay in use. Safe to
    call while other threads synthesize: they switch to the compiled functions once all are
    ready. TORCHDYNAMO_DISABLE=1 makes the compiled functions run eagerly."""
    if _COMPILED:
        return
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1  # three small kernels: no pool of compile workers
    # the kernels' threads follow torch's at each call (else fixed when compiled: with 2 threads
    # the compiled glue made a 10 s synthesis 1.37 -> 1.54 s, dynamic 1.21 s)
    inductor_config.cpp.dynamic_threads = True
    compiled = {fn: torch.compile(fn, dynamic=True, fullgraph=True)
                for fn in (_leaky_into, _add_converted, _add_converted_)}
    with torch.inference_mode():  # as the pipeline runs (grad mode is part of a compilation)
        whole = torch.randn(3 * 7 * 11)
        for x in (whole, whole[5:-9]):  # the decoder's crops are views at an offset
            y = x.to(torch.bfloat16)
            compiled[_leaky_into](torch.empty(x.shape[0] + 4, dtype=torch.bfloat16)[2:-2], x, LRELU_SLOPE)
            compiled[_add_converted_](compiled[_add_converted](x, y), y)
    _COMPILED.update(compiled)


def _residual_add(total: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """total + y in x's dtype, where total is x itself (left unmodified) or a sum made here
    (added into in place): a residual chain that allocates no buffer of its own beyond y's
    conversion. On CPUs y (a convolution's output) is converted first: torch's CPU add of mixed
    dtypes converts through a copy of its own and then takes a slower path (3x the time of both);
    CUDA adds mixed dtypes in one kernel. With `compile_pointwise()` a mixed CPU add is one loop."""
    if y.device.type == "cpu" and y.dtype != x.dtype:
        glue = _compiled_glue(_add_converted if total is x else _add_converted_, total, y)
        if glue is not None:
            compiled, (flat_total, flat_y) = glue
            if total is not x:
                compiled(flat_total, flat_y)
                return total
            b, c, n, w = total.shape
            return compiled(flat_total, flat_y).view(b, n, w, c).permute(0, 3, 1, 2)  # channels-last
    if y.device.type == "cpu":
        y = y.to(x.dtype)
    if total is not x:
        return total.add_(y)
    return y.add_(x) if y.dtype == x.dtype else x + y


def _mkldnn_layout(x: Tensor) -> bool:
    """Whether x's [B, C, L, 1] layout runs on mkldnn's kernels (CPUs) rather than torch's
    2-D convolutions (CUDA: cuDNN's NHWC kernels, see `Generator._decode`)."""
    return x.device.type == "cpu"


def _conv(conv: nn.Conv1d, x: Tensor, slope: float | None = None, dtype: torch.dtype | None = None,
          out_slope: float | None = None) -> Tensor:
    """`conv` of x [B, C, L] (after a leaky ReLU of `slope` if given, and followed by one of
    `out_slope` if given), or the same of x [B, C, L, 1] in channels-last layout (the decoder's
    layout on CPUs and CUDA, see `Generator._decode`), with input and weight in `dtype` if given (the
    output is then `dtype` too).

    Off the CPU that layout runs torch's 2-D convolution. On the CPU it is mkldnn's 2-D
    convolution, 1.2-2x faster than the 1-D convolution of [B, C, L] on the decoder's shapes, with
    the output's leaky ReLU fused into it (one pass less over the activations: 12 % of a bf16
    synthesis on one thread). A dilated convolution gets its input
    padded beforehand: mkldnn pads dilated ones 4-10x slower (an undilated one pads at full
    speed, so an input that needs no activation is read as it is); the activation is written
    straight into the padded input, whose margins alone are zeroed (F.pad would fill it whole and
    then copy)."""
    weight = _weight_in(conv, dtype)
    bias = None if conv.bias is None else conv.bias.to(weight.dtype)
    if x.dim() == 3:
        x = x if slope is None else F.leaky_relu(x, slope)
        out = conv._conv_forward(x if dtype is None else x.to(dtype), weight, bias)
        return out if out_slope is None else F.leaky_relu_(out, out_slope)
    (k,), (d,), (stride,) = conv.kernel_size, conv.dilation, conv.stride
    if conv.padding == "same":  # torch puts the odd one on the right
        left = d * (k - 1) // 2
        right = d * (k - 1) - left
    else:
        (left,) = (right,) = conv.padding
    if not _mkldnn_layout(x):
        x = x if slope is None else F.leaky_relu(x, slope)
        x = x if dtype is None else x.to(dtype)
        if left != right:
            x, left = F.pad(x, (0, 0, left, right)).contiguous(memory_format=torch.channels_last), 0
        weight_4d = _derived_weight(conv, ("channels_last", weight.dtype), lambda w: w.to(weight.dtype)[..., None]
                                    .contiguous(memory_format=torch.channels_last))
        out = F.conv2d(x, weight_4d, bias, (stride, 1), (left, 0), (d, 1))
        return out if out_slope is None else F.leaky_relu_(out, out_slope)
    if slope is None and d == 1 and left == right and x.dtype == weight.dtype:
        padded, padding = x, left
    else:
        b, c, n, _ = x.shape
        padded, padding = torch.empty((b, c, left + n + right, 1), dtype=weight.dtype, device=x.device,
                                      memory_format=torch.channels_last), 0
        padded[:, :, :left].zero_()
        padded[:, :, left + n:].zero_()
        inner = padded[:, :, left:left + n]
        glue = None if slope is None or x.dtype == padded.dtype else _compiled_glue(_leaky_into, inner, x)
        if glue is not None:
            compiled, (flat_inner, flat_x) = glue
            compiled(flat_inner, flat_x, slope)
        elif slope is None or x.dtype != padded.dtype:  # leaky_relu.out does not convert
            inner.copy_(x)
            if slope is not None:
                F.leaky_relu_(inner, slope)
        else:
            torch.ops.aten.leaky_relu.out(x, slope, out=inner)
    # the input's layout picks mkldnn's channels-last kernel; the weight's does not matter (measured)
    return torch.ops.mkldnn._convolution_pointwise(
        padded, weight[..., None], bias, [padding, 0], [stride, 1], [d, 1], 1,
        "none" if out_slope is None else "leaky_relu", [] if out_slope is None else [out_slope], "")


def _upsample(up: nn.ConvTranspose1d, x: Tensor, noise_conv: nn.Conv1d | None = None,
              source: Tensor | None = None) -> Tensor:
    """up(x), plus noise_conv(source) when given (source [B, 1, N] at the output rate): x [B, C, L]
    or x [B, C, L, 1] channels-last (the decoder's layout, see `_conv`), out in x's layout.

    On the CPU layout both are matrix products that write the output directly. mkldnn runs the
    decoder's transposed convolutions at 50-80 GFLOP/s and the 1-channel strided source
    convolutions at a few (then added in a pass of their own), where products reach the GEMM rate:
    each tap block of s input-to-output taps (s = stride) is one product of the input's
    [L, C_in] rows with that block's [C_in, s·C_out] weights, added into the output rows it
    reaches (overlap-add with the block's shift), and the source convolution is one product of
    its strided windows with [k, C_out], added into the output in place. Off the CPU that layout
    runs torch's transposed 2-D convolution."""
    if x.dim() == 3:
        out = up(x)
        return out if noise_conv is None else out.add_(_conv(noise_conv, source))
    (k,), (stride,), (pad,), (extra,) = up.kernel_size, up.stride, up.padding, up.output_padding
    if not _mkldnn_layout(x):
        weight = _derived_weight(up, "channels_last",
                                 lambda w: w[..., None].contiguous(memory_format=torch.channels_last))
        out = F.conv_transpose2d(x, weight, up.bias, (stride, 1), (pad, 0), (extra, 0))
        return out if noise_conv is None else out.add_(_conv(noise_conv, source[..., None]))
    b, c_in, n, _ = x.shape
    c_out = up.out_channels
    n_out = (n - 1) * stride - 2 * pad + k + extra
    rows = -(-max((n - 1) * stride + k, pad + n_out) // stride)  # of `stride` samples each
    # [C_in, C_out, k] -> [C_in, k·C_out], tap-major, so a block of taps is a column range
    taps = _derived_weight(up, "taps", lambda w: w.permute(0, 2, 1).reshape(c_in, k * c_out))
    bias = torch.zeros(c_out, dtype=x.dtype, device=x.device) if up.bias is None else up.bias
    if noise_conv is not None and noise_conv.bias is not None:
        bias = bias + noise_conv.bias
    out = bias.expand(b, rows * stride, c_out).contiguous()  # [B, samples, C]: channels-last memory
    rows_of = out.view(b, rows, stride * c_out)
    x_rows = x.permute(0, 2, 3, 1).reshape(b, n, c_in)  # a view of channels-last memory
    for item in range(b):
        for first in range(0, k, stride):
            width = min(stride, k - first) * c_out
            block = first // stride
            rows_of[item, block:block + n, :width].addmm_(x_rows[item], taps[:, first * c_out:first * c_out + width])
    out = out[:, pad:pad + n_out]
    if noise_conv is not None:
        (kn,), (sn,), (pn,) = noise_conv.kernel_size, noise_conv.stride, noise_conv.padding
        src = F.pad(source.reshape(b, -1), (pn, pn)) if pn else source.reshape(b, -1)
        windows = src.unfold(-1, kn, sn)[:, :n_out]  # [B, n_out, kn]
        weight = _derived_weight(noise_conv, "taps", lambda w: w[:, 0].T)  # [kn, C_out]
        for item in range(b):
            out[item].addmm_(windows[item], weight)
    out = out.permute(0, 2, 1)[..., None]  # [B, C, n_out, 1]
    return out if b == 1 else out.contiguous(memory_format=torch.channels_last)


class ResBlock1(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            _weight_norm(nn.Conv1d(channels, channels, kernel_size, dilation=d, padding="same")) for d in dilations)
        self.convs2 = nn.ModuleList(
            _weight_norm(nn.Conv1d(channels, channels, kernel_size, padding="same")) for _ in dilations)

    def forward(self, x: Tensor) -> Tensor:  # x is not modified (the stage's other blocks read it)
        dtype, total = _RESBLOCK_DTYPE.get(), x
        for c1, c2 in zip(self.convs1, self.convs2):
            activated = _conv(c1, total, LRELU_SLOPE, dtype, out_slope=LRELU_SLOPE)
            total = _residual_add(total, _conv(c2, activated, dtype=dtype), x)
        return total


class ResBlock2(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs = nn.ModuleList(
            _weight_norm(nn.Conv1d(channels, channels, kernel_size, dilation=d, padding="same"))
            for d in dilations[:2])

    def forward(self, x: Tensor) -> Tensor:  # x is not modified
        dtype, total = _RESBLOCK_DTYPE.get(), x
        for conv in self.convs:
            total = _residual_add(total, _conv(conv, total, LRELU_SLOPE, dtype), x)
        return total


def sine_excitation(f0: Tensor, upp: int, sample_rate: int) -> tuple[Tensor, Tensor]:
    """Sine at f0 held for `upp` samples per frame, and the voicing mask, each [B, T·upp].

    The phase of sample k = 1..upp of frame t is offset_t + k·f0_t/sr, where offset_t is the sum
    of the earlier frames' increments upp·f0/sr; increments are wrapped to [−0.5, 0.5) and sums
    to (−1, 1), so the float32 phase keeps its precision on long inputs (the reference's SineGen
    since Nov 2024)."""
    b, t = f0.shape
    ramp = (f0 / sample_rate)[..., None] * torch.arange(1, upp + 1, dtype=f0.dtype, device=f0.device)
    increments = torch.fmod(ramp[:, :-1, -1] + 0.5, 1.0) - 0.5  # [B, T−1] per-frame phase steps
    offsets = F.pad(increments.cumsum(dim=1).fmod(1.0), (1, 0))  # [B, T]
    phase = (ramp + offsets[..., None]).reshape(b, t * upp)
    sine = torch.sin(phase * (2 * math.pi)) * SINE_AMP
    voiced = (f0 > 0).repeat_interleave(upp, dim=1)
    return sine, voiced


class SineSource(nn.Module):
    """NSF source (one harmonic): voiced sine plus Gaussian noise, merged by a 1→1 linear layer."""

    def __init__(self, sample_rate: int):
        super().__init__()
        self.sample_rate = sample_rate
        self.l_linear = nn.Linear(1, 1)

    def forward(self, f0: Tensor, upp: int, noise: SynthNoise) -> Tensor:  # [B, T] Hz -> [B, 1, T·upp]
        sine, voiced = sine_excitation(f0.float(), upp, self.sample_rate)
        eps = noise.source(sine[..., None])  # [B, T·upp, 1]
        amplitude = torch.where(voiced, NSF_NOISE_STD, SINE_AMP / 3)
        excitation = (torch.where(voiced, sine, 0.0) + amplitude * eps[..., 0])[..., None]
        excitation = excitation.to(self.l_linear.weight.dtype)
        return torch.tanh(self.l_linear(excitation)).transpose(1, 2)


class _PostConv(nn.Conv1d):
    """The decoder's last convolution (to one channel), which also takes the channels-last
    layout [B, C, L, 1] (out [B, 1, L]): on CPUs mkldnn's channels-last convolution is 3x faster than
    transposing to [B, C, L] for the 1-D one."""

    def forward(self, x: Tensor) -> Tensor:
        out = _conv(self, x)
        return out[..., 0] if out.dim() == 4 else out


class Generator(nn.Module):
    """HiFi-GAN decoder; with `nsf` it is the reference's GeneratorNSF, which adds a strided conv
    of the sine source to every upsampling stage."""

    def __init__(self, config: SynthesizerConfig, nsf: bool):
        super().__init__()
        rates, channels = config.upsample_rates, config.upsample_initial_channel
        block = ResBlock1 if config.resblock == "1" else ResBlock2
        self.upp, self.nsf = config.upsample_factor, nsf
        self.context_frames = config.decoder_context_frames
        self.stage_margins = config.decoder_stage_margins
        self.stage_strides = tuple(math.prod(rates[i + 1:]) for i in range(len(rates)))  # output samples per sample
        self.cpu_segment_frames = CPU_DECODE_SEGMENT_FRAMES
        if nsf:
            self.m_source = SineSource(config.sample_rate)
            self.noise_convs = nn.ModuleList()
        self.conv_pre = nn.Conv1d(config.inter_channels, channels, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (rate, kernel) in enumerate(zip(rates, config.upsample_kernel_sizes)):
            c_in, c_out = channels >> i, channels >> (i + 1)
            self.ups.append(_weight_norm(nn.ConvTranspose1d(c_in, c_out, kernel, rate, padding=(kernel - rate) // 2)))
            if nsf:  # bring the source from the output rate down to this stage's rate
                stride = math.prod(rates[i + 1:])
                self.noise_convs.append(nn.Conv1d(1, c_out, 2 * stride, stride, padding=stride // 2)
                                        if i + 1 < len(rates) else nn.Conv1d(1, c_out, 1))
            for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes):
                self.resblocks.append(block(c_out, k, d))
        self.conv_post = _PostConv(c_out, 1, 7, padding=3, bias=False)
        self.cond = nn.Conv1d(config.gin_channels, channels, 1)

    def forward(self, z: Tensor, g: Tensor, f0: Tensor | None = None, noise: SynthNoise | None = None,
                keep: tuple[int, int] | None = None) -> Tensor:
        """z [B, inter, T] → audio [B, 1, T·upp], or only frames keep = (start, stop) of it: the
        convolutions then run on those frames and `context_frames` on each side, not on all T.

        On CPUs each batch item is decoded alone, in segments of `cpu_segment_frames` (each with
        its context): the same samples, but activations of a few seconds stay in the caches and in
        reused memory (a 30 s input decoded whole took 1.2-1.5x the time, 1.1-1.2x the peak
        memory; two 10 s items decoded together 1.2x the time of one after the other)."""
        source = self.m_source(f0, self.upp, noise) if self.nsf else None  # [B, 1, T·upp]
        # the source is made whole first: its phase sums over all earlier frames, and its noise
        # draws keep the reference's order
        start, stop = keep or (0, z.shape[-1])
        if z.device.type != "cpu":
            return self._decode_frames(z, g, source, start, stop)
        step = self.cpu_segment_frames
        items = []
        for b in range(z.shape[0]):
            zb, gb, sb = z[b:b + 1], g[b:b + 1], None if source is None else source[b:b + 1]
            items.extend(self._decode_frames(zb, gb, sb, a, min(a + step, stop)) for a in range(start, stop, step))
        out = items[0] if len(items) == 1 else torch.cat(items, dim=-1)  # [1, 1, B·n]
        return out.view(z.shape[0], 1, -1)

    def _decode_frames(self, z: Tensor, g: Tensor, source: Tensor | None, start: int, stop: int) -> Tensor:
        """Output frames start..stop, decoded from those frames and their context."""
        lo, hi = max(0, start - self.context_frames), min(z.shape[-1], stop + self.context_frames)
        source = None if source is None else source[..., lo * self.upp:hi * self.upp]
        return self._decode(z[..., lo:hi], g, source, ((start - lo) * self.upp, (stop - lo) * self.upp))

    def _decode(self, z: Tensor, g: Tensor, source: Tensor | None, keep: tuple[int, int]) -> Tensor:
        """Output samples keep = (a, b) of z's frames [B, inter, T] (and the source [B, 1, T·upp]).
        After each stage only what the later stages read for those stays (`stage_margins`): the
        context a segment needs at the input is mostly not needed past the first stage (a 10 s
        synthesis in 400-frame segments, bf16 on one thread: 2-3 % faster)."""
        a, b = keep
        x = self.conv_pre(z) + self.cond(g)
        # The upsampling stages in channels-last [B, C, L, 1] (see `_conv`) on CPUs and on CUDA:
        # there cuDNN's 1-D convolutions of [B, C, L] turn their input into NHWC and the output
        # back (29 % of a 16 x 10 s fp16 synthesis's kernel time on an H100); the residual blocks'
        # convolutions took 72 ms per pass channels-last against 119 ms (bench/synth_gpu.py) and
        # a whole 16 x 10 s conversion 0.767 against 0.817 s (crepe), 0.420 against 0.434 s
        # (rmvpe), fp16 on an H100 (session 14).
        if x.device.type == "cuda" or x.device.type == "cpu" and torch.backends.mkldnn.is_available():
            x = x[..., None].contiguous(memory_format=torch.channels_last)
        per_stage = len(self.resblocks) // len(self.ups)
        first = 0  # x's first sample, in its stage's samples
        for i, up in enumerate(self.ups):
            first *= up.stride[0]
            stride, n = self.stage_strides[i], x.shape[2] * up.stride[0]
            stage_source = None if source is None else source[..., first * stride:(first + n) * stride]
            x = _upsample(up, F.leaky_relu_(x, LRELU_SLOPE), self.noise_convs[i] if self.nsf else None, stage_source)
            blocks = self.resblocks[i * per_stage:(i + 1) * per_stage]
            xs = blocks[0](x)
            for rb in blocks[1:]:
                xs = xs.add_(rb(x))
            x = xs.div_(per_stage)
            lo = max(first, a // stride - self.stage_margins[i])
            hi = min(first + x.shape[2], -(-b // stride) + self.stage_margins[i])
            x, first = x[:, :, lo - first:hi - first], lo
        # the reference uses torch's default slope (0.01) here, not LRELU_SLOPE
        out = torch.tanh(self.conv_post(F.leaky_relu(x, 0.01)))  # [B, 1, samples from `first`]
        return out[..., a - first:b - first]


# ---------------------------------------------------------------------------------------------
# random draws
# ---------------------------------------------------------------------------------------------

class SynthNoise(ABC):
    """The synthesizer's random draws, requested in the reference's order: the prior noise, then
    (f0 voices only) SineGen's phase draw, which has no effect on the output, and the NSF noise."""

    @abstractmethod
    def prior(self, like: Tensor) -> Tensor:
        """ε ~ N(0, 1) shaped like the prior mean [B, inter, T] (scaled by the caller)."""

    @abstractmethod
    def source(self, like: Tensor) -> Tensor:
        """ε ~ N(0, 1) shaped like the sine [B, T·upp, 1]."""

    def rewind_point(self) -> Callable[[], None]:
        """A function that puts the draws back where they are now, so a pass tried again (after
        the device ran out of memory) draws the same values."""
        return lambda: None

    @staticmethod
    def from_generator(generator: torch.Generator) -> SynthNoise:
        """Draw lazily from `generator`, on its device, in the reference's order. A CPU generator
        seeded with s gives the draws of a CPU reference `infer` called right after
        `torch.manual_seed(s)`, wherever the model runs; one on the model's device avoids a copy."""
        return GeneratorNoise(generator)

    @staticmethod
    def injected(prior: Tensor, source: Tensor | None = None) -> SynthNoise:
        """Given draws, e.g. recorded from a reference run: prior [1, inter, T], source [1, T·upp, 1]."""
        return InjectedNoise(prior, source)

    @staticmethod
    def zeros() -> SynthNoise:
        """No noise at all: the prior mean and a clean sine (deterministic output)."""
        return ZeroNoise()

    @staticmethod
    def stacked(items: Sequence[SynthNoise], lengths: Sequence[int]) -> SynthNoise:
        """A batch's draws: item i draws from its own source exactly as it would alone, for
        its `lengths[i]` frames, and its padding gets zeros."""
        return StackedNoise(items, lengths)


class GeneratorNoise(SynthNoise):
    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def _randn(self, like: Tensor) -> Tensor:
        # float32 draws whatever the model's precision: the stream must not depend on it
        eps = torch.randn(like.shape, generator=self.generator, device=self.generator.device)
        return to_device(eps, like.device, like.dtype)

    def rewind_point(self) -> Callable[[], None]:
        state = self.generator.get_state()
        return lambda: self.generator.set_state(state)

    def prior(self, like: Tensor) -> Tensor:
        return self._randn(like)

    def source(self, like: Tensor) -> Tensor:
        # the reference's random initial phase, zeroed for the fundamental; drawn to keep the stream aligned
        torch.rand((1, 1, 1), generator=self.generator, device=self.generator.device)
        return self._randn(like)


class InjectedNoise(SynthNoise):
    def __init__(self, prior: Tensor, source: Tensor | None):
        self._prior, self._source = prior, source

    @staticmethod
    def _fit(noise: Tensor | None, like: Tensor, what: str) -> Tensor:
        if noise is None:
            raise ValueError(f"no injected {what} noise was given")
        if noise.shape != like.shape:
            raise ValueError(f"injected {what} noise has shape {tuple(noise.shape)}, needed {tuple(like.shape)}")
        return to_device(noise, like.device, like.dtype)

    def prior(self, like: Tensor) -> Tensor:
        return self._fit(self._prior, like, "prior")

    def source(self, like: Tensor) -> Tensor:
        return self._fit(self._source, like, "source")


class StackedNoise(SynthNoise):
    def __init__(self, items: Sequence[SynthNoise], lengths: Sequence[int]):
        if len(items) != len(lengths):
            raise ValueError(f"{len(items)} noise sources for {len(lengths)} batch items")
        self.items, self.lengths = list(items), list(lengths)

    def rewind_point(self) -> Callable[[], None]:
        points = [item.rewind_point() for item in self.items]

        def rewind() -> None:
            for point in points:
                point()
        return rewind

    def _stack(self, like: Tensor, draw, time_dim: int, per_frame: int) -> Tensor:
        out = torch.zeros_like(like)
        for i, (item, frames) in enumerate(zip(self.items, self.lengths)):
            n = frames * per_frame
            out[i:i + 1].narrow(time_dim, 0, n).copy_(draw(item, like[i:i + 1].narrow(time_dim, 0, n)))
        return out

    def prior(self, like: Tensor) -> Tensor:  # [B, inter, T]; drawn before the source
        self._frames = like.shape[2]
        return self._stack(like, lambda item, x: item.prior(x), 2, 1)

    def source(self, like: Tensor) -> Tensor:  # [B, T·upp, 1]
        return self._stack(like, lambda item, x: item.source(x), 1, like.shape[1] // self._frames)


class ZeroNoise(SynthNoise):
    def prior(self, like: Tensor) -> Tensor:
        return torch.zeros_like(like)

    def source(self, like: Tensor) -> Tensor:
        return torch.zeros_like(like)


# ---------------------------------------------------------------------------------------------
# the whole synthesizer
# ---------------------------------------------------------------------------------------------

class Synthesizer(nn.Module):
    """The inference part of the reference's SynthesizerTrnMs{256,768}NSFsid[_nono]."""

    def __init__(self, config: SynthesizerConfig, feature_dim: int, f0: bool):
        super().__init__()
        self.config, self.feature_dim, self.f0 = config, feature_dim, f0
        self.enc_p = TextEncoder(config, feature_dim, f0)
        self.dec = Generator(config, nsf=f0)
        self.flow = Flow(config)
        self.emb_g = _embedding(config.spk_embed_dim, config.gin_channels)

    def fold_weight_norm(self) -> Synthesizer:
        """Replace every weight-normed layer's g·v/‖v‖ by its plain weight, computed once."""
        for module in self.modules():
            if hasattr(module, "_weight_norm_hook"):
                _fold_weight_norm(module)
        return self

    def infer(self, phone: Tensor, pitch: Tensor | None, nsff0: Tensor | None, sid: int | Sequence[int] = 0, *,
              noise: SynthNoise, lengths: Sequence[int] | None = None, trim_frames: int = 0) -> Tensor:
        """phone [B, T, feature_dim] float at 100 fps; pitch [B, T] coarse 1..255 (long) and nsff0
        [B, T] Hz (0 = unvoiced) for f0 voices, None otherwise → audio [B, 1, T·upsample_factor].

        A batch holds items of `lengths` frames (default: all T), zero-padded at the end, with one
        speaker id each (or one for all). Each item's output up to its length equals its output
        alone, except the last few hundred samples, which hear the decoder's padding (callers
        trim far more than that).

        With `trim_frames`, the output leaves out that many frames at the start and before each
        item's end (audio [B, 1, (T − 2·trim_frames)·upsample_factor], item i valid for its first
        (lengths[i] − 2·trim_frames)·upsample_factor samples), and the decoder does not compute
        them: the same samples as trimming the whole output, for less work."""
        if phone.dim() != 3 or phone.shape[-1] != self.feature_dim:
            raise ValueError(f"phone must be [B, T, {self.feature_dim}], got {tuple(phone.shape)}")
        if self.f0:
            if pitch is None or nsff0 is None:
                raise ValueError("this voice is pitch-conditioned: pitch and nsff0 are required")
            if pitch.shape != phone.shape[:2] or nsff0.shape != phone.shape[:2]:
                raise ValueError(f"pitch {tuple(pitch.shape)} and nsff0 {tuple(nsff0.shape)} must be "
                                 f"{tuple(phone.shape[:2])}")
        elif pitch is not None or nsff0 is not None:
            raise ValueError("this voice has no pitch input: pass pitch=None and nsff0=None")
        b, t = phone.shape[:2]
        sids = [sid] * b if isinstance(sid, int) else list(sid)
        if len(sids) != b or not all(0 <= s < self.emb_g.num_embeddings for s in sids):
            raise ValueError(f"sid {sid} out of range: the voice has {self.emb_g.num_embeddings} speaker(s)"
                             f" and the batch {b} item(s)")
        if not 0 <= 2 * trim_frames < min(lengths or [t]):
            raise ValueError(f"trim_frames {trim_frames} leaves nothing of items of {min(lengths or [t])} frames")
        mask = None
        if lengths is not None:
            if len(lengths) != b or not all(0 < n <= t for n in lengths):
                raise ValueError(f"lengths {list(lengths)} do not fit a batch of {b} × {t} frames")
            if min(lengths) < t:
                mask = torch.arange(t, device=phone.device) < to_device(torch.tensor(lengths), phone.device)[:, None]
                mask = mask[:, None].to(phone.dtype)  # [B, 1, T]
        g = self.emb_g.weight[to_device(torch.tensor(sids), phone.device)][:, :, None]  # [B, gin, 1]
        m_p, logs_p = self.enc_p(phone, pitch, mask)
        z_p = _masked(m_p + torch.exp(logs_p) * noise.prior(m_p) * PRIOR_NOISE_SCALE, mask)
        z = _masked(self.flow.reverse(z_p, g, mask), mask)
        keep = (trim_frames, t - trim_frames) if trim_frames else None
        return self.dec(z, g, nsff0, noise, keep)


@dataclass
class Voice:
    """A loaded voice: the synthesizer (weight norm folded, eval mode) and its file metadata."""

    model: Synthesizer
    config: SynthesizerConfig
    version: str  # "v1" (256-d features) or "v2" (768-d)
    info: str

    @property
    def f0(self) -> bool:
        return self.model.f0

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def feature_dim(self) -> int:
        return self.model.feature_dim

    @property
    def upsample_factor(self) -> int:
        return self.config.upsample_factor


# ---------------------------------------------------------------------------------------------
# voice files
# ---------------------------------------------------------------------------------------------

def load_voice(path: str | Path, device: str | torch.device = "cpu") -> Voice:
    """Load an RVC voice `.pth` (reference or Applio layout); AssetError if it is missing,
    unreadable or not a voice the reference could run."""
    ckpt = torch_load_checked(path, "voice")
    try:
        return voice_from_checkpoint(ckpt, device)
    except AssetError as e:
        raise AssetError(f"{path}: {e}") from None


def voice_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu", fold: bool = True) -> Voice:
    """Build a voice from a loaded voice-file dict, checking every key and shape. `fold=False`
    keeps the per-forward weight norm of the reference (only to check the fold)."""
    if not isinstance(ckpt, dict) or not {"weight", "config"} <= ckpt.keys():
        found = sorted(map(str, ckpt.keys())) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise AssetError(f"not an RVC voice: needs the keys 'weight' and 'config', found {found}")
    vocoder = ckpt.get("vocoder", "HiFi-GAN")
    if vocoder != "HiFi-GAN":
        raise AssetError(f"unsupported vocoder {vocoder!r}: only HiFi-GAN voices can be run")
    version = ckpt.get("version", "v1")
    if version not in FEATURE_DIM:
        raise AssetError(f"unsupported voice version {version!r} (expected 'v1' or 'v2')")
    f0 = ckpt.get("f0", 1)
    if f0 not in (0, 1):  # Applio stores a bool, which compares equal
        raise AssetError(f"f0 flag must be 0 or 1, got {f0!r}")
    weights = _normalized_weights(ckpt["weight"])
    config = SynthesizerConfig.from_list(ckpt["config"])
    if "emb_g.weight" in weights:  # the reference trusts the speaker table over config[15]
        config = dataclasses.replace(config, spk_embed_dim=weights["emb_g.weight"].shape[0])
    with torch.device("meta"):  # shapes only: no memory, no draws from the global RNG
        model = Synthesizer(config, FEATURE_DIM[version], bool(f0))
    _check_keys(model, weights)
    model.load_state_dict(weights, strict=True, assign=True)
    model.requires_grad_(False).eval()
    if fold:
        model.fold_weight_norm()
    return Voice(model.to(device), config, version, str(ckpt.get("info", "")))


def _normalized_weights(weight: object) -> dict[str, Tensor]:
    """float32 tensors under the reference's names, without the training-only `enc_q`."""
    if not isinstance(weight, dict):
        raise AssetError(f"'weight' must be a dict of tensors, got {type(weight).__name__}")
    out = {}
    for key, value in weight.items():
        key = str(key)
        if not isinstance(value, Tensor):
            raise AssetError(f"weight {key!r} is a {type(value).__name__}, not a tensor")
        if key.startswith("enc_q."):
            continue
        for applio, legacy in _APPLIO_WEIGHT_NORM.items():
            key = key.replace(applio, legacy)
        out[key] = value.float() if value.is_floating_point() else value
    return out


def _check_keys(model: nn.Module, weights: dict[str, Tensor]) -> None:
    expected = model.state_dict()
    problems = []
    for what, keys in (("missing", sorted(expected.keys() - weights.keys())),
                       ("unexpected", sorted(weights.keys() - expected.keys()))):
        if keys:
            more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
            problems.append(f"{what} keys {', '.join(keys[:8])}{more}")
    wrong = [f"{k} {list(weights[k].shape)} (expected {list(v.shape)})"
             for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if wrong:
        more = f" and {len(wrong) - 8} more" if len(wrong) > 8 else ""
        problems.append(f"wrong shapes {', '.join(wrong[:8])}{more}")
    if problems:
        raise AssetError("weights do not match the voice's config: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# random voices (demo assets, test fixtures)
# ---------------------------------------------------------------------------------------------

# (version, rate) → (filter_length, upsample_rates, upsample_kernel_sizes), from the reference's
# configs/{v1,v2}/*.json (v2 40k uses the v1 file)
_LAYOUTS = {
    ("v1", 32000): (1024, [10, 4, 2, 2, 2], [16, 16, 4, 4, 4]),
    ("v1", 40000): (2048, [10, 10, 2, 2], [16, 16, 4, 4]),
    ("v1", 48000): (2048, [10, 6, 2, 2, 2], [16, 16, 4, 4, 4]),
    ("v2", 32000): (1024, [10, 8, 2, 2], [20, 16, 4, 4]),
    ("v2", 40000): (2048, [10, 10, 2, 2], [16, 16, 4, 4]),
    ("v2", 48000): (2048, [12, 10, 2, 2], [24, 20, 4, 4]),
}
_CALIBRATION_FRAMES = 32
_PRE_TANH_RMS = 0.5


def random_voice_checkpoint(seed: int, version: str, sample_rate: int, f0: bool) -> dict:
    """A voice-file dict as the reference's training writes it (`process_ckpt.savee`: fp16
    weights without `enc_q`, legacy weight-norm names, 18-value config), with random weights
    from `seed` shaped so the output is audible, unclipped and depends on features, f0, speaker
    and noise. Deterministic; the global RNG is not used. Its last step calibrates `conv_post` on a
    forward pass, so a CPU with other float rounding may differ in a last fp16 bit there."""
    if (version, sample_rate) not in _LAYOUTS:
        raise ValueError(f"no reference layout for {version} at {sample_rate} Hz")
    filter_length, rates, kernels = _LAYOUTS[(version, sample_rate)]
    config = [filter_length // 2 + 1, 32, 192, 192, 768, 2, 6, 3, 0, "1", [3, 7, 11], [[1, 3, 5]] * 3,
              rates, 512, kernels, 109, 256, sample_rate]
    synth_config = SynthesizerConfig.from_list(config)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Synthesizer(synth_config, FEATURE_DIM[version], f0).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in shapes.items():
        if key.endswith(".weight_g"):
            continue  # drawn with its weight_v
        if key.endswith(".weight_v"):
            v = _random_weight(key, shape, generator, synth_config)
            g = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
            weights[key[:-1] + "g"] = g * (1 + 0.1 * torch.randn(g.shape, generator=generator))
            weights[key] = v
        else:
            weights[key] = _random_weight(key, shape, generator, synth_config)
    weights = {k: weights[k].half() for k in shapes}
    weights["dec.conv_post.weight"] = _calibrated_conv_post(weights, config, version, f0, generator)
    return {"weight": weights, "config": config, "info": "0epoch", "sr": f"{sample_rate // 1000}k",
            "f0": int(f0), "version": version}


def _random_weight(key: str, shape: torch.Size, generator: torch.Generator, config: SynthesizerConfig) -> Tensor:
    def normal(std: float) -> Tensor:
        return torch.randn(shape, generator=generator) * std

    fan_in = math.prod(shape[1:])
    if key.endswith(".gamma"):
        return 1 + normal(0.1)
    if key.endswith(".beta"):
        return normal(0.1)
    if ".emb_rel_" in key:
        return normal(shape[-1] ** -0.5)
    if key == "emb_g.weight":  # at N(0, 1) the speaker would drown the content
        return normal(0.5)
    if key == "enc_p.emb_pitch.weight":
        return normal(1.0)
    if key == "dec.m_source.l_linear.weight":
        return 2 + normal(0.2)  # sine amplitude 0.1 → about 0.2 before the tanh
    if key == "enc_p.proj.bias":  # log-scale half biased to −1: a prior narrow enough for content to matter
        bias = normal(0.05)
        bias[shape[0] // 2:] -= 1
        return bias
    if key.endswith(".bias"):
        return normal(0.05)
    if key.startswith("dec.ups."):  # ConvTranspose1d [in, out, k]: each output sums in·k/stride taps
        stride = config.upsample_rates[int(key.split(".")[2])]
        return normal(math.sqrt(2 / (shape[0] * shape[2] / stride)))
    if key.startswith("dec.resblocks."):
        return normal(0.5 / math.sqrt(fan_in))
    if key.startswith("dec.noise_convs."):  # the source is ~0.2 in amplitude: make it count
        return normal(3 / math.sqrt(fan_in))
    if key.startswith("flow.") and ".post." in key:  # zero at training init; small so the flow acts
        return normal(0.2 / math.sqrt(fan_in))
    return normal(1 / math.sqrt(fan_in))


@torch.no_grad()  # not inference_mode: the result goes into a checkpoint callers may edit
def _calibrated_conv_post(weights: dict[str, Tensor], config: list, version: str, f0: bool,
                          generator: torch.Generator) -> Tensor:
    """conv_post's input comes from a LeakyReLU, so it is mostly positive and random weights give
    a large DC. Remove the DC its input causes on a fixed pitched input (least change to the
    weight), then scale to a pre-tanh RMS of 0.5."""
    voice = voice_from_checkpoint({"weight": weights, "config": config, "version": version, "f0": int(f0)})
    t = _CALIBRATION_FRAMES
    phone = torch.randn(1, t, voice.feature_dim, generator=generator)
    pitch = nsff0 = None
    if f0:  # a 110 → 330 Hz glide with an unvoiced gap
        nsff0 = 110 * 3 ** torch.linspace(0, 1, t)[None]
        nsff0[:, t // 2:t // 2 + t // 8] = 0
        # any plausible coarse pitch will do for calibration (log scale over 50..1100 Hz)
        pitch = torch.where(nsff0 > 0, 1 + 254 * torch.log(nsff0 / 50) / math.log(1100 / 50), 1).round().long()
    captured = []
    hook = voice.model.dec.conv_post.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    voice.model.infer(phone, pitch, nsff0, noise=SynthNoise.from_generator(generator))
    hook.remove()
    x = captured[0].flatten(2)  # [1, C, N] in either layout, after the final LeakyReLU
    w = weights["dec.conv_post.weight"].float()  # [1, C, 7]
    mean = x.mean(dim=-1)[0][:, None].expand_as(w[0])  # output DC = <w, mean>
    w = w - (w * mean).sum() / (mean * mean).sum() * mean
    rms = F.conv1d(x, w, padding=3).pow(2).mean().sqrt()
    return (w * (_PRE_TANH_RMS / rms)).half()


def save_voice(ckpt: dict, path: str | Path) -> None:
    """Write a voice-file dict the way the reference does (`torch.save`)."""
    torch.save(ckpt, path)
