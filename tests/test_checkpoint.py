"""Checkpoint formats, round trips, adaptation and the errors users see."""
import argparse
import os
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
