"""Overlapping patches (the release's custom patches: 16 x 16 every 10 frames and bins)."""
import argparse
import warnings

import numpy as np
import pytest
import torch

from audiomae import AudioMAE, AudioMAEClassifier, AudioMAEConfig
from audiomae.checkpoint import CheckpointAdaptedWarning, infer_config
from audiomae.model import local_grid, masked_mse, norm_pix_target, patchify, unpatchify


def _release_flexible_table(dim, patch_hw):
    """The release's table for a grid it reports as ``patch_hw`` = (h, w), written from its
    semantics: a meshgrid with w first, the first half of the channels coding the w coordinate."""
    def code(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(patch_hw[1], dtype=np.float32), np.arange(patch_hw[0], dtype=np.float32))
    table = np.concatenate([code(dim // 2, gw), code(dim // 2, gh)], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros([1, dim]), table])).float()[None]


def test_grid_and_config_fields():
    cfg = AudioMAEConfig(patch_stride=10)
    assert cfg.grid_size == (101, 12) and cfg.num_patches == 1212 and cfg.overlapping and cfg.stride == 10
    assert AudioMAEConfig().grid_size == (64, 8) and not AudioMAEConfig().overlapping
    assert AudioMAEConfig(patch_size=14).grid_size == (73, 9)  # remainders cropped
    assert AudioMAEConfig(img_size=(512, 128), patch_stride=10).grid_size == (50, 12)
    # the stride of non-overlapping patches is spelled one way, so configs compare and record alike
    assert AudioMAEConfig(patch_stride=16) == AudioMAEConfig() and AudioMAEConfig(patch_stride=16).patch_stride is None
    assert AudioMAEConfig.from_dict(AudioMAEConfig(patch_stride=10).to_dict()) == cfg
    for bad in (0, -3, 17, 2.5, "10", True):
        with pytest.raises(ValueError, match="patch_stride"):
            AudioMAEConfig(patch_stride=bad)


def test_patches_are_the_unfolded_input_time_major():
    spec = torch.randn(2, 1, 1024, 128, dtype=torch.float64)
    patches = patchify(spec, 16, 10)
    assert patches.shape == (2, 1212, 256)
    for k in (0, 11, 12, 605, 1211):
        t, f = divmod(k, 12)
        torch.testing.assert_close(patches[:, k], spec[:, 0, 10 * t:10 * t + 16, 10 * f:10 * f + 16].reshape(2, 256),
                                   rtol=0, atol=0)
    # the stride of the patches themselves gives the non-overlapping patchify
    torch.testing.assert_close(patchify(spec, 16, 16), patchify(spec, 16), rtol=0, atol=0)


def test_unpatchify_averages_the_overlaps():
    spec = torch.randn(2, 1, 256, 128, dtype=torch.float64)
    back = unpatchify(patchify(spec, 16, 10), 16, (25, 12), 10)
    assert back.shape == (2, 1, 256, 126)  # 11 * 10 + 16 bins covered
    torch.testing.assert_close(back, spec[..., :126], rtol=0, atol=1e-12)
    # each value is the mean of the patches covering it: one patch of 1s among 0s gives 1/count
    one = torch.zeros(1, 300, 256, dtype=torch.float64)
    one[0, 13] = 1.0  # patch (t=1, f=1): frames 10..25, bins 10..25
    img = unpatchify(one, 16, (25, 12), 10)[0, 0]
    assert img[10, 10] == 0.25 and img[12, 16] == 0.5 and img[16, 16] == 1.0 and img[26, 26] == 0


def test_patch_embedding_is_the_strided_convolution():
    model = AudioMAEClassifier(AudioMAEConfig.preset("tiny", patch_stride=10), num_classes=3).double()
    spec = torch.randn(2, 1, 256, 128, dtype=torch.float64)
    w = model.patch_embed.proj.weight.reshape(64, 256)
    want = patchify(spec, 16, 10) @ w.T + model.patch_embed.proj.bias + model.pos_embed[:, 1:]
    torch.testing.assert_close(model.tokens(spec), want, rtol=1e-12, atol=1e-12)


def test_position_tables_follow_the_release():
    cfg = AudioMAEConfig.preset("tiny", patch_stride=10, img_size=(1024, 128))
    model = AudioMAE(cfg)
    # released kind: the release's table for its (101, 12) report of the grid, frequency code first
    torch.testing.assert_close(model.pos_embed, _release_flexible_table(64, (101, 12)), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.decoder_pos_embed, _release_flexible_table(64, (101, 12)), rtol=0, atol=1e-6)
    # the non-overlapping table stays the release's scrambled one: its grid reported as (8, 64)
    plain = AudioMAE(AudioMAEConfig.preset("tiny", img_size=(1024, 128)))
    torch.testing.assert_close(plain.pos_embed, _release_flexible_table(64, (8, 64)), rtol=0, atol=1e-6)
    # grid kind: time code first, as without overlap
    grid = AudioMAE(cfg.replace(pos_embed_kind="grid")).pos_embed[0, 1:]
    assert torch.equal(grid[1, :32], grid[0, :32]) and not torch.equal(grid[12, :32], grid[0, :32])


def test_local_decoder_repeats_the_last_time_row_as_the_release():
    cfg = AudioMAEConfig.preset("tiny", patch_stride=10, img_size=(1024, 128), decoder_depth=2)
    assert cfg.window == (6, 6) and cfg.window_size is None  # the release's windows for its custom patches
    assert AudioMAEConfig.preset("tiny").window == (4, 4)
    assert local_grid(cfg) == (102, 12)
    assert local_grid(cfg.replace(window_size=(4, 4))) == (104, 12)
    assert local_grid(AudioMAEConfig.preset("tiny")) == (16, 8)  # no overlap: the grid itself
    model = AudioMAE(cfg).eval()
    seen = []
    model.decoder_blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model.decoder_norm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    spec = torch.randn(2, 1, 1024, 128)
    noise = torch.rand(2, 1212)
    with torch.no_grad():
        out = model(spec, noise=noise)
    into, after = seen
    assert into.shape == (2, 102 * 12, 64) and after.shape == (2, 1212, 64)
    rows = into.unflatten(1, (102, 12))
    assert torch.equal(rows[:, 101], rows[:, 100])
    assert out.pred.shape == (2, 1212, 256)
    # the release's masking recipe on 1212 patches: the int(1212 * 0.2) = 242 smallest noise values kept
    kept = torch.argsort(noise, dim=1)[:, :242]
    want = torch.ones(2, 1212).scatter_(1, kept, 0.0)
    assert torch.equal(out.mask, want)
    # the loss: norm-pix targets of the unfolded patches, averaged over the removed ones
    target = norm_pix_target(patchify(spec, 16, 10))
    torch.testing.assert_close(out.loss, masked_mse(out.pred, target, out.mask), rtol=1e-6, atol=0)
    assert not torch.equal(out.loss, masked_mse(out.pred, target, 1 - out.mask))


@pytest.mark.parametrize("mode", ["global", "hybrid", "local"])
def test_pretraining_trains_and_reconstructs(mode):
    cfg = AudioMAEConfig.preset("tiny", patch_stride=10, decoder_mode=mode)
    model = AudioMAE(cfg)
    spec = torch.randn(2, 1, 256, 128)
    out = model(spec)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.patch_embed.proj.weight.grad.abs().sum() > 0
    recon, mask = model.reconstruct(spec)
    assert recon.shape == mask.shape == (2, 1, 256, 126)
    assert 0 <= float(mask.min()) and float(mask.max()) <= 1 and 0.6 < float(mask.mean()) < 1.0


def test_classifier_masks_the_overlapping_grid_in_2d():
    cfg = AudioMAEConfig.preset("tiny", patch_stride=10, img_size=(1024, 128), finetune_mask_2d=True)
    model = AudioMAEClassifier(cfg, num_classes=4).train()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    logits = model(torch.randn(2, 1, 1024, 128))
    assert logits.shape == (2, 4)
    assert seen == [(2, 1 + 80 * 9, 64)]  # int(101 * 0.8) time rows, int(12 * 0.8) frequency columns


def test_checkpoints_tell_their_stride():
    model = AudioMAE(AudioMAEConfig.preset("tiny", patch_stride=10, img_size=(1024, 128)))
    sd = model.state_dict()
    # a bare state dict: the release's table of overlapping patches names its grid and stride
    fields = infer_config(sd)
    assert fields["patch_stride"] == 10 and fields["img_size"] == (1024, 128) and fields["pos_embed_kind"] == "released"
    loaded = AudioMAE.from_pretrained(sd)
    assert loaded.config.patch_stride == 10 and torch.equal(loaded.pos_embed, model.pos_embed)
    spec, noise = torch.randn(1, 1, 1024, 128), torch.rand(1, 1212)
    with torch.no_grad():
        torch.testing.assert_close(loaded(spec, noise=noise).loss, model.eval()(spec, noise=noise).loss)
    # the release's args say use_custom_patch even where the table is a trained (here: zero) one
    zero = dict(sd, pos_embed=torch.zeros_like(sd["pos_embed"]), decoder_pos_embed=torch.zeros_like(sd["pos_embed"][..., :64]))
    assert "patch_stride" not in infer_config(zero)
    fields = infer_config(zero, argparse.Namespace(use_custom_patch=True))
    assert fields["patch_stride"] == 10 and fields["img_size"] == (1024, 128)
    # a non-overlapping table keeps non-overlapping patches
    assert "patch_stride" not in infer_config(AudioMAE(AudioMAEConfig.preset("tiny", img_size=(1024, 128))).state_dict())


def test_finetuning_a_non_overlapping_checkpoint_with_overlapping_patches(tmp_path):
    base = AudioMAE(AudioMAEConfig.preset("tiny", img_size=(1024, 128)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf = AudioMAEClassifier.from_pretrained({"model": base.state_dict()}, patch_stride=10, num_classes=3)
    notes = " ".join(str(w.message) for w in caught if issubclass(w.category, CheckpointAdaptedWarning))
    assert "rebuilt for the 101x12 grid of overlapping patches" in notes
    assert clf.config.grid_size == (101, 12)
    torch.testing.assert_close(clf.pos_embed, _release_flexible_table(64, (101, 12)), rtol=0, atol=1e-6)
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "blocks.1.mlp.fc2.weight", "cls_token"):
        assert torch.equal(clf.state_dict()[name], base.state_dict()[name]), name
    # and back: the file records the stride
    clf.save_pretrained(tmp_path / "c.pt")
    again = AudioMAEClassifier.from_pretrained(tmp_path / "c.pt")
    assert again.config == clf.config
    x = torch.randn(1, 1, 1024, 128)
    torch.testing.assert_close(again(x), clf(x))


def test_a_released_custom_patch_file_loads_with_the_releases_windows(tmp_path):
    """The release's pretraining file of custom patches: 6 x 6 windows on 102 x 12 tokens."""
    model = AudioMAE(AudioMAEConfig.preset("tiny", patch_stride=10, img_size=(1024, 128)))
    path = tmp_path / "release.pth"
    torch.save({"model": model.state_dict(), "epoch": 3, "args": argparse.Namespace(use_custom_patch=True)}, path)
    loaded = AudioMAE.from_pretrained(path)
    assert loaded.config.window == (6, 6) and loaded.decoder_blocks[0].grid == (102, 12)
    assert loaded.decoder_blocks[0].attn.window == (6, 6)
    spec, noise = torch.randn(1, 1, 1024, 128), torch.rand(1, 1212)
    with torch.no_grad():
        assert torch.equal(loaded(spec, noise=noise).pred, model.eval()(spec, noise=noise).pred)


def test_a_twelve_row_table_is_read_as_non_overlapping_first():
    """The release's table of a 12 x 8 grid (192 x 128, non-overlapping) is also that of an 8 x 12
    grid of overlapping patches: files of 128 mel bins are read as non-overlapping first."""
    sd = AudioMAEClassifier(AudioMAEConfig.preset("tiny", img_size=(192, 128)), num_classes=2).state_dict()
    fields = infer_config(sd)
    assert fields["img_size"] == (192, 128) and "patch_stride" not in fields
    assert AudioMAEClassifier.from_pretrained(sd).config.grid_size == (12, 8)


@pytest.mark.parametrize("stride", [8, 12])
def test_strides_whose_frequency_patches_the_windows_do_not_tile(stride):
    cfg = AudioMAEConfig.preset("tiny", patch_stride=stride)
    with pytest.raises(ValueError, match=r"does not tile the \d+ frequency patches.*patch_stride=10.*global"):
        AudioMAE(cfg)
    AudioMAE(cfg.replace(decoder_mode="global"))  # no windows
    AudioMAEClassifier(cfg, num_classes=2)  # no decoder


def test_configs_record_and_compare_as_before_the_new_fields():
    """Files of the previous version hold window_size (4, 4) and no patch_stride; files now leave
    both out while they hold their defaults, so older versions read files of models without them."""
    old = {k: v for k, v in AudioMAEConfig.preset("tiny").to_dict().items() if k != "patch_stride"}
    old["window_size"] = [4, 4]
    assert AudioMAEConfig.from_dict(old) == AudioMAEConfig.preset("tiny")
    assert AudioMAEConfig.from_dict(old).replace(patch_stride=10).window == (6, 6)
    assert AudioMAEConfig(window_size=(8, 4)).window_size == (8, 4)  # another window is kept
    saved = AudioMAEConfig.preset("tiny").to_file_dict()
    assert "patch_stride" not in saved and "window_size" not in saved
    assert AudioMAEConfig.preset("tiny", patch_stride=10).to_file_dict()["patch_stride"] == 10


def test_release_files_at_other_mel_counts_and_told_strides():
    # a custom-patch file of 64 mel bins: its table names the 101 x 5 grid of overlapping patches
    sd = AudioMAEClassifier(AudioMAEConfig.preset("tiny", patch_stride=10, img_size=(1024, 64)), num_classes=2)
    fields = infer_config(sd.state_dict(), argparse.Namespace(use_custom_patch=True))
    assert fields["patch_stride"] == 10 and AudioMAEConfig.from_dict({**fields, "num_classes": 2}).grid_size == (101, 5)
    # use_custom_patch=False: non-overlapping, even where the table would also read as overlapping
    sd = AudioMAEClassifier(AudioMAEConfig.preset("tiny", img_size=(192, 64)), num_classes=2).state_dict()
    fields = infer_config(sd, argparse.Namespace(use_custom_patch=False))
    assert fields["img_size"] == (192, 64) and "patch_stride" not in fields
