"""Checkpoint formats, round trips, adaptation and the errors users see."""
import argparse
import os
import time
import warnings

import pytest
import torch

from audiomae import AudioMAE, AudioMAEClassifier, AudioMAEConfig, CheckpointAdaptedWarning, CheckpointError
from audiomae.checkpoint import infer_config
from audiomae.pos_embed import sincos_2d
from conftest import DATA, load_fixture

TINY = AudioMAEConfig.preset("tiny")


def _released_file(tmp_path, sd, args=None, name="release.pth"):
    """A checkpoint as the release's training script writes it."""
    path = tmp_path / name
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
                "epoch": 32, "scaler": {"scale": 65536.0, "growth_factor": 2.0},
                "args": args or argparse.Namespace(model="mae_vit_base_patch16", norm_pix_loss=True,
                                                   mask_ratio=0.8, decoder_mode=1, batch_size=8, blr=2e-4)},
               path)
    return path


def _same_output(a, b, x, noise=None):
    a.eval(), b.eval()
    with torch.no_grad():
        if isinstance(a, AudioMAE):
            return torch.equal(a(x, noise=noise).pred, b(x, noise=noise).pred)
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize("name", ["model_tiny_local", "model_tiny_global"])
def test_released_format_loads_strict_and_matches_fixture(tmp_path, name):
    d = load_fixture(name)
    path = _released_file(tmp_path, d["state_dict"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to adapt: no message
        model = AudioMAE.from_pretrained(path, config=AudioMAEConfig(**d["config"])).eval()
    with torch.no_grad():
        out = model(d["input"], mask_ratio=0.8, noise=d["noise"])
    torch.testing.assert_close(out.pred, d["pred"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["model_tiny_local", "model_tiny_global"])
def test_config_inferred_from_shapes(tmp_path, name):
    d = load_fixture(name)
    cfg = infer_config(d["state_dict"])
    for k in ["embed_dim", "depth", "decoder_embed_dim", "decoder_depth", "decoder_mode", "img_size", "patch_size"]:
        assert cfg[k] == getattr(AudioMAEConfig(**d["config"]), k), k


def test_vit_b_released_format_roundtrip(tmp_path):
    """A ViT-B pretraining checkpoint in the released format (1024 x 128, 16-layer local decoder)
    loads with strict key matching, its config read from the shapes and the release's args."""
    src = AudioMAE(AudioMAEConfig.preset("base")).eval()
    path = _released_file(tmp_path, src.state_dict())
    model = AudioMAE.from_pretrained(path)
    cfg = model.config
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.decoder_depth, cfg.decoder_num_heads) == (768, 12, 12, 16, 16)
    assert cfg.img_size == (1024, 128) and cfg.decoder_mode == "local" and cfg.norm_pix_loss
    assert set(model.state_dict()) == set(src.state_dict())
    x = torch.randn(1, 1, 1024, 128)
    assert _same_output(src, model, x, noise=torch.rand(1, 512))


def test_own_format_roundtrip_both_models(tmp_path):
    for model in [AudioMAE(TINY.replace(decoder_mode="hybrid")), AudioMAEClassifier(TINY, num_classes=7)]:
        path = tmp_path / f"{type(model).__name__}.pt"
        model.save_pretrained(path)
        raw = torch.load(path, weights_only=True)
        assert raw["format"] == "audiomae" and "model" in raw and "config" in raw
        back = type(model).from_pretrained(path)
        assert back.config == model.config
        x = torch.randn(2, 1, 256, 128)
        assert _same_output(model, back, x, noise=torch.rand(2, 128) if isinstance(model, AudioMAE) else None)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_bare_state_dict_ddp_prefix_and_dict_input(tmp_path):
    model = AudioMAE(TINY)
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "bare.pt")
    for src in [tmp_path / "bare.pt", str(tmp_path / "bare.pt"), sd]:
        back = AudioMAE.from_pretrained(src)
        assert _same_output(model, back, torch.randn(1, 1, 256, 128), noise=torch.rand(1, 128))


def test_safetensors_roundtrip(tmp_path):
    pytest.importorskip("safetensors")
    model = AudioMAEClassifier(TINY, num_classes=3)
    model.save_pretrained(tmp_path / "m.safetensors")
    back = AudioMAEClassifier.from_pretrained(tmp_path / "m.safetensors")
    assert back.config == model.config
    assert _same_output(model, back, torch.randn(2, 1, 256, 128))


def test_pretraining_into_classifier_takes_encoder(tmp_path):
    d = load_fixture("model_tiny_local")
    path = _released_file(tmp_path, d["state_dict"])
    with pytest.warns(CheckpointAdaptedWarning, match="dropped decoder_blocks.*mask_token.*norm") as rec:
        clf = AudioMAEClassifier.from_pretrained(path, num_classes=10)
    assert len(rec) == 1 and "new head for 10 classes" in str(rec[0].message)
    torch.testing.assert_close(clf.blocks[1].attn.qkv.weight, d["state_dict"]["blocks.1.attn.qkv.weight"])
    # the encoder tokens equal the pretraining model's (before its final norm)
    mae = AudioMAE.from_pretrained(path).eval()
    clf.eval()
    x = d["input"]
    with torch.no_grad():
        torch.testing.assert_close(clf.encode_tokens(clf.tokens(x)), mae.encode_tokens(mae.tokens(x)))


def test_classifier_checkpoint_into_pretraining_model_is_refused(tmp_path):
    torch.save(load_fixture("classifier_tiny")["state_dict"], tmp_path / "clf.pt")
    with pytest.raises(CheckpointError, match="fine-tuned classifier.*decoder_embed.*AudioMAEClassifier"):
        AudioMAE.from_pretrained(tmp_path / "clf.pt")


def test_wrong_size_names_the_keys(tmp_path):
    torch.save(AudioMAE(TINY).state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch: .*cls_token: checkpoint \(1, 1, 64\) vs model \(1, 1, 96\)"):
        AudioMAE.from_pretrained(tmp_path / "tiny.pt", config=TINY.replace(embed_dim=96, num_heads=4))
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: blocks\.2\."):
        AudioMAE.from_pretrained(tmp_path / "tiny.pt", config=TINY.replace(depth=3))


def test_missing_decoder_is_named(tmp_path):
    sd = {k: v for k, v in AudioMAE(TINY).state_dict().items() if not k.startswith(("decoder_", "mask_token"))}
    torch.save(sd, tmp_path / "enc.pt")
    with pytest.raises(CheckpointError, match="encoder without a decoder.*decoder_blocks"):
        AudioMAE.from_pretrained(tmp_path / "enc.pt")


def test_unsafe_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"model": AudioMAE(TINY).state_dict(), "hook": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        AudioMAE.from_pretrained(tmp_path / "evil.pt")


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        AudioMAE.from_pretrained(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a PyTorch checkpoint"):
        AudioMAE.from_pretrained(tmp_path / "junk.pt")
    (tmp_path / "notes.pt").write_text("hello")  # text: said so, and no advice to unpickle it unsafely
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as info:
        AudioMAE.from_pretrained(tmp_path / "notes.pt")
    assert "weights_only" not in str(info.value)
    (tmp_path / "clip.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")
    with pytest.raises(CheckpointError, match="clip.wav: not a PyTorch checkpoint"):
        AudioMAE.from_pretrained(tmp_path / "clip.wav")
    with pytest.raises(CheckpointError, match="is a directory"):
        AudioMAE.from_pretrained(tmp_path)
    torch.save({"model": AudioMAE(TINY).state_dict()}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="cut.pt: not a readable PyTorch checkpoint"):
        AudioMAE.from_pretrained(tmp_path / "cut.pt")
    # torch.save's legacy (non-zip) format is a pickle and still loads
    torch.save({"model": AudioMAE(TINY).state_dict()}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert isinstance(AudioMAE.from_pretrained(tmp_path / "legacy.pt"), AudioMAE)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an Audio-MAE state dict"):
        AudioMAE.from_pretrained(tmp_path / "other.pt")


@pytest.mark.parametrize("frames", [512, 128])
def test_other_input_length_rebuilds_fixed_tables(tmp_path, frames):
    """A 1024-frame-style checkpoint fine-tuned at 512 (ESC-50) or 128 (Speech Commands) frames."""
    src = AudioMAE(TINY)  # 256 frames
    path = _released_file(tmp_path, src.state_dict())
    with pytest.warns(CheckpointAdaptedWarning, match=r"fixed sin-cos table rebuilt for the .*x8 grid") as rec:
        clf = AudioMAEClassifier.from_pretrained(path, img_size=(frames, 128), num_classes=50)
    assert len(rec) == 1  # one message for all adaptations
    grid = (frames // 16, 8)
    torch.testing.assert_close(clf.pos_embed.data, sincos_2d(64, grid))
    out = clf(torch.randn(2, 1, frames, 128))
    assert out.shape == (2, 50)
    with pytest.warns(CheckpointAdaptedWarning, match="decoder_pos_embed: fixed sin-cos table rebuilt"):
        mae = AudioMAE.from_pretrained(path, img_size=(frames, 128))
    torch.testing.assert_close(mae.decoder_pos_embed.data, sincos_2d(64, grid))
    assert torch.isfinite(mae(torch.randn(1, 1, frames, 128)).loss)


def test_encoder_only_embeds_where_the_decoder_windows_do_not_tile(tmp_path):
    """A pretraining checkpoint embeds at any length with encoder_only=True: the same embeddings as the
    whole model where both load, and at 272 frames (17 x 8 patches, not tiled by 4 x 4 windows)."""
    torch.manual_seed(0)
    src = AudioMAE(TINY)
    path = _released_file(tmp_path, src.state_dict())
    x = torch.randn(2, 1, 256, 128)
    enc = AudioMAE.from_pretrained(path, encoder_only=True)
    assert enc.config.decoder_depth == 0 and not any(k.startswith("decoder_blocks.") for k in enc.state_dict())
    torch.testing.assert_close(enc.embed(x), src.eval().embed(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not tile the 17 x 8 patch grid"):
        AudioMAE.from_pretrained(path, img_size=(272, 128))
    with pytest.warns(CheckpointAdaptedWarning, match="rebuilt for the 17x8 grid"):
        enc = AudioMAE.from_pretrained(path, img_size=(272, 128), encoder_only=True)
    torch.testing.assert_close(enc.pos_embed.data, sincos_2d(64, (17, 8)))
    for k, v in src.state_dict().items():
        if not k.startswith("decoder") and k != "pos_embed":
            torch.testing.assert_close(enc.state_dict()[k], v, rtol=0, atol=0)
    pooled, patches = enc.embed_both(torch.randn(2, 1, 272, 128))
    assert pooled.shape == (2, 64) and patches.shape == (2, 17 * 8, 64) and torch.isfinite(patches).all()
    # it does not pass for the pretraining model it is not
    with pytest.raises(RuntimeError, match="encoder_only=True"):
        enc(torch.randn(2, 1, 272, 128))
    with pytest.raises(RuntimeError, match="encoder_only=True"):
        enc.reconstruct(torch.randn(2, 1, 272, 128))
    with pytest.raises(CheckpointError, match="encoder_only=True"):
        enc.save_pretrained(tmp_path / "enc.pt")
    assert not (tmp_path / "enc.pt").exists()
    with pytest.raises(TypeError, match="encoder_only is for AudioMAE"):
        AudioMAEClassifier.from_pretrained(path, encoder_only=True)
    # a hybrid decoder with a given number of local blocks too
    hybrid = AudioMAE(TINY.replace(decoder_mode="hybrid", decoder_depth=4, hybrid_local_depth=2))
    hybrid.save_pretrained(tmp_path / "hybrid.pt")
    with pytest.warns(CheckpointAdaptedWarning, match="rebuilt for the 17x8 grid"):
        enc = AudioMAE.from_pretrained(tmp_path / "hybrid.pt", img_size=(272, 128), encoder_only=True)
    assert enc.embed(torch.randn(1, 1, 272, 128)).shape == (1, 64)


def test_trained_table_is_interpolated(tmp_path):
    src = AudioMAEClassifier(TINY, num_classes=4)
    sd = src.state_dict()
    sd["pos_embed"] = sd["pos_embed"] + 0.1 * torch.randn_like(sd["pos_embed"])  # a trained table
    torch.save(sd, tmp_path / "trained.pt")
    with pytest.warns(CheckpointAdaptedWarning, match="interpolated from 16x8 to 8x8"):
        clf = AudioMAEClassifier.from_pretrained(tmp_path / "trained.pt", img_size=(128, 128))
    assert clf.pos_embed.shape == (1, 65, 64)
    torch.testing.assert_close(clf.pos_embed[:, 0], sd["pos_embed"][:, 0])


def test_classifier_new_head_when_classes_differ(tmp_path):
    path = DATA / "classifier_tiny.pt"
    with pytest.warns(CheckpointAdaptedWarning, match="head for 10 classes not loaded"):
        clf = AudioMAEClassifier.from_pretrained(path, num_classes=3)
    assert clf.head.weight.shape == (3, 64)
    d = load_fixture("classifier_tiny")
    same = AudioMAEClassifier.from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(same(d["input"]), d["logits"], rtol=0, atol=1e-5)


# --- the checkpoint's own grid and table kind, whatever the new model's --------------------------
def test_other_mel_bins_rebuild_fixed_tables_for_the_checkpoints_grid(tmp_path):
    """A 16x8 checkpoint loaded for 64 mel bins: its grid is read as the release's (8 frequency
    patches), not from the new model's 4, so the fixed tables are recognised and rebuilt for 16x4."""
    torch.save(AudioMAE(TINY).state_dict(), tmp_path / "bare.pt")
    with pytest.warns(CheckpointAdaptedWarning, match=r"pos_embed: fixed sin-cos table rebuilt for the 16x4 grid") as rec:
        mae = AudioMAE.from_pretrained(tmp_path / "bare.pt", img_size=(256, 64))
    assert "interpolated" not in str(rec[0].message) and "checkpoint's 16x8 table" in str(rec[0].message)
    torch.testing.assert_close(mae.pos_embed.data, sincos_2d(64, (16, 4)), rtol=0, atol=0)
    torch.testing.assert_close(mae.decoder_pos_embed.data, sincos_2d(64, (16, 4)), rtol=0, atol=0)
    assert torch.isfinite(mae(torch.randn(1, 1, 256, 64)).loss)


def test_trained_table_grid_comes_from_the_files_config(tmp_path):
    """A trained 16x4 table (64 mel bins) in a file with its config: interpolated from 16x4, the grid
    its config names, not from a grid guessed from the new model's frequency count."""
    src = AudioMAEClassifier(TINY.replace(img_size=(256, 64)), num_classes=4)
    src.pos_embed.data += 0.1 * torch.randn_like(src.pos_embed)
    src.save_pretrained(tmp_path / "own.pt")
    for img_size, grid in [((512, 64), "32x4"), ((512, 128), "32x8")]:
        with pytest.warns(CheckpointAdaptedWarning, match=f"trained table interpolated from 16x4 to {grid}"):
            clf = AudioMAEClassifier.from_pretrained(tmp_path / "own.pt", img_size=img_size)
        torch.testing.assert_close(clf.pos_embed[:, 0], src.pos_embed[:, 0])
    # the same table with a config that does not describe it is refused, naming the key
    raw = torch.load(tmp_path / "own.pt", weights_only=True)
    raw["config"]["img_size"] = [128, 64]
    torch.save(raw, tmp_path / "lying.pt")
    with pytest.raises(CheckpointError, match=r"pos_embed: the checkpoint's table has 64 positions, but the 8x4"):
        AudioMAEClassifier.from_pretrained(tmp_path / "lying.pt", config=TINY.replace(img_size=(512, 64)), num_classes=4)


def test_fixed_table_of_another_grid_is_recognised(tmp_path):
    """A bare state dict of a 5x5 grid (80 x 80 input): 25 positions are no multiple of 8 frequency
    patches, but the table is the fixed code of the 5x5 grid, which names it."""
    src = AudioMAEClassifier(TINY.replace(img_size=(80, 80)), num_classes=4)
    assert infer_config(src.state_dict())["img_size"] == (80, 80)
    with pytest.warns(CheckpointAdaptedWarning, match=r"rebuilt for the 10x5 grid .*checkpoint's 5x5 table"):
        clf = AudioMAEClassifier.from_pretrained(src.state_dict(), img_size=(160, 80))
    torch.testing.assert_close(clf.pos_embed.data, sincos_2d(64, (10, 5)), rtol=0, atol=0)


def test_table_that_fits_no_grid_is_refused(tmp_path):
    src = AudioMAEClassifier(TINY.replace(img_size=(80, 80)), num_classes=4)
    sd = src.state_dict()
    sd["pos_embed"] = sd["pos_embed"] + 0.1 * torch.randn_like(sd["pos_embed"])  # trained: no fixed code
    torch.save(sd, tmp_path / "trained.pt")
    assert "img_size" not in infer_config(sd)
    for kwargs in [dict(img_size=(160, 80)), dict(config=TINY.replace(img_size=(160, 80)), num_classes=4), {}]:
        with pytest.raises(CheckpointError, match=r"pos_embed: the checkpoint's 25 positions fit no patch grid.*"
                                                  r"8 frequency patches.*save_pretrained"):
            AudioMAEClassifier.from_pretrained(tmp_path / "trained.pt", **kwargs)


@pytest.mark.parametrize("kind", ["grid", "released"])
def test_table_kind_detected_and_kept_when_adapting(tmp_path, kind):
    """A bare state dict of a ``pos_embed_kind`` model: the kind is read from its tables, and another
    input length rebuilds that kind (not the config default), saying which."""
    src = AudioMAE(TINY.replace(pos_embed_kind=kind))
    with pytest.warns(CheckpointAdaptedWarning, match=rf"rebuilt for the 32x8 grid \('{kind}' kind") as rec:
        mae = AudioMAE.from_pretrained(src.state_dict(), img_size=(512, 128))
    torch.testing.assert_close(mae.pos_embed.data, sincos_2d(64, (32, 8), kind), rtol=0, atol=0)
    torch.testing.assert_close(mae.decoder_pos_embed.data, sincos_2d(64, (32, 8), kind), rtol=0, atol=0)
    assert mae.config.pos_embed_kind == kind and "pos_embed_kind=" not in str(rec[0].message)  # read, not corrected
    assert infer_config(src.state_dict())["pos_embed_kind"] == kind
    # same shapes: loads as it is, with its kind in the config
    same = AudioMAE.from_pretrained(src.state_dict())
    assert same.config.pos_embed_kind == kind and _same_output(src, same, torch.randn(1, 1, 256, 128),
                                                               noise=torch.rand(1, 128))


def test_explicit_config_of_the_other_kind_keeps_the_checkpoints(tmp_path):
    src = AudioMAEClassifier(TINY.replace(pos_embed_kind="grid"), num_classes=4)
    with pytest.warns(CheckpointAdaptedWarning, match=r"'grid' kind.*pos_embed_kind='grid' \(the checkpoint's tables\), "
                                                      r"not 'released'"):
        clf = AudioMAEClassifier.from_pretrained(src.state_dict(), config=TINY.replace(img_size=(512, 128)),
                                                 num_classes=4)
    assert clf.config.pos_embed_kind == "grid"
    torch.testing.assert_close(clf.pos_embed.data, sincos_2d(64, (32, 8), "grid"), rtol=0, atol=0)


def test_half_precision_fixed_table_is_recognised(tmp_path):
    sd = {k: v.half() if v.is_floating_point() else v for k, v in AudioMAEClassifier(TINY, num_classes=4).state_dict().items()}
    with pytest.warns(CheckpointAdaptedWarning, match="fixed sin-cos table rebuilt for the 32x8 grid"):
        clf = AudioMAEClassifier.from_pretrained(sd, img_size=(512, 128))
    torch.testing.assert_close(clf.pos_embed.data, sincos_2d(64, (32, 8)), rtol=0, atol=0)


# --- the release's args, by the script that wrote them --------------------------------------------
def test_finetuning_args_go_to_the_finetuning_fields(tmp_path):
    """main_finetune_as.py's mask_2d / mask_t_prob / mask_f_prob are the classifier's fine-tuning
    masking; the pretraining masking fields keep their defaults."""
    clf = AudioMAEClassifier(TINY, num_classes=10)
    args = argparse.Namespace(model="vit_base_patch16", nb_classes=10, mask_2d=True, mask_t_prob=0.3,
                              mask_f_prob=0.25, drop_path=0.1)
    path = _released_file(tmp_path, clf.state_dict(), args, name="ft.pth")
    cfg = AudioMAEClassifier.from_pretrained(path).config
    assert (cfg.finetune_mask_2d, cfg.finetune_mask_t_prob, cfg.finetune_mask_f_prob) == (True, 0.3, 0.25)
    default = AudioMAEConfig()
    assert (cfg.mask_t_prob, cfg.mask_f_prob, cfg.mask_mode) == (default.mask_t_prob, default.mask_f_prob, "unstructured")


def test_pretraining_args_go_to_the_pretraining_fields(tmp_path):
    """main_pretrain.py's mask_2d selects its structured masking (random_masking_2d) with its
    mask_t_prob / mask_f_prob; the fine-tuning fields keep their defaults."""
    args = argparse.Namespace(model="mae_vit_base_patch16", norm_pix_loss=True, mask_ratio=0.8, mask_2d=True,
                              mask_t_prob=0.7, mask_f_prob=0.3, no_shift=False, decoder_mode=1)
    path = _released_file(tmp_path, AudioMAE(TINY).state_dict(), args, name="pt.pth")
    cfg = AudioMAE.from_pretrained(path).config
    assert (cfg.mask_mode, cfg.mask_t_prob, cfg.mask_f_prob, cfg.mask_ratio) == ("time_frequency", 0.7, 0.3, 0.8)
    default = AudioMAEConfig()
    assert (cfg.finetune_mask_2d, cfg.finetune_mask_t_prob, cfg.finetune_mask_f_prob) == \
        (default.finetune_mask_2d, default.finetune_mask_t_prob, default.finetune_mask_f_prob)
    assert cfg.shift_size == default.shift_size
    # without mask_2d the release masks unstructured (mask_ratio); its t / f defaults are still recorded
    plain = infer_config(AudioMAE(TINY).state_dict(), argparse.Namespace(mask_2d=False, mask_t_prob=0.7, no_shift=True))
    assert "mask_mode" not in plain and plain["mask_t_prob"] == 0.7 and plain["shift_size"] == (0, 0)


# --- patch 14 (the release's ViT-H) ---------------------------------------------------------------
@pytest.mark.parametrize("frames", [1024, 512])
def test_patch14_input_size_is_the_releases(tmp_path, frames):
    """Patch 14 on the release's inputs leaves 73 (or 36) x 9 patches, the remainders dropped, as the
    huge preset does: the inferred input is that one, not 73 * 14 = 1022 frames."""
    assert AudioMAEConfig.preset("huge").img_size == (1024, 128)
    src = AudioMAE(TINY.replace(patch_size=14, img_size=(frames, 128), decoder_mode="global"))
    torch.save(src.state_dict(), tmp_path / "h.pt")
    assert infer_config(src.state_dict())["img_size"] == (frames, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to adapt
        model = AudioMAE.from_pretrained(tmp_path / "h.pt")
    assert model.config.img_size == (frames, 128) and model.config.grid_size == (frames // 14, 9)
    L = (frames // 14) * 9
    assert _same_output(src, model, torch.randn(1, 1, frames, 128), noise=torch.rand(1, L))


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    """Written through a temporary file (atomic), yet readable as a plain open() would make it."""
    import stat

    from audiomae.checkpoint import atomic_save

    old = os.umask(0o022)
    try:
        atomic_save({"x": torch.zeros(1)}, tmp_path / "a.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.pt").st_mode) == 0o644


@pytest.mark.skipif(os.name != "posix", reason="the writer's lock is an flock")
def test_partial_saves_of_killed_writers_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    import fcntl
    from audiomae import checkpoint as ck

    old = time.time() - 3600
    for name in (".tmp-dead.pt", ".tmp-live.pt", ".tmp-other.npy", "checkpoint-last.pt"):
        (tmp_path / name).write_bytes(b"x" * 100)
        os.utime(tmp_path / name, (old, old))
    (tmp_path / ".tmp-young.pt").write_bytes(b"x")  # just created, its writer about to lock it
    live = os.open(tmp_path / ".tmp-live.pt", os.O_RDONLY)
    fcntl.flock(live, fcntl.LOCK_EX)  # as atomic_save holds it while it writes
    try:
        assert ck.remove_partial_saves(str(tmp_path)) == [(".tmp-dead.pt", 100)]
    finally:
        os.close(live)
    assert sorted(os.listdir(tmp_path)) == [".tmp-live.pt", ".tmp-other.npy", ".tmp-young.pt", "checkpoint-last.pt"]
    # a save in progress holds its lock until its file has its name: a sweep meanwhile leaves it
    real, swept, run = torch.save, [], tmp_path / "run"
    run.mkdir()

    def save_while_swept(obj, f):
        real(obj, f)
        assert len(os.listdir(run)) == 1  # the partial file
        swept.append(ck.remove_partial_saves(str(run), min_age_s=0))

    monkeypatch.setattr(torch, "save", save_while_swept)
    ck.atomic_save({"x": torch.ones(3)}, run / "a.pt")
    monkeypatch.undo()
    assert swept == [[]] and os.listdir(run) == ["a.pt"]
    assert torch.equal(torch.load(run / "a.pt")["x"], torch.ones(3))


def test_loaded_models_are_in_eval_mode_and_guessed_heads_are_named(tmp_path):
    """from_pretrained gives a model ready for use (drop-path off, so embed is deterministic), and a
    bare state dict of a width no preset has says which head count it assumed."""
    import warnings as _w
    from audiomae import AudioMAEClassifier, AudioMAEConfig
    from audiomae.checkpoint import CheckpointAdaptedWarning
    cfg = AudioMAEConfig.preset("tiny").replace(num_heads=2)
    clf = AudioMAEClassifier(cfg, num_classes=3, drop_path_rate=0.5)
    clf.save_pretrained(tmp_path / "c.pt")
    loaded = AudioMAEClassifier.from_pretrained(tmp_path / "c.pt")
    assert not loaded.training and loaded.config.num_heads == 2
    x = torch.randn(2, 1, 256, 128)
    torch.testing.assert_close(loaded.embed(x), loaded.embed(x), rtol=0, atol=0)
    # a width no preset has (96): the head count is a guess, and the warning says which
    odd = AudioMAEClassifier(cfg.replace(embed_dim=96, num_heads=3), num_classes=3)
    torch.save(odd.state_dict(), tmp_path / "bare.pt")
    with pytest.warns(CheckpointAdaptedWarning, match="assumed num_heads=1 for width 96"):
        AudioMAEClassifier.from_pretrained(tmp_path / "bare.pt")
    with _w.catch_warnings():
        _w.simplefilter("error", CheckpointAdaptedWarning)
        assert AudioMAEClassifier.from_pretrained(tmp_path / "bare.pt", num_heads=3).config.num_heads == 3


def test_save_pretrained_refuses_extras_a_safe_load_could_not_read(tmp_path):
    import pathlib
    import numpy as np
    model = AudioMAE(AudioMAEConfig.preset("tiny"))
    for extra, where in [(dict(data_root=pathlib.Path("/tmp")), "data_root is a pathlib"),
                         (dict(stats=np.float64(1.0)), "stats is a numpy.float64"),
                         (dict(args={"runs": [1, object()]}), r"args\['runs'\]\[1\] is a builtins.object")]:
        with pytest.raises(TypeError, match=where + ".*a safe load"):
            model.save_pretrained(tmp_path / "x.pt", **extra)
    assert not (tmp_path / "x.pt").exists()
    model.save_pretrained(tmp_path / "ok.pt", args={"a": [1, 2.5, None, "x", (True,)]}, table=torch.ones(2))
    assert AudioMAE.from_pretrained(tmp_path / "ok.pt").config == model.config
    # what a safe load reads back is taken: the release's args, a state dict, sizes, dtypes, devices
    from audiomae.checkpoint import torch_load
    fine = dict(args=argparse.Namespace(model="mae_vit_base_patch16", blr=2e-4), ema=model.state_dict(),
                size=torch.Size([2, 3]), dtype=torch.float16, device=torch.device("cpu"))
    model.save_pretrained(tmp_path / "more.pt", **fine)
    back = torch_load(str(tmp_path / "more.pt"))
    assert back["args"].model == "mae_vit_base_patch16" and back["size"] == (2, 3) and back["dtype"] == torch.float16
    assert list(back["ema"]) == list(model.state_dict())
    with pytest.raises(CheckpointError, match="it is a folder; give a file name"):
        model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="a name ending in / is a folder's; give a file name"):
        model.save_pretrained(str(tmp_path / "new") + "/")  # not there yet: no raw rename error, nothing left
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-") or n == "new"]


def test_safetensors_keep_json_extras_and_refuse_others(tmp_path):
    pytest.importorskip("safetensors")
    from audiomae.checkpoint import read_checkpoint
    model = AudioMAE(AudioMAEConfig.preset("tiny"))
    model.save_pretrained(tmp_path / "m.safetensors", args={"stats": "esc50", "clip_seconds": 5.0})
    assert read_checkpoint(tmp_path / "m.safetensors")[2] == {"stats": "esc50", "clip_seconds": 5.0}
    with pytest.raises(TypeError, match="safetensors metadata as JSON"):
        model.save_pretrained(tmp_path / "t.safetensors", table=torch.ones(1))


def test_a_tilde_in_a_checkpoint_path_is_the_home_folder(tmp_path, monkeypatch):
    """Never a folder named ~ in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = AudioMAE(AudioMAEConfig.preset("tiny"))
    model.save_pretrained("~/m.pt")
    assert (tmp_path / "home" / "m.pt").is_file() and not (tmp_path / "~").exists()
    assert AudioMAE.from_pretrained("~/m.pt").config == model.config


def test_a_damaged_file_is_refused_not_loaded_with_wrong_weights(tmp_path):
    """torch.load does not check the archive's checksums: a flipped byte in a tensor would load. A file
    written without checksums (set_crc32_options(False)) still loads."""
    from audiomae.train.state import load_training_state
    model = AudioMAE(AudioMAEConfig.preset("tiny"))
    model.save_pretrained(tmp_path / "ok.pt")
    data = bytearray((tmp_path / "ok.pt").read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="bad.pt is damaged: the data of .* does not match its stored checksum"):
        AudioMAE.from_pretrained(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="cannot resume: .*bad.pt is damaged"):
        load_training_state(str(tmp_path / "bad.pt"))
    assert AudioMAE.from_pretrained(tmp_path / "ok.pt").config == model.config
    torch.serialization.set_crc32_options(False)
    try:
        model.save_pretrained(tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert AudioMAE.from_pretrained(tmp_path / "nocrc.pt").config == model.config


def test_extra_entries_cannot_replace_the_models_own(tmp_path):
    model = AudioMAE(AudioMAEConfig.preset("tiny"))
    for key in ("config", "model", "format", "version", "kind"):
        with pytest.raises(ValueError, match=f"save_pretrained: {key} is an entry of the model's own"):
            model.save_pretrained(tmp_path / "x.pt", **{key: {"lr": 1e-4}})
    assert not (tmp_path / "x.pt").exists()
    model.save_pretrained(tmp_path / "x.pt", train_config={"lr": 1e-4})
    back = AudioMAE.from_pretrained(tmp_path / "x.pt")
    assert back.config == model.config
    assert torch.load(tmp_path / "x.pt", weights_only=False)["train_config"] == {"lr": 1e-4}


def test_a_release_run_launched_with_submitit_loads_its_path_arguments(tmp_path):
    """The release's submitit launcher sets output_dir, log_dir and job_dir to pathlib paths: the file
    loads (they were refused as objects other than tensors) and gives the same model."""
    import pathlib

    sd = AudioMAE(TINY).state_dict()
    args = argparse.Namespace(model="mae_vit_base_patch16", norm_pix_loss=True, mask_ratio=0.8,
                              output_dir=pathlib.Path("/checkpoint/u/123"), log_dir=pathlib.PurePosixPath("/logs"),
                              job_dir=pathlib.PosixPath("/checkpoint/u/%j"))
    path = _released_file(tmp_path, sd, args)
    model = AudioMAE.from_pretrained(str(path), config=TINY)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    model.save_pretrained(str(tmp_path / "again.pt"))  # its args written again, the paths as strings
    from audiomae.checkpoint import read_checkpoint
    assert read_checkpoint(str(tmp_path / "again.pt"))[2].output_dir == "/checkpoint/u/123"
    assert torch.load(tmp_path / "again.pt", weights_only=False)["args"].mask_ratio == 0.8


def test_wrapper_prefixes_are_stripped_in_any_order():
    """torch.compile(DDP(model)) saves _orig_mod.module.* (DDP(torch.compile(model)) module._orig_mod.*)."""
    sd = AudioMAE(TINY).state_dict()
    for prefix in ("_orig_mod.module.", "module._orig_mod.", "module.module.", "_orig_mod."):
        model = AudioMAE.from_pretrained({prefix + k: v for k, v in sd.items()})
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items()), prefix


@pytest.mark.parametrize("damage, message", [
    (lambda sd: sd.pop("decoder_blocks.0.attn.meta_mlp.fc1.weight"),
     "an incomplete Audio-MAE state dict: decoder_blocks.0.attn.meta_mlp.fc1.weight is missing"),
    (lambda sd: sd.update({"decoder_blocks.0.attn.tau": torch.tensor(1.0)}),
     r"weights of an unexpected rank \(decoder_blocks.0.attn.tau \(\)\)"),
    (lambda sd: sd.update({0: torch.zeros(1)}), "keys must be parameter names \\(strings\\), got 0"),
    (lambda sd: sd.update({"cls_token": torch.empty(1, 1, 64, device="meta")}),
     "1 tensor of the state dict holds no dense values \\(the first: cls_token, on the meta device\\)"),
    (lambda sd: sd.update({"cls_token": sd["cls_token"].to_sparse()}), "cls_token, layout torch.sparse_coo"),
])
def test_damaged_state_dicts_are_checkpoint_errors(tmp_path, damage, message):
    sd = dict(AudioMAE(TINY).state_dict())
    damage(sd)
    with pytest.raises(CheckpointError, match=message):
        AudioMAE.from_pretrained(sd)
    if all(isinstance(k, str) for k in sd) and not sd["cls_token"].is_meta:  # the same from a file
        torch.save(sd, tmp_path / "d.pt")
        with pytest.raises(CheckpointError, match=message):
            AudioMAEClassifier.from_pretrained(str(tmp_path / "d.pt"))


def test_a_global_decoders_head_count_guessed_from_its_width_is_said(tmp_path, capsys):
    """A bare state dict of a global decoder does not hold its head count: at a width no preset has, the
    assumption is a warning (it was silent) and info marks it; at a preset's width it is the preset's."""
    cfg = AudioMAEConfig.preset("tiny", decoder_mode="global", decoder_embed_dim=96, decoder_num_heads=4)
    sd = AudioMAE(cfg).state_dict()
    with pytest.warns(CheckpointAdaptedWarning, match="assumed decoder_num_heads=3 for width 96 "
                                                      r"\(pass decoder_num_heads= if the model had another\)"):
        assert AudioMAE.from_pretrained(sd).config.decoder_num_heads == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert AudioMAE.from_pretrained(sd, decoder_num_heads=4).config.decoder_num_heads == 4
        preset = AudioMAE.from_pretrained(AudioMAE(AudioMAEConfig.preset("tiny", decoder_mode="global")).state_dict())
        assert preset.config.decoder_num_heads == TINY.decoder_num_heads
    from audiomae.info import main as info_main
    torch.save(sd, tmp_path / "g.pt")
    assert info_main([str(tmp_path / "g.pt")]) == 0
    assert "decoder: global, 4 blocks, width 96, 3 heads (not in the weights: width / 32)" in capsys.readouterr().out


def test_save_pretrained_keeps_the_run_options_of_the_file_the_model_came_from(tmp_path):
    """A classifier loaded and saved again lost its run's options: classify then scored a single-label
    model with sigmoids and lost its class names. They are written again, unless other args are given,
    and not for a new head on a pretrained encoder (that run's options are not the classifier's)."""
    from audiomae.checkpoint import read_checkpoint
    run = {"multi_label": False, "class_names": ["a", "b", "c"], "stats": "esc50"}
    AudioMAEClassifier(AudioMAEConfig.preset("tiny", num_classes=3)).save_pretrained(str(tmp_path / "c.pt"), args=run)
    model = AudioMAEClassifier.from_pretrained(str(tmp_path / "c.pt"))
    for name in ("again.pt", "again.safetensors"):
        model.save_pretrained(str(tmp_path / name))
        assert read_checkpoint(str(tmp_path / name))[2] == run, name
    model.save_pretrained(str(tmp_path / "mine.pt"), args={"note": 1})
    assert read_checkpoint(str(tmp_path / "mine.pt"))[2] == {"note": 1}
    AudioMAE(TINY).save_pretrained(str(tmp_path / "pre.pt"), args={"data": "synthetic"})
    with pytest.warns(CheckpointAdaptedWarning):
        head = AudioMAEClassifier.from_pretrained(str(tmp_path / "pre.pt"), num_classes=3)
    head.save_pretrained(str(tmp_path / "head.pt"))
    assert read_checkpoint(str(tmp_path / "head.pt"))[2] is None


def test_a_safetensors_file_is_read_whatever_its_name(tmp_path, capsys):
    """SAVED.SAFETENSORS (or a safetensors file named .bin) was taken for a PyTorch checkpoint and refused."""
    pytest.importorskip("safetensors")
    model = AudioMAE(TINY)
    model.save_pretrained(str(tmp_path / "saved.safetensors"))
    os.link(tmp_path / "saved.safetensors", tmp_path / "SAVED.SAFETENSORS")
    os.link(tmp_path / "saved.safetensors", tmp_path / "weights.bin")
    for name in ("SAVED.SAFETENSORS", "weights.bin"):
        loaded = AudioMAE.from_pretrained(str(tmp_path / name))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    from audiomae.info import main as info_main
    assert info_main([str(tmp_path / "weights.bin")]) == 0
    assert "width 64" in capsys.readouterr().out
