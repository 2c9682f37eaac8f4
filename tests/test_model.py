"""The model against the released semantics: fixtures, layout, shapes, embeddings."""
import pytest
import torch

import audiomae
from audiomae import AudioMAE, AudioMAEClassifier, AudioMAEConfig
from audiomae.model import patchify, unpatchify
from conftest import load_fixture

# float32 rounding of a few dozen layers: the fixtures were computed by another implementation
PRED_ATOL = 1e-5
LOSS_RTOL = 1e-6


@pytest.mark.parametrize("name", ["model_tiny_local", "model_tiny_global"])
def test_pretraining_fixture(name):
    d = load_fixture(name)
    model = AudioMAE(AudioMAEConfig(**d["config"])).eval()
    model.load_state_dict(d["state_dict"], strict=True)
    with torch.no_grad():
        out = model(d["input"], mask_ratio=d["mask_ratio"], noise=d["noise"])
    torch.testing.assert_close(out.mask, d["mask"], rtol=0, atol=0)
    torch.testing.assert_close(out.pred, d["pred"], rtol=0, atol=PRED_ATOL)
    torch.testing.assert_close(out.loss, d["loss"], rtol=LOSS_RTOL, atol=1e-7)
    loss, pred, mask = out  # unpacks and indexes like the release's tuple
    assert loss is out.loss and pred is out.pred and mask is out.mask
    assert out[0] is out.loss and out[-1] is out.mask and out[1:] == (out.pred, out.mask) and len(out) == 3


@pytest.mark.parametrize("name", ["model_tiny_local", "model_tiny_global"])
def test_built_position_tables_are_the_fixtures(name):
    """The tables the pretraining model builds itself (before any weights are loaded) are the released
    code's: the fixtures' pos_embed and decoder_pos_embed, to float32 rounding. (The released classifier
    starts from zeros and takes its table from the checkpoint, so only loading matters there.)"""
    d = load_fixture(name)
    built = AudioMAE(AudioMAEConfig(**d["config"])).state_dict()
    for key in ("pos_embed", "decoder_pos_embed"):
        torch.testing.assert_close(built[key], d["state_dict"][key], rtol=0, atol=1e-6)
        assert d["state_dict"][key].abs().max() > 0.5  # a real table, not zeros


def test_local_fixture_needs_time_only_shift():
    """The released weights were trained with shift (2, 0); (2, 2) must give a different answer."""
    d = load_fixture("model_tiny_local")
    model = AudioMAE(AudioMAEConfig(**d["config"], shift_size=(2, 2))).eval()
    model.load_state_dict(d["state_dict"])
    with torch.no_grad():
        out = model(d["input"], mask_ratio=d["mask_ratio"], noise=d["noise"])
    assert (out.pred - d["pred"]).abs().max() > 1e-2


def test_classifier_fixture():
    d = load_fixture("classifier_tiny")
    model = AudioMAEClassifier(AudioMAEConfig(**d["config"])).eval()
    model.load_state_dict(d["state_dict"], strict=True)
    with torch.no_grad():
        logits = model(d["input"])
    torch.testing.assert_close(logits, d["logits"], rtol=0, atol=1e-5)


def test_vit_b_layout():
    """The released fine-tuned ViT-B (527 classes) has 85,659,407 trainable parameters."""
    clf = AudioMAEClassifier(AudioMAEConfig.preset("base"), num_classes=527)
    assert sum(p.numel() for p in clf.parameters() if p.requires_grad) == 85_659_407
    assert not clf.pos_embed.requires_grad


def test_vit_b_pretraining_state_dict_keys():
    model = AudioMAE(AudioMAEConfig.preset("base"))
    sd = model.state_dict()
    assert sd["pos_embed"].shape == (1, 513, 768)
    assert sd["decoder_pos_embed"].shape == (1, 513, 512)
    assert len([k for k in sd if k.startswith("decoder_blocks.15.")]) == 17  # tau, qkv, proj, meta_mlp x2, norm1, mlp x2, norm2
    assert sd["decoder_blocks.3.attn.tau"].shape == (16,)
    assert sd["decoder_blocks.3.attn.meta_mlp.fc1.weight"].shape == (384, 2)
    assert not any("relative_coordinates" in k or "attn_mask" in k for k in sd)
    # odd layers shift time by 2, even layers do not
    assert [b.shift for b in model.decoder_blocks[:4]] == [(0, 0), (2, 0), (0, 0), (2, 0)]


@pytest.mark.parametrize("mode", ["local", "global", "hybrid"])
@pytest.mark.parametrize("img", [(256, 128), (128, 64)])
def test_shapes_and_backward(mode, img):
    cfg = AudioMAEConfig.preset("tiny", decoder_mode=mode, img_size=img)
    model = AudioMAE(cfg)
    x = torch.randn(3, 1, *img)
    out = model(x)
    L = cfg.num_patches
    assert out.pred.shape == (3, L, 256) and out.mask.shape == (3, L)
    assert int(out.mask[0].sum()) == L - int(L * 0.2)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())


def test_hybrid_layout():
    cfg = AudioMAEConfig.preset("tiny", decoder_mode="hybrid")
    model = AudioMAE(cfg)
    kinds = [type(b).__name__ for b in model.decoder_blocks]
    assert kinds == ["SwinBlock", "SwinBlock", "Block", "Block"]


def test_window_clamped_to_small_grid():
    # 64 frames x 32 bins -> a 4 x 2 grid: window clamps to 4 x 2, no shift on either axis
    cfg = AudioMAEConfig.preset("tiny", img_size=(64, 32))
    model = AudioMAE(cfg)
    assert model.decoder_blocks[1].attn.window == (4, 2)
    assert model.decoder_blocks[1].shift == (0, 0)
    model(torch.randn(2, 1, 64, 32)).loss.backward()


def test_window_that_does_not_tile_is_refused():
    with pytest.raises(ValueError, match="does not tile"):
        AudioMAE(AudioMAEConfig.preset("tiny", img_size=(96, 128)))  # 6 x 8 grid, 4 x 4 windows


def test_patchify_roundtrip_and_order():
    x = torch.randn(2, 1, 64, 32)
    p = patchify(x, 16)
    assert p.shape == (2, 8, 256)
    # token 1 is time row 0, frequency column 1; its values row-major 16 time rows of 16 bins
    torch.testing.assert_close(p[:, 1], x[:, 0, :16, 16:32].reshape(2, 256))
    torch.testing.assert_close(unpatchify(p, 16, (4, 2)), x)


def test_bad_input_shape_message():
    model = AudioMAE(AudioMAEConfig.preset("tiny"))
    with pytest.raises(ValueError, match=r"expected input \[B, 1, 256, 128\]"):
        model(torch.randn(2, 1, 200, 128))
    with pytest.raises(ValueError, match=r"unsqueeze\(1\)"):
        model(torch.randn(2, 256, 128))
    with pytest.raises(ValueError, match=r"one clip .*unsqueeze\(0\)"):  # load_input's [1, T, F]
        model.embed(torch.randn(1, 256, 128))


@pytest.mark.parametrize("bad,message", [
    (lambda: torch.randn(2, 1, 256, 128).numpy(), "got numpy.ndarray; convert it with torch.from_numpy"),
    (lambda: torch.zeros(2, 1, 256, 128, dtype=torch.long), "floating-point spectrogram, got dtype torch.int64"),
    (lambda: torch.randn(2, 1, 256, 128, dtype=torch.float64), "torch.float64 differs from the model's torch.float32"),
], ids=["numpy", "integer", "float64"])
def test_bad_input_type_message(bad, message):
    model = AudioMAE(AudioMAEConfig.preset("tiny"))
    with pytest.raises(TypeError, match=message):
        model(bad())
    classifier = AudioMAEClassifier(AudioMAEConfig.preset("tiny"), num_classes=3)
    with pytest.raises(TypeError, match=message):
        classifier(bad())


def test_input_dtype_may_differ_under_autocast():
    model = AudioMAE(AudioMAEConfig.preset("tiny"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.embed(torch.randn(2, 1, 256, 128, dtype=torch.bfloat16)).shape == (2, 64)


def test_embeddings():
    d = load_fixture("model_tiny_local")
    model = AudioMAE.from_pretrained("tests/data/model_tiny_local.pt").eval()
    pooled = model.embed(d["input"])
    per_patch = model.embed(d["input"], per_patch=True)
    assert pooled.shape == (2, 64) and per_patch.shape == (2, 128, 64)
    torch.testing.assert_close(pooled, per_patch.mean(1))
    # the classifier built from the same encoder gives the same per-patch tokens before the final norm
    clf = AudioMAEClassifier.from_pretrained("tests/data/classifier_tiny.pt").eval()
    assert clf.embed(d["input"]).shape == (2, 64)
    assert clf.embed(d["input"], per_patch=True).shape == (2, 128, 64)


def test_classifier_2d_masking_in_training_only():
    cfg = AudioMAEConfig.preset("tiny", finetune_mask_2d=True)
    clf = AudioMAEClassifier(cfg, num_classes=5)
    x = torch.randn(2, 1, 256, 128)
    clf.eval()
    a = clf(x)
    torch.testing.assert_close(a, clf(x))
    clf.train()
    feats = clf.forward_features(x)  # masked: 12 of 16 rows, 6 of 8 columns
    assert feats.shape == (2, 64)
    # explicit noise fixes the kept rows/columns: same noise, same result
    noise = torch.rand(2, 16 + 8)
    torch.testing.assert_close(clf(x, noise=noise), clf(x, noise=noise))
    assert not torch.allclose(clf(x, mask_2d=False), clf(x, noise=noise))


def test_presets():
    for name in ["tiny", "small", "base", "large", "huge", "B", "mae_vit_base_patch16"]:
        AudioMAEConfig.preset(name)
    assert AudioMAEConfig.preset("huge").grid_size == (73, 9)
    with pytest.raises(ValueError, match="unknown preset"):
        AudioMAEConfig.preset("gigantic")
    with pytest.raises(ValueError, match="decoder_mode"):
        AudioMAEConfig(decoder_mode="windowed")
    # the release's decoders: 16 local (Swin) blocks, or 8 global (ViT) blocks
    assert AudioMAEConfig.preset("base").decoder_depth == 16
    assert AudioMAEConfig.preset("base", decoder_mode="global").decoder_depth == 8
    assert AudioMAEConfig.preset("large", decoder_mode="global").num_local_blocks == 0
    assert AudioMAEConfig.preset("base", decoder_mode="global", decoder_depth=12).decoder_depth == 12
    assert AudioMAEConfig.preset("huge").decoder_depth == 8


def test_public_api():
    assert audiomae.AudioMAEConfig is AudioMAEConfig
    assert callable(audiomae.AudioMAE.from_pretrained)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.5, float("nan")])
@pytest.mark.parametrize("mode", ["unstructured", "time"])
def test_mask_ratio_outside_0_1_is_refused_by_name(ratio, mode):
    """0 would give a NaN loss (no masked patch), 1 no kept patch; the message names mask_ratio."""
    model = AudioMAE(AudioMAEConfig.preset("tiny"))
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\) \(the loss is the mean over the masked"):
        model(torch.randn(2, 1, 256, 128), mask_ratio=ratio, mask_mode=mode)


def test_mask_ratio_that_masks_nothing_is_refused():
    model = AudioMAE(AudioMAEConfig.preset("tiny"))
    x = torch.randn(2, 1, 256, 128)
    with pytest.raises(ValueError, match=r"mask_ratio=1e-17 masks no patch of the 16 x 8 patch grid"):
        model(x, mask_ratio=1e-17)
    with pytest.raises(TypeError, match="mask_ratio must be a number"):
        model(x, mask_ratio="0.8")
    model.config.mask_ratio = 0.0  # a config changed after it was checked
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\)"):
        model(x)
    out = model(x, mask_ratio=0.005)  # int(128 * 0.995) = 127 kept: a ratio that masks one patch is fine
    assert (out.mask.sum(1) == 1).all() and torch.isfinite(out.loss)
    assert (model(x, mask_ratio=0.99).mask.sum(1) == 127).all()


def test_config_masking_rules_match_the_forward_call():
    for kw, message in [(dict(mask_ratio=1.0), r"mask_ratio must be in \[0, 1\)"),
                        (dict(mask_ratio=float("nan")), r"mask_ratio must be in \[0, 1\)"),
                        (dict(mask_t_prob=1.5), r"mask_t_prob must be in \[0, 1\]"),
                        (dict(finetune_mask_f_prob=-0.1), r"finetune_mask_f_prob must be in \[0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            AudioMAEConfig.preset("tiny", **kw)
    # configs that cannot pretrain are still configs (a classifier's, files saved with mask_ratio 0);
    # the forward call refuses to pretrain with them
    x = torch.randn(1, 1, 256, 128)
    for kw, message in [(dict(mask_ratio=0.0), r"mask_ratio must be in \(0, 1\)"),
                        (dict(mask_mode="time_frequency", mask_t_prob=0.0, mask_f_prob=0.0), "mask no patch"),
                        (dict(img_size=(16, 128), mask_mode="time"), "no mask_ratio does on this grid")]:
        cfg = AudioMAEConfig.preset("tiny", **kw)
        with pytest.raises(ValueError, match=message):
            AudioMAE(cfg)(torch.randn(1, 1, *cfg.img_size))
    clf = AudioMAEClassifier(AudioMAEConfig.preset("tiny", mask_ratio=0.0), num_classes=3)
    assert clf(x).shape == (1, 3)


def test_config_rejects_bad_heads_and_non_integer_sizes():
    for kw, message in [(dict(num_heads=0), "num_heads=0 must be a positive integer"),
                        (dict(decoder_num_heads=0), "decoder_num_heads=0 must be a positive integer"),
                        (dict(num_heads=-4), "num_heads=-4 must be a positive integer"),
                        (dict(num_heads=3), r"embed_dim=64 is not divisible by its number of heads \(num_heads=3\)"),
                        (dict(decoder_num_heads=3), r"decoder_embed_dim=64 is not divisible .*decoder_num_heads=3"),
                        (dict(img_size=(1024.7, 128.9)), "img_size must be an int or a pair of ints"),
                        (dict(img_size=("256", 128)), "img_size must be an int or a pair of ints"),
                        (dict(patch_size=16.5), "patch_size=16.5 must be a positive integer")]:
        with pytest.raises(ValueError, match=message):
            AudioMAEConfig.preset("tiny", **kw)
    assert AudioMAEConfig.preset("tiny", img_size=(256.0, 128)).img_size == (256, 128)  # whole floats are taken


@pytest.mark.parametrize("kw,message", [
    (dict(depth=-1), "depth=-1 must be a non-negative integer"),
    (dict(decoder_depth=2.5), "decoder_depth=2.5 must be a non-negative integer"),
    (dict(num_classes=0), "num_classes=0 must be a positive integer"),
    (dict(num_classes="5"), "num_classes='5' must be a positive integer"),
    (dict(mlp_ratio=0), "mlp_ratio=0 must be a positive number"),
    (dict(mlp_ratio=0.001), "mlp_ratio=0.001 leaves the MLP of width 64 no hidden unit"),
    (dict(drop_path_rate=2.0), r"drop_path_rate=2.0 must be a rate in \[0, 1\)"),
    (dict(meta_dropout=-0.1), r"meta_dropout=-0.1 must be a rate in \[0, 1\)"),
    (dict(layer_norm_eps=-1.0), "layer_norm_eps=-1.0 must be a positive number"),
    (dict(layer_norm_eps=float("nan")), "layer_norm_eps=nan must be a positive number"),
    (dict(decoder_mode="hybrid", hybrid_local_depth=10), r"hybrid_local_depth=10 must be an integer in \[0, decoder_depth=4\]"),
    (dict(global_pool="False"), "global_pool='False' must be True or False"),
    (dict(norm_pix_loss="no"), "norm_pix_loss='no' must be True or False"),
    (dict(in_chans=0), "in_chans=0 must be a positive integer"),
])
def test_config_names_every_value_a_model_cannot_be_built_from(kw, message):
    with pytest.raises(ValueError, match="invalid AudioMAEConfig: " + message):
        AudioMAEConfig.preset("tiny", **kw)
    with pytest.raises(ValueError, match=message):
        AudioMAEConfig.preset("tiny").replace(**kw)


def test_models_take_a_config_a_preset_name_or_a_dict(tmp_path):
    tiny = AudioMAEConfig.preset("tiny")
    assert AudioMAE("tiny").config == tiny and AudioMAE(tiny.to_dict()).config == tiny
    assert AudioMAEClassifier("tiny", num_classes=3).config.num_classes == 3
    with pytest.raises(TypeError, match="expected an AudioMAEConfig, a preset name or a dict of its fields, got int"):
        AudioMAE(5)
    with pytest.raises(ValueError, match="unknown AudioMAEConfig field\\(s\\): foo"):
        tiny.replace(foo=1)
    AudioMAE(tiny).save_pretrained(tmp_path / "m.pt")
    assert AudioMAE.from_pretrained(tmp_path / "m.pt", config=tiny.to_dict()).config == tiny
    with pytest.raises(ValueError, match="unknown AudioMAEConfig field"):
        AudioMAE.from_pretrained(tmp_path / "m.pt", foo=1)
    assert tiny.replace(global_pool=1).global_pool is True


def test_inputs_that_cannot_be_meant_are_named():
    model = AudioMAE(AudioMAEConfig.preset("tiny"))
    with pytest.raises(ValueError, match="expected a batch of at least one clip, got \\[0, 1, 256, 128\\]"):
        model(torch.randn(0, 1, 256, 128))
    with pytest.raises(ValueError, match="pad or cut the time axis"):
        model(torch.randn(1, 1, 200, 128))
    with pytest.raises(ValueError, match="the model takes 128 mel bins"):
        model(torch.randn(1, 1, 256, 64))
    clf = AudioMAEClassifier(AudioMAEConfig.preset("tiny"), num_classes=3).eval()
    with pytest.raises(ValueError, match="noise fixes the 2D token masking, which is off here"):
        clf(torch.randn(2, 1, 256, 128), noise=torch.rand(2, 24))
    assert clf(torch.randn(2, 1, 256, 128), mask_2d=True, noise=torch.rand(2, 24)).shape == (2, 3)
    from audiomae.model import patchify, unpatchify
    with pytest.raises(ValueError, match=r"patchify expects \[B, C, T, F\], got shape \(2, 256, 128\)"):
        patchify(torch.randn(2, 256, 128), 16)
    with pytest.raises(ValueError, match=r"expects \[B, 128, 256 x channels\], got shape \(2, 10, 256\)"):
        unpatchify(torch.randn(2, 10, 256), 16, (16, 8))


def test_noise_of_the_wrong_kind_or_device_is_refused():
    model = AudioMAE(AudioMAEConfig.preset("tiny"))
    x = torch.randn(2, 1, 256, 128)
    with pytest.raises(TypeError, match=r"noise must be a torch.Tensor, got builtins.list; convert it"):
        model(x, noise=[[0.5] * 128] * 2)
    with pytest.raises(ValueError, match=r"noise is on meta but the input is on cpu: move it"):
        model(x, noise=torch.rand(2, 128, device="meta"))
    with pytest.raises(ValueError, match="noise is on meta"):
        model(x, mask_mode="time", noise=torch.rand(2, 16, device="meta"))
    clf = AudioMAEClassifier(AudioMAEConfig.preset("tiny"), num_classes=3)
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        clf(x, mask_2d=True, noise=[[0.5] * 24] * 2)


def test_float64_input_advice_works():
    """Under autocast a float64 input cannot reach the convolution (autocast does not cast float64);
    the error says so and what works, and following it works."""
    model = AudioMAE(AudioMAEConfig.preset("tiny")).eval()
    x = torch.randn(2, 1, 256, 128, dtype=torch.float64)
    for run in (lambda: model(x), lambda: model(x, mask_mode="time"), lambda: model.embed(x)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with pytest.raises(TypeError, match=r"model.double\(\)\); torch.autocast does not cast float64"):
                run()
    with pytest.raises(TypeError, match=r"spec.to\(torch.float32\)\) or the model \(model.double\(\)\)"):
        model(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(x.float()).loss)
    assert model.double()(x).loss.dtype == torch.float64


def test_meta_mlp_drops_after_both_layers_in_training():
    """The release's meta-MLP is timm's Mlp with drop=0.1: dropout after the ReLU and after fc2, so in
    training some position-bias entries are exactly 0; in eval mode none are."""
    from audiomae.layers import WindowAttention
    attn = WindowAttention(32, 4, (4, 4))
    torch.manual_seed(0)
    bias = attn.train().position_bias()
    zeros = (bias == 0).float().mean().item()
    assert 0.05 < zeros < 0.15  # p = 0.1 over 4 x 16 x 16 outputs
    assert (attn.eval().position_bias() != 0).all()


def test_embed_both_is_embed_and_per_patch_in_one_pass():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 256, 128)
    for model in (AudioMAE(AudioMAEConfig.preset("tiny")).eval(),
                  AudioMAEClassifier(AudioMAEConfig.preset("tiny"), num_classes=3).eval(),
                  AudioMAEClassifier(AudioMAEConfig.preset("tiny"), num_classes=3, global_pool=False).eval()):
        pooled, per = model.embed_both(x)
        torch.testing.assert_close(pooled, model.embed(x), rtol=0, atol=0)
        torch.testing.assert_close(per, model.embed(x, per_patch=True), rtol=0, atol=0)
        # and the model's own computation of each, step by step
        with torch.no_grad():
            tokens = model.encode_tokens(model.tokens(x))
            if isinstance(model, AudioMAE):
                want_per = model.norm(tokens)[:, 1:]
                want_pooled = want_per.mean(dim=1)
            else:
                want_per, want_pooled = tokens[:, 1:], model.forward_features(x, mask_2d=False)
        torch.testing.assert_close(per, want_per, rtol=0, atol=0)
        torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=0)


def test_a_model_keeps_its_own_config_and_bad_config_calls_say_what_is_wrong():
    cfg = AudioMAEConfig.preset("tiny")
    model = AudioMAE(cfg)
    cfg.img_size = (512, 128)  # the caller's object edited afterwards: the model is still the one it built
    assert model.config.img_size == (256, 128) and model.config is not cfg
    assert model.embed(torch.randn(2, 1, 256, 128)).shape[0] == 2
    with pytest.raises(TypeError, match="a preset is named by a string"):
        AudioMAEConfig.preset(None)
    with pytest.raises(ValueError, match=r"unknown AudioMAEConfig field\(s\): foo"):
        AudioMAEConfig.preset("tiny", foo=1)
    with pytest.raises(TypeError, match="from_dict takes a dict"):
        AudioMAEConfig.from_dict(None)


def test_forward_hooks_on_the_patch_embedding_run_in_pretraining():
    """The kept patches are embedded by a fused op that does not call ``patch_embed``; a hook on it (or
    on its projection, or a global one; forward or backward) makes the model embed every patch and
    gather instead: the hooks run and the loss is the same, value for value."""
    model = AudioMAE(AudioMAEConfig.preset("tiny")).eval()
    x = torch.randn(2, 1, 256, 128)
    torch.manual_seed(3)
    fused = model(x).loss
    seen = []
    for register in (lambda f: model.patch_embed.register_forward_hook(lambda m, i, o: f(o.shape)),
                     lambda f: model.patch_embed.proj.register_forward_pre_hook(lambda m, i: f(i[0].shape)),
                     lambda f: torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: f(None))):
        handle = register(seen.append)
        try:
            torch.manual_seed(3)
            assert torch.equal(model(x).loss, fused)
        finally:
            handle.remove()
        assert seen, "the hook did not run"
        seen.clear()
    # a backward hook too: the gradient reaches patch_embed's output through the module
    handle = model.patch_embed.register_full_backward_hook(lambda m, gi, go: seen.append(go[0].shape))
    try:
        torch.manual_seed(3)
        model(x.clone().requires_grad_()).loss.backward()
    finally:
        handle.remove()
    assert seen == [(2, 128, 64)]


@pytest.mark.parametrize("stride", [None, 10])
def test_unpatchify_inverts_patchify_for_several_channels(stride):
    x = torch.randn(2, 3, 64, 32)
    grid = ((64 - 16) // (stride or 16) + 1, (32 - 16) // (stride or 16) + 1)
    back = unpatchify(patchify(x, 16, stride), 16, grid, stride)
    assert back.shape[:2] == (2, 3)
    torch.testing.assert_close(back, x[:, :, :back.shape[2], :back.shape[3]])
    with pytest.raises(ValueError, match=r"expects \[B, 8, 256 x channels\], got shape \(2, 8, 300\)"):
        unpatchify(torch.zeros(2, 8, 300), 16, (4, 2))


def test_reconstruct_gives_plain_tensors_for_the_figure_and_the_audio(tmp_path):
    """reconstruct runs without gradients (its outputs went to numpy with requires_grad and failed), for
    every channel count; mel_to_audio takes the model's layout of one clip and says what else it needs."""
    from audiomae.reconstruct import mel_to_audio, reconstruction_figure

    model = AudioMAE(AudioMAEConfig.preset("tiny"))
    spec = torch.randn(1, 1, 256, 128)
    recon, mask = model.reconstruct(spec)
    assert not recon.requires_grad and not mask.requires_grad
    reconstruction_figure(spec[0, 0], recon[0, 0], mask[0, 0], str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").stat().st_size > 0
    wave = mel_to_audio(recon[:, :, :20], n_iter=2)  # [1, 1, T, 128]: one clip
    assert wave.shape == (19 * 160,) and not wave.requires_grad
    with pytest.raises(ValueError, match=r"one clip's log-mel \[T, mel bins\], got shape \(2, 1, 20, 128\)"):
        mel_to_audio(torch.randn(2, 1, 20, 128))
    with pytest.raises(ValueError, match="at least 3 frames"):
        mel_to_audio(torch.randn(2, 128))
    two = AudioMAE(AudioMAEConfig.preset("tiny", in_chans=2))
    recon, mask = two.reconstruct(torch.randn(1, 2, 256, 128))
    assert recon.shape == (1, 2, 256, 128) and mask.shape == (1, 1, 256, 128)


def test_a_replaced_patch_projection_is_used_in_pretraining(monkeypatch):
    """The fused embedding reads proj.weight and proj.bias: a projection replaced by a Conv2d subclass
    with its own forward, or by a wrapper module (an adapter), is called instead (before, the first
    was silently skipped and the second raised AttributeError)."""
    model = AudioMAE(AudioMAEConfig.preset("tiny")).eval()
    x = torch.randn(2, 1, 256, 128)
    torch.manual_seed(0)
    plain = model(x).loss

    class Scaled(torch.nn.Conv2d):
        def forward(self, inp):
            return 2 * super().forward(inp)

    class Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inp):
            return 2 * self.inner(inp)

    conv = model.patch_embed.proj
    scaled = Scaled(1, conv.out_channels, conv.kernel_size, conv.stride)
    scaled.load_state_dict(conv.state_dict())
    import audiomae.model as M
    for proj in (scaled, Wrap(conv)):
        model.patch_embed.proj = proj
        torch.manual_seed(0)
        loss = model(x).loss
        with monkeypatch.context() as m:  # the model's path through every patch, which calls the projection
            m.setattr(M, "_fusable", lambda patch_embed: False)
            torch.manual_seed(0)
            unfused = model(x).loss
        assert torch.equal(loss, unfused) and not torch.equal(loss, plain)
    model.patch_embed.proj = conv
    torch.manual_seed(0)
    assert torch.equal(model(x).loss, plain)


def test_patchify_refuses_a_size_or_stride_that_is_not_positive():
    for p, stride, what in ((0, None, "patch size"), (16, 0, "stride"), (16.0, None, "patch size")):
        with pytest.raises(ValueError, match=f"patchify's {what} must be a positive integer"):
            patchify(torch.zeros(1, 1, 32, 32), p, stride)
    import numpy as np
    assert torch.equal(patchify(torch.ones(1, 1, 32, 32), np.int64(16)), patchify(torch.ones(1, 1, 32, 32), 16))
