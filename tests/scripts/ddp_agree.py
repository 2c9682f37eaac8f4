"""Launched by torchrun with 2 CPU processes: a short pretraining, after which the trainer checks
that every rank holds the same weights (it prints "ranks agree")."""
import sys

from audiomae.train.loop import pretrain

out = sys.argv[1]
pretrain(dict(output_dir=out, data="synthetic", num_clips=32, batch_size=4, epochs=1, blr=1e-3, weight_decay=1e-4,
              warmup_epochs=0, num_workers=0, quiet=True, seed=0, model="tiny", device="cpu", tensorboard=False,
              cleanup=False))
