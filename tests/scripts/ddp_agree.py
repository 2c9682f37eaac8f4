"""Launched by torchrun with 2 CPU processes: a short pretraining, after which the trainer checks
that every rank holds the same weights (it prints "ranks agree"); then a resume, which must give
each rank back its own random state, and an evaluation of a clip count that does not split evenly,
which must score every clip once (it prints "resume and evaluation per rank ok")."""
import os
import sys

import torch
import torch.distributed as dist

from audiomae import AudioMAEClassifier, AudioMAEConfig
from audiomae.data import FeatureExtractor, SyntheticAudioDataset
from audiomae.train import distributed as D, loop
from audiomae.train.distributed import DistInfo

out = sys.argv[1]
opts = dict(output_dir=out, data="synthetic", num_clips=32, batch_size=4, epochs=1, blr=1e-3, weight_decay=1e-4,
            warmup_epochs=0, num_workers=0, quiet=True, seed=0, model="tiny", device="cpu", tensorboard=False,
            cleanup=False)
loop.pretrain(opts)
rank, world = dist.get_rank(), dist.get_world_size()

# the checkpoint holds every rank's random state, and a resume restores this rank's own
state = torch.load(os.path.join(out, "checkpoint-last.pt"), weights_only=True)
ranks = state["rng_ranks"]
assert len(ranks) == world and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
seen = {}
resume = loop.Trainer.resume


def spy(self, path):
    resume(self, path)
    seen["rng"] = torch.get_rng_state()


loop.Trainer.resume = spy
loop.pretrain(dict(opts, epochs=2, resume="auto"))
assert torch.equal(seen["rng"], ranks[rank]["torch"]), "a resumed rank did not get its own random state"

# 5 clips on 2 processes: every clip scored once (the padding of the last rank dropped)
ds = SyntheticAudioDataset(num_clips=5, split="val")
model = AudioMAEClassifier(AudioMAEConfig.preset("tiny"), num_classes=ds.num_classes)
feats = FeatureExtractor(target_length=256)
scores, targets = loop.predict(model, ds, dict(batch_size=2, num_workers=0, quiet=True), torch.device("cpu"), feats,
                               DistInfo(rank=rank, world_size=world))
want = torch.stack([ds.target(i) for i in range(5)])
assert scores.shape[0] == 5 and sorted(map(tuple, targets.tolist())) == sorted(map(tuple, want.tolist()))
if rank == 0:
    print("resume and evaluation per rank ok")
D.cleanup()  # the product's own exit: a barrier, then the group destroyed with nothing holding it
