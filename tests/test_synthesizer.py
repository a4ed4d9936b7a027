import io
import math

import pytest
import torch

from pipeline import synthesizer
from pipeline.assets import AssetError
from pipeline.synthesizer import (
    SynthesizerConfig, SynthNoise, load_voice, random_voice_checkpoint, resblock_precision, save_voice,
    sine_excitation, voice_from_checkpoint)

T = 20  # frames (10 ms each): enough for the attention window and every upsampling stage
# every rate/version layout; f0 and no-f0 voices both covered without building all 12
COMBOS = [("v1", 32000, True), ("v1", 40000, False), ("v1", 48000, False),
          ("v2", 32000, True), ("v2", 40000, True), ("v2", 48000, False)]
_CACHE = {}


def checkpoint(version: str, sample_rate: int, f0: bool, seed: int = 0) -> dict:
    """Random voices are costly to make: build each once per session (callers must not mutate)."""
    key = (seed, version, sample_rate, f0)
    if key not in _CACHE:
        _CACHE[key] = random_voice_checkpoint(seed, version, sample_rate, f0)
    return _CACHE[key]


def inputs(feature_dim: int, f0: bool = True, frames: int = T, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    phone = torch.randn(1, frames, feature_dim, generator=g)
    if not f0:
        return phone, None, None
    nsff0 = torch.linspace(120, 260, frames)[None]
    nsff0[:, frames // 2:frames // 2 + 4] = 0
    pitch = torch.where(nsff0 > 0, (nsff0 / 3).round(), 1).long()
    return phone, pitch, nsff0


@torch.inference_mode()
def synthesize(voice, phone, pitch, nsff0, noise=None, sid=0):
    return voice.model.infer(phone, pitch, nsff0, sid, noise=noise or SynthNoise.zeros())


@pytest.fixture(scope="module")
def v2_ckpt():
    return checkpoint("v2", 40000, True)


@pytest.fixture(scope="module")
def v2_voice(v2_ckpt):
    return voice_from_checkpoint(v2_ckpt)


def with_changes(ckpt: dict, **changes) -> dict:
    out = {**ckpt, "weight": dict(ckpt["weight"])}
    out.update(changes)
    return out


# --- the file format ------------------------------------------------------------------------------

def test_random_checkpoint_has_the_reference_file_layout(v2_ckpt):
    assert list(v2_ckpt) == ["weight", "config", "info", "sr", "f0", "version"]
    assert v2_ckpt["sr"] == "40k" and v2_ckpt["f0"] == 1 and v2_ckpt["version"] == "v2"
    assert v2_ckpt["config"][0] == 1025 and checkpoint("v1", 32000, True)["config"][0] == 513
    assert len(v2_ckpt["config"]) == 18 and v2_ckpt["config"][12] == [10, 10, 2, 2]
    w = v2_ckpt["weight"]
    assert len(w) == 457 and sum(t.numel() for t in w.values()) == 27_537_346
    assert all(t.dtype == torch.float16 for t in w.values())
    assert not any("enc_q" in k or "parametrizations" in k for k in w)
    shapes = {
        "emb_g.weight": (109, 256), "enc_p.emb_phone.weight": (192, 768), "enc_p.emb_pitch.weight": (256, 192),
        "enc_p.encoder.attn_layers.5.emb_rel_k": (1, 21, 96), "enc_p.proj.weight": (384, 192, 1),
        "flow.flows.6.enc.cond_layer.weight_v": (1152, 256, 1), "flow.flows.0.post.weight": (96, 192, 1),
        "dec.m_source.l_linear.weight": (1, 1), "dec.ups.0.weight_g": (512, 1, 1),
        "dec.ups.0.weight_v": (512, 256, 16), "dec.noise_convs.0.weight": (256, 1, 80),
        "dec.noise_convs.3.weight": (32, 1, 1), "dec.resblocks.11.convs2.2.weight_v": (32, 32, 11),
        "dec.conv_post.weight": (1, 32, 7),
    }
    for key, shape in shapes.items():
        assert tuple(w[key].shape) == shape, key
    assert "dec.conv_post.bias" not in w and not any(k.startswith("flow.flows.1.") for k in w)


def test_random_checkpoint_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a = random_voice_checkpoint(0, "v1", 40000, False)
    assert torch.equal(state, torch.get_rng_state())
    b = checkpoint("v1", 40000, False, seed=0)

    def serialized(ckpt):
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        return buf.getvalue()

    assert serialized(a) == serialized(b)
    c = random_voice_checkpoint(1, "v1", 40000, False)
    assert not torch.equal(a["weight"]["emb_g.weight"], c["weight"]["emb_g.weight"])


def test_config_parses_the_list_and_rate_names(v2_ckpt):
    config = SynthesizerConfig.from_list(v2_ckpt["config"])
    assert config.sample_rate == 40000 and config.upsample_factor == 400
    assert config.resblock_dilation_sizes == ((1, 3, 5),) * 3
    named = SynthesizerConfig.from_list(v2_ckpt["config"][:-1] + ["48k"])
    assert named.sample_rate == 48000
    with pytest.raises(AssetError, match="18 values"):
        SynthesizerConfig.from_list(v2_ckpt["config"][:-1])


# --- loading ------------------------------------------------------------------------------------

def test_load_voice_round_trip_and_metadata(tmp_path, v2_ckpt, v2_voice):
    path = tmp_path / "voice.pth"
    save_voice(v2_ckpt, path)
    voice = load_voice(path)
    assert (voice.version, voice.f0, voice.sample_rate, voice.feature_dim, voice.upsample_factor) == \
        ("v2", True, 40000, 768, 400)
    assert voice.info == "0epoch" and voice.config.spk_embed_dim == 109
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in voice.model.parameters())
    x = inputs(768)
    assert torch.equal(synthesize(voice, *x), synthesize(v2_voice, *x))


def test_speaker_count_comes_from_the_table_not_the_config(v2_ckpt):
    ckpt = with_changes(v2_ckpt, config=v2_ckpt["config"][:15] + [3] + v2_ckpt["config"][16:])
    assert voice_from_checkpoint(ckpt).config.spk_embed_dim == 109


def test_applio_layout_loads_strictly_to_the_same_voice(v2_ckpt, v2_voice):
    renamed = {k.replace(".weight_g", ".parametrizations.weight.original0")
                .replace(".weight_v", ".parametrizations.weight.original1"): v
               for k, v in v2_ckpt["weight"].items()}
    assert sum(".parametrizations." in k for k in renamed) == 2 * 104
    applio = with_changes(v2_ckpt, weight=renamed, f0=True, vocoder="HiFi-GAN", epoch=3, author="x")
    x = inputs(768)
    assert torch.equal(synthesize(voice_from_checkpoint(applio), *x), synthesize(v2_voice, *x))


def test_folded_weight_norm_equals_per_forward_weight_norm(v2_ckpt, v2_voice):
    unfolded = voice_from_checkpoint(v2_ckpt, fold=False)
    keys = unfolded.model.state_dict().keys()
    assert keys == {k for k in v2_ckpt["weight"]}  # exactly the reference's names
    assert not any(k.endswith((".weight_g", ".weight_v")) for k in v2_voice.model.state_dict())
    x = inputs(768)
    noise = SynthNoise.from_generator
    a = synthesize(unfolded, *x, noise(torch.Generator().manual_seed(3)))
    b = synthesize(v2_voice, *x, noise(torch.Generator().manual_seed(3)))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_missing_unexpected_and_misshaped_weights_are_named(v2_ckpt):
    weight = dict(v2_ckpt["weight"])
    weight["dec.conv_post.weight_x"] = weight.pop("dec.conv_post.weight")
    missing_and_unexpected = r"missing keys dec\.conv_post\.weight;.*unexpected keys dec\.conv_post\.weight_x"
    with pytest.raises(AssetError, match=missing_and_unexpected):
        voice_from_checkpoint(with_changes(v2_ckpt, weight=weight))
    # a v2 file labelled v1: the 768-d input layer does not fit a 256-d voice
    misshaped = r"wrong shapes enc_p\.emb_phone\.weight \[192, 768\] \(expected \[192, 256\]\)"
    with pytest.raises(AssetError, match=misshaped):
        voice_from_checkpoint(with_changes(v2_ckpt, version="v1"))
    # an f0 file labelled no-f0: the NSF source and pitch table are left over
    with pytest.raises(AssetError, match=r"unexpected keys dec\.m_source\.l_linear\.bias"):
        voice_from_checkpoint(with_changes(v2_ckpt, f0=0))


@pytest.mark.parametrize("changes, message", [
    ({"vocoder": "RefineGAN"}, "unsupported vocoder 'RefineGAN'"),
    ({"version": "v3"}, "unsupported voice version 'v3'"),
    ({"f0": 2}, "f0 flag must be 0 or 1"),
    ({"config": [1, 2, 3]}, "config must be a list of 18 values"),
])
def test_unsupported_metadata_is_rejected(v2_ckpt, changes, message):
    with pytest.raises(AssetError, match=message):
        voice_from_checkpoint(with_changes(v2_ckpt, **changes))


def test_bad_files_raise_asset_errors_naming_the_file(tmp_path, v2_ckpt):
    with pytest.raises(AssetError, match="not found"):
        load_voice(tmp_path / "absent.pth")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(AssetError, match="notes.pth"):
        load_voice(text)
    small = tmp_path / "small.pth"
    torch.save({"weight": {"emb_g.weight": torch.zeros(4096)}, "config": v2_ckpt["config"]}, small)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(small.read_bytes()[: small.stat().st_size // 2])
    with pytest.raises(AssetError, match="truncated.pth: cannot load voice"):
        load_voice(truncated)
    no_weight = tmp_path / "no_weight.pth"
    torch.save({"config": v2_ckpt["config"], "info": "x"}, no_weight)
    with pytest.raises(AssetError, match=r"no_weight.pth: not an RVC voice: needs the keys 'weight' and 'config'"):
        load_voice(no_weight)


def test_loading_does_not_touch_the_global_rng(v2_ckpt):
    state = torch.get_rng_state()
    voice = voice_from_checkpoint(v2_ckpt)
    synthesize(voice, *inputs(768), SynthNoise.from_generator(torch.Generator().manual_seed(0)))
    assert torch.equal(state, torch.get_rng_state())


# --- inference ----------------------------------------------------------------------------------

@pytest.mark.parametrize("version, sample_rate, f0", COMBOS)
def test_output_has_one_frame_of_samples_per_10ms_for_every_layout(version, sample_rate, f0):
    voice = voice_from_checkpoint(checkpoint(version, sample_rate, f0))
    assert voice.upsample_factor == sample_rate // 100
    out = synthesize(voice, *inputs(voice.feature_dim, f0),
                     SynthNoise.from_generator(torch.Generator().manual_seed(0)))
    assert out.shape == (1, 1, T * sample_rate // 100)
    assert torch.isfinite(out).all() and out.abs().max() < 1
    assert 0.05 < out.pow(2).mean().sqrt() < 0.8


def test_no_f0_voice_runs_without_pitch():
    voice = voice_from_checkpoint(checkpoint("v2", 48000, False))
    assert not voice.f0 and not hasattr(voice.model.dec, "m_source")
    phone = inputs(768, f0=False)[0]
    assert synthesize(voice, phone, None, None).shape == (1, 1, T * 480)
    with pytest.raises(ValueError, match="no pitch input"):
        synthesize(voice, *inputs(768))


def test_same_seed_same_output_other_seed_other_output(v2_voice):
    x = inputs(768)

    def run(seed):
        return synthesize(v2_voice, *x, SynthNoise.from_generator(torch.Generator().manual_seed(seed)))

    assert torch.equal(run(1), run(1))
    assert (run(1) - run(2)).abs().max() > 0.05


def test_zero_noise_is_deterministic_and_differs_from_noisy_output(v2_voice):
    x = inputs(768)
    assert torch.equal(synthesize(v2_voice, *x), synthesize(v2_voice, *x))
    noisy = synthesize(v2_voice, *x, SynthNoise.from_generator(torch.Generator().manual_seed(0)))
    assert (noisy - synthesize(v2_voice, *x)).abs().max() > 0.05


def test_generator_draws_prior_then_phase_then_source(v2_voice):
    """The draw order of the reference: injecting the same stream reproduces the generator run."""
    x = inputs(768)
    g = torch.Generator().manual_seed(9)
    prior = torch.randn(1, 192, T, generator=g)
    torch.rand(1, 1, 1, generator=g)  # SineGen's initial phase (no effect on the output)
    source = torch.randn(1, T * 400, 1, generator=g)
    injected = synthesize(v2_voice, *x, SynthNoise.injected(prior, source))
    drawn = synthesize(v2_voice, *x, SynthNoise.from_generator(torch.Generator().manual_seed(9)))
    assert torch.equal(injected, drawn)
    with pytest.raises(ValueError, match="shape"):
        synthesize(v2_voice, *x, SynthNoise.injected(prior[:, :, :-1], source))


def test_output_follows_features_pitch_and_speaker(v2_voice):
    phone, pitch, nsff0 = inputs(768, frames=40)
    base = synthesize(v2_voice, phone, pitch, nsff0)

    def change(**kw):
        args = {"phone": phone, "pitch": pitch, "nsff0": nsff0, **kw}
        out = synthesize(v2_voice, args["phone"], args["pitch"], args["nsff0"], sid=kw.get("sid", 0))
        return float((out - base).pow(2).mean().sqrt() / base.pow(2).mean().sqrt())

    assert change(phone=inputs(768, frames=40, seed=1)[0]) > 0.1
    assert change(nsff0=nsff0 * 1.5) > 0.1
    assert change(pitch=torch.clamp(pitch + 40, max=255)) > 0.1
    assert change(sid=3) > 0.1


def test_speaker_id_out_of_range_is_an_error(v2_voice):
    with pytest.raises(ValueError, match="sid 109 out of range"):
        synthesize(v2_voice, *inputs(768), sid=109)
    with pytest.raises(ValueError, match="out of range"):
        synthesize(v2_voice, *inputs(768), sid=-1)


def test_pitch_inputs_are_required_and_checked(v2_voice):
    phone, pitch, nsff0 = inputs(768)
    with pytest.raises(ValueError, match="pitch and nsff0 are required"):
        synthesize(v2_voice, phone, None, None)
    with pytest.raises(ValueError, match="must be"):
        synthesize(v2_voice, phone, pitch[:, :-1], nsff0)
    with pytest.raises(ValueError, match=r"phone must be \[B, T, 768\]"):
        synthesize(v2_voice, phone[..., :256], pitch, nsff0)


# --- the NSF sine -------------------------------------------------------------------------------

def test_sine_phase_is_continuous_and_starts_one_step_in():
    sr, upp, frames, hz = 40000, 400, 300, 197.3
    sine, voiced = sine_excitation(torch.full((1, frames), hz), upp, sr)
    n = torch.arange(1, frames * upp + 1, dtype=torch.float64)
    expected = 0.1 * torch.sin(2 * math.pi * ((hz * n / sr) % 1.0))
    torch.testing.assert_close(sine[0].double(), expected, atol=2e-5, rtol=0)
    assert voiced.all()


def test_sine_voicing_follows_f0_per_frame():
    f0 = torch.tensor([[0.0, 100.0, 0.0, 220.0]])
    sine, voiced = sine_excitation(f0, 4, 1000)
    assert voiced[0].tolist() == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 4
    # the phase keeps running through unvoiced frames (f0 = 0 adds nothing): frame 3 starts at 0.4
    phase = 0.4 + 0.22 * torch.arange(1, 5)
    torch.testing.assert_close(sine[0, 12:], 0.1 * torch.sin(2 * math.pi * phase), atol=1e-6, rtol=0)


# --- batches --------------------------------------------------------------------------------------

@pytest.mark.parametrize("f0", [True, False])
def test_a_padded_batch_gives_each_item_its_own_output(f0):
    """Items of different lengths in one batch, each with its own seeded draws and speaker, equal
    their lone outputs except the last samples, which hear the decoder's padding."""
    voice = voice_from_checkpoint(checkpoint("v2", 40000, f0))
    voice.model.emb_g.weight.data[1] = torch.randn(voice.config.gin_channels)  # a second speaker
    lengths, sids, seeds = [60, 41, 60], [0, 1, 0], [3, 4, 5]
    items = [inputs(768, f0, frames=n, seed=s) for n, s in zip(lengths, seeds)]
    alone = [synthesize(voice, *x, SynthNoise.from_generator(torch.Generator().manual_seed(s)), sid=sid)[0, 0]
             for x, s, sid in zip(items, seeds, sids)]
    t = max(lengths)

    def padded(i, k):
        x = items[i][k]
        return None if x is None else torch.nn.functional.pad(x, (0, 0, 0, t - x.shape[1]) if k == 0
                                                                else (0, t - x.shape[1]))

    batch = [torch.cat([padded(i, k) for i in range(3)]) if f0 or k == 0 else None for k in range(3)]
    noise = SynthNoise.stacked([SynthNoise.from_generator(torch.Generator().manual_seed(s)) for s in seeds], lengths)
    with torch.inference_mode():
        out = voice.model.infer(*batch, sids, noise=noise, lengths=lengths)
    assert out.shape == (3, 1, t * voice.upsample_factor)
    margin = 10 * voice.upsample_factor  # 100 ms: far less than the pipeline's trim
    for i, n in enumerate(lengths):
        keep = n * voice.upsample_factor - margin
        torch.testing.assert_close(out[i, 0, :keep], alone[i][:keep], atol=2e-5, rtol=0)
    assert not torch.allclose(alone[0], alone[2])  # seeds differ, so the comparison means something


@pytest.mark.parametrize("version,sample_rate,f0", COMBOS)
def test_trimmed_output_is_not_decoded_and_equals_the_trimmed_whole(version, sample_rate, f0):
    """With trim_frames the decoder skips the trimmed frames but for its receptive field
    (`decoder_context_frames`); the kept samples equal those of the whole output."""
    voice = voice_from_checkpoint(checkpoint(version, sample_rate, f0))
    frames, trim = 90, 30
    x = inputs(voice.feature_dim, f0, frames=frames, seed=1)

    def run(trim_frames):
        noise = SynthNoise.from_generator(torch.Generator().manual_seed(7))
        with torch.inference_mode():
            return voice.model.infer(*x, noise=noise, trim_frames=trim_frames)[0, 0]

    upp = voice.upsample_factor
    whole, trimmed = run(0), run(trim)
    assert trimmed.shape == ((frames - 2 * trim) * upp,)
    torch.testing.assert_close(trimmed, whole[trim * upp:(frames - trim) * upp], atol=2e-5, rtol=0)
    assert voice.model.dec.context_frames < trim  # so the decoder really left frames out

    # without its context, the edges of the kept part come out different
    voice.model.dec.context_frames = 0
    edge = run(trim)[:upp] - whole[trim * upp:(trim + 1) * upp]
    assert edge.abs().max() > 1e-3


@pytest.mark.parametrize("trim", [0, 20])
def test_decoding_in_segments_equals_decoding_whole(trim):
    voice = voice_from_checkpoint(checkpoint("v2", 40000, True))
    x = inputs(768, frames=90, seed=5)

    def run(segment_frames):
        voice.model.dec.cpu_segment_frames = segment_frames
        noise = SynthNoise.from_generator(torch.Generator().manual_seed(2))
        with torch.inference_mode():
            return voice.model.infer(*x, noise=noise, trim_frames=trim)

    whole, segmented = run(10**6), run(16)  # 16 < context_frames: segments read their neighbours
    assert segmented.shape == whole.shape == (1, 1, (90 - 2 * trim) * voice.upsample_factor)
    torch.testing.assert_close(segmented, whole, atol=2e-5, rtol=0)


@pytest.fixture(params=["mkldnn", "torch"])
def layout_kernels(request, monkeypatch):
    """The channels-last layout's kernels: mkldnn's (CPUs) or torch's 2-D convolutions (what CUDA
    runs), the latter here on the CPU."""
    if request.param == "torch":
        monkeypatch.setattr(synthesizer, "_mkldnn_layout", lambda x: False)
        monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", None)  # never called then
    return request.param


def test_the_cuda_decoders_channels_last_kernels_give_the_plain_layouts_output(v2_voice, monkeypatch):
    """The whole decoder in [B, C, L, 1] on torch's 2-D convolutions (CUDA's kernels, run here
    on the CPU) against the plain [B, C, L] layout, batched and trimmed."""
    x = [torch.cat(parts) for parts in zip(inputs(768, frames=60, seed=6), inputs(768, frames=60, seed=7))]

    def run():
        noise = SynthNoise.from_generator(torch.Generator().manual_seed(1))
        with torch.inference_mode():
            return v2_voice.model.infer(*x, noise=noise, trim_frames=7)

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    plain = run()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(synthesizer, "_mkldnn_layout", lambda x: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    torch.testing.assert_close(run(), plain, atol=2e-5, rtol=0)


def test_cpus_without_mkldnn_decode_in_the_plain_layout_to_the_same_output(v2_voice, monkeypatch):
    x = inputs(768, frames=60, seed=6)

    def run():
        noise = SynthNoise.from_generator(torch.Generator().manual_seed(1))
        with torch.inference_mode():
            return v2_voice.model.infer(*x, noise=noise)

    channels_last = run()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", None)  # the plain layout never calls it
    torch.testing.assert_close(run(), channels_last, atol=2e-5, rtol=0)


def test_a_trimmed_batch_keeps_each_items_own_end(v2_voice):
    lengths, trim, seeds = [80, 65], 25, [3, 4]
    items = [inputs(768, frames=n, seed=s) for n, s in zip(lengths, seeds)]
    upp = v2_voice.upsample_factor
    alone = [synthesize(v2_voice, *x, SynthNoise.from_generator(torch.Generator().manual_seed(s)))[0, 0]
             for x, s in zip(items, seeds)]
    t = max(lengths)
    batch = [torch.cat([torch.nn.functional.pad(x[k], (0, 0, 0, t - x[k].shape[1]) if k == 0 else (0, t - x[k].shape[1]))
                        for x in items]) for k in range(3)]
    noise = SynthNoise.stacked([SynthNoise.from_generator(torch.Generator().manual_seed(s)) for s in seeds], lengths)
    with torch.inference_mode():
        out = v2_voice.model.infer(*batch, noise=noise, lengths=lengths, trim_frames=trim)
    assert out.shape == (2, 1, (t - 2 * trim) * upp)
    for i, n in enumerate(lengths):
        kept = (n - 2 * trim) * upp
        torch.testing.assert_close(out[i, 0, :kept], alone[i][trim * upp:(n - trim) * upp], atol=2e-5, rtol=0)


@pytest.mark.parametrize("version,sample_rate,f0", [("v1", 32000, True), ("v2", 48000, False)])
def test_bf16_residual_blocks_stay_within_the_fidelity_bound(version, sample_rate, f0):
    voice = voice_from_checkpoint(checkpoint(version, sample_rate, f0))
    x = inputs(voice.feature_dim, f0, frames=60, seed=2)
    exact = synthesize(voice, *x)
    with resblock_precision(torch.bfloat16):
        rounded = synthesize(voice, *x)
    assert rounded.dtype == torch.float32
    error = ((rounded - exact).norm() / exact.norm()).item()
    assert 1e-6 < error < 5e-3  # rounded, but far inside the 1e-2 bound


def test_compiled_glue_computes_what_the_eager_glue_computes(v2_voice, monkeypatch):
    """compile_pointwise: the decoder's bf16 glue as inductor loops gives the eager output up to
    the leaky ReLU's rounding order, is used by every residual block, and leaves fp32 exact."""
    from pipeline import synthesizer

    monkeypatch.setattr(synthesizer, "_COMPILED", {})  # this process's compilations stay this test's
    monkeypatch.setattr(v2_voice.model.dec, "cpu_segment_frames", 25)  # crops and offsets in play
    x = inputs(768, frames=60, seed=5)
    exact = synthesize(v2_voice, *x)
    with resblock_precision(torch.bfloat16):
        eager = synthesize(v2_voice, *x)
    synthesizer.compile_pointwise()
    calls = {fn.__name__: 0 for fn in synthesizer._COMPILED}

    def counted(fn, compiled):
        def call(*args):
            calls[fn.__name__] += 1
            return compiled(*args)
        return call

    synthesizer._COMPILED.update({fn: counted(fn, c) for fn, c in synthesizer._COMPILED.items()})
    with resblock_precision(torch.bfloat16):
        compiled = synthesize(v2_voice, *x)
    assert torch.equal(synthesize(v2_voice, *x), exact)  # fp32 takes no mixed-dtype glue
    # per segment, each of the 3 stages' residual blocks: 3 activations into a dilated input,
    # 1 sum made, 2 added into
    blocks = len(v2_voice.model.dec.resblocks) * -(-60 // 25)
    assert calls == {"_leaky_into": 3 * blocks, "_add_converted": blocks, "_add_converted_": 2 * blocks}
    error = {name: ((out - exact).norm() / exact.norm()).item() for name, out in [("eager", eager), ("compiled", compiled)]}
    assert 1e-6 < error["compiled"] < min(5e-3, 1.2 * error["eager"]), error  # rounded as much, no more
    assert not torch.equal(compiled, eager)  # the compiled glue ran (it rounds the leaky ReLU once, not twice)


def test_a_failed_compilation_leaves_the_eager_glue(v2_voice, monkeypatch):
    from pipeline import synthesizer

    monkeypatch.setattr(synthesizer, "_COMPILED", {})

    def no_compiler(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler")
        return call

    monkeypatch.setattr(torch, "compile", no_compiler)
    with pytest.raises(RuntimeError, match="compiler"):
        synthesizer.compile_pointwise()
    assert synthesizer._COMPILED == {}
    x = inputs(768, frames=30, seed=6)
    with resblock_precision(torch.bfloat16):
        out = synthesize(v2_voice, *x)
    assert torch.isfinite(out).all()


def test_batch_arguments_are_checked(v2_voice):
    phone, pitch, nsff0 = inputs(768)
    with pytest.raises(ValueError, match="lengths"):
        v2_voice.model.infer(phone, pitch, nsff0, noise=SynthNoise.zeros(), lengths=[T + 1])
    with pytest.raises(ValueError, match="sid"):
        v2_voice.model.infer(phone, pitch, nsff0, [0, 0], noise=SynthNoise.zeros())
    with pytest.raises(ValueError, match="trim_frames"):
        v2_voice.model.infer(phone, pitch, nsff0, noise=SynthNoise.zeros(), trim_frames=T // 2)


@pytest.mark.parametrize("make", [
    lambda: torch.nn.Conv1d(8, 8, 11, dilation=5, padding="same"),
    lambda: torch.nn.Conv1d(8, 8, 4, dilation=3, padding="same"),  # even: more padding on the right
    lambda: torch.nn.Conv1d(8, 6, 3, padding="same"),
    lambda: torch.nn.Conv1d(1, 8, 20, 10, padding=5),  # a noise conv: strided, int padding
    lambda: torch.nn.Conv1d(8, 8, 1),
], ids=["dilated", "even-kernel", "k3", "strided", "1x1"])
def test_channels_last_convolution_equals_the_module(make, layout_kernels):
    """The decoder's CPU layout ([B, C, L, 1] channels-last; padded beforehand or by mkldnn; an
    output activation fused into the convolution) computes what the 1-D module computes, with
    mkldnn's kernels and with torch's 2-D convolution (CUDA's)."""
    from pipeline.synthesizer import _conv

    torch.manual_seed(0)
    conv = make()
    x = torch.randn(2, conv.in_channels, 97)
    x4 = x[..., None].contiguous(memory_format=torch.channels_last)
    leaky = torch.nn.functional.leaky_relu
    with torch.inference_mode():
        expected, got = conv(x), _conv(conv, x4)
        expected_activated, got_activated = conv(leaky(x, 0.1)), _conv(conv, x4, 0.1)
        expected_both, got_both = leaky(conv(leaky(x, 0.1)), 0.2), _conv(conv, x4, 0.1, out_slope=0.2)
        got_out_only = _conv(conv, x4, out_slope=0.2)
    assert got.shape == got_activated.shape == got_both.shape == (*expected.shape, 1)
    torch.testing.assert_close(got[..., 0], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_activated[..., 0], expected_activated, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_both[..., 0], expected_both, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_out_only[..., 0], leaky(expected, 0.2), rtol=0, atol=1e-5)
    # the [B, C, L] path
    torch.testing.assert_close(_conv(conv, x, 0.1), expected_activated, rtol=0, atol=0)
    torch.testing.assert_close(_conv(conv, x, 0.1, out_slope=0.2), expected_both, rtol=0, atol=0)


@pytest.mark.parametrize("kernel, stride, padding, output_padding", [
    (20, 10, 5, 0),  # the decoder's: (kernel - stride) / 2
    (16, 10, 3, 0),  # a last tap block narrower than the stride
    (4, 2, 1, 0),
    (3, 4, 0, 0),  # fewer taps than the stride: gaps of bias alone
    (7, 3, 4, 2),  # padding past a block, output padding
])
@pytest.mark.parametrize("batch", [1, 2])
def test_channels_last_upsampling_equals_the_modules(kernel, stride, padding, output_padding, batch, layout_kernels):
    """The CPU layout's upsampling (matrix products per tap block, the source convolution added in
    place; or torch's transposed 2-D convolution, CUDA's) computes the transposed convolution plus
    the source convolution of the 1-D modules."""
    from pipeline.synthesizer import _upsample

    torch.manual_seed(0)
    up = torch.nn.ConvTranspose1d(16, 8, kernel, stride, padding=padding, output_padding=output_padding)
    x = torch.randn(batch, 16, 31)
    with torch.inference_mode():
        expected = up(x)
        source = torch.randn(batch, 1, expected.shape[-1] * 2)
        noise_conv = torch.nn.Conv1d(1, 8, 4, 2, padding=1)
        got = _upsample(up, x[..., None].contiguous(memory_format=torch.channels_last))
        got_with_source = _upsample(up, x[..., None].contiguous(memory_format=torch.channels_last),
                                    noise_conv, source)
        expected_with_source = expected + noise_conv(source)
        assert torch.equal(_upsample(up, x, noise_conv, source), expected_with_source)  # the [B, C, L] path
    assert got.shape == got_with_source.shape == (*expected.shape, 1)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got[..., 0], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_with_source[..., 0], expected_with_source, rtol=0, atol=1e-5)
