"""Launched by torchrun with 2 CPU processes. SIGTERM reaches rank 1 alone: once as a step begins (as
when a scheduler signals one task), once while its loader reads (which then fails, as a loader
whose workers the signal also ended). Both times both ranks must stop at the same step with one
checkpoint, and a resume must end with the weights of a run
never interrupted (it prints "interrupted together at step 3 twice, resumed exactly")."""
import os
import signal
import sys

import torch
import torch.distributed as dist

from audiomae.train import distributed as D, loop

out = sys.argv[1]
opts = dict(data="synthetic", num_clips=48, batch_size=4, epochs=1, blr=1e-3, weight_decay=1e-4, warmup_epochs=0,
            num_workers=0, quiet=True, seed=0, model="tiny", device="cpu", tensorboard=False, cleanup=False)
loop.pretrain(dict(opts, output_dir=os.path.join(out, "straight")))
rank = dist.get_rank()

train_step = loop.Trainer.train_step


def signalled_step(self, batches):
    if rank == 1 and self.step == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while this rank is in the step
    return train_step(self, batches)


def interrupted(run, want, undo):
    try:
        loop.pretrain(dict(opts, output_dir=run))
        raise SystemExit(f"rank {rank}: the run was not interrupted")
    except loop.Interrupted as e:
        stopped = e.step
    undo()  # the resume runs undisturbed
    steps = [None, None]
    dist.all_gather_object(steps, stopped)
    assert steps == [want, want], f"the ranks stopped at steps {steps}, not together at step {want}"
    assert torch.load(os.path.join(run, "checkpoint-last.pt"), weights_only=True)["step"] == want
    loop.pretrain(dict(opts, output_dir=run, resume="auto"))
    if rank == 0:
        a = torch.load(os.path.join(out, "straight", "model.pt"), weights_only=True)["model"]
        b = torch.load(os.path.join(run, "model.pt"), weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), f"{run}: the resumed run ended with other weights"


# 1. the signal as step 3 begins on rank 1 (after the agreement before it): both finish it, stop at 3
loop.Trainer.train_step = signalled_step
interrupted(os.path.join(out, "run"), 3, lambda: setattr(loop.Trainer, "train_step", train_step))

# 2. the signal while rank 1's loader reads the first clip of step 4, which then fails: rank 0 meets it
#    at the agreement before step 4, both stop at 3
from audiomae.data import SyntheticAudioDataset  # noqa: E402

getitem, reads = SyntheticAudioDataset.__getitem__, [0]


def failing_read(self, index):
    reads[0] += 1
    if rank == 1 and reads[0] == 13:  # 3 steps of 4 clips read
        os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError("DataLoader worker exited unexpectedly")
    return getitem(self, index)


SyntheticAudioDataset.__getitem__ = failing_read
interrupted(os.path.join(out, "run-loader"), 3, lambda: setattr(SyntheticAudioDataset, "__getitem__", getitem))
if rank == 0:
    print("interrupted together at step 3 twice, resumed exactly")
D.cleanup()  # the product's own exit: a barrier, then the group destroyed with nothing holding it
