"""Launched by torchrun with 2 CPU processes: SIGTERM reaches rank 1 alone in the middle of a step (as
when a scheduler signals one task); both ranks must finish that step, stop after it together with
one checkpoint, and a resume must end with the weights of a run never interrupted (it prints
"interrupted together at step N, resumed exactly")."""
import os
import signal
import sys

import torch
import torch.distributed as dist

from audiomae.train import loop

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


loop.Trainer.train_step = signalled_step
run = os.path.join(out, "run")
try:
    loop.pretrain(dict(opts, output_dir=run))
    raise SystemExit(f"rank {rank}: the run was not interrupted")
except loop.Interrupted as e:
    stopped = e.step
loop.Trainer.train_step = train_step
steps = [None, None]
dist.all_gather_object(steps, stopped)
assert steps == [3, 3], f"the ranks stopped at steps {steps}, not together after step 3"
assert torch.load(os.path.join(run, "checkpoint-last.pt"), weights_only=True)["step"] == 3

loop.pretrain(dict(opts, output_dir=run, resume="auto"))
if rank == 0:
    a = torch.load(os.path.join(out, "straight", "model.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(run, "model.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run ended with other weights"
    print("interrupted together at step 3, resumed exactly")
dist.barrier()
dist.destroy_process_group()
