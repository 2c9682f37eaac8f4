"""Commands built on the loops: embed, reconstruct, and the demo (the main job end to end)."""
from __future__ import annotations

import os
import time
from typing import Any, Dict

import torch

from .checkpoint import read_checkpoint
from .model import AudioMAE, AudioMAEClassifier


def load_any(path: str, **overrides):
    """A pretraining checkpoint (with decoder) as AudioMAE, anything else as AudioMAEClassifier."""
    sd, _, _ = read_checkpoint(path)
    if any(k.startswith("decoder_") for k in sd):
        return AudioMAE.from_pretrained(path, **overrides)
    return AudioMAEClassifier.from_pretrained(path, **overrides)


def _device(name: str) -> torch.device:
    from .train.distributed import pick_device
    return pick_device(name)


def embed(opts: Dict[str, Any]) -> str:
    """Embeddings of audio files (positional inputs) or of a dataset (``--data``) -> .pt or .npz."""
    from .audio import load_input
    from .data import FeatureExtractor
    from .train.loop import build_dataset, embed_dataset
    from tqdm.auto import tqdm

    device = _device(opts.get("device", "auto"))
    model = load_any(opts["checkpoint"]).to(device).eval()
    T = model.config.img_size[0]
    out: Dict[str, Any] = {"checkpoint": os.path.abspath(opts["checkpoint"])}
    if opts.get("inputs"):
        pooled, patches = [], []
        stats = opts.get("stats", "audioset")
        files = opts["inputs"]
        bs = int(opts.get("batch_size", 32))
        for i in tqdm(range(0, len(files), bs), desc="embedding", unit="batch", disable=opts.get("quiet")):
            x = torch.stack([load_input(f, target_length=T, stats=stats) for f in files[i:i + bs]]).to(device)
            pooled.append(model.embed(x).float().cpu())
            if opts.get("per_patch"):
                patches.append(model.embed(x, per_patch=True).float().cpu())
        out["embeddings"] = torch.cat(pooled)
        out["paths"] = [os.path.abspath(f) for f in files]
        if patches:
            out["patch_embeddings"] = torch.cat(patches)
    else:
        dataset = build_dataset(opts, "val" if opts.get("eval_data") else "train")
        feats = FeatureExtractor(target_length=T, stats=opts.get("stats", "audioset"), device=device)
        out["embeddings"], out["targets"] = embed_dataset(model, dataset, opts, device, feats)
        if opts.get("per_patch"):
            out["patch_embeddings"], _ = embed_dataset(model, dataset, opts, device, feats, per_patch=True)
        out["class_names"] = list(getattr(dataset, "class_names", []) or [])
    path = opts.get("out", "embeddings.pt")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".npz"):
        import numpy as np
        np.savez(path, **{k: (v.numpy() if torch.is_tensor(v) else np.asarray(v)) for k, v in out.items()})
    else:
        torch.save(out, path)
    print(f"wrote {tuple(out['embeddings'].shape)} embeddings to {path}")
    return path


def _clip_input(src: str, T: int, stats) -> torch.Tensor:
    from .audio import load_input, waveform_to_input
    if src.startswith("synthetic:"):
        from .data import SyntheticAudioDataset
        try:
            idx = int(src.split(":", 1)[1])
        except ValueError:
            raise SystemExit(f"error: {src}: expected synthetic:N with N a clip number") from None
        ds = SyntheticAudioDataset(num_clips=idx + 1, split="val")
        return waveform_to_input(ds[idx]["waveform"], target_length=T, stats=stats)
    if not os.path.exists(src):
        raise SystemExit(f"error: {src}: no such audio file")
    return load_input(src, target_length=T, stats=stats)


def reconstruct(opts: Dict[str, Any]) -> str:
    """One clip -> PNG of input / masked input / reconstruction / reconstruction + visible (+ WAV)."""
    from .reconstruct import mel_to_audio, reconstruction_figure, write_wav

    device = _device(opts.get("device", "auto"))
    model = AudioMAE.from_pretrained(opts["checkpoint"]).to(device).eval()
    T = model.config.img_size[0]
    x = _clip_input(opts["audio"], T, opts.get("stats", "audioset")).unsqueeze(0).to(device)
    g = torch.Generator().manual_seed(int(opts.get("seed", 0)))
    noise = torch.rand(1, model.config.num_patches, generator=g).to(device)
    with torch.no_grad():
        recon, mask = model.reconstruct(x, opts.get("mask_ratio", 0.8), noise=noise)
        loss = model(x, opts.get("mask_ratio", 0.8), noise=noise).loss
    reconstruction_figure(x[0, 0], recon[0, 0], mask[0, 0], opts["out"],
                          title=f"{os.path.basename(opts['audio'])}: masked-patch loss {float(loss):.3f}")
    print(f"wrote {opts['out']} (loss on the removed patches {float(loss):.4f})")
    if opts.get("wav"):
        pasted = x[0, 0] * (1 - mask[0, 0]) + recon[0, 0] * mask[0, 0]
        write_wav(opts["wav"], mel_to_audio(pasted.cpu(), opts.get("stats", "audioset")))
        print(f"wrote {opts['wav']}")
    return opts["out"]


def demo(opts: Dict[str, Any]) -> Dict[str, float]:
    """The main job on the embedded dataset: pretrain a tiny Audio-MAE, draw a reconstruction, and
    linear-probe its frozen embeddings against the same encoder untrained."""
    from .data import FeatureExtractor
    from .train.loop import build_dataset, embed_dataset, linear_probe, pretrain

    out = opts["output_dir"]
    t0 = time.time()
    pre = dict(opts, model="tiny", data="synthetic", blr=1e-2, weight_decay=0.05, warmup_epochs=1,
               min_lr=1e-5, accum_iter=1, mask_ratio=0.8, mask_mode="unstructured", augment=True, num_workers=0,
               stats="audioset", log_every=10, save_every_steps=0, max_nan_steps=20, precision="auto")
    print(f"[1/3] pretraining a tiny Audio-MAE on {opts['num_clips']} synthetic clips for {opts['epochs']} epochs")
    pretrain(pre)
    ckpt = os.path.join(out, "model.pt")

    print("[2/3] reconstruction of a held-out clip")
    png = os.path.join(out, "reconstruction.png")
    reconstruct({"checkpoint": ckpt, "audio": "synthetic:3", "out": png, "device": opts.get("device", "auto"),
                 "seed": 0, "mask_ratio": 0.8})

    print("[3/3] linear probe on frozen embeddings (10 classes, chance = 10 %)")
    device = _device(opts.get("device", "auto"))
    train_set = build_dataset(pre, "train")
    val_set = build_dataset(pre, "val")
    trained = AudioMAE.from_pretrained(ckpt).to(device)
    feats = FeatureExtractor(target_length=trained.config.img_size[0], stats="audioset", device=device)
    torch.manual_seed(opts.get("seed", 0))
    untrained = AudioMAE(trained.config).to(device)
    results = {}
    for name, model in [("pretrained", trained), ("untrained", untrained)]:
        tx, ty = embed_dataset(model, train_set, pre, device, feats, desc=f"embedding ({name})")
        vx, vy = embed_dataset(model, val_set, pre, device, feats, desc=f"embedding ({name})")
        results[name] = linear_probe(tx, ty, vx, vy)["accuracy"]
    print()
    print(f"  linear-probe accuracy, pretrained encoder : {results['pretrained'] * 100:5.1f} %")
    print(f"  linear-probe accuracy, untrained encoder  : {results['untrained'] * 100:5.1f} %")
    print("  chance                                    :  10.0 %")
    print(f"  reconstruction picture: {png}   ({time.time() - t0:.0f} s in all)")
    return results
