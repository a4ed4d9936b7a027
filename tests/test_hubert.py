"""HuBERT content encoder: parity with transformers' independent implementation, fairseq and
transformers file layouts, refusal of unsafe or broken files, frame count."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from pipeline.assets import AssetError
from pipeline.hubert import (
    Hubert,
    HubertConfig,
    content_features,
    load_hubert,
    parse_conv_layers,
    random_hubert_checkpoint,
    save_hubert_checkpoint,
)

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# 12 layers (v1/v2 need layers 9 and 12) but narrow, so CPU runs stay short.
NARROW = HubertConfig(encoder_embed_dim=64, encoder_layers=12, encoder_attention_heads=4,
                      encoder_ffn_embed_dim=128,
                      conv_feature_layers=((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2,
                      conv_pos=16, conv_pos_groups=4, final_dim=16)
SMALL = HubertConfig(**{**NARROW.__dict__, "encoder_layers": 2})


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def speechlike(seconds: float, seed: int = 0) -> torch.Tensor:
    """[1, L] gliding tone gated at 3 Hz plus noise: frames differ in content and loudness."""
    n = int(16000 * seconds)
    t = torch.arange(n, dtype=torch.float64) / 16000
    gen = torch.Generator().manual_seed(seed)
    tone = 0.3 * torch.sin(2 * math.pi * (180 + 40 * seed) * t * (1 + 0.5 * t))
    noise = 0.02 * torch.randn(n, generator=gen, dtype=torch.float64)
    x = tone * (torch.sin(2 * math.pi * 3 * t) > 0) + noise
    return x.float().view(1, -1)


def fairseq_model(ckpt: dict) -> Hubert:
    """The in-memory model: fairseq state dict minus the training-only tensors, in fp32."""
    model = Hubert(HubertConfig.from_fairseq(ckpt["cfg"]["model"]))
    state = {k: v.float() for k, v in ckpt["model"].items() if k not in ("mask_emb", "label_embs_concat")}
    model.load_state_dict(state, strict=True)
    return model.eval()


def to_transformers_key(key: str) -> str:
    """fairseq name -> transformers HubertModel name, spelled out independently of the loader."""
    parts = key.split(".")
    if key == "mask_emb":
        return "masked_spec_embed"
    if parts[:2] == ["feature_extractor", "conv_layers"]:
        sub = {"0": "conv", "2": "layer_norm"}[parts[3]]
        return f"feature_extractor.conv_layers.{parts[2]}.{sub}.{parts[4]}"
    if parts[0] == "layer_norm":
        return "feature_projection.layer_norm." + parts[1]
    if parts[0] == "post_extract_proj":
        return "feature_projection.projection." + parts[1]
    if parts[:2] == ["encoder", "pos_conv"]:
        return {"bias": "encoder.pos_conv_embed.conv.bias",
                "weight_g": "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
                "weight_v": "encoder.pos_conv_embed.conv.parametrizations.weight.original1"}[parts[3]]
    if parts[:2] == ["encoder", "layers"]:
        module = ".".join(parts[3:-1])
        module = {"self_attn.q_proj": "attention.q_proj", "self_attn.k_proj": "attention.k_proj",
                  "self_attn.v_proj": "attention.v_proj", "self_attn.out_proj": "attention.out_proj",
                  "self_attn_layer_norm": "layer_norm", "fc1": "feed_forward.intermediate_dense",
                  "fc2": "feed_forward.output_dense", "final_layer_norm": "final_layer_norm"}[module]
        return f"encoder.layers.{parts[2]}.{module}.{parts[-1]}"
    return key  # encoder.layer_norm.*


def transformers_model(ckpt: dict, config: HubertConfig):
    dims, kernels, strides = zip(*config.conv_feature_layers)
    hf_config = transformers.HubertConfig(
        hidden_size=config.encoder_embed_dim, num_hidden_layers=config.encoder_layers,
        num_attention_heads=config.encoder_attention_heads,
        intermediate_size=config.encoder_ffn_embed_dim, conv_dim=dims, conv_kernel=kernels,
        conv_stride=strides, conv_bias=False, feat_extract_norm="group", do_stable_layer_norm=False,
        feat_proj_layer_norm=True, num_conv_pos_embeddings=config.conv_pos,
        num_conv_pos_embedding_groups=config.conv_pos_groups, layer_norm_eps=1e-5, hidden_act="gelu")
    model = transformers.HubertModel._from_config(hf_config, attn_implementation="eager")
    state = {to_transformers_key(k): v.float() for k, v in ckpt["model"].items()
             if k != "label_embs_concat" and not k.startswith("final_proj.")}
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def narrow_ckpt() -> dict:
    return random_hubert_checkpoint(3, NARROW)


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> tuple[dict, str]:
    ckpt = random_hubert_checkpoint(0)
    path = tmp_path_factory.mktemp("hubert") / "hubert_base.pt"
    save_hubert_checkpoint(ckpt, path)
    return ckpt, str(path)


def assert_matches_transformers(ours: Hubert, ckpt: dict, config: HubertConfig, wav: torch.Tensor) -> None:
    hf = transformers_model(ckpt, config)
    with torch.no_grad():
        hidden = hf(wav, output_hidden_states=True).hidden_states
        final_w, final_b = (ckpt["model"][f"final_proj.{p}"].float() for p in ("weight", "bias"))
        expected = {"layer 9": hidden[9], "layer 12": hidden[12],
                    "v1": F.linear(hidden[9], final_w, final_b), "v2": hidden[12]}
        got = {"layer 9": ours.extract_features(wav, 9), "layer 12": ours.extract_features(wav, 12),
               "v1": content_features(ours, wav, "v1"), "v2": content_features(ours, wav, "v2")}
    for name, want in expected.items():
        assert got[name].shape == want.shape, name
        assert (got[name] - want).abs().max().item() <= 1e-4, name
        # the comparison is meaningful only if the features carry signal
        assert want.std().item() > 0.1, name


def test_matches_transformers_narrow(narrow_ckpt):
    assert_matches_transformers(fairseq_model(narrow_ckpt), narrow_ckpt, NARROW, speechlike(1.5))


def test_matches_transformers_base_from_file(base_file):
    ckpt, path = base_file
    model = load_hubert(path)
    assert os.path.getsize(path) > 180e6  # full size, fp16 (~189 MB like the real file)
    assert next(model.parameters()).dtype == torch.float32
    assert_matches_transformers(model, ckpt, HubertConfig(), speechlike(1.0))


def test_random_base_features_stay_frame_dependent(base_file):
    """Random post-LN stacks collapse all frames to one vector; ours must not (else the
    fixture would test nothing downstream)."""
    model = load_hubert(base_file[1])
    with torch.no_grad():
        a, b = (model.extract_features(speechlike(1.0, seed), 12)[0] for seed in (0, 1))
        for layer in (9, 12):
            x = model.extract_features(speechlike(1.0), layer)[0]  # [T, 768]
            assert x.std(dim=0).mean() > 0.4 * x.std()
    assert (a - b).abs().mean() > 0.3 * a.std()


def test_content_features_shapes_and_dtype(narrow_ckpt):
    model = fairseq_model(narrow_ckpt)
    wav = speechlike(0.5).double()  # the reference hands HuBERT float64 audio; it is cast
    assert content_features(model, wav, "v1").shape == (1, NARROW.num_frames(8000), 16)
    assert content_features(model, wav, "v2").dtype == torch.float32
    with pytest.raises(ValueError):
        content_features(model, wav, "v3")
    with pytest.raises(ValueError):
        model.extract_features(wav.float(), 13)


def test_a_batch_of_different_lengths_gives_each_its_features_alone(narrow_ckpt):
    """Zero-padded to the longest with `lengths`: each item's own GroupNorm statistics, zeros past
    its end for the positional convolution, no attention to the padding."""
    model = fairseq_model(narrow_ckpt)
    wavs = [speechlike(s, seed)[0] for s, seed in ((0.9, 1), (0.5, 2), (0.73, 3), (0.9, 4))]
    lengths = [w.shape[0] for w in wavs]
    batch = torch.stack([torch.nn.functional.pad(w, (0, max(lengths) - w.shape[0])) for w in wavs])
    with torch.no_grad():
        for version in ("v1", "v2"):
            together = content_features(model, batch, version, lengths)
            unmasked = content_features(model, batch, version)
            for i, wav in enumerate(wavs):
                alone = content_features(model, wav[None], version)[0]
                frames = NARROW.num_frames(lengths[i])
                torch.testing.assert_close(together[i, :frames], alone, rtol=0, atol=2e-5)
                if lengths[i] < max(lengths):  # the padding would change every frame otherwise
                    assert (unmasked[i, :frames] - alone).abs().max() > 1e-3


def test_random_checkpoint_is_deterministic(tmp_path):
    a, b = random_hubert_checkpoint(7, SMALL), random_hubert_checkpoint(7, SMALL)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(v.dtype == torch.float16 for v in a["model"].values())
    assert a["model"]["mask_emb"].shape == (64,)
    assert a["cfg"]["model"]["conv_feature_layers"] == "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2"
    c = random_hubert_checkpoint(8, SMALL)
    assert not torch.equal(a["model"]["post_extract_proj.weight"], c["model"]["post_extract_proj.weight"])
    digests = []
    for name, ckpt in (("a", a), ("b", b)):  # same file name: torch.save records it in the zip
        save_hubert_checkpoint(ckpt, tmp_path / name / "hubert_base.pt")
        digests.append(hashlib.sha256((tmp_path / name / "hubert_base.pt").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_fairseq_file_round_trip(tmp_path, narrow_ckpt):
    path = tmp_path / "hubert.pt"
    save_hubert_checkpoint(narrow_ckpt, path)
    loaded, expected = load_hubert(path), fairseq_model(narrow_ckpt)
    assert loaded.config == NARROW
    assert loaded.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in loaded.state_dict().items())
    wav = speechlike(0.5)
    with torch.no_grad():
        assert torch.equal(loaded.extract_features(wav, 12), expected.extract_features(wav, 12))


def test_our_state_dict_reloads_strict(narrow_ckpt):
    model = fairseq_model(narrow_ckpt)
    again = Hubert(NARROW)
    again.load_state_dict(model.state_dict(), strict=True)  # folded pos conv weight
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())


def test_fairseq_objects_in_pickle_load_as_inert_stubs(tmp_path):
    """The real hubert_base.pt pickles the task's fairseq Dictionary; load it without fairseq."""
    class Dictionary:
        def __init__(self):
            self.symbols, self.indices, self.count = ["<s>", "<pad>", "</s>", "<unk>", "0"], {"0": 4}, [1] * 5

    names = ["fairseq", "fairseq.data", "fairseq.data.dictionary"]
    modules = {name: types.ModuleType(name) for name in names}
    Dictionary.__module__, Dictionary.__qualname__ = "fairseq.data.dictionary", "Dictionary"
    modules["fairseq.data.dictionary"].Dictionary = Dictionary
    ckpt = random_hubert_checkpoint(1, SMALL)
    ckpt["task_state"] = {"dictionaries": [Dictionary()]}
    path = tmp_path / "with_dictionary.pt"
    sys.modules.update(modules)
    try:
        save_hubert_checkpoint(ckpt, path)
    finally:
        for name in names:
            del sys.modules[name]
    assert "fairseq.data.dictionary.Dictionary" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    model = load_hubert(path)
    assert "fairseq" not in sys.modules
    assert all(torch.equal(v, fairseq_model(ckpt).state_dict()[k]) for k, v in model.state_dict().items())


def test_old_args_namespace_layout_loads(tmp_path):
    ckpt = random_hubert_checkpoint(2, SMALL)
    ckpt["args"], ckpt["cfg"] = argparse.Namespace(**ckpt["cfg"]["model"]), None
    save_hubert_checkpoint(ckpt, tmp_path / "args.pt")
    assert load_hubert(tmp_path / "args.pt").config == SMALL


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("payload", [_System, _Exec])
def test_malicious_checkpoint_is_refused_without_running_code(tmp_path, payload):
    marker = tmp_path / "marker"
    ckpt = random_hubert_checkpoint(1, SMALL)
    ckpt["extra_state"] = {"x": payload(marker)}
    path = tmp_path / "evil.pt"
    save_hubert_checkpoint(ckpt, path)
    with pytest.raises(AssetError, match="refusing to unpickle") as err:
        load_hubert(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_malicious_plain_pickle_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_System(marker), protocol=4))
    with pytest.raises(AssetError):
        load_hubert(path)
    assert not marker.exists()


def test_broken_files_raise_asset_error(tmp_path, narrow_ckpt):
    good = tmp_path / "good.pt"
    save_hubert_checkpoint(narrow_ckpt, good)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(AssetError, match="truncated") as err:
        load_hubert(tmp_path / "truncated.pt")
    assert "truncated.pt" in str(err.value)

    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with pytest.raises(AssetError, match="not a torch checkpoint"):
        load_hubert(tmp_path / "notes.txt")
    with pytest.raises(AssetError, match="not found"):
        load_hubert(tmp_path / "missing.pt")

    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(AssetError, match="no 'model' state dict"):
        load_hubert(tmp_path / "other.pt")

    renamed = {**narrow_ckpt, "model": dict(narrow_ckpt["model"])}
    renamed["model"]["encoder.layers.0.fc3.weight"] = renamed["model"].pop("encoder.layers.0.fc1.weight")
    save_hubert_checkpoint(renamed, tmp_path / "renamed.pt")
    with pytest.raises(AssetError, match=r"fc3\.weight"):
        load_hubert(tmp_path / "renamed.pt")

    stable = {**narrow_ckpt, "cfg": {**narrow_ckpt["cfg"],
                                     "model": {**narrow_ckpt["cfg"]["model"], "layer_norm_first": True}}}
    save_hubert_checkpoint(stable, tmp_path / "large.pt")
    with pytest.raises(AssetError, match="layer_norm_first"):
        load_hubert(tmp_path / "large.pt")


def write_transformers_dir(ckpt: dict, config: HubertConfig, directory, fmt: str, prefix: str):
    """RVC-main / Applio layout: HubertModel weights plus a separate final_proj Linear."""
    hf = transformers_model(ckpt, config)
    hf.config.to_json_file(directory / "config.json")
    state = {prefix + k: v.contiguous() for k, v in hf.state_dict().items()}
    state.update({k: v.float() for k, v in ckpt["model"].items() if k.startswith("final_proj.")})
    if fmt == "safetensors":
        safetensors_torch.save_file(state, directory / "model.safetensors")
    else:  # older transformers spell the weight norm weight_g / weight_v
        for new, old in (("original0", "weight_g"), ("original1", "weight_v")):
            state[f"{prefix}encoder.pos_conv_embed.conv.{old}"] = state.pop(
                f"{prefix}encoder.pos_conv_embed.conv.parametrizations.weight.{new}")
        torch.save(state, directory / "pytorch_model.bin")


@pytest.mark.parametrize("fmt,prefix", [("safetensors", ""), ("bin", "hubert.")])
def test_transformers_directory_equals_fairseq_file(tmp_path, narrow_ckpt, fmt, prefix):
    write_transformers_dir(narrow_ckpt, NARROW, tmp_path, fmt, prefix)
    loaded, expected = load_hubert(tmp_path), fairseq_model(narrow_ckpt)
    assert loaded.config == NARROW
    wav = speechlike(0.5)
    for version in ("v1", "v2"):
        diff = content_features(loaded, wav, version) - content_features(expected, wav, version)
        assert diff.abs().max().item() <= 1e-6


def test_transformers_directory_errors(tmp_path, narrow_ckpt):
    with pytest.raises(AssetError, match="no config.json"):
        load_hubert(tmp_path)
    write_transformers_dir(narrow_ckpt, NARROW, tmp_path, "safetensors", "")
    (tmp_path / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(AssetError, match="no model.safetensors or pytorch_model.bin"):
        load_hubert(tmp_path)
    (tmp_path / "elsewhere.safetensors").rename(tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "do_stable_layer_norm": True}))
    with pytest.raises(AssetError, match="unsupported HuBERT variant"):
        load_hubert(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = safetensors_torch.load_file(tmp_path / "model.safetensors")
    del state["final_proj.weight"], state["final_proj.bias"]
    safetensors_torch.save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(AssetError, match="final_proj"):
        load_hubert(tmp_path)


@pytest.mark.parametrize("num_samples", [400, 719, 720, 8000, 16001, 24321])
def test_frame_count(num_samples):
    model = Hubert(SMALL).eval()
    expected = (num_samples - 400) // 320 + 1
    assert SMALL.num_frames(num_samples) == HubertConfig().num_frames(num_samples) == expected
    with torch.no_grad():
        assert model.extract_features(torch.randn(2, num_samples), 1).shape == (2, expected, 64)


def test_too_short_input_is_rejected():
    with pytest.raises(ValueError, match="too few"):
        Hubert(SMALL).extract_features(torch.zeros(1, 399), 1)


def test_conv_layer_spec_parsing():
    default = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"
    assert parse_conv_layers(default) == HubertConfig().conv_feature_layers
    for bad in ["__import__('os').system('true')", "[(512,10,5)] * 10**9", "[(512, 'a', 2)]", "[]"]:
        with pytest.raises(AssetError):
            parse_conv_layers(bad)
