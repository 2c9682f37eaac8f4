"""Training loop pieces: schedule, parameter groups, layer decay, metrics, NaN handling, resume."""
import json
import math
import os

import pytest
import torch

from audiomae import AudioMAE, AudioMAEClassifier, AudioMAEConfig
from audiomae.train import TrainingError
from audiomae.train.loop import Trainer
from audiomae.train.distributed import DistInfo
from audiomae.train.metrics import average_precision, d_prime, multilabel_metrics, roc_auc, singlelabel_metrics
from audiomae.train.optim import FINETUNE_NO_DECAY, LEGACY_NO_DECAY, adamw, layer_id, lr_at, param_groups
from audiomae.train.sampler import ResumableSampler

TINY = AudioMAEConfig.preset("tiny")


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0) == 0.0
    assert lr_at(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    vals = [lr_at(s, 100, 10, 1.0) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_param_groups_no_decay_rules():
    """The release's rules: pretraining (timm's add_weight_decay, no names) decays the tokens,
    fine-tuning (param_groups_lrd with the ViT's no_weight_decay list) leaves the cls token out."""
    model = AudioMAE(TINY)
    groups = param_groups(model, 0.05)
    by_name = {n: g["weight_decay"] for g in groups for n in g["names"]}
    for name in ["blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "decoder_blocks.0.attn.tau",
                 "patch_embed.proj.bias", "decoder_blocks.0.attn.meta_mlp.fc1.bias"]:
        assert by_name[name] == 0.0, name
    for name in ["cls_token", "mask_token", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight",
                 "decoder_pred.weight", "decoder_blocks.0.attn.meta_mlp.fc1.weight"]:
        assert by_name[name] == 0.05, name
    assert "pos_embed" not in by_name and "decoder_pos_embed" not in by_name  # frozen
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == n_trainable
    legacy = {n: g["weight_decay"] for g in param_groups(model, 0.05, skip=LEGACY_NO_DECAY) for n in g["names"]}
    assert legacy["cls_token"] == legacy["mask_token"] == 0.0 and legacy["decoder_pred.weight"] == 0.05

    clf = AudioMAEClassifier(TINY, num_classes=3)
    ft = {n: g["weight_decay"] for g in param_groups(clf, 5e-4, 0.75, skip=FINETUNE_NO_DECAY) for n in g["names"]}
    assert ft["cls_token"] == 0.0 and ft["fc_norm.weight"] == 0.0 and ft["head.bias"] == 0.0
    assert ft["head.weight"] == ft["patch_embed.proj.weight"] == ft["blocks.1.mlp.fc2.weight"] == 5e-4


class _WithToken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.full((1, 1, 4), 0.5))
        self.proj = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.proj(x + self.cls_token[0])


def test_lr_floor_above_the_lr_is_the_lr():
    assert [lr_at(s, 10, 2, 1e-7, 1e-6) for s in (0, 1, 2, 6, 10)] == [0.0, 5e-8, 1e-7, 1e-7, 1e-7]


def _token_decay(trainer):
    return next(g["weight_decay"] for g in trainer.optimizer.param_groups
                if any(p is trainer.model.cls_token for p in g["params"]))


def test_a_resumed_run_keeps_its_weight_decay_rule(tmp_path):
    def step_fn(m, batch):
        return (m(batch["waveform"]) ** 2).mean()

    torch.manual_seed(0)
    first = _trainer(tmp_path, step_fn, model=_WithToken(), epochs=2, weight_decay=0.1, save_every_steps=1)
    assert first.no_decay == () and _token_decay(first) == 0.1
    first.run()
    path = os.path.join(tmp_path, "checkpoint-last.pt")
    state = torch.load(path, weights_only=True)
    assert state["schedule"]["no_decay"] == []
    assert [len(g["params"]) for g in state["optimizer"]["param_groups"]] == [2, 1]  # token, weight | bias
    again = _trainer(tmp_path, step_fn, model=_WithToken(), epochs=2, weight_decay=0.1)
    again.resume(path)
    assert again.no_decay == () and _token_decay(again) == 0.1

    # a run of a version that never decayed the tokens: its optimizer has other groups
    torch.manual_seed(0)
    old = _trainer(tmp_path / "old", step_fn, model=_WithToken(), epochs=2, weight_decay=0.1, save_every_steps=1)
    old._build_optimizer(LEGACY_NO_DECAY)
    _crash_at(old, 4)
    path = os.path.join(tmp_path / "old", "checkpoint-last.pt")
    state = torch.load(path, weights_only=True)
    state["schedule"].pop("no_decay")  # as earlier versions wrote it
    torch.save(state, path)
    resumed = _trainer(tmp_path / "old", step_fn, model=_WithToken(), epochs=2, weight_decay=0.1)
    resumed.resume(path)
    assert resumed.no_decay == LEGACY_NO_DECAY
    assert _token_decay(resumed) == 0.0
    resumed.run()
    torch.manual_seed(0)
    straight = _trainer(tmp_path / "straight", step_fn, model=_WithToken(), epochs=2, weight_decay=0.1)
    straight._build_optimizer(LEGACY_NO_DECAY)
    straight.run()
    assert torch.equal(resumed.model.cls_token, straight.model.cls_token)


def test_layer_decay():
    clf = AudioMAEClassifier(TINY, num_classes=3)  # depth 2
    assert layer_id("cls_token", 2) == 0 and layer_id("patch_embed.proj.weight", 2) == 0
    assert layer_id("blocks.1.mlp.fc1.weight", 2) == 2
    assert layer_id("head.weight", 2) == 3
    groups = param_groups(clf, 0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["head.weight"] == 1.0
    assert scale["blocks.1.attn.qkv.weight"] == 0.5
    assert scale["blocks.0.attn.qkv.weight"] == 0.25
    assert scale["cls_token"] == 0.125


def test_adamw_keeps_the_groups_and_fuses_only_on_cuda():
    clf = AudioMAEClassifier(TINY, num_classes=3)
    groups = param_groups(clf, 0.05, layer_decay=0.5)
    opt = adamw(groups, 1e-3)
    assert not opt.defaults.get("fused")  # parameters on the CPU: the default implementation
    assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in groups]
    assert [g["lr_scale"] for g in opt.param_groups] == [g["lr_scale"] for g in groups]
    assert all("names" not in g for g in opt.param_groups) and all("names" in g for g in groups)
    # the single-kernel update is the same update (PyTorch runs it on CPUs too)
    torch.manual_seed(0)
    for p in clf.parameters():
        p.grad = torch.randn_like(p)
    twin = AudioMAEClassifier(TINY, num_classes=3)
    twin.load_state_dict(clf.state_dict())
    for p, q in zip(clf.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    fused = adamw(param_groups(twin, 0.05, layer_decay=0.5), 1e-3, fused=True)
    assert fused.defaults["fused"]
    before = [p.detach().clone() for p in clf.parameters()]
    opt.step()
    fused.step()
    for (name, p), q in zip(clf.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)
    moved = [(p - b).abs().max() > 0 for p, b in zip(clf.parameters(), before)]
    assert moved == [p.requires_grad for p in clf.parameters()]  # every trainable parameter, and only those


def test_metrics():
    s = torch.tensor([0.9, 0.8, 0.7, 0.6])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert average_precision(s, y) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert roc_auc(s, y) == pytest.approx(0.75)
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])) == pytest.approx(0.5)  # ties
    assert d_prime(0.5) == pytest.approx(0.0, abs=1e-12)
    assert d_prime(0.75) == pytest.approx(math.sqrt(2) * 0.6744897501960817, rel=1e-6)
    m = multilabel_metrics(torch.stack([s, 1 - s], 1), torch.stack([y, 1 - y], 1))
    assert m["mAP"] == pytest.approx((average_precision(s, y) + average_precision(1 - s, 1 - y)) / 2)
    assert math.isnan(average_precision(s, torch.zeros(4)))
    assert (m["classes"], m["ap_classes"], m["auc_classes"]) == (2, 2, 2)
    from audiomae.train.metrics import coverage_note
    assert coverage_note(m) == ""
    # a class without positives is left out of the mAP, one without negatives out of the AUC: counted and said
    m = multilabel_metrics(torch.stack([s, 1 - s, s * 0.5], 1), torch.stack([y, torch.zeros(4), torch.ones(4)], 1))
    assert m["mAP"] == pytest.approx((average_precision(s, y) + 1.0) / 2) and m["AUC"] == pytest.approx(0.75)
    assert (m["classes"], m["ap_classes"], m["auc_classes"]) == (3, 2, 1)
    assert coverage_note(m) == (" (mAP over 2 of 3 classes: 1 has no positive clip here; AUC over 1: 1 has no "
                                "negative clip)")
    acc = singlelabel_metrics(torch.eye(3)[[0, 1, 1]], torch.eye(3)[[0, 1, 2]])
    assert acc["accuracy"] == pytest.approx(2 / 3)


def test_resumable_sampler_ranks_and_start():
    a = ResumableSampler(10, seed=1, rank=0, world_size=2)
    b = ResumableSampler(10, seed=1, rank=1, world_size=2)
    a.set_epoch(3), b.set_epoch(3)
    ia, ib = list(a), list(b)
    assert len(ia) == len(ib) == 5 and not set(ia) & set(ib)
    a.set_epoch(3, start=2)
    assert list(a) == ia[2:]
    a.set_epoch(3)  # same epoch: start kept
    assert list(a) == ia[2:]
    a.set_epoch(4)
    assert len(list(a)) == 5
    w = ResumableSampler(4, weights=[0, 0, 1, 0], num_samples=6)
    assert list(w) == [2] * 6


def test_resumable_sampler_epoch_longer_than_the_dataset():
    s = ResumableSampler(10, seed=2, num_samples=25)
    order = list(s)
    assert len(s) == len(order) == 25
    assert sorted(order[:10]) == sorted(order[10:20]) == list(range(10))  # whole permutations
    assert len(set(order[20:])) == 5
    assert list(ResumableSampler(10, shuffle=False, num_samples=25)) == [i % 10 for i in range(25)]
    two = [list(ResumableSampler(10, seed=2, num_samples=25, rank=r, world_size=2)) for r in range(2)]
    assert len(two[0]) == len(two[1]) == 12


def test_label_smoothing_is_timms_label_smoothing_cross_entropy():
    from audiomae.train.loop import _loss_fn
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g)
    labels = torch.tensor([0, 3, 1, 1, 2])
    target = torch.eye(4)[labels]
    logp = torch.log_softmax(logits, -1)
    nll = -logp.gather(1, labels[:, None])[:, 0]
    timm = (0.9 * nll + 0.1 * -logp.mean(-1)).mean()  # LabelSmoothingCrossEntropy(smoothing=0.1)
    torch.testing.assert_close(_loss_fn(False, 0.1)(logits, target), timm)
    torch.testing.assert_close(_loss_fn(False)(logits, target), nll.mean())
    bce = _loss_fn(True, 0.1)(logits, target)  # multi-label BCE is never smoothed (refused by finetune)
    torch.testing.assert_close(bce, torch.nn.functional.binary_cross_entropy_with_logits(logits, target))


def test_weighted_sampling_without_replacement():
    """The release's AS-2M fine-tuning draws each epoch's clips by weight, each at most once."""
    w = [0.0, 1.0, 1.0, 50.0, 1.0, 0.0, 1.0, 1.0]
    s = ResumableSampler(8, weights=w, num_samples=4, replacement=False, seed=3)
    seen = set()
    for epoch in range(40):
        s.set_epoch(epoch)
        order = list(s)
        assert len(order) == 4 and len(set(order)) == 4 and not {0, 5} & set(order)
        assert 3 in order  # the heavy clip comes every epoch, once
        seen |= set(order)
    assert seen == {1, 2, 3, 4, 6, 7}
    g = torch.Generator().manual_seed(3 * 1_000_003 + 39)
    assert order == torch.multinomial(torch.tensor(w, dtype=torch.double), 4, False, generator=g).tolist()
    with_repl = ResumableSampler(8, weights=w, num_samples=6, seed=3)
    assert len(set(with_repl)) < 6  # the heavy clip repeats
    halves = [list(ResumableSampler(8, weights=w, num_samples=6, replacement=False, rank=r, world_size=2))
              for r in range(2)]
    assert len(set(halves[0] + halves[1])) == 6  # the ranks share one draw
    with pytest.raises(ValueError, match="7 clips per epoch cannot be drawn without replacement from the 6 clips"):
        ResumableSampler(8, weights=w, num_samples=7, replacement=False)


class _Toy(torch.utils.data.Dataset):
    multi_label = False
    num_classes = 2

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"waveform": torch.full((4,), float(i)), "target": torch.tensor([1.0, 0.0]), "index": i, "bad": []}


def _trainer(tmp_path, step_fn, model=None, **over):
    opts = dict(output_dir=str(tmp_path), batch_size=4, epochs=2, blr=1e-3, weight_decay=0.0, warmup_epochs=0,
                quiet=True, num_workers=0, seed=0, max_nan_steps=2, tensorboard=False)
    opts.update(over)
    model = model or torch.nn.Linear(4, 1)
    model.config = TINY  # checkpoints record the model config
    return Trainer(model, opts, _Toy(), torch.device("cpu"), DistInfo(), step_fn)


def _crash_at(trainer, step):
    """Run ``trainer`` until it has done ``step`` steps, then stop it as a crash would."""
    orig = trainer.train_step

    def crash(batches):
        if trainer.step == step:
            raise KeyboardInterrupt
        return orig(batches)

    trainer.train_step = crash
    with pytest.raises(KeyboardInterrupt):
        trainer.run()


def test_nan_steps_are_skipped_then_stop(tmp_path):
    calls = {"n": 0}

    def step_fn(m, batch):
        calls["n"] += 1
        out = m(batch["waveform"]).mean()
        return out * float("nan") if calls["n"] in (2, 3) else out

    tr = _trainer(tmp_path, step_fn)
    summary = tr.run()
    assert summary["skipped_steps"] == 2 and summary["steps"] == 8
    lines = open(os.path.join(tmp_path, "metrics.jsonl")).read().splitlines()
    assert lines and '"skipped_steps": 2' in lines[-1]

    def always_nan(m, batch):
        return m(batch["waveform"]).mean() * float("nan")

    tr = _trainer(tmp_path / "b", always_nan)
    w0 = tr.model.weight.detach().clone()
    with pytest.raises(TrainingError, match="3 non-finite steps in a row"):
        tr.run()
    assert torch.equal(tr.model.weight, w0)  # skipped steps never touch the weights


def test_a_finite_loss_with_non_finite_gradients_is_skipped(tmp_path):
    """sqrt at 0: the loss is 0, its gradient inf; the step is skipped like a NaN loss's and the
    weights stay finite."""
    calls = {"n": 0}

    def step_fn(m, batch):
        calls["n"] += 1
        out = m(batch["waveform"]).mean()
        return (out * 0).abs().sqrt() if calls["n"] == 2 else out

    for clip in (None, 1.0):  # with clipping, the norm it computes tells
        calls["n"] = 0
        tr = _trainer(tmp_path / str(clip), step_fn, clip_grad=clip)
        summary = tr.run()
        assert summary["skipped_steps"] == 1 and summary["steps"] == 8
        assert torch.isfinite(tr.model.weight).all() and torch.isfinite(tr.model.bias).all()


def test_resume_continues_exactly(tmp_path):
    def step_fn(m, batch):
        x = batch["waveform"] + 0.1 * torch.randn(batch["waveform"].shape)  # uses the RNG
        return (m(x) ** 2).mean()

    torch.manual_seed(0)
    straight = _trainer(tmp_path / "a", step_fn, epochs=3)
    straight.run()

    torch.manual_seed(0)
    first = _trainer(tmp_path / "b", step_fn, epochs=3, save_every_steps=1)
    # stop in the middle of epoch 2 (step 6 of 12) as a crash would, after the step-6 checkpoint
    _crash_at(first, 6)
    torch.manual_seed(123)  # a new process has another RNG state; resume must restore it
    second = _trainer(tmp_path / "b", step_fn, epochs=3)
    second.resume(os.path.join(tmp_path / "b", "checkpoint-last.pt"))
    assert second.step == 6 and second.epoch == 1 and second.epoch_step == 2
    assert second.current_lr() == pytest.approx(straight.schedule["lr"] * 0.5 * (1 + math.cos(math.pi * 0.5)))
    second.run()
    assert torch.equal(second.model.weight, straight.model.weight)
    assert torch.equal(second.model.bias, straight.model.bias)


def test_resume_with_another_lr_says_so(tmp_path, capsys):
    def step_fn(m, batch):
        return (m(batch["waveform"]) ** 2).mean()

    first = _trainer(tmp_path, step_fn, epochs=3, save_every_steps=1)
    _crash_at(first, 2)
    same = _trainer(tmp_path, step_fn, epochs=3)
    same.resume(os.path.join(tmp_path, "checkpoint-last.pt"))
    assert "peak lr" not in capsys.readouterr().err
    other = _trainer(tmp_path, step_fn, epochs=3, blr=2e-3)
    other.resume(os.path.join(tmp_path, "checkpoint-last.pt"))
    out = capsys.readouterr().err
    assert "note: the peak lr is 3.125e-05 (from this run's options), the run began with 1.563e-05" in out


def test_resume_logs_each_step_once_and_lr_is_the_steps(tmp_path):
    def step_fn(m, batch):
        return (m(batch["waveform"]) ** 2).mean()

    first = _trainer(tmp_path, step_fn, epochs=3, save_every_steps=3, log_every=1, warmup_epochs=1)
    _crash_at(first, 5)
    log = os.path.join(tmp_path, "metrics.jsonl")
    with open(log, "a") as f:
        f.write('{"phase": "train", "st')  # a line cut off by the crash
    second = _trainer(tmp_path, step_fn, epochs=3, log_every=1, warmup_epochs=1)
    second.resume(os.path.join(tmp_path, "checkpoint-last.pt"))  # the step-3 checkpoint
    second.run()
    import json
    recs = [json.loads(line) for line in open(log)]
    steps = [r["step"] for r in recs if r["phase"] == "train"]
    assert steps == list(range(1, 13))  # 4 steps per epoch, each once
    # the lr logged with a step is the one it used: 0 for the first step of the warmup
    assert recs[0]["lr"] == 0.0 and recs[1]["lr"] == pytest.approx(second.lr / 4)
    assert recs[-1]["lr"] == pytest.approx(lr_at(11, 12, 4, second.lr))


def test_leftover_batches_of_an_epoch_are_trained(tmp_path):
    seen = []

    def step_fn(m, batch):
        seen.append(batch["index"].tolist())
        return m(batch["waveform"]).mean()

    tr = _trainer(tmp_path, step_fn, epochs=1, accum_iter=3)  # 16 clips, batch 4: 4 batches, 3 + 1
    assert tr.steps_per_epoch == 2
    tr.run()
    assert tr.step == 2 and sorted(i for b in seen for i in b) == list(range(16))


def test_resume_of_a_run_that_left_accumulation_leftovers_out(tmp_path):
    """Checkpoints of earlier versions count only whole accumulation groups per epoch: such a run
    continues on its own schedule."""
    def step_fn(m, batch):
        return m(batch["waveform"]).mean()

    first = _trainer(tmp_path, step_fn, epochs=2, accum_iter=3)  # 4 batches an epoch: 2 steps now, 1 before
    first.run()
    path = os.path.join(tmp_path, "checkpoint-last.pt")
    state = torch.load(path, weights_only=True)
    assert state["schedule"]["leftover_steps"] is True
    new = dict(state, schedule=dict(state["schedule"], steps_per_epoch=1))
    torch.save(new, path)  # a checkpoint of this version with another geometry: refused
    with pytest.raises(TrainingError, match="steps per epoch"):
        _trainer(tmp_path, step_fn, epochs=2, accum_iter=3).resume(path)
    state["schedule"].pop("leftover_steps")  # as earlier versions wrote it
    state["schedule"].update(steps_per_epoch=1, total_steps=2)
    state.update(step=1, epoch=1, epoch_step=0)
    torch.save(state, path)
    again = _trainer(tmp_path, step_fn, epochs=2, accum_iter=3)
    again.resume(path)
    assert again.steps_per_epoch == 1 and again.total_steps == 2
    assert again.run()["steps"] == 2


def test_an_evaluation_that_fails_loses_no_training(tmp_path):
    """The checkpoint of an epoch is written before its evaluation: when that fails (a disk full, bad
    evaluation files), a resume evaluates the epoch and goes on exactly."""
    def step_fn(m, batch):
        x = batch["waveform"] + 0.1 * torch.randn(batch["waveform"].shape)
        return (m(x) ** 2).mean()

    evaluated = []

    def evaluate(tr):
        evaluated.append((tr.epoch, tr.step))
        torch.rand(3)  # an evaluation may draw random numbers (the held-out loss's masks)
        tr.runlog.write({"phase": "eval", "step": tr.step, "epoch": tr.epoch})

    torch.manual_seed(0)
    straight = _trainer(tmp_path / "a", step_fn, epochs=3)
    straight.on_epoch_end = evaluate
    straight.run()
    assert evaluated == [(1, 4), (2, 8), (3, 12)]

    def failing(tr):
        evaluate(tr)
        if tr.epoch == 2:  # after its row was logged, as when the best checkpoint cannot be written
            evaluated.pop()
            raise OSError("No space left on device")

    evaluated.clear()
    torch.manual_seed(0)
    first = _trainer(tmp_path / "b", step_fn, epochs=3)
    first.on_epoch_end = failing
    with pytest.raises(OSError):
        first.run()
    path = os.path.join(tmp_path / "b", "checkpoint-last.pt")
    state = torch.load(path, weights_only=True)
    assert (state["epoch"], state["step"], state["eval_pending"]) == (2, 8, True)
    torch.manual_seed(123)
    second = _trainer(tmp_path / "b", step_fn, epochs=3)
    second.on_epoch_end = evaluate
    second.resume(path)
    second.run()
    assert evaluated == [(1, 4), (2, 8), (3, 12)]
    assert torch.equal(second.model.weight, straight.model.weight)
    assert torch.load(path, weights_only=True)["eval_pending"] is False
    rows = [json.loads(line) for line in open(os.path.join(tmp_path / "b", "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["phase"] == "eval"] == [4, 8, 12]  # the epoch-2 row once

    # a pending evaluation resumed by a run without one: no later checkpoint claims it pending
    failed = _trainer(tmp_path / "c", step_fn, epochs=3)
    failed.on_epoch_end = failing
    with pytest.raises(OSError):
        failed.run()
    plain = _trainer(tmp_path / "c", step_fn, epochs=3, save_every_steps=1)
    plain.resume(os.path.join(tmp_path / "c", "checkpoint-last.pt"))
    assert plain.eval_pending is False
    _crash_at(plain, 10)
    assert torch.load(os.path.join(tmp_path / "c", "checkpoint-last.pt"), weights_only=True)["eval_pending"] is False


def test_an_interrupt_that_stops_the_evaluation_ends_as_an_interrupt(tmp_path, capsys):
    """SIGTERM or Ctrl-C reach the evaluation's loader workers too, which then end: the run stops as
    interrupted (the checkpoint before the evaluation stands), not with the loader's error."""
    import signal
    import time

    from audiomae.train.loop import Interrupted

    def step_fn(m, batch):
        return (m(batch["waveform"]) ** 2).mean()

    def evaluation_cut_short(tr):
        os.kill(os.getpid(), signal.SIGTERM)  # the signal of the process group ...
        time.sleep(0.05)
        raise RuntimeError("DataLoader worker (pid 123) exited unexpectedly")  # ... ended the workers

    tr = _trainer(tmp_path, step_fn, epochs=2)
    tr.on_epoch_end = evaluation_cut_short
    with pytest.raises(Interrupted):
        tr.run()
    # the error is named all the same, in case it was the evaluation's own
    assert "evaluation ended with RuntimeError: DataLoader worker (pid 123) exited unexpectedly" in \
        capsys.readouterr().err
    state = torch.load(os.path.join(tmp_path, "checkpoint-last.pt"), weights_only=True)
    assert (state["epoch"], state["eval_pending"]) == (1, True)
    tr = _trainer(tmp_path, step_fn, epochs=2)
    tr.on_epoch_end = lambda t: (_ for _ in ()).throw(RuntimeError("a real failure"))
    with pytest.raises(RuntimeError, match="a real failure"):  # without an interrupt the error is the error
        tr.run()


def test_a_loader_error_after_a_stop_request_is_named_and_the_run_stops(tmp_path, capsys):
    """The signal that asks for a stop ends loader workers too: the loader's error then stops the
    run with the checkpoint of the last finished step, and is named in case it was its own."""
    import signal
    import time

    from audiomae.train.loop import Interrupted

    class Failing:
        """The trainer's loader, whose third batch the signal's end of its workers loses."""

        def __init__(self, inner):
            self.inner = inner

        def set_epoch(self, epoch):
            self.inner.set_epoch(epoch)

        def __iter__(self):
            for n, batch in enumerate(self.inner):
                if n == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.05)
                    raise OSError("worker gone")
                yield batch

    tr = _trainer(tmp_path, lambda m, b: (m(b["waveform"]) ** 2).mean(), epochs=1)
    tr.loader = Failing(tr.loader)
    with pytest.raises(Interrupted) as e:
        tr.run()
    assert e.value.step == 2
    assert "note: reading the next batch ended with OSError: worker gone after the stop was asked for" in \
        capsys.readouterr().err
    state = torch.load(os.path.join(tmp_path, "checkpoint-last.pt"), weights_only=True)
    assert state["step"] == e.value.step


def test_resume_refuses_other_geometry(tmp_path):
    tr = _trainer(tmp_path, lambda m, b: m(b["waveform"]).mean(), epochs=1)
    tr.run()
    other = _trainer(tmp_path, lambda m, b: m(b["waveform"]).mean(), batch_size=8)
    with pytest.raises(TrainingError, match="steps per epoch"):
        other.resume(os.path.join(tmp_path, "checkpoint-last.pt"))


@pytest.mark.parametrize("over,want", [({}, None), ({"compile": True}, [None]),
                                       ({"compile_mode": "max-autotune-no-cudagraphs"}, ["max-autotune-no-cudagraphs"]),
                                       ({"compile": True, "compile_mode": "default"}, [None])])
def test_compile_options_reach_torch_compile(tmp_path, monkeypatch, over, want):
    modes = []

    def fake_compile(model, mode=None, **kw):
        modes.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    tr = _trainer(tmp_path, lambda m, b: m(b["waveform"]).mean(), **over)
    assert modes == (want or [])
    assert tr.forward_model is tr.model


def test_cli_compile_mode_choices():
    from audiomae.cli import build_parser

    args = build_parser().parse_args(["pretrain", "--compile-mode", "max-autotune-no-cudagraphs"])
    assert args.compile_mode == "max-autotune-no-cudagraphs" and not args.compile
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--compile-mode", "fastest"])


def test_evaluate_needs_a_classifier_with_the_data_classes(tmp_path):
    """A pretraining checkpoint has no head to evaluate: said before any work, with what to do;
    a classifier for another number of classes likewise."""
    from audiomae.train.loop import evaluate

    opts = {"data": "synthetic", "num_eval_clips": 4, "clip_seconds": 2.56, "output_dir": str(tmp_path / "out"),
            "device": "cpu", "quiet": True}
    AudioMAE(TINY).save_pretrained(tmp_path / "pre.pt")
    with pytest.raises(TrainingError, match="pretraining checkpoint without a classification head.*finetune"):
        evaluate(dict(opts, checkpoint=str(tmp_path / "pre.pt")))
    AudioMAEClassifier(TINY, num_classes=3).save_pretrained(tmp_path / "three.pt")
    with pytest.raises(TrainingError, match="predicts 3 classes, the data has 10"):
        evaluate(dict(opts, checkpoint=str(tmp_path / "three.pt")))


def test_metrics_files_are_strict_json(tmp_path):
    """NaN and Infinity are not JSON: a skipped step's NaN loss and the infinite d-prime of an AUC of 1
    are written as null, so strict parsers read the files."""
    from audiomae.train.loop import RunLog, _strict_json

    def strict(text):
        def refuse(name):
            raise ValueError(f"not JSON: {name}")
        return json.loads(text, parse_constant=refuse)

    assert _strict_json({"d_prime": float("inf"), "x": [1.0, float("nan")], "n": 3}) == {"d_prime": None,
                                                                                          "x": [1.0, None], "n": 3}
    log = RunLog(str(tmp_path), enabled=True, tensorboard=False)
    log.write({"phase": "train", "step": 1, "loss": float("nan"), "lr": 1e-3})
    log.close()
    rec = strict((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["loss"] is None and rec["lr"] == 1e-3


def test_graceful_interrupt_flags_the_first_sigint_and_restores_the_handler():
    import signal
    import time

    from audiomae.train.loop import GracefulInterrupt
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job: SIGINT stays ignored
        with GracefulInterrupt(True):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # a preemption still checkpoints
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with GracefulInterrupt(True) as g:
                os.kill(os.getpid(), sig)
                time.sleep(0.05)
                assert g.requested  # the first one only asks to stop
                if sig == signal.SIGINT:  # a second Ctrl-C stops at once
                    with pytest.raises(KeyboardInterrupt):
                        os.kill(os.getpid(), sig)
                        time.sleep(0.05)
                else:  # a second SIGTERM is the same preemption
                    os.kill(os.getpid(), sig)
                    time.sleep(0.05)
                    assert g.requested
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is before[1]
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_predict_keeps_no_autograd_graph():
    """Evaluation scores carry no graph: memory stays flat over the evaluation set (with one, every
    batch's activations would live until the scores are joined)."""
    from audiomae.data import FeatureExtractor, SyntheticAudioDataset
    from audiomae.train.loop import embed_dataset, predict

    torch.manual_seed(0)
    model = AudioMAEClassifier(AudioMAEConfig.preset("tiny"), num_classes=10)
    data = SyntheticAudioDataset(num_clips=6, clip_seconds=2.56, split="val")
    feats = FeatureExtractor(target_length=256)
    opts = {"batch_size": 4, "num_workers": 0, "quiet": True}
    scores, targets = predict(model, data, opts, torch.device("cpu"), feats)
    assert scores.shape == (6, 10) and not scores.requires_grad and scores.grad_fn is None
    emb, _ = embed_dataset(model, data, opts, torch.device("cpu"), feats)
    assert not emb.requires_grad


def test_a_nan_evaluation_does_not_keep_the_best_checkpoint_forever():
    from audiomae.train.loop import improves

    nan = float("nan")
    assert improves(0.3, None) and improves(nan, None)
    assert improves(0.4, 0.3) and not improves(0.3, 0.3) and not improves(0.2, 0.3)
    assert improves(0.1, nan) and not improves(nan, nan) and not improves(nan, 0.3)


def test_labels_with_a_folder_dataset_are_noted_as_unused(tmp_path, capsys):
    import numpy as np
    import soundfile as sf
    from audiomae.train.loop import build_dataset

    for c in ("cat", "dog"):
        os.makedirs(tmp_path / c)
        sf.write(str(tmp_path / c / "a.wav"), np.zeros(1600, dtype=np.float32), 16000)
    ds = build_dataset({"data": str(tmp_path), "labels": "classes.csv"}, "train")
    assert ds.class_names == ["cat", "dog"]
    assert "--labels classes.csv is not used: the classes of the folder" in capsys.readouterr().err


def test_held_out_loss_masks_each_clip_by_its_index():
    """The held-out loss draws each clip's mask from the seed and the clip's index: the same loss in
    any order and batch size (and so with any number of processes, each reading its share)."""
    from audiomae.data import FeatureExtractor, SyntheticAudioDataset
    from audiomae.train.loop import held_out_loss

    torch.manual_seed(0)
    model = AudioMAE(AudioMAEConfig.preset("tiny"))
    data = SyntheticAudioDataset(num_clips=5, clip_seconds=2.56, split="val")
    feats = FeatureExtractor(target_length=256)
    cpu = torch.device("cpu")
    opts = {"num_workers": 0, "quiet": True}
    a = held_out_loss(model, data, dict(opts, batch_size=2), cpu, feats)
    reordered = torch.utils.data.Subset(data, [3, 1, 4, 0, 2])
    b = held_out_loss(model, reordered, dict(opts, batch_size=3), cpu, feats)
    assert a == pytest.approx(b, rel=1e-6, abs=0)
    rng = torch.get_rng_state()
    c = held_out_loss(model, data, dict(opts, batch_size=5), cpu, feats, seed=1)
    assert c != pytest.approx(a, rel=1e-6) and torch.equal(torch.get_rng_state(), rng)


def test_logged_loss_is_the_mean_of_the_steps_since_the_last_row(tmp_path):
    seen = []

    def step_fn(m, batch):
        loss = (m(batch["waveform"]) ** 2).mean() + len(seen)  # a different loss every step
        seen.append(float(loss.detach()))
        return loss

    tr = _trainer(tmp_path, step_fn, epochs=2, log_every=3)
    tr.run()
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl")) if '"train"' in line]
    assert [r["step"] for r in rows] == [3, 4, 6, 8]  # every 3 steps and at each epoch's end (4 steps each)
    assert [r["epoch"] for r in rows] == [1, 1, 2, 2]  # from 1, as the evaluation rows
    want = [sum(seen[0:3]) / 3, seen[3], sum(seen[4:6]) / 2, sum(seen[6:8]) / 2]
    assert [r["loss"] for r in rows] == pytest.approx(want, rel=1e-6)


def test_python_callers_runs_record_the_default_downmix(tmp_path):
    """A run started from Python without ``downmix`` records "first": later commands on its
    checkpoints read files as it did (a checkpoint without the option reads as a run from before
    it, which averaged the channels)."""
    from audiomae.checkpoint import read_checkpoint
    from audiomae.train import loop

    opts = dict(output_dir=str(tmp_path), data="synthetic", num_clips=8, batch_size=4, epochs=1, blr=1e-3,
                weight_decay=0.05, warmup_epochs=0, num_workers=0, quiet=True, seed=0, model="tiny", device="cpu",
                tensorboard=False)
    loop.pretrain(opts)
    for name in ("model.pt", "checkpoint-last.pt"):
        _, _, args = read_checkpoint(str(tmp_path / name))
        assert args["downmix"] == "first", name
        got, changed = loop.inherit_run_options({}, args)
        assert got["downmix"] == changed["downmix"] == "first"


def test_inherited_defaults_need_no_note(capsys):
    from audiomae.train.loop import _note_inherited

    _note_inherited({"downmix": "first", "stats": "audioset"}, "ck.pt")
    assert capsys.readouterr() == ("", "")
    _note_inherited({"downmix": "mean", "stats": "audioset", "clip_seconds": 5.0}, "ck.pt")
    captured = capsys.readouterr()
    out = captured.err  # a note, not a result: stderr
    assert captured.out == "" and "--downmix mean" in out and "--clip-seconds 5" in out and "audioset" not in out


def test_a_stop_right_after_a_periodic_checkpoint_does_not_write_it_again(tmp_path):
    def step_fn(m, batch):
        return (m(batch["waveform"]) ** 2).mean()

    tr = _trainer(tmp_path, step_fn, epochs=2, save_every_steps=2)
    saves, orig_save, orig_step = [], tr.save, tr.train_step

    def save(name="checkpoint-last.pt"):
        saves.append((tr.step, name))
        orig_save(name)

    def step(batches):
        if tr.step == 1:
            tr._stop.requested = True  # as the signal handler does, during step 2
        return orig_step(batches)

    tr.save, tr.train_step = save, step
    with pytest.raises(KeyboardInterrupt) as info:
        tr.run()
    assert info.value.step == 2 and saves == [(2, "checkpoint-last.pt")]


def test_a_second_sigterm_is_the_same_preemption_a_second_ctrl_c_stops_at_once():
    import signal
    import time
    from audiomae.train.loop import GracefulInterrupt

    def deliver(sig):
        os.kill(os.getpid(), sig)
        time.sleep(0.05)  # the handler runs in this thread at the next bytecode

    with GracefulInterrupt() as stop:
        deliver(signal.SIGTERM)
        deliver(signal.SIGTERM)  # a scheduler's and torchrun's: one preemption
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            deliver(signal.SIGINT)
    with GracefulInterrupt(hard_second=True) as stop:
        deliver(signal.SIGINT)
        # with several processes a second Ctrl-C ends the process from the operating system
        assert stop.requested and signal.getsignal(signal.SIGINT) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_leaving_the_group_releases_a_model_wrapper_that_a_reference_cycle_holds(tmp_path):
    # a trainer kept by a cycle (frames a lazy import captured) holds the DDP wrapper, whose reducer
    # holds the process group: cleanup collects it while the interpreter runs, not at its shutdown
    import gc
    import weakref
    import torch.distributed as dist
    from audiomae.train import distributed as D

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    enabled = gc.isenabled()
    gc.disable()  # no automatic collection between here and the check
    try:
        holder = {"ddp": torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))}
        holder["self"] = holder
        alive = weakref.ref(holder["ddp"])
        del holder
        D.cleanup()
        assert not dist.is_initialized() and alive() is None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if enabled:
            gc.enable()


def test_a_run_held_by_a_reference_cycle_is_released_before_the_next_one_starts(tmp_path, monkeypatch):
    # torch's first optimizer captures the frames of its compiler's import, the trainer's among them:
    # the model and optimizer of that run outlive it until a collection; the next run makes one first
    import gc
    import weakref
    from audiomae.train import loop

    runs = []
    init = loop.Trainer.__init__

    def held_by_a_cycle(self, *a, **k):
        init(self, *a, **k)
        self.cycle = self
        runs.append(weakref.ref(self))

    monkeypatch.setattr(loop.Trainer, "__init__", held_by_a_cycle)
    opts = dict(data="synthetic", num_clips=8, batch_size=4, epochs=1, blr=1e-3, weight_decay=1e-4, warmup_epochs=0,
                num_workers=0, quiet=True, seed=0, model="tiny", device="cpu", tensorboard=False)
    enabled = gc.isenabled()
    gc.disable()
    try:
        loop.pretrain(dict(opts, output_dir=str(tmp_path / "a")))
        assert runs[0]() is not None  # nothing collected it yet
        loop.pretrain(dict(opts, output_dir=str(tmp_path / "b")))
        assert runs[0]() is None and len(runs) == 2
    finally:
        if enabled:
            gc.enable()


def test_labels_that_the_training_manifest_uses_are_not_noted_as_unused_for_a_folder_eval_set(tmp_path, capsys):
    import json
    import numpy as np
    import soundfile as sf
    from audiomae.train.loop import build_dataset

    for c in ("cat", "dog"):
        os.makedirs(tmp_path / "ev" / c)
        sf.write(str(tmp_path / "ev" / c / "a.wav"), np.zeros(1600, dtype=np.float32), 16000)
    manifest = tmp_path / "train.json"
    manifest.write_text(json.dumps({"data": [{"wav": str(tmp_path / "ev" / "cat" / "a.wav"), "labels": "/m/c"}]}))
    opts = {"data": str(manifest), "eval_data": str(tmp_path / "ev"), "labels": "classes.csv"}
    assert build_dataset(opts, "val").class_names == ["cat", "dog"]
    assert "is not used" not in capsys.readouterr().err


def test_cross_validation_resumes_each_fold_from_its_own_folder_only(tmp_path):
    """--resume DIR with --cv-folds resumed every fold from that one checkpoint: fold 2 took fold 1's
    model and score."""
    from audiomae.train import TrainingError
    from audiomae.train.loop import cross_validate
    with pytest.raises(TrainingError, match=r"--cv-folds resumes with --resume auto .*not --resume .*fold-1"):
        cross_validate({"cv_folds": 2, "resume": str(tmp_path / "fold-1"), "output_dir": str(tmp_path),
                        "data": "d{fold}", "eval_data": "e{fold}"})
    with pytest.raises(Exception) as e:  # resume=False from Python is no resume: the folds start (and meet no data)
        cross_validate({"cv_folds": 2, "resume": False, "output_dir": str(tmp_path / "new"),
                        "data": str(tmp_path / "d{fold}"), "eval_data": str(tmp_path / "e{fold}")})
    assert "--cv-folds resumes" not in str(e.value)


@pytest.mark.parametrize("damage", [lambda s: s.pop("schedule"), lambda s: s.update(rng={}),
                                    lambda s: s.pop("epoch_step")])
def test_a_training_checkpoint_missing_part_of_its_state_is_a_checkpoint_error(tmp_path, damage):
    """Without its schedule, or with an empty rng, a resume ended in a KeyError."""
    from audiomae.checkpoint import CheckpointError
    from audiomae.train.state import load_training_state
    tr = _trainer(tmp_path, lambda m, b: m(b["waveform"]).mean(), epochs=1)
    tr.run()
    state = torch.load(os.path.join(tmp_path, "checkpoint-last.pt"), weights_only=False)
    damage(state)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_training_state(str(tmp_path / "bad.pt"))
