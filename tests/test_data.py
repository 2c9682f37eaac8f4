"""Tests of audiomae.data: datasets, bad-file handling, loaders, sampling weights, augmentations."""
import json
import logging
import math
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from audiomae.audio import fbank, waveform_to_input
from audiomae.data import (
    SYNTHETIC_CLASS_NAMES,
    DataError,
    DistributedWeightedSampler,
    FeatureExtractor,
    FolderDataset,
    ManifestDataset,
    SyntheticAudioDataset,
    TooManyBadFilesError,
    collate_items,
    default_target_length,
    label_counts,
    label_weights,
    make_loader,
    mixup,
    roll_and_magnitude,
    spec_augment,
)

SR = 16000


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _tone(seconds, freq=440.0, sr=SR, channels=1):
    t = np.arange(int(round(seconds * sr))) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t)
    return np.stack([x] * channels, 1) if channels > 1 else x


def _wav(path, seconds=0.5, freq=440.0, sr=SR, channels=1):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, _tone(seconds, freq, sr, channels), sr, subtype="PCM_16")
    return path


LABEL_CSV = 'index,mid,display_name\n0,/m/a,"Speech"\n1,/m/b,"Male speech, man speaking"\n2,/m/c,"Dog"\n'


@pytest.fixture
def audioset_dir(tmp_path):
    """A tiny AudioSet-style folder: manifest with relative and absolute paths, label CSV."""
    _wav(str(tmp_path / "audio" / "a.wav"), 0.5, 300.0)
    _wav(str(tmp_path / "audio" / "b.wav"), 1.5, 600.0, sr=44100, channels=2)  # resampled, downmixed
    _wav(str(tmp_path / "audio" / "c.flac"), 0.8, 900.0, sr=8000)
    abs_path = _wav(str(tmp_path / "elsewhere" / "d.wav"), 0.3, 1200.0)
    (tmp_path / "labels.csv").write_text(LABEL_CSV)
    data = {
        "data": [
            {"wav": "audio/a.wav", "labels": "/m/a"},
            {"wav": "audio/b.wav", "labels": "/m/a,/m/b"},
            {"wav": "audio/c.flac", "labels": "/m/c,/m/a"},
            {"wav": abs_path, "labels": "/m/b"},
        ]
    }
    (tmp_path / "train.json").write_text(json.dumps(data))
    return tmp_path


def _clip_descriptors(ds, n):
    """Hand-made clip descriptors that do not depend on pitch: peakiness of the frame spectra,
    energy-modulation spectrum, centroid movement (a nearest-class-mean check of the classes)."""
    w = torch.stack([ds[i]["waveform"] for i in range(n)])
    F = fbank(w - w.mean(-1, keepdim=True))[..., 4:]  # bins 0-3 are degenerate at 128 mels
    e = torch.logsumexp(F, -1)
    peak = F.sort(-1, descending=True).values
    peak = (peak - peak[..., :1]).mean(1)[:, [1, 2, 4, 8, 16, 32, 64]]
    m = torch.fft.rfft(e - e.mean(1, keepdim=True), dim=1).abs()
    m = m / (m.sum(1, keepdim=True) + 1e-6)
    fr = torch.fft.rfftfreq(e.shape[1], 0.01)
    bands = torch.stack([m[:, (fr >= a) & (fr < b)].sum(1) for a, b in [(0, 2), (2, 5), (5, 10), (10, 20), (20, 50)]], 1)
    cen = (torch.softmax(F, -1) * torch.arange(F.shape[-1]).float()).sum(-1)
    slope = (cen[:, -60:].mean(1) - cen[:, :60].mean(1))[:, None]
    moves = (cen[:, 1:] - cen[:, :-1]).abs().mean(1, keepdim=True)
    feats = torch.cat([peak, bands, e.std(1, keepdim=True), cen.std(1, keepdim=True), slope, moves], 1)
    labels = np.array([ds.labels_of(i)[0] for i in range(n)])
    return feats.numpy().astype(np.float64), labels


# ----------------------------------------------------------------------------------------------
# synthetic dataset
# ----------------------------------------------------------------------------------------------
def test_synthetic_item_format():
    ds = SyntheticAudioDataset(num_clips=20)
    assert len(ds) == 20 and ds.num_classes == 10 and ds.class_names == SYNTHETIC_CLASS_NAMES
    assert not ds.multi_label
    assert ds.clip_samples == 40960 and ds.target_length == 256
    item = ds[13]
    assert set(item) == {"waveform", "length", "target", "index", "bad"}
    assert item["length"] == ds.clip_samples  # synthetic clips fill the clip
    w = item["waveform"]
    assert w.dtype == torch.float32 and w.shape == (40960,)
    assert torch.isfinite(w).all() and w.abs().max() <= 1.0 and w.abs().max() > 0.01
    assert item["target"].dtype == torch.float32 and item["target"].tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert item["index"] == 13 and item["bad"] == []
    assert ds.labels_per_clip()[:12] == [[i % 10] for i in range(12)]
    assert ds[-1]["index"] == 19
    with pytest.raises(IndexError):
        ds[20]


def test_synthetic_deterministic():
    a = SyntheticAudioDataset(num_clips=30, seed=3)
    b = SyntheticAudioDataset(num_clips=30, seed=3)
    for i in (0, 7, 29):
        assert torch.equal(a[i]["waveform"], b[i]["waveform"])
    # reading order does not matter: each clip depends on (seed, split, index) only
    assert torch.equal(a[7]["waveform"], SyntheticAudioDataset(num_clips=8, seed=3)[7]["waveform"])
    assert not torch.equal(a[7]["waveform"], SyntheticAudioDataset(num_clips=30, seed=4)[7]["waveform"])
    assert not torch.equal(a[7]["waveform"], SyntheticAudioDataset(num_clips=30, seed=3, split="val")[7]["waveform"])
    assert not torch.equal(a[7]["waveform"], a[17]["waveform"])  # same class, other parameters


def test_synthetic_balance_and_distinguishable():
    train = SyntheticAudioDataset(num_clips=200, seed=0, split="train")
    val = SyntheticAudioDataset(num_clips=200, seed=0, split="val")
    counts = label_counts(train)
    assert counts.tolist() == [20.0] * 10
    xtr, ytr = _clip_descriptors(train, 200)
    xva, yva = _clip_descriptors(val, 200)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    centroids = np.stack([xtr[ytr == c].mean(0) for c in range(10)])
    pred = ((xva[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    acc = (pred == yva).mean()
    assert acc > 0.35, acc  # chance is 0.10
    # ... but not trivially separable by such simple features
    assert acc < 0.95, acc


def test_synthetic_speed():
    import time

    ds = SyntheticAudioDataset(num_clips=100)
    ds[0]
    t0 = time.perf_counter()
    for i in range(100):
        ds[i]
    per_clip = (time.perf_counter() - t0) / 100
    assert per_clip < 0.005, per_clip


def test_features_mode():
    ds = SyntheticAudioDataset(num_clips=4)
    dsf = SyntheticAudioDataset(num_clips=4, features=True)
    item = dsf[2]
    assert "waveform" not in item and item["input"].shape == (1, 256, 128)
    assert item["input"].dtype == torch.float32
    ref = waveform_to_input(ds[2]["waveform"], target_length=256, stats="audioset")
    assert torch.allclose(item["input"], ref)
    batch = collate_items([dsf[0], dsf[1]])
    assert batch["input"].shape == (2, 1, 256, 128)
    # the feature extractor passes precomputed inputs through
    assert torch.equal(FeatureExtractor(target_length=256)(batch), batch["input"])


def test_default_target_length():
    assert default_target_length(160000) == 1024  # 10 s AudioSet
    assert default_target_length(80000) == 512  # 5 s ESC-50
    assert default_target_length(16000) == 128  # 1 s Speech Commands


# ----------------------------------------------------------------------------------------------
# manifest dataset
# ----------------------------------------------------------------------------------------------
def test_manifest_dataset(audioset_dir):
    ds = ManifestDataset(audioset_dir / "train.json", audioset_dir / "labels.csv", clip_seconds=1.0)
    assert len(ds) == 4 and ds.num_classes == 3 and ds.multi_label
    assert ds.class_names == ["Speech", "Male speech, man speaking", "Dog"]
    assert ds.class_mids == ["/m/a", "/m/b", "/m/c"]
    assert ds.paths[0] == os.path.normpath(str(audioset_dir / "audio" / "a.wav"))
    assert ds.paths[3] == os.path.normpath(str(audioset_dir / "elsewhere" / "d.wav"))
    assert ds.labels_per_clip() == [[0], [0, 1], [2, 0], [1]]
    targets = torch.stack([ds[i]["target"] for i in range(4)])
    assert targets.tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 1], [0, 1, 0]]
    for i in range(4):
        w = ds[i]["waveform"]
        assert w.shape == (16000,) and w.dtype == torch.float32
    a = ds[0]["waveform"]  # 0.5 s: padded with zeros
    assert a[:8000].abs().max() > 0.2 and a[8000:].abs().max() == 0
    b = ds[1]["waveform"]  # 1.5 s at 44.1 kHz stereo: resampled, downmixed, cut
    assert b[-1000:].abs().max() > 0.2
    assert ds.bad_count == 0


def test_manifest_csv_and_unlabelled(audioset_dir):
    (audioset_dir / "m.csv").write_text('wav,labels\naudio/a.wav,"/m/a,/m/c"\naudio/c.flac,/m/b\n')
    ds = ManifestDataset(audioset_dir / "m.csv", audioset_dir / "labels.csv", clip_seconds=0.5)
    assert ds.labels_per_clip() == [[0, 2], [1]]
    (audioset_dir / "m.tsv").write_text("wav\tlabels\naudio/a.wav\t/m/a\n")
    assert ManifestDataset(audioset_dir / "m.tsv", audioset_dir / "labels.csv").labels_per_clip() == [[0]]
    # without a label file (pretraining): labels optional, empty targets
    (audioset_dir / "u.json").write_text('{"data": [{"wav": "audio/a.wav"}]}')
    u = ManifestDataset(audioset_dir / "u.json", None, clip_seconds=0.5)
    assert u.num_classes == 0 and u[0]["target"].shape == (0,)
    # root overrides the manifest's folder
    os.makedirs(audioset_dir / "sub")
    (audioset_dir / "sub" / "r.json").write_text('{"data": [{"wav": "audio/a.wav", "labels": "/m/a"}]}')
    r = ManifestDataset(audioset_dir / "sub" / "r.json", audioset_dir / "labels.csv", root=audioset_dir)
    assert r.paths[0] == os.path.normpath(str(audioset_dir / "audio" / "a.wav"))


def test_manifest_single_label(audioset_dir):
    with pytest.raises(DataError, match=r"data\[1\].*2 labels"):
        ManifestDataset(audioset_dir / "train.json", audioset_dir / "labels.csv", multi_label=False)
    (audioset_dir / "s.json").write_text('{"data": [{"wav": "audio/a.wav", "labels": "/m/c"}]}')
    ds = ManifestDataset(audioset_dir / "s.json", audioset_dir / "labels.csv", multi_label=False)
    assert ds[0]["target"].tolist() == [0, 0, 1]


BAD_MANIFESTS = [
    ('{"data": [\n  {"wav": "a.wav", "labels": "/m/a"},\n  {"wav": "b.wav" "labels": "/m/a"}\n]}', r"line 3, column 19: invalid JSON"),
    ('{"items": []}', r"no 'data' key"),
    ('{"data": {"wav": "a.wav"}}', r"'data' must be a list"),
    ('{"data": [{"wav": "a.wav", "labels": "/m/a"}, {"labels": "/m/a"}]}', r"data\[1\]: missing key 'wav'"),
    ('{"data": [{"wav": "a.wav", "labels": "/m/a"}, {"wav": "b.wav"}]}', r"data\[1\]: missing key 'labels'"),
    ('{"data": [{"wav": "a.wav", "labels": "/m/a"}, {"wav": "b", "labels": "/m/a"}, {"wav": "c", "labels": "/m/a,/m/zz"}]}', r"data\[2\]: unknown label '/m/zz'"),
    ('{"data": [{"wav": "", "labels": "/m/a"}]}', r"data\[0\]: 'wav' must be a non-empty string"),
    ('{"data": [{"wav": "a.wav", "labels": " , "}]}', r"data\[0\]: no labels"),
    ('{"data": [{"wav": "a.wav", "labels": 3}]}', r"data\[0\]: 'labels' must be"),
    ('{"data": ["a.wav"]}', r"data\[0\]: an entry must be an object"),
    ('{"data": []}', r"lists no clips"),
]


@pytest.mark.parametrize("text,match", BAD_MANIFESTS)
def test_malformed_manifest(tmp_path, text, match):
    (tmp_path / "labels.csv").write_text(LABEL_CSV)
    (tmp_path / "m.json").write_text(text)
    with pytest.raises(DataError, match=match) as info:
        ManifestDataset(tmp_path / "m.json", tmp_path / "labels.csv")
    assert "m.json" in str(info.value)


BAD_LABEL_CSVS = [
    ('index,mid,display_name\n0,/m/a,"A"\n1,/m/b,"B, b"\n1,/m/c,"C"\n', r"line 4: duplicate index 1 \(first on line 3\)"),
    ('index,mid,display_name\n0,/m/a,A\n1,/m/a,B\n', r"line 3: duplicate mid '/m/a'"),
    ('index,mid,display_name\n0,/m/a,A\nx,/m/b,B\n', r"line 3: index 'x' is not an integer"),
    ('index,mid,display_name\n0,/m/a,A\n1_0,/m/b,B\n', r"line 3: index '1_0' is not an integer"),  # int(): 10
    ('idx,mid,display_name\n0,/m/a,A\n', r"line 1: .*no 'index' column"),
    ('index,mid,display_name\n0,/m/a,A\n2,/m/b,B\n', r"indices must be 0\.\.1; missing \[1\].*line 3"),
    ('index,mid,display_name\n0,/m/a,A\n1,,B\n', r"line 3: empty mid"),
    ('index,mid,display_name\n0\n', r"line 2: expected at least 2 fields"),
    ("", r"the label file is empty"),
    ("index,mid,display_name\n", r"no classes"),
    # an unclosed quote took the rest of the file as one name (3 classes, then an unknown-label error)
    ('index,mid,display_name\n0,/m/a,A\n1,/m/b,"B\n2,/m/c,C\n', r"line 4: malformed CSV: unexpected end of data "
     r"\(a field's opening quote is never closed"),
]


@pytest.mark.parametrize("text,match", BAD_LABEL_CSVS)
def test_malformed_label_csv(tmp_path, text, match):
    (tmp_path / "labels.csv").write_text(text)
    (tmp_path / "m.json").write_text('{"data": [{"wav": "a.wav", "labels": "/m/a"}]}')
    with pytest.raises(DataError, match=match) as info:
        ManifestDataset(tmp_path / "m.json", tmp_path / "labels.csv")
    assert "labels.csv" in str(info.value)


def test_missing_manifest_or_labels(tmp_path):
    (tmp_path / "labels.csv").write_text(LABEL_CSV)
    with pytest.raises(DataError, match="nope.json: cannot open"):
        ManifestDataset(tmp_path / "nope.json", tmp_path / "labels.csv")
    (tmp_path / "m.json").write_text('{"data": [{"wav": "a.wav", "labels": "/m/a"}]}')
    with pytest.raises(DataError, match="nope.csv: cannot open"):
        ManifestDataset(tmp_path / "m.json", tmp_path / "nope.csv")


def test_a_file_listed_twice_is_named(tmp_path, caplog):
    (tmp_path / "labels.csv").write_text(LABEL_CSV)
    entries = [{"wav": "a.wav", "labels": "/m/a"}, {"wav": "b.wav", "labels": "/m/a"},
               {"wav": "./a.wav", "labels": "/m/b"}, {"wav": "b.wav", "labels": "/m/a"}]
    (tmp_path / "m.json").write_text(json.dumps({"data": entries}))
    caplog.set_level(logging.WARNING, logger="audiomae.data")
    ds = ManifestDataset(tmp_path / "m.json", tmp_path / "labels.csv")
    assert len(ds) == 4
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "2 entries repeat a file listed before (each is a clip of its own; 1 with other labels)" in text
    assert "data[2] repeats " in text and "data[0]" in text


def test_files_that_are_not_utf8_text(tmp_path):
    """A Latin-1 label file or manifest, a compressed manifest, an audio file given as the manifest:
    a DataError naming the file and what to do, not a UnicodeDecodeError."""
    import gzip
    (tmp_path / "labels.csv").write_text(LABEL_CSV)
    (tmp_path / "m.json").write_text('{"data": [{"wav": "a.wav", "labels": "/m/a"}]}')
    (tmp_path / "latin1.csv").write_bytes("index,mid,display_name\n0,/m/a,Caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv: the label file is not UTF-8 text .*Save it as UTF-8"):
        ManifestDataset(tmp_path / "m.json", tmp_path / "latin1.csv")
    (tmp_path / "m1.csv").write_bytes("wav,labels\ncaf\u00e9.wav,/m/a\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"m1.csv: the manifest is not UTF-8 text"):
        ManifestDataset(tmp_path / "m1.csv", tmp_path / "labels.csv")
    (tmp_path / "m.json.gz").write_bytes(gzip.compress((tmp_path / "m.json").read_bytes()))
    with pytest.raises(DataError, match=r"m.json.gz: the manifest is not UTF-8 text .*decompress it first"):
        ManifestDataset(tmp_path / "m.json.gz", tmp_path / "labels.csv")
    wav = _wav(str(tmp_path / "clip.wav"), 0.1)
    with pytest.raises(DataError, match=r"clip.wav: an audio file, not a manifest: --data takes"):
        ManifestDataset(wav, tmp_path / "labels.csv")


def test_a_json_manifest_nested_too_deeply_is_a_data_error(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(DataError, match="deep.json: its JSON nests too deeply to be a manifest"):
        ManifestDataset(tmp_path / "deep.json")


def test_malformed_csv_manifest(tmp_path):
    (tmp_path / "labels.csv").write_text(LABEL_CSV)
    (tmp_path / "m.csv").write_text("wav,labels\na.wav,/m/a\nb.wav,/m/a,extra\n")
    with pytest.raises(DataError, match=r"m.csv, line 3: expected 2 fields"):
        ManifestDataset(tmp_path / "m.csv", tmp_path / "labels.csv")
    (tmp_path / "n.csv").write_text("wav,labels\na.wav,/m/a\nb.wav,/m/q\n")
    with pytest.raises(DataError, match=r"n.csv, line 3: unknown label '/m/q'"):
        ManifestDataset(tmp_path / "n.csv", tmp_path / "labels.csv")
    (tmp_path / "q.csv").write_text('wav,labels\na.wav,"/m/a\nb.wav,/m/a\nc.wav,/m/b\n')  # was 1 clip, silently
    with pytest.raises(DataError, match=r"q.csv, line 4: malformed CSV: unexpected end of data"):
        ManifestDataset(tmp_path / "q.csv", tmp_path / "labels.csv")


# ----------------------------------------------------------------------------------------------
# folder dataset
# ----------------------------------------------------------------------------------------------
def test_folder_dataset(tmp_path):
    _wav(str(tmp_path / "root" / "rain" / "x.wav"), 0.2)
    _wav(str(tmp_path / "root" / "dog" / "b.wav"), 0.2)
    _wav(str(tmp_path / "root" / "dog" / "nested" / "a.flac"), 0.2)
    sf.write(str(tmp_path / "root" / "dog" / "c.ogg"), _tone(0.2), SR, format="OGG", subtype="VORBIS")
    (tmp_path / "root" / "dog" / "notes.txt").write_text("not audio")
    os.makedirs(tmp_path / "root" / "empty")
    ds = FolderDataset(tmp_path / "root", clip_seconds=0.25)
    assert ds.class_names == ["dog", "empty", "rain"]
    assert [os.path.relpath(p, tmp_path / "root") for p in ds.paths] == [
        os.path.join("dog", "b.wav"), os.path.join("dog", "c.ogg"),
        os.path.join("dog", "nested", "a.flac"), os.path.join("rain", "x.wav"),
    ]
    assert ds.labels_per_clip() == [[0], [0], [0], [2]]
    item = ds[3]
    assert item["target"].tolist() == [0, 0, 1] and item["waveform"].shape == (4000,)
    assert all(ds[i]["waveform"].abs().max() > 0.1 for i in range(4))


def test_datasets_downmix_stereo_files(tmp_path):
    """Stereo files give their first channel (the release's front end), or the channel mean when asked,
    in folders, manifests and the training loop's dataset builder."""
    from audiomae.train.loop import build_dataset
    left = _tone(0.25, 500.0)
    path = str(tmp_path / "root" / "cls" / "s.wav")
    os.makedirs(os.path.dirname(path))
    sf.write(path, np.stack([left, -0.5 * left], 1), SR, subtype="PCM_16")
    (tmp_path / "m.json").write_text(json.dumps({"data": [{"wav": path, "labels": ""}]}))
    want_first = torch.from_numpy(left.astype(np.float32))
    for make in (lambda **kw: FolderDataset(tmp_path / "root", clip_seconds=0.25, **kw),
                 lambda **kw: ManifestDataset(tmp_path / "m.json", clip_seconds=0.25, **kw),
                 lambda **kw: build_dataset({"data": str(tmp_path / "root"), "clip_seconds": 0.25,
                                             **kw}, "train")):
        first = make()[0]["waveform"]
        torch.testing.assert_close(first, want_first, atol=1 / 32768, rtol=0)
        mean = make(downmix="mean")[0]["waveform"]
        torch.testing.assert_close(mean, 0.25 * want_first, atol=1 / 32768, rtol=0)
    with pytest.raises(ValueError, match="downmix must be one of"):
        FolderDataset(tmp_path / "root", clip_seconds=0.25, downmix="average")


def test_dataset_arguments_are_checked_when_the_dataset_is_made(tmp_path):
    _wav(str(tmp_path / "root" / "dog" / "a.wav"), 0.2)
    _wav(str(tmp_path / "root" / "dog" / "b.flac"), 0.2)
    assert len(FolderDataset(tmp_path / "root", clip_seconds=0.25, extensions=".wav")) == 1  # not '.', 'w', ...
    with pytest.raises(ValueError, match="unknown"):
        FolderDataset(tmp_path / "root", clip_seconds=0.25, stats="foo")
    with pytest.raises(ValueError, match="target_length must be a positive number of frames"):
        SyntheticAudioDataset(num_clips=2, target_length=0)
    bad = SyntheticAudioDataset(num_clips=2, transform=lambda w: w.numpy())
    with pytest.raises(TypeError, match="transform must return a 1-D float tensor .*got a ndarray"):
        bad[0]
    with pytest.raises(ValueError, match="holds 'waveform'.*this one has 'foo'"):
        FeatureExtractor()({"foo": 1})
    # rates, clip lengths and frame counts: usage errors now, not every file "unreadable" later
    for kw, match in ((dict(sample_rate=0), "sample_rate must be a positive whole number of Hz, got 0"),
                      (dict(sample_rate=22050.5), "got 22050.5"),
                      (dict(clip_seconds=float("inf")), "clip_seconds must be a positive number of seconds"),
                      (dict(clip_seconds="1"), "got '1'"),
                      (dict(clip_seconds=1e-5), "clip_seconds=1e-05 is shorter than one 25 ms analysis frame")):
        with pytest.raises(ValueError, match=match):
            SyntheticAudioDataset(num_clips=2, **kw)
    assert SyntheticAudioDataset(num_clips=2, clip_seconds=1.0, target_length=np.int64(100)).target_length == 100


def test_items_at_another_rate_get_the_16khz_input_length():
    """The model input is the 16 kHz fbank: 1 s clips at 8 kHz are 98 frames, padded to 128."""
    eight = SyntheticAudioDataset(num_clips=2, clip_seconds=1.0, sample_rate=8000, features=True)
    sixteen = SyntheticAudioDataset(num_clips=2, clip_seconds=1.0, features=True)
    assert eight.target_length == sixteen.target_length == 128
    x = eight[0]["input"][0]
    assert x.shape == (128, 128)
    assert (x[98:] == x[-1]).all() and not (x[97] == x[-1]).all()  # 98 real frames, then the padding value


def test_long_files_fill_the_model_input_as_the_release_reads_them(tmp_path):
    """The release cuts the fbank of the whole file at the input length: a 12 s file gives 1024 real
    frames (10.255 s), not 10 s and padding; --clip-seconds still cuts where it says."""
    from audiomae.train.loop import build_dataset
    _wav(str(tmp_path / "root" / "c" / "long.wav"), 12.0)
    ds = FolderDataset(tmp_path / "root")
    assert (ds.clip_samples, ds.target_length) == (164080, 1024) and ds[0]["length"] == 164080
    assert FolderDataset(tmp_path / "root", target_length=512).clip_samples == 82160
    ten = FolderDataset(tmp_path / "root", clip_seconds=10.0)
    assert (ten.clip_samples, ten.target_length) == (160000, 1024)
    whole = waveform_to_input(torch.from_numpy(sf.read(str(tmp_path / "root" / "c" / "long.wav"),
                                                       dtype="float32")[0]), target_length=1024)
    feats = FeatureExtractor(target_length=1024)
    item = ds[0]
    x = feats({"waveform": item["waveform"][None], "length": torch.tensor([item["length"]])})[0]
    torch.testing.assert_close(x, whole, atol=2e-4, rtol=0)  # the release's input of the whole file
    opts = {"data": str(tmp_path / "root")}
    assert build_dataset(opts, "train").clip_samples == 164080
    assert build_dataset(dict(opts, target_length=256), "train").clip_samples == 41200
    assert build_dataset(dict(opts, clip_seconds=2.0), "train").clip_samples == 32000


def test_folder_dataset_symlink_loop(tmp_path):
    """A link back up the tree (dog/again -> dog) does not list the same files over and over."""
    _wav(str(tmp_path / "dog" / "a.wav"), 0.1)
    _wav(str(tmp_path / "cat" / "b.wav"), 0.1)
    os.symlink(tmp_path / "dog", tmp_path / "dog" / "again")
    ds = FolderDataset(tmp_path, clip_seconds=0.1)
    assert [os.path.basename(p) for p in ds.paths] == ["b.wav", "a.wav"]


def test_folder_dataset_system_folders_and_what_it_leaves_out(tmp_path, caplog):
    """__MACOSX / @eaDir are no class (they used to take index 0 and shift every label); audio files
    in the root, of another format, or reached by two classes through a link are named in warnings."""
    _wav(str(tmp_path / "dog" / "a.wav"), 0.1)
    _wav(str(tmp_path / "cat" / "b.wav"), 0.1)
    _wav(str(tmp_path / "__MACOSX" / "dog" / "._a.wav"), 0.1)
    _wav(str(tmp_path / "dog" / "@eaDir" / "a.wav"), 0.1)
    _wav(str(tmp_path / "loose.wav"), 0.1)
    (tmp_path / "dog" / "song.mp3").write_bytes(b"ID3")
    os.symlink(tmp_path / "cat", tmp_path / "dog" / "linkcat")
    caplog.set_level(logging.WARNING, logger="audiomae.data")
    ds = FolderDataset(tmp_path, clip_seconds=0.1)
    assert ds.class_names == ["cat", "dog"]
    assert [os.path.relpath(p, tmp_path) for p in ds.paths] == [
        os.path.join("cat", "b.wav"), os.path.join("dog", "a.wav"), os.path.join("dog", "linkcat", "b.wav")]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "1 audio file directly in" in text and "is in no class folder" in text
    assert "left out 1 .mp3 file under" in text
    assert "1 audio file is in two class folders (through a link), with both labels: " in text
    assert os.path.join("dog", "linkcat", "b.wav") + " (also in cat)" in text
    # the folder read again (a run's training and evaluation sets): nothing said twice
    (tmp_path / "bird").mkdir()
    caplog.clear()
    FolderDataset(tmp_path, clip_seconds=0.1)
    FolderDataset(tmp_path, clip_seconds=0.1)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == len(set(said)) and sum("class folder" in m and "bird" in m for m in said) == 1


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        FolderDataset(tmp_path / "missing")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="no class sub-folders"):
        FolderDataset(tmp_path / "empty")
    os.makedirs(tmp_path / "noaudio" / "cls")
    (tmp_path / "noaudio" / "cls" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no audio files"):
        FolderDataset(tmp_path / "noaudio")


# ----------------------------------------------------------------------------------------------
# bad files
# ----------------------------------------------------------------------------------------------
def _bad_manifest(tmp_path, n_good=7):
    """Manifest of n_good readable clips with a corrupt, an empty and a missing file at 1, 3, 4."""
    entries = []
    for i in range(n_good):
        entries.append({"wav": _wav(str(tmp_path / f"g{i}.wav"), 0.1, 200.0 + 50 * i), "labels": "/m/a"})
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage" + bytes(range(200)))
    (tmp_path / "empty.wav").write_bytes(b"")
    entries.insert(1, {"wav": "corrupt.wav", "labels": "/m/b"})
    entries.insert(3, {"wav": "empty.wav", "labels": "/m/b"})
    entries.insert(4, {"wav": "missing.wav", "labels": "/m/c"})
    (tmp_path / "labels.csv").write_text(LABEL_CSV)
    (tmp_path / "m.json").write_text(json.dumps({"data": entries}))
    return tmp_path / "m.json", tmp_path / "labels.csv"


BAD_NAMES = {"corrupt.wav", "empty.wav", "missing.wav"}


def _warned_paths(caplog):
    return [r.args[0] for r in caplog.records if r.name == "audiomae.data" and "unreadable" in r.getMessage()]


def test_bad_files_substituted_counted_reported_once(tmp_path, caplog):
    manifest, labels = _bad_manifest(tmp_path)
    ds = ManifestDataset(manifest, labels, clip_seconds=0.1, max_bad_fraction=1.0)
    caplog.set_level(logging.WARNING, logger="audiomae.data")
    for _ in range(2):  # two epochs
        items = [ds[i] for i in range(len(ds))]
    # a bad clip is replaced by the next readable one, deterministically
    assert [it["index"] for it in items] == [0, 2, 2, 5, 5, 5, 6, 7, 8, 9]
    assert items[1]["target"].tolist() == [1, 0, 0]  # the substitute's target
    assert [os.path.basename(p) for p, _ in items[3]["bad"]] == ["empty.wav", "missing.wav"]
    assert ds.bad_count == 3 and {os.path.basename(p) for p in ds.bad_files} == BAD_NAMES
    reasons = {os.path.basename(p): r for p, r in ds.bad_files.items()}
    assert "empty" in reasons["empty.wav"] and "no such file" in reasons["missing.wav"]
    warned = _warned_paths(caplog)
    assert sorted(os.path.basename(p) for p in warned) == sorted(BAD_NAMES)  # once each
    # each clip counts once (missing.wav is tried for items 3 and 4, in both epochs; clip 5 is read
    # for items 3, 4 and 5): the 7 readable clips and the 3 bad files
    assert ds.bad_tracker.bad_attempts == 3 and ds.bad_tracker.attempts == 7 + 3


def test_bad_fraction_threshold(tmp_path):
    manifest, labels = _bad_manifest(tmp_path)
    ds = ManifestDataset(manifest, labels, clip_seconds=0.1, max_bad_fraction=0.2, min_attempts=5)
    with pytest.raises(TooManyBadFilesError, match="max_bad_fraction=0.2") as info:
        for i in range(len(ds)):
            ds[i]
    msg = str(info.value)
    assert "corrupt.wav" in msg and "empty.wav" in msg
    # by default the threshold waits for 100 clips, or all of a smaller dataset: here the 10th
    ds = ManifestDataset(manifest, labels, clip_seconds=0.1)
    for i in range(len(ds) - 1):
        ds[i]
    assert ds.bad_count == 3 and ds.bad_tracker.judged_after == 10
    with pytest.raises(TooManyBadFilesError, match=r"3 audio files could not be decoded, 30.00% of the 10 clips"):
        ds[len(ds) - 1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_bad_file_counts_once_over_epochs(tmp_path, num_workers):
    """1 unreadable file of 150 (0.67 %) stays under a 1 % threshold in every epoch, wherever the
    shuffle puts it (each retry used to count as another failed read)."""
    (tmp_path / "labels.csv").write_text(LABEL_CSV)
    good = _wav(str(tmp_path / "g.wav"), 0.03)
    (tmp_path / "bad.wav").write_bytes(b"RIFF junk")
    entries = [{"wav": "bad.wav" if i == 3 else good, "labels": "/m/a"} for i in range(150)]
    (tmp_path / "m.json").write_text(json.dumps({"data": entries}))
    ds = ManifestDataset(tmp_path / "m.json", tmp_path / "labels.csv", clip_seconds=0.03)
    loader = make_loader(ds, batch_size=10, shuffle=False, num_workers=num_workers)
    for _ in range(3):
        assert sum(len(b["index"]) for b in loader) == 150
    assert ds.bad_count == 1 and ds.bad_tracker.bad_attempts == 1


def test_manifest_paths_relative_to_the_working_directory(tmp_path, monkeypatch, caplog):
    """AST's recipes write manifests under data/datafiles/ whose paths start from the working
    directory: found there (with a note) when they are not next to the manifest; root= decides."""
    _wav(str(tmp_path / "data" / "audio" / "a.wav"), 0.2)
    (tmp_path / "data" / "datafiles").mkdir(parents=True)
    (tmp_path / "data" / "datafiles" / "labels.csv").write_text(LABEL_CSV)
    m = tmp_path / "data" / "datafiles" / "m.json"
    m.write_text(json.dumps({"data": [{"wav": "./data/audio/a.wav", "labels": "/m/a"}]}))
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="audiomae.data")
    ds = ManifestDataset("data/datafiles/m.json", "data/datafiles/labels.csv", clip_seconds=0.2)
    assert ds.paths == [str(tmp_path / "data" / "audio" / "a.wav")] and ds.bad_count == 0
    assert ds[0]["index"] == 0 and "working directory" in caplog.text
    ds = ManifestDataset(m, tmp_path / "data" / "datafiles" / "labels.csv", root=tmp_path / "elsewhere")
    assert ds.paths == [str(tmp_path / "elsewhere" / "data" / "audio" / "a.wav")]
    # next to the manifest wins when the paths are there
    _wav(str(tmp_path / "data" / "datafiles" / "data" / "audio" / "a.wav"), 0.2)
    ds = ManifestDataset("data/datafiles/m.json", "data/datafiles/labels.csv", clip_seconds=0.2)
    assert ds.paths == [str(tmp_path / "data" / "datafiles" / "data" / "audio" / "a.wav")]


def test_no_readable_clip_in_a_worker_is_a_clean_error(tmp_path):
    (tmp_path / "labels.csv").write_text(LABEL_CSV)
    (tmp_path / "m.json").write_text('{"data": [{"wav": "x.wav", "labels": "/m/a"}, {"wav": "y.wav", "labels": "/m/a"}]}')
    ds = ManifestDataset(tmp_path / "m.json", tmp_path / "labels.csv", max_bad_fraction=1.0)
    with pytest.raises(TooManyBadFilesError) as info:
        list(make_loader(ds, batch_size=2, num_workers=1))
    msg = str(info.value)
    assert msg.startswith("no readable clip") and "Traceback" not in msg and "x.wav" in msg


def test_all_files_bad(tmp_path):
    (tmp_path / "labels.csv").write_text(LABEL_CSV)
    (tmp_path / "m.json").write_text('{"data": [{"wav": "x.wav", "labels": "/m/a"}, {"wav": "y.wav", "labels": "/m/a"}]}')
    ds = ManifestDataset(tmp_path / "m.json", tmp_path / "labels.csv", max_bad_fraction=1.0)
    with pytest.raises(TooManyBadFilesError, match="no readable clip"):
        ds[0]


def test_unreadable_sample_rate_wraps_around(tmp_path):
    """A header with sample rate 0 is a bad file; the substitute search wraps to index 0."""
    good = _wav(str(tmp_path / "good.wav"), 0.1)
    raw = bytearray(open(_wav(str(tmp_path / "rate0.wav"), 0.1), "rb").read())
    raw[24:28] = (0).to_bytes(4, "little")  # the fmt chunk's sample rate
    (tmp_path / "rate0.wav").write_bytes(bytes(raw))
    (tmp_path / "labels.csv").write_text(LABEL_CSV)
    entries = [{"wav": good, "labels": "/m/a"}, {"wav": "rate0.wav", "labels": "/m/b"}]
    (tmp_path / "m.json").write_text(json.dumps({"data": entries}))
    ds = ManifestDataset(tmp_path / "m.json", tmp_path / "labels.csv", clip_seconds=0.1, max_bad_fraction=1.0)
    item = ds[1]
    assert item["index"] == 0 and item["target"].tolist() == [1, 0, 0]
    assert ds.bad_count == 1 and list(ds.bad_files) == [str(tmp_path / "rate0.wav")]


def test_loader_accounts_through_subset(tmp_path):
    manifest, labels = _bad_manifest(tmp_path)
    ds = ManifestDataset(manifest, labels, clip_seconds=0.1, max_bad_fraction=1.0)
    loader = make_loader(torch.utils.data.Subset(ds, [0, 1, 2]), batch_size=3, num_workers=2)
    assert sorted(i for b in loader for i in b["index"].tolist()) == [0, 2, 2]
    assert ds.bad_count == 1 and loader.bad_count == 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_aggregates_bad_files(tmp_path, caplog, num_workers):
    manifest, labels = _bad_manifest(tmp_path)
    ds = ManifestDataset(manifest, labels, clip_seconds=0.1, max_bad_fraction=1.0)
    caplog.set_level(logging.WARNING, logger="audiomae.data")
    loader = make_loader(ds, batch_size=3, shuffle=True, num_workers=num_workers, seed=1)
    seen_bad = []
    for _ in range(2):
        n = 0
        for batch in loader:
            n += len(batch["index"])
            assert batch["waveform"].shape[1:] == (1600,) and batch["target"].shape[1:] == (3,)
            seen_bad += [os.path.basename(p) for p, _ in batch["bad"]]
        assert n == len(ds)
    assert set(seen_bad) == BAD_NAMES
    # totals in the main process, whichever process decoded
    assert ds.bad_count == 3 and loader.bad_count == 3
    assert {os.path.basename(p) for p in loader.bad_files} == BAD_NAMES
    assert sorted(os.path.basename(p) for p in _warned_paths(caplog)) == sorted(BAD_NAMES)
    # each clip once over both epochs: the 7 readable ones and the 3 bad files
    assert ds.bad_tracker.bad_attempts == 3 and ds.bad_tracker.attempts == 7 + 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_small_dataset_is_judged_in_its_first_pass(tmp_path, num_workers):
    """Fewer clips than min_attempts: the threshold applies once every clip was read (in the first
    epoch, not in whichever later one brings the reads to 100), and a rank's share counts as all."""
    (tmp_path / "labels.csv").write_text(LABEL_CSV)
    good = _wav(str(tmp_path / "g.wav"), 0.03)
    entries = [{"wav": good if i in (0, 7) else f"missing-{i}.wav", "labels": "/m/a"} for i in range(12)]
    (tmp_path / "m.json").write_text(json.dumps({"data": entries}))
    ds = ManifestDataset(tmp_path / "m.json", tmp_path / "labels.csv", clip_seconds=0.03)
    loader = make_loader(ds, batch_size=4, shuffle=True, num_workers=num_workers, seed=0)
    assert ds.bad_tracker.judged_after == 12
    with pytest.raises(TooManyBadFilesError, match=r"10 audio files could not be decoded, 83.33% of the 12 clips"):
        for _ in loader:
            pass
    # a process reading a share of it is judged on the dataset's size: once shuffling has brought it
    # every clip (a fixed share of 3 alone is not judged)
    from audiomae.train.sampler import ResumableSampler
    ds = ManifestDataset(tmp_path / "m.json", tmp_path / "labels.csv", clip_seconds=0.03)
    loader = make_loader(ds, batch_size=3, sampler=ResumableSampler(12, rank=1, world_size=4, seed=1))
    assert ds.bad_tracker.judged_after == 12
    with pytest.raises(TooManyBadFilesError, match="of the 12 clips"):
        for epoch in range(50):
            loader.set_epoch(epoch)
            for _ in loader:
                pass
    fixed = ManifestDataset(tmp_path / "m.json", tmp_path / "labels.csv", clip_seconds=0.03)
    share = make_loader(fixed, batch_size=3, sampler=ResumableSampler(12, shuffle=False, rank=1, world_size=4))
    for _ in range(3):
        for _ in share:
            pass
    assert fixed.bad_tracker.attempts < 12  # an evaluation's fixed share: never judged alone


def test_weighted_draws_with_replacement_are_judged_after_min_attempts_reads(tmp_path):
    """A weighted sampler with replacement may never reach every clip (zero weights): the threshold
    applies after min_attempts reads, over the distinct clips read."""
    from audiomae.train.sampler import ResumableSampler
    (tmp_path / "labels.csv").write_text(LABEL_CSV)
    good = _wav(str(tmp_path / "g.wav"), 0.03)
    entries = [{"wav": f"missing-{i}.wav" if i % 4 == 0 else good, "labels": "/m/a"} for i in range(40)]
    (tmp_path / "m.json").write_text(json.dumps({"data": entries}))
    ds = ManifestDataset(tmp_path / "m.json", tmp_path / "labels.csv", clip_seconds=0.03)
    weights = [0.0] + [1.0] * 39  # clip 0 is never drawn: the 40 clips are never all read
    loader = make_loader(ds, batch_size=5, sampler=ResumableSampler(40, weights=weights, num_samples=40))
    assert ds.bad_tracker.judged_after == 40
    with pytest.raises(TooManyBadFilesError, match="could not be decoded"):
        for _ in range(4):
            for _ in loader:
                pass
    assert 100 <= ds.bad_tracker.reads < 110  # at the 100th read, in the third epoch


def test_loader_threshold_with_workers(tmp_path):
    manifest, labels = _bad_manifest(tmp_path)
    ds = ManifestDataset(manifest, labels, clip_seconds=0.1, max_bad_fraction=0.1, min_attempts=5)
    loader = make_loader(ds, batch_size=5, shuffle=False, num_workers=2)
    with pytest.raises(TooManyBadFilesError, match="could not be decoded"):
        for _ in loader:
            pass


# ----------------------------------------------------------------------------------------------
# loaders, features, weights
# ----------------------------------------------------------------------------------------------
def test_loader_workers_agree_and_reseed():
    ds = SyntheticAudioDataset(num_clips=24)
    l0 = make_loader(ds, batch_size=8, shuffle=True, num_workers=0, seed=5)
    l2 = make_loader(ds, batch_size=8, shuffle=True, num_workers=2, seed=5)
    b0, b2 = list(l0), list(l2)
    assert len(l0) == 3
    for x, y in zip(b0, b2):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["waveform"], y["waveform"])
        assert torch.equal(x["waveform"][0], ds[int(x["index"][0])]["waveform"])
    order1 = torch.cat([b["index"] for b in b0])
    assert sorted(order1.tolist()) == list(range(24))
    order2 = torch.cat([b["index"] for b in l0])  # next epoch: another order
    assert not torch.equal(order1, order2)
    l0.set_epoch(0)
    assert torch.equal(torch.cat([b["index"] for b in l0]), order1)
    seq = make_loader(ds, batch_size=10, shuffle=False, drop_last=True)
    assert [b["index"].tolist() for b in seq] == [list(range(10)), list(range(10, 20))]


def test_loader_distributed():
    ds = SyntheticAudioDataset(num_clips=10)
    parts = []
    for rank in range(2):
        loader = make_loader(ds, batch_size=5, distributed=True, num_replicas=2, rank=rank, seed=3)
        parts.append(torch.cat([b["index"] for b in loader]).tolist())
    assert len(parts[0]) == len(parts[1]) == 5
    assert sorted(parts[0] + parts[1]) == list(range(10))


def test_feature_extractor():
    ds = SyntheticAudioDataset(num_clips=3)
    batch = collate_items([ds[i] for i in range(3)])
    fe = FeatureExtractor(target_length=256, stats="audioset", device="cpu")
    x = fe(batch["waveform"])
    assert x.shape == (3, 1, 256, 128) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert torch.allclose(x[1], waveform_to_input(batch["waveform"][1], target_length=256))
    assert torch.equal(fe(batch), x)
    assert FeatureExtractor()(batch["waveform"]).shape == (3, 1, 1024, 128)


def _release_input(w, target_length, stats="audioset"):
    """The release's model input of one clip: fbank of its real samples, zero rows after the log,
    normalised (float64, straight from the recipe)."""
    w = torch.as_tensor(w, dtype=torch.float64)
    n = target_length
    if w.shape[-1] >= 400:
        f = fbank(w - w.mean())[:n]
    else:
        f = torch.zeros(0, 128, dtype=torch.float64)
    f = torch.cat([f, torch.zeros(n - f.shape[0], 128, dtype=torch.float64)])
    return ((f + 4.2677393) / (2 * 4.5689974)).float()[None]


def test_a_clip_shorter_than_one_frame_is_unreadable(tmp_path):
    """Under 25 ms (400 samples at 16 kHz) a clip has no fbank frame: its input would be padding
    only, so it is skipped and counted as a bad file (as embed and load_input refuse it), and so is
    what a transform shortens below a frame."""
    (tmp_path / "labels.csv").write_text(LABEL_CSV)
    short, good = _wav(str(tmp_path / "short.wav"), 0.02), _wav(str(tmp_path / "good.wav"), 0.1)
    (tmp_path / "m.json").write_text(json.dumps({"data": [{"wav": short, "labels": "/m/a"},
                                                          {"wav": good, "labels": "/m/b"}]}))
    ds = ManifestDataset(tmp_path / "m.json", tmp_path / "labels.csv", clip_seconds=0.1, max_bad_fraction=1.0)
    item = ds[0]
    assert item["index"] == 1 and item["bad"][0][0] == short
    assert "320 samples (20 ms at 16000 Hz) is shorter than one 25 ms analysis frame" in item["bad"][0][1]
    ds = ManifestDataset(tmp_path / "m.json", tmp_path / "labels.csv", clip_seconds=0.1,
                         transform=lambda w: w[:100])
    with pytest.raises(ValueError, match="transform returned 100 samples for clip 1, fewer than one 25 ms"):
        ds[1]


@pytest.mark.parametrize("seconds", [0.25, 0.5, 0.8, 0.03, 1.0])
def test_short_clips_get_the_release_padding(tmp_path, seconds):
    """A clip shorter than the clip length: fbank of its real samples, padded after the log
    (+0.467 rows), alike in features mode, in a batch through the feature extractor, and as
    load_input gives it for the file."""
    from audiomae.audio import load_input

    path = _wav(str(tmp_path / "a.wav"), seconds, 700.0)
    full = _wav(str(tmp_path / "b.wav"), 1.0, 500.0)
    (tmp_path / "labels.csv").write_text(LABEL_CSV)
    (tmp_path / "m.json").write_text(json.dumps({"data": [{"wav": path, "labels": "/m/a"},
                                                          {"wav": full, "labels": "/m/b"}]}))
    kw = dict(clip_seconds=1.0, target_length=128)
    ds = ManifestDataset(tmp_path / "m.json", tmp_path / "labels.csv", **kw)
    dsf = ManifestDataset(tmp_path / "m.json", tmp_path / "labels.csv", features=True, **kw)
    item = ds[0]
    n = int(round(seconds * SR))
    assert item["length"] == n and item["waveform"].shape == (SR,) and torch.all(item["waveform"][n:] == 0)
    ref = _release_input(sf.read(path, dtype="float32")[0], 128)
    frames = 1 + (n - 400) // 160 if n >= 400 else 0
    assert torch.all(ref[0, frames:] == ref[0, -1]) and abs(float(ref[0, -1, 0]) - 0.467032) < 1e-6
    batch = collate_items([ds[0], ds[1]])
    assert batch["length"].tolist() == [n, SR]
    fe = FeatureExtractor(target_length=128)
    got = {"features mode": dsf[0]["input"], "feature extractor": fe(batch)[0],
           "feature extractor, lengths given": fe(batch["waveform"], batch["length"])[0]}
    if n >= 400:
        got["load_input"] = load_input(path, 128)
    for name, x in got.items():
        assert x.shape == (1, 128, 128)
        torch.testing.assert_close(x, ref, atol=2e-4, rtol=0, msg=name)
        assert torch.equal(x[0, frames:], ref[0, frames:]), name  # the padding value exactly
    # the full clip in the same batch is computed as before (every frame real)
    torch.testing.assert_close(fe(batch)[1], waveform_to_input(batch["waveform"][1], target_length=128))
    if n < SR:  # without lengths, a padded waveform is taken as it is (its zeros are audio)
        assert not torch.allclose(fe(batch["waveform"])[0], ref, atol=1e-2)


def test_long_clips_are_cut_to_the_clip_length(tmp_path):
    path = _wav(str(tmp_path / "a.wav"), 1.5, 700.0)
    (tmp_path / "labels.csv").write_text(LABEL_CSV)
    (tmp_path / "m.json").write_text(json.dumps({"data": [{"wav": path, "labels": "/m/a"}]}))
    ds = ManifestDataset(tmp_path / "m.json", tmp_path / "labels.csv", clip_seconds=1.0, target_length=128)
    item = ds[0]
    assert item["length"] == SR and item["waveform"].shape == (SR,)
    x = FeatureExtractor(target_length=128)(collate_items([item]))[0]
    torch.testing.assert_close(x, _release_input(sf.read(path, dtype="float32")[0][:SR], 128), atol=2e-4, rtol=0)


def test_pad_beyond():
    from audiomae.audio import num_frames, pad_beyond

    assert [num_frames(n) for n in (0, 399, 400, 559, 560, 160000)] == [0, 0, 1, 1, 2, 998]
    assert num_frames(torch.tensor([0, 399, 400, 560, 160000])).tolist() == [0, 0, 1, 2, 998]
    x = torch.randn(3, 1, 10, 4)
    assert pad_beyond(x, torch.tensor([2000, 2000, 2000]), "audioset") is x  # nothing to pad
    assert pad_beyond(x, None, "audioset") is x
    y = pad_beyond(x, torch.tensor([400 + 160 * 4, 0, 2000]), None)  # 5 frames, none, all
    assert torch.equal(y[0, :, :5], x[0, :, :5]) and torch.all(y[0, :, 5:] == 0)
    assert torch.all(y[1] == 0) and torch.equal(y[2], x[2])
    z = pad_beyond(x.to(torch.bfloat16), [560, 560, 560], "audioset")
    assert z.dtype == torch.bfloat16 and torch.all(z[:, :, 2:] == torch.tensor(0.467032).to(torch.bfloat16))
    for bad in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 2]), torch.ones(3, 1, dtype=torch.long)):
        with pytest.raises(ValueError, match="lengths"):
            pad_beyond(x, bad, "audioset")
    with pytest.raises(ValueError, match="batch"):
        waveform_to_input(torch.randn(1000), lengths=[500])


def test_label_weights_toy():
    labels = [[0], [0], [0], [1], [0, 1], [2]]
    counts = label_counts(labels, 4)
    assert counts.tolist() == [4, 2, 1, 0]
    w = label_weights(labels, num_classes=4)
    cw = [1000 / 4.01, 1000 / 2.01, 1000 / 1.01]
    expected = [cw[0], cw[0], cw[0], cw[1], cw[0] + cw[1], cw[2]]
    assert w.dtype == torch.float64 and torch.allclose(w, torch.tensor(expected, dtype=torch.float64))


def test_label_weights_refuse_indices_that_are_not_classes():
    """-1 wrapped to the last class's weight; 3 with 2 classes was an IndexError; 1.0 an IndexError too."""
    for labels, n, message in (([[0], [-1]], None, r"clip 1: class index -1 is not a class \(a non-negative integer\)"),
                               ([[0], [3]], 2, r"clip 1: class index 3 is not a class \(an integer in \[0, 2\)\)"),
                               ([[1.0]], None, r"clip 0: class index 1.0 is not a class")):
        with pytest.raises(ValueError, match=message):
            label_weights(labels, num_classes=n)
    # integer tensors and numpy integers are class indices too
    torch.testing.assert_close(label_weights(torch.tensor([[0], [1], [1]])), label_weights([[0], [1], [1]]))
    torch.testing.assert_close(label_weights([[np.int64(0)], [np.int32(1)]]), label_weights([[0], [1]]))


def test_weighted_sampling_balances(audioset_dir):
    ds = ManifestDataset(audioset_dir / "train.json", audioset_dir / "labels.csv")
    w = label_weights(ds)
    assert w.shape == (4,)
    assert math.isclose(float(w[1]), 1000 / 3.01 + 1000 / 2.01)  # /m/a on 3 clips, /m/b on 2
    loader = make_loader(ds, batch_size=4, weighted=True, num_samples=8)
    assert len(loader) == 2 and isinstance(loader.sampler, torch.utils.data.WeightedRandomSampler)
    # many draws: clip frequencies follow the weights
    sampler = torch.utils.data.WeightedRandomSampler(w, 20000, generator=torch.Generator().manual_seed(0))
    freq = np.bincount(list(sampler), minlength=4) / 20000
    assert np.allclose(freq, (w / w.sum()).numpy(), atol=0.02)


def test_distributed_weighted_sampler():
    w = label_weights([[0]] * 8 + [[1]] * 2)
    s = [DistributedWeightedSampler(w, num_samples=6, num_replicas=3, rank=r, seed=7) for r in range(3)]
    draws = [list(x) for x in s]
    assert all(len(d) == 6 for d in draws) and len(s[0]) == 6
    # disjoint shares of one global weighted draw: interleaving them gives that draw
    g = torch.Generator().manual_seed(7)
    full = torch.multinomial(w, 18, True, generator=g).tolist()
    assert [draws[i % 3][i // 3] for i in range(18)] == full
    s[0].set_epoch(1)
    assert list(s[0]) != draws[0]
    assert len(DistributedWeightedSampler(w, num_replicas=3, rank=0)) == 4


# ----------------------------------------------------------------------------------------------
# augmentations
# ----------------------------------------------------------------------------------------------
def test_mixup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 6, generator=g)
    t = torch.eye(4)[[0, 1, 2, 3]]
    lams = []
    for _ in range(50):
        mx, mt, lam = mixup(x, t, alpha=0.5, generator=g)
        assert 0.0 <= lam <= 1.0
        assert torch.allclose(mx, lam * x + (1 - lam) * x.flip(0))
        assert torch.allclose(mt, lam * t + (1 - lam) * t.flip(0))
        assert torch.allclose(mt.sum(1), torch.ones(4))
        lams.append(lam)
    assert min(lams) < 0.2 and max(lams) > 0.8  # Beta(0.5, 0.5) is U-shaped
    assert mixup(x, t, generator=torch.Generator().manual_seed(1))[2] == mixup(x, t, generator=torch.Generator().manual_seed(1))[2]
    mx, mt, lam = mixup(x, t, lam=0.3)
    assert lam == 0.3 and torch.allclose(mt[0], torch.tensor([0.3, 0, 0, 0.7]))
    mx, mt, lam = mixup(x, torch.tensor([0, 1, 2, 2]), lam=0.25, num_classes=3)
    assert torch.allclose(mt[1], torch.tensor([0.0, 1.0, 0.0]) * 0.25 + torch.tensor([0.0, 0.0, 1.0]) * 0.75)
    assert mixup(x, t, alpha=0.0)[2] == 1.0
    assert torch.equal(x, torch.randn(4, 1, 8, 6, generator=torch.Generator().manual_seed(0)))  # not in place


def test_waveform_mixup():
    """The release's loader mixup: per clip with probability prob, another clip of the batch, its own
    Beta(10, 10) weight, the partner cut to the clip's length; targets mixed with the same weight."""
    from audiomae.data import waveform_mixup
    g = torch.Generator().manual_seed(0)
    B, N = 6, 50
    w = torch.randn(B, N, generator=g)
    lengths = torch.tensor([50, 30, 50, 10, 40, 50])
    w = w * (torch.arange(N) < lengths[:, None])  # zero padding past each clip's length
    t = torch.eye(B)
    lams, mixed_frac = [], []
    for _ in range(200):
        out, tt, lam = waveform_mixup(w, t, prob=0.5, lengths=lengths, generator=g)
        assert lam.shape == (B,) and ((lam > 0) & (lam <= 1)).all()
        kept = lam == 1
        assert torch.equal(out[kept], w[kept]) and torch.equal(tt[kept], t[kept])
        mixed_frac.append((~kept).float().mean().item())
        for i in torch.nonzero(~kept).flatten().tolist():
            # exactly one partner j != i; the clip's length is kept (nothing past it)
            j = [k for k in range(B) if k != i and tt[i, k] > 0][0]
            assert tt[i, i] == pytest.approx(lam[i].item()) and tt[i, j] == pytest.approx(1 - lam[i].item())
            assert tt[i].sum() == pytest.approx(1.0)
            want = lam[i] * w[i] + (1 - lam[i]) * w[j] * (torch.arange(N) < lengths[i])
            torch.testing.assert_close(out[i], want)
            assert out[i, lengths[i]:].abs().max() == 0 if lengths[i] < N else True
            lams.append(lam[i].item())
    assert 0.4 < sum(mixed_frac) / len(mixed_frac) < 0.6
    lams = torch.tensor(lams)
    assert 0.45 < lams.mean() < 0.55 and 0.09 < lams.std() < 0.13  # Beta(10, 10): 0.5 and 0.109
    assert torch.equal(waveform_mixup(w, t, prob=0.0)[0], w)
    assert (waveform_mixup(w[:1], t[:1], prob=1.0)[2] == 1).all()  # one clip: nothing to mix with
    with pytest.raises(ValueError, match="prob must be in"):
        waveform_mixup(w, t, prob=1.5)
    with pytest.raises(ValueError, match="target must be float"):
        waveform_mixup(w, torch.arange(B), prob=0.5)


def _bands(mask_1d):
    """Start and width of the single run of True in a 1-D bool tensor (width 0 -> (None, 0))."""
    idx = torch.nonzero(mask_1d).flatten()
    if len(idx) == 0:
        return None, 0
    assert torch.equal(idx, torch.arange(idx[0], idx[-1] + 1)), "mask is not contiguous"
    return int(idx[0]), len(idx)


def test_spec_augment():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 300, 128, generator=g) + 1.0  # no natural zeros
    out = spec_augment(x, freq_mask=48, time_mask=192, generator=g)
    assert out.shape == x.shape and (x >= 1).all()
    fw, tw = [], []
    for b in range(64):
        z = out[b, 0] == 0
        full_f = z.all(0)  # frequency bins masked over all time
        full_t = z.all(1)  # frames masked over all bins
        _, wf = _bands(full_f)
        _, wt = _bands(full_t)
        # every zero lies in the frequency band or the time band; kept values are untouched
        assert torch.equal(z, full_f[None, :] | full_t[:, None])
        assert torch.equal(out[b, 0][~z], x[b, 0][~z])
        assert wf < 48 and wt < 192
        fw.append(wf)
        tw.append(wt)
    assert len(set(fw)) > 5 and len(set(tw)) > 5  # iid per example
    assert max(tw) > 100 and max(fw) > 30
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(spec_augment(x, generator=g1), spec_augment(x, generator=g2))
    v = spec_augment(x[:2], generator=g, mask_value=0.467)
    assert ((v == 0.467) | (v >= 1)).all()
    assert torch.equal(spec_augment(x, freq_mask=0, time_mask=0), x)


def test_roll_and_magnitude():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g)
    shifts, gains = [], []
    for _ in range(40):
        y, s, m = roll_and_magnitude(x, generator=g, return_params=True)
        assert 0.5 <= float(m) <= 1.5 and 0 <= int(s) < 1000
        assert torch.allclose(y, torch.roll(x, int(s)) * float(m))
        assert torch.allclose(torch.sort(y / float(m)).values, torch.sort(x).values)  # same samples
        shifts.append(int(s))
        gains.append(float(m))
    assert len(set(shifts)) > 30  # the roll acts (it is always 0 in the release)
    assert 0.9 < np.mean(gains) < 1.1 and np.std(gains) > 0.05
    xb = torch.randn(5, 200, generator=g)
    yb, sb, mb = roll_and_magnitude(xb, generator=g, return_params=True)
    for i in range(5):
        assert torch.allclose(yb[i], torch.roll(xb[i], int(sb[i])) * float(mb[i]))
    y = roll_and_magnitude(x, generator=g, roll=False)
    assert torch.allclose(y / (y[0] / x[0]), x)


def test_roll_within_real_lengths():
    """With lengths (a batch of padded clips), each clip rolls within its own samples and its
    padding stays at the end; full-length clips roll as without lengths."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([300, 1000, 1, 0, 999])
    x = torch.randn(5, 1000, generator=g)
    x[torch.arange(1000) >= lengths[:, None]] = 0
    seen = set()
    for _ in range(20):
        y, s, m = roll_and_magnitude(x, generator=g, return_params=True, lengths=lengths)
        for i, n in enumerate(lengths.tolist()):
            assert 0 <= int(s[i]) < max(n, 1)
            assert torch.allclose(y[i, :n], torch.roll(x[i, :n], int(s[i])) * float(m[i]))
            assert torch.all(y[i, n:] == 0)
        seen.add(int(s[0]))
    assert len(seen) > 10
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    full = torch.randn(3, 50, generator=g)
    assert torch.equal(roll_and_magnitude(full, generator=g1, lengths=[50, 50, 50]),
                       roll_and_magnitude(full, generator=g2))
    with pytest.raises(ValueError, match="lengths"):
        roll_and_magnitude(full, lengths=[50, 50])


def test_roll_as_dataset_transform(audioset_dir):
    """The transform sees the clip's real length: padding stays at the end."""
    ds = ManifestDataset(audioset_dir / "train.json", audioset_dir / "labels.csv", clip_seconds=1.0,
                         transform=roll_and_magnitude)
    torch.manual_seed(0)
    w = ds[0]["waveform"]  # 0.5 s clip
    assert w[:8000].abs().max() > 0.1 and w[8000:].abs().max() == 0
    plain = ManifestDataset(audioset_dir / "train.json", audioset_dir / "labels.csv", clip_seconds=1.0)[0]["waveform"]
    assert not torch.allclose(w, plain)
    gain = float(w.abs().max() / plain.abs().max())
    assert 0.5 <= gain <= 1.5
    assert torch.allclose(torch.sort(w[:8000]).values, torch.sort(plain[:8000]).values * gain, atol=1e-6)


def test_evaluation_and_embedding_count_each_readable_clip_once(tmp_path):
    """Training may use a stand-in for an unreadable clip; evaluation and embedding leave it out, so
    each readable clip counts once (rows, targets, per-class counts) and the rows name their clips."""
    from audiomae import AudioMAEClassifier, AudioMAEConfig
    from audiomae.train import loop

    manifest, labels = _bad_manifest(tmp_path)  # 7 readable clips, all of class /m/a; 3 bad ones
    ds = ManifestDataset(manifest, labels, clip_seconds=0.1, max_bad_fraction=1.0)
    torch.manual_seed(0)
    model = AudioMAEClassifier(AudioMAEConfig.preset("tiny"), num_classes=ds.num_classes).eval()
    feats = FeatureExtractor(target_length=model.config.img_size[0], stats="audioset", device="cpu")
    opts = {"batch_size": 4, "quiet": True}
    indices = []
    emb, targets = loop.embed_dataset(model, ds, opts, torch.device("cpu"), feats, indices=indices)
    readable = [0, 2, 5, 6, 7, 8, 9]
    assert indices == readable and emb.shape[0] == targets.shape[0] == 7
    assert targets.argmax(1).tolist() == [0] * 7  # no target of a bad file (/m/b, /m/c) remains
    # the rows equal the clips embedded one by one
    one = torch.stack([ds[i]["waveform"] for i in readable])
    assert torch.allclose(emb, model.embed(feats(one)), atol=1e-5)
    scores, targets = loop.predict(model, ds, opts, torch.device("cpu"), feats)
    assert scores.shape[0] == targets.shape[0] == 7 and targets.sum(0).tolist() == [7, 0, 0]


def test_a_bad_file_is_reported_once_per_process(tmp_path, caplog):
    """Two datasets over the same files (a run's training and evaluation sets) count a bad file each,
    and it is reported once."""
    manifest, labels = _bad_manifest(tmp_path)
    caplog.set_level(logging.WARNING, logger="audiomae.data")
    sets = [ManifestDataset(manifest, labels, clip_seconds=0.1, max_bad_fraction=1.0) for _ in range(2)]
    for ds in sets:
        for i in range(len(ds)):
            ds[i]
    assert [ds.bad_count for ds in sets] == [3, 3]
    assert sorted(os.path.basename(p) for p in _warned_paths(caplog)) == sorted(BAD_NAMES)


def test_workers_of_any_start_method_ignore_stop_signals_during_training(monkeypatch):
    """The default worker_init_fn carries the training loop's flag in its pickle: a spawn or
    forkserver worker imports the module afresh (flag off there) and still ignores SIGINT and
    SIGTERM, serving batches until the loop stops."""
    import pickle
    import signal
    from audiomae.data import loader as L

    init = make_loader(SyntheticAudioDataset(num_clips=4), batch_size=2, num_workers=1).loader.worker_init_fn
    monkeypatch.setattr(L, "WORKERS_IGNORE_STOP_SIGNALS", True)  # as a training loop sets it
    shipped = pickle.dumps(init)  # when the loader starts its workers
    monkeypatch.setattr(L, "WORKERS_IGNORE_STOP_SIGNALS", False)  # what a freshly imported module holds
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        pickle.loads(shipped)(0)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in before)
        for s, h in before.items():
            signal.signal(s, h)
        init(0)  # in the main process (or a fork): the flag as it is now, off
        assert all(signal.getsignal(s) is h for s, h in before.items())
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_waveform_mixup_of_pcm_samples_mixes_by_lam():
    from audiomae.data import waveform_mixup
    w = torch.tensor([[1000] * 8, [-1000] * 8], dtype=torch.int16)
    out, tgt, lam = waveform_mixup(w, torch.eye(2), prob=1.0, generator=torch.Generator().manual_seed(0))
    want, _, _ = waveform_mixup(w.float(), torch.eye(2), prob=1.0, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.int16 and torch.equal(out, want.round().to(torch.int16))
    assert not torch.equal(out, w[[1, 0]])  # not the partner alone (lam cast to int16 was 0)
    torch.testing.assert_close(torch.diagonal(tgt), lam)  # the targets mixed by the same lam


@pytest.mark.parametrize("rate", [16000, 8000])
def test_the_feature_extractor_checks_its_batch_alike_on_every_path(rate):
    from audiomae.data import FeatureExtractor
    fe = FeatureExtractor(target_length=64, sample_rate=rate)
    w = torch.randn(2, 4000) * 0.1
    bad = w.clone()
    bad[1, 7] = float("nan")
    with pytest.raises(ValueError, match="waveform holds 1 non-finite sample"):
        fe(bad)
    with pytest.raises(ValueError, match=r"lengths must be in \[0, 4000\]"):
        fe(w, torch.tensor([-5, 99999]))
    with pytest.raises(ValueError, match="lengths must be 2 whole numbers"):
        fe(w, torch.tensor([1.5, 2.0]))
    assert fe(w, torch.tensor([4000, 2000])).shape == (2, 1, 64, 128)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_a_manifest_path_that_steps_up_from_a_linked_folder_is_read_as_the_os_does(tmp_path):
    """store/manifests/m.json lists ../audio/a.wav; manifests/ is a link to store/manifests: the file is
    store/audio/a.wav (the tidied path, manifests/../audio, was a folder that does not exist)."""
    (tmp_path / "store" / "manifests").mkdir(parents=True)
    _wav(str(tmp_path / "store" / "audio" / "a.wav"), 0.1)
    (tmp_path / "store" / "manifests" / "m.json").write_text('{"data": [{"wav": "../audio/a.wav"}, '
                                                             '{"wav": "./../audio/a.wav"}]}')
    os.symlink(tmp_path / "store" / "manifests", tmp_path / "manifests")
    ds = ManifestDataset(tmp_path / "manifests" / "m.json")
    assert all(os.path.isfile(p) for p in ds.paths), ds.paths
    assert os.path.samefile(ds.paths[0], tmp_path / "store" / "audio" / "a.wav")
    assert ds[0]["waveform"].numel() > 0


def test_synthetic_dataset_refuses_what_it_cannot_make():
    """A float size or seed (truncated before), and a rate below 8 kHz (an IndexError in the clip
    generator), are refused by name."""
    with pytest.raises(TypeError, match=r"num_clips must be an integer, got 2.5 \(float\)"):
        SyntheticAudioDataset(num_clips=2.5)
    with pytest.raises(TypeError, match=r"seed must be an integer, got 1.0 \(float\)"):
        SyntheticAudioDataset(num_clips=2, seed=1.0)
    with pytest.raises(ValueError, match="sample_rate must be at least 8000 Hz for the synthetic clips"):
        SyntheticAudioDataset(num_clips=2, sample_rate=6000)
    assert SyntheticAudioDataset(num_clips=np.int64(2), sample_rate=22050)[1]["waveform"].numel() > 0


def test_one_synthetic_clip_of_any_number_without_the_set():
    """reconstruct synthetic:N made a set of N + 1 clips to read clip N (synthetic:99999999999 was a
    MemoryError); a clip does not depend on the set's size."""
    big = SyntheticAudioDataset(num_clips=12, split="val", seed=3)
    one = SyntheticAudioDataset(num_clips=1, split="val", seed=3)
    for i in (0, 5, 11):
        assert torch.equal(one.clip_waveform(i), big[i]["waveform"])
    assert one.clip_waveform(99999999999).shape == big[0]["waveform"].shape
    with pytest.raises(ValueError, match="a clip number is an integer of at least 0, got -1"):
        one.clip_waveform(-1)
