"""HuBERT-base / ContentVec content encoder with fairseq semantics and fairseq state-dict names.

RVC feeds the raw 16 kHz waveform (no normalisation) through fairseq's HuBERT and keeps the
output of transformer layer 9 projected by `final_proj` (v1, 256-d) or of layer 12 (v2, 768-d),
50 frames per second. The distributed `hubert_base.pt` is a whole fairseq checkpoint that pickles
fairseq objects; `load_hubert` reads it without fairseq and without running pickled code. The
transformers layout (RVC main 2026, Applio's ContentVec) loads too. Chunks of different lengths
run as one zero-padded batch with each chunk's values (`Hubert.extract_features(lengths=)`).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.assets import AssetError, torch_load_checked
from pipeline.memory import to_device

_DEFAULT_CONV_LAYERS = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
# Training-only tensors of a fairseq HuBERT checkpoint: accepted in the file, not needed here.
_TRAINING_ONLY_KEYS = ("mask_emb", "label_embs_concat")
_OUTPUT_LAYER = {"v1": 9, "v2": 12}
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class HubertConfig:
    """The fairseq `cfg.model` fields that shape the network (names as fairseq spells them)."""

    encoder_embed_dim: int = 768
    encoder_layers: int = 12
    encoder_attention_heads: int = 12
    encoder_ffn_embed_dim: int = 3072
    conv_feature_layers: tuple[tuple[int, int, int], ...] = _DEFAULT_CONV_LAYERS  # (dim, kernel, stride)
    conv_pos: int = 128
    conv_pos_groups: int = 16
    final_dim: int = 256  # ContentVec's final_proj output

    @classmethod
    def from_fairseq(cls, cfg: dict) -> HubertConfig:
        """Build from a fairseq `cfg["model"]` dict (or `vars(args)` of an older checkpoint)."""
        if cfg.get("layer_norm_first", False):
            raise AssetError("HuBERT with layer_norm_first=True (large/stable variant) is not supported")
        if cfg.get("extractor_mode", "default") != "default":
            raise AssetError(f"HuBERT extractor_mode {cfg['extractor_mode']!r} is not supported")
        if cfg.get("conv_bias", False):
            raise AssetError("HuBERT with conv_bias=True is not supported")
        values = {f.name: cfg[f.name] for f in fields(cls) if cfg.get(f.name) is not None}
        if "conv_feature_layers" in values:
            values["conv_feature_layers"] = parse_conv_layers(values["conv_feature_layers"])
        config = cls(**values)
        if config.final_dim <= 0:  # fairseq: final_dim 0 means "same as the encoder"
            config = replace(config, final_dim=config.encoder_embed_dim)
        return config

    def to_fairseq(self) -> dict:
        """The fields as fairseq stores them (conv stack as a python expression string)."""
        return {**asdict(self), "conv_feature_layers": format_conv_layers(self.conv_feature_layers),
                "layer_norm_first": False, "extractor_mode": "default", "conv_bias": False}

    def num_frames(self, num_samples: int) -> int:
        """Output frames for `num_samples` input samples: floor((L - 400) / 320) + 1 for base."""
        n = num_samples
        for _, kernel, stride in self.conv_feature_layers:
            n = (n - kernel) // stride + 1
        return max(n, 0)


def parse_conv_layers(spec: str | list | tuple) -> tuple[tuple[int, int, int], ...]:
    """Parse fairseq's `conv_feature_layers`, e.g. "[(512,10,5)] + [(512,3,2)] * 4".

    fairseq writes it as a python expression that `ast.literal_eval` alone rejects (it has
    list `+` and `*`), so literals go through literal_eval and only those two operators are
    evaluated here; nothing else in the string can run."""
    def value(node: ast.expr) -> list | tuple:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = value(node.left), value(node.right)
            if isinstance(left, list) and isinstance(right, list):
                return left + right
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            left, count = value(node.left), ast.literal_eval(node.right)
            if isinstance(left, list) and type(count) is int and 0 <= len(left) * count <= 64:
                return left * count
        else:
            return ast.literal_eval(node)
        raise ValueError("only list + list and list * int (up to 64 layers) are allowed")

    try:
        layers = value(ast.parse(spec, mode="eval").body) if isinstance(spec, str) else spec
        layers = tuple(tuple(layer) for layer in layers)
    except (SyntaxError, ValueError, TypeError, RecursionError) as e:
        raise AssetError(f"bad conv_feature_layers {spec!r}: {e}") from None
    if not layers or not all(len(t) == 3 and all(type(v) is int and v > 0 for v in t) for t in layers):
        raise AssetError(f"bad conv_feature_layers {spec!r}: expected a list of (dim, kernel, stride)")
    return layers


def format_conv_layers(layers: tuple[tuple[int, int, int], ...]) -> str:
    """Inverse of `parse_conv_layers`, in fairseq's run-length style."""
    runs: list[list] = []
    for layer in layers:
        if runs and runs[-1][0] == layer:
            runs[-1][1] += 1
        else:
            runs.append([layer, 1])
    return " + ".join(f"[({d},{k},{s})]" + (f" * {n}" if n > 1 else "") for (d, k, s), n in runs)


def _valid_frames(frames: Sequence[int], total: int, device: torch.device) -> Tensor:
    """[B, total] bool: True for each batch item's first frames[b] frames."""
    return torch.arange(total, device=device) < to_device(torch.tensor(list(frames)), device)[:, None]


class _Fp32GroupNorm(nn.GroupNorm):
    """fairseq computes the feature extractor's GroupNorm in fp32 even in a half model. Its
    groups are single channels (hubert_base: 512 of 512), each normalised over the whole input."""

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """x [B, C, T]; `valid` [B, 1, T] bool: each item's own frames, whose statistics alone
        normalise it (a batch of different lengths)."""
        if valid is None:
            return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                                self.eps).type_as(x)
        if self.num_groups != self.num_channels:
            raise ValueError("masked GroupNorm needs one channel per group")
        x32, mask = x.float(), valid.float()
        count = mask.sum(dim=2, keepdim=True)  # [B, 1, 1]
        mean = (x32 * mask).sum(dim=2, keepdim=True) / count
        var = ((x32 - mean).square() * mask).sum(dim=2, keepdim=True) / count
        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight.float()[:, None] + self.bias.float()[:, None]).type_as(x)


class _WeightNormConv1d(nn.Conv1d):
    """The positional conv. fairseq stores it weight-normed (`weight_g`, `weight_v`, norm over
    dims 0 and 1); loading folds them into a plain `weight` so inference does not redo it."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        g_key, v_key = prefix + "weight_g", prefix + "weight_v"
        if g_key in state_dict and v_key in state_dict:
            g, v = state_dict.pop(g_key).float(), state_dict.pop(v_key).float()
            # the kernel torch.nn.utils.weight_norm (fairseq's) runs, so the fold is exact
            state_dict[prefix + "weight"] = torch._weight_norm(v, g, 2)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _SamePad(nn.Module):
    """An even kernel with padding k//2 yields one frame too many; fairseq drops the last."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.trim = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, : x.shape[2] - self.trim]


class FeatureExtractor(nn.Module):
    def __init__(self, conv_layers: tuple[tuple[int, int, int], ...]):
        super().__init__()
        blocks, in_dim = [], 1
        for i, (dim, kernel, stride) in enumerate(conv_layers):
            # Index 1 is fairseq's dropout slot; keeping it keeps the `.0.` / `.2.` key indices.
            block = [nn.Conv1d(in_dim, dim, kernel, stride=stride, bias=False), nn.Identity()]
            if i == 0:
                block.append(_Fp32GroupNorm(dim, dim))
            blocks.append(nn.Sequential(*block, nn.GELU()))
            in_dim = dim
        self.conv_layers = nn.ModuleList(blocks)

    def forward(self, wav: Tensor, lengths: Sequence[int] | None = None) -> Tensor:  # [B, L] -> [B, C, T]
        """With `lengths` (samples of each item of a zero-padded batch), each item is normalised
        by its own frames; the unpadded convolutions' outputs within an item's length read only
        its own samples, so each item gets its values alone."""
        x = wav.unsqueeze(1)
        blocks = iter(self.conv_layers)
        if lengths is not None:
            conv, dropout, norm, gelu = next(blocks)  # only the first block normalises
            x = conv(x)
            (kernel,), (stride,) = conv.kernel_size, conv.stride
            valid = _valid_frames([(n - kernel) // stride + 1 for n in lengths], x.shape[2], x.device)
            x = gelu(norm(dropout(x), valid[:, None]))
        for block in blocks:
            x = block(x)
        return x


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor, key_padding: Tensor | None = None) -> Tensor:  # [B, T, C]
        """`key_padding` [B, T] bool: frames past an item's length, which its frames do not attend to."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for t in (self.q_proj(x), self.k_proj(x), self.v_proj(x)))
        # One fused kernel, no [B, H, T, T] scores in memory: 1.7x faster on CPUs than fairseq's
        # matmul, softmax, matmul (q scaled first), whose sums it rounds differently (~1e-7).
        keep = None if key_padding is None else ~key_padding[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # [B, H, T, head_dim]
        return self.out_proj(a.transpose(1, 2).reshape(B, T, C))


class EncoderLayer(nn.Module):
    """Post-LN transformer layer (fairseq layer_norm_first=False)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.self_attn = SelfAttention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, key_padding: Tensor | None = None) -> Tensor:
        x = self.self_attn_layer_norm(x + self.self_attn(x, key_padding))
        return self.final_layer_norm(x + self.fc2(F.gelu(self.fc1(x))))


class Encoder(nn.Module):
    def __init__(self, config: HubertConfig):
        super().__init__()
        dim, k = config.encoder_embed_dim, config.conv_pos
        self.pos_conv = nn.Sequential(
            _WeightNormConv1d(dim, dim, k, padding=k // 2, groups=config.conv_pos_groups),
            _SamePad(k), nn.GELU())
        self.layer_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            EncoderLayer(dim, config.encoder_attention_heads, config.encoder_ffn_embed_dim)
            for _ in range(config.encoder_layers))

    def forward(self, x: Tensor, num_layers: int, key_padding: Tensor | None = None) -> Tensor:
        """x [B, T, C] → the first num_layers layers' output. `key_padding` [B, T] bool: frames past
        each item's length, zeroed for the positional convolution (which pads with zeros past an
        input's end) and left out of the attention."""
        if key_padding is not None:
            x = x.masked_fill(key_padding[..., None], 0.0)
        x = self.layer_norm(x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2))
        for layer in self.layers[:num_layers]:
            x = layer(x, key_padding)
        return x


class Hubert(nn.Module):
    def __init__(self, config: HubertConfig = HubertConfig()):
        super().__init__()
        self.config = config
        conv_dim = config.conv_feature_layers[-1][0]
        self.feature_extractor = FeatureExtractor(config.conv_feature_layers)
        self.layer_norm = nn.LayerNorm(conv_dim)
        self.post_extract_proj = nn.Linear(conv_dim, config.encoder_embed_dim)
        self.encoder = Encoder(config)
        self.final_proj = nn.Linear(config.encoder_embed_dim, config.final_dim)

    def extract_features(self, wav: Tensor, output_layer: int, lengths: Sequence[int] | None = None) -> Tensor:
        """wav [B, L] raw 16 kHz samples -> output of transformer layer `output_layer` (1-based,
        fairseq's meaning; no final norm) [B, T, encoder_embed_dim], T = config.num_frames(L).

        `lengths`: samples of each item of a batch zero-padded to L; item i then gets, in its
        first num_frames(lengths[i]) frames, its features alone (up to float summation order):
        its own normalisation statistics, zeros past its end for the positional convolution,
        and no attention to the padding."""
        if not 1 <= output_layer <= self.config.encoder_layers:
            raise ValueError(f"output_layer {output_layer} not in 1..{self.config.encoder_layers}")
        shortest = min(lengths) if lengths is not None else wav.shape[-1]
        if self.config.num_frames(shortest) < 1:
            raise ValueError(f"{shortest} samples are too few for one HuBERT frame")
        x = self.feature_extractor(wav, lengths).transpose(1, 2)
        x = self.post_extract_proj(self.layer_norm(x))
        key_padding = None
        if lengths is not None:
            key_padding = ~_valid_frames([self.config.num_frames(n) for n in lengths], x.shape[1], x.device)
        return self.encoder(x, output_layer, key_padding)


def content_features(model: Hubert, wav16k: Tensor, version: str, lengths: Sequence[int] | None = None) -> Tensor:
    """RVC's content features of wav16k [B, L]: v1 = layer 9 + final_proj [B, T, 256],
    v2 = layer 12 [B, T, 768]. The input is cast to the model's dtype, as the reference does.
    `lengths`: of a zero-padded batch (see `Hubert.extract_features`)."""
    if version not in _OUTPUT_LAYER:
        raise ValueError(f"unknown RVC version {version!r} (expected 'v1' or 'v2')")
    ref = model.final_proj.weight
    with torch.no_grad():
        feats = model.extract_features(wav16k.to(ref.device, ref.dtype), _OUTPUT_LAYER[version], lengths)
        return model.final_proj(feats) if version == "v1" else feats


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------

class _PickledFairseqObject:
    """Inert stand-in for any fairseq object a checkpoint pickles (e.g. the task's
    `fairseq.data.dictionary.Dictionary`): it keeps the pickled state as attributes, runs nothing."""

    def __init__(self, *args):
        self.args = args


def load_hubert(path: str | Path, device: str | torch.device = "cpu") -> Hubert:
    """Load a fairseq `hubert_base.pt`, or a transformers HuBERT directory (`config.json` plus
    `model.safetensors` or `pytorch_model.bin`, with a separate `final_proj`), as an fp32 model in
    eval mode. Raises AssetError naming the path and the problem."""
    path = Path(path)
    if path.is_dir():
        model = _load_transformers_dir(path)
    else:
        model = _load_fairseq_file(path)
    return model.to(device).eval()


def _load_fairseq_file(path: Path) -> Hubert:
    if not path.is_file():
        raise AssetError(f"{path}: HuBERT checkpoint file not found")
    with path.open("rb") as f:
        if f.read(4) != _ZIP_MAGIC:
            raise AssetError(f"{path}: not a torch checkpoint (torch.save writes a zip archive, "
                             "this file is not one)")
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except RuntimeError:  # a damaged archive; torch_load_checked below names the problem
        needed = []
    refused = sorted(n for n in needed if not n.startswith("fairseq.") and n != "argparse.Namespace")
    if refused:
        raise AssetError(f"{path}: refusing to unpickle {', '.join(refused)}: a HuBERT checkpoint "
                         "holds only tensors, plain containers and fairseq objects")
    allowed = [(_PickledFairseqObject, n) for n in needed if n.startswith("fairseq.")]
    allowed += [argparse.Namespace] if "argparse.Namespace" in needed else []
    # safe_globals changes process-wide state for the duration of the load; loads happen at start.
    with torch.serialization.safe_globals(allowed):
        ckpt = torch_load_checked(path, "HuBERT checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise AssetError(f"{path}: not a fairseq HuBERT checkpoint (no 'model' state dict)")
    if isinstance(ckpt.get("cfg"), dict) and isinstance(ckpt["cfg"].get("model"), dict):
        cfg = ckpt["cfg"]["model"]
    elif isinstance(ckpt.get("args"), argparse.Namespace):
        cfg = vars(ckpt["args"])
    else:
        raise AssetError(f"{path}: fairseq checkpoint has neither cfg['model'] nor args")
    return _from_state_dict(path, cfg, ckpt["model"])


def _load_transformers_dir(path: Path) -> Hubert:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise AssetError(f"{path}: transformers HuBERT directory has no config.json")
    try:
        hf = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AssetError(f"{config_file}: unreadable config.json: {e}") from None
    if not isinstance(hf, dict):
        raise AssetError(f"{config_file}: config.json is not a JSON object")
    variant = {k: hf.get(k, v) for k, v in _TRANSFORMERS_VARIANT.items()}
    if variant != _TRANSFORMERS_VARIANT:
        raise AssetError(f"{config_file}: unsupported HuBERT variant {variant} "
                         f"(need {_TRANSFORMERS_VARIANT})")
    state = _read_transformers_weights(path)
    state = {_fairseq_key(k.removeprefix("hubert.")): v for k, v in state.items()}
    # save_pretrained leaves out fields equal to transformers' defaults, which are HuBERT base.
    base = HubertConfig()
    dims, kernels, strides = zip(*base.conv_feature_layers)
    cfg = {
        "encoder_embed_dim": hf.get("hidden_size", base.encoder_embed_dim),
        "encoder_layers": hf.get("num_hidden_layers", base.encoder_layers),
        "encoder_attention_heads": hf.get("num_attention_heads", base.encoder_attention_heads),
        "encoder_ffn_embed_dim": hf.get("intermediate_size", base.encoder_ffn_embed_dim),
        "conv_feature_layers": list(zip(hf.get("conv_dim", dims), hf.get("conv_kernel", kernels),
                                        hf.get("conv_stride", strides))),
        "conv_pos": hf.get("num_conv_pos_embeddings", base.conv_pos),
        "conv_pos_groups": hf.get("num_conv_pos_embedding_groups", base.conv_pos_groups),
    }
    if "final_proj.weight" in state:  # its size is ContentVec's final_dim
        cfg["final_dim"] = state["final_proj.weight"].shape[0]
    return _from_state_dict(path, cfg, state)


def _read_transformers_weights(path: Path) -> dict[str, Tensor]:
    safetensors_file, bin_file = path / "model.safetensors", path / "pytorch_model.bin"
    if safetensors_file.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(safetensors_file)
        except (SafetensorError, OSError) as e:
            raise AssetError(f"{safetensors_file}: cannot load HuBERT weights: {e}") from None
    if bin_file.is_file():
        state = torch_load_checked(bin_file, "HuBERT weights")
        if not isinstance(state, dict):
            raise AssetError(f"{bin_file}: not a state dict")
        return state
    raise AssetError(f"{path}: transformers HuBERT directory has no model.safetensors or pytorch_model.bin")


# The transformers HubertModel settings that equal fairseq HuBERT base semantics.
_TRANSFORMERS_VARIANT = {"feat_extract_norm": "group", "do_stable_layer_norm": False,
                         "feat_proj_layer_norm": True, "conv_bias": False, "hidden_act": "gelu",
                         "conv_pos_batch_norm": False, "layer_norm_eps": 1e-5}

# transformers HubertModel name -> fairseq name (applied in order; unknown names pass through
# and are then reported by the strict load)
_TRANSFORMERS_TO_FAIRSEQ = [
    (r"^masked_spec_embed$", "mask_emb"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
    (r"^feature_extractor\.conv_layers\.0\.layer_norm\.", "feature_extractor.conv_layers.0.2."),
    (r"^feature_projection\.layer_norm\.", "layer_norm."),
    (r"^feature_projection\.projection\.", "post_extract_proj."),
    (r"^encoder\.pos_conv_embed\.conv\.(parametrizations\.weight\.original0|weight_g)$",
     "encoder.pos_conv.0.weight_g"),
    (r"^encoder\.pos_conv_embed\.conv\.(parametrizations\.weight\.original1|weight_v)$",
     "encoder.pos_conv.0.weight_v"),
    (r"^encoder\.pos_conv_embed\.conv\.bias$", "encoder.pos_conv.0.bias"),
    (r"^(encoder\.layers\.\d+)\.attention\.", r"\1.self_attn."),
    (r"^(encoder\.layers\.\d+)\.layer_norm\.", r"\1.self_attn_layer_norm."),
    (r"^(encoder\.layers\.\d+)\.feed_forward\.intermediate_dense\.", r"\1.fc1."),
    (r"^(encoder\.layers\.\d+)\.feed_forward\.output_dense\.", r"\1.fc2."),
]


def _fairseq_key(key: str) -> str:
    for pattern, replacement in _TRANSFORMERS_TO_FAIRSEQ:
        key = re.sub(pattern, replacement, key)
    return key


def _from_state_dict(path: Path, cfg: dict, state: dict) -> Hubert:
    """Model from a fairseq-named state dict (fp16 or fp32) and fairseq model cfg."""
    try:
        model = Hubert(HubertConfig.from_fairseq(cfg))
    except AssetError as e:
        raise AssetError(f"{path}: {e}") from None
    except (TypeError, ValueError, RuntimeError) as e:
        raise AssetError(f"{path}: bad HuBERT config: {e}") from None
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise AssetError(f"{path}: HuBERT state dict holds non-tensor values")
    state = {k: v.float() for k, v in state.items() if k not in _TRAINING_ONLY_KEYS}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        problem = " ".join(str(e).split())
        raise AssetError(f"{path}: weights do not match the HuBERT config: {problem[:600]}") from None
    return model


# ----------------------------------------------------------------------------------------------
# writing (demo assets and test fixtures)
# ----------------------------------------------------------------------------------------------

def random_hubert_checkpoint(seed: int, config: HubertConfig | None = None) -> dict:
    """A fairseq-layout HuBERT checkpoint with random fp16 weights, bitwise reproducible from
    `seed` for a given torch version (own generator, fixed draw order).

    A post-LN stack with full-gain random attention maps every frame onto nearly the same vector
    within a few layers; value/output projections at 0.3 of unit gain and sharp q/k keep layer-9
    and layer-12 frames distinct and driven by the input."""
    config = config or HubertConfig()
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float, mean: float = 0.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * std + mean).half()

    def linear(name: str, n_in: int, n_out: int, gain: float = 1.0, std: float | None = None) -> None:
        model[f"{name}.weight"] = normal(n_out, n_in, std=std or gain / math.sqrt(n_in))
        model[f"{name}.bias"] = normal(n_out, std=0.05)

    def layer_norm(name: str, dim: int) -> None:
        model[f"{name}.weight"] = normal(dim, std=0.1, mean=1.0)
        model[f"{name}.bias"] = normal(dim, std=0.05)

    dim, model = config.encoder_embed_dim, {}
    in_dim = 1
    for i, (out_dim, kernel, _) in enumerate(config.conv_feature_layers):
        model[f"feature_extractor.conv_layers.{i}.0.weight"] = normal(
            out_dim, in_dim, kernel, std=math.sqrt(2 / (in_dim * kernel)))
        in_dim = out_dim
    layer_norm("feature_extractor.conv_layers.0.2", config.conv_feature_layers[0][0])
    layer_norm("layer_norm", in_dim)
    linear("post_extract_proj", in_dim, dim)
    k, groups = config.conv_pos, config.conv_pos_groups
    v = torch.randn(dim, dim // groups, k, generator=gen) * math.sqrt(4 / (k * dim))
    g = v.norm(dim=(0, 1), keepdim=True) * (1 + 0.1 * torch.randn(1, 1, k, generator=gen))
    model["encoder.pos_conv.0.weight_g"], model["encoder.pos_conv.0.weight_v"] = g.half(), v.half()
    model["encoder.pos_conv.0.bias"] = normal(dim, std=0.05)
    layer_norm("encoder.layer_norm", dim)
    for i in range(config.encoder_layers):
        p = f"encoder.layers.{i}."
        linear(p + "self_attn.q_proj", dim, dim, std=0.06)
        linear(p + "self_attn.k_proj", dim, dim, std=0.06)
        linear(p + "self_attn.v_proj", dim, dim, gain=0.3)
        linear(p + "self_attn.out_proj", dim, dim, gain=0.3)
        layer_norm(p + "self_attn_layer_norm", dim)
        linear(p + "fc1", dim, config.encoder_ffn_embed_dim)
        linear(p + "fc2", config.encoder_ffn_embed_dim, dim)
        layer_norm(p + "final_layer_norm", dim)
    linear("final_proj", dim, config.final_dim)
    model["mask_emb"] = torch.rand(dim, generator=gen).half()
    model["label_embs_concat"] = normal(504, config.final_dim, std=1.0)  # km500 + 4 specials
    return {
        "args": None,
        "cfg": {
            "_name": None,
            "common": {"fp16": True, "seed": seed},
            "model": {"_name": "hubert", "label_rate": 50.0, "activation_fn": "gelu",
                      "dropout": 0.1, "attention_dropout": 0.1, "encoder_layerdrop": 0.05,
                      "untie_final_proj": False, **config.to_fairseq()},
            "task": {"_name": "hubert_pretraining", "labels": ["km"], "label_rate": 50.0,
                     "sample_rate": 16000, "normalize": False},
            "criterion": {"_name": "hubert"},
        },
        "model": model,
        "task_state": {},
        "optimizer_history": [],
        "extra_state": {},
        "last_optimizer_state": None,
    }


def save_hubert_checkpoint(ckpt: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
