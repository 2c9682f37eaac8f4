"""A resumable, rank-aware sampler: the order of each epoch depends only on (seed, epoch), so a run
resumed in the middle of an epoch continues with exactly the batches it had not seen."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Uniform shuffling, or weighted draws (``weights``), split across ranks.

    ``num_samples`` (default: the dataset's length) indices per epoch: uniform shuffling makes them
    from whole permutations (each clip once per ``length`` draws), weighted sampling draws them,
    with ``replacement`` (a clip may come several times an epoch) or without it (each at most once,
    the release's AS-2M fine-tuning: ``WeightedRandomSampler(..., 200000, replacement=False)``).
    Every rank gets ``num_samples // world_size`` indices per epoch (the tail is dropped so ranks
    stay in step); ``set_epoch(e, start=k)`` skips the first ``k`` indices of this rank's share.
    """

    def __init__(self, length: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 weights: Optional[Sequence[float]] = None, num_samples: Optional[int] = None,
                 replacement: bool = True):
        if length <= 0:
            raise ValueError("the dataset is empty")
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.weights = torch.as_tensor(weights, dtype=torch.double) if weights is not None else None
        self.num_samples = num_samples or length
        self.replacement = bool(replacement)
        if self.weights is not None and not self.replacement:
            drawable = int((self.weights > 0).sum())
            if self.num_samples > drawable:
                raise ValueError(f"{self.num_samples} clips per epoch cannot be drawn without replacement from the "
                                 f"{drawable} clips of non-zero weight; lower the epoch size, or draw with "
                                 "replacement")
        self.per_rank = self.num_samples // world_size
        if self.per_rank == 0:
            raise ValueError(f"{self.num_samples} samples cannot be split across {world_size} processes")
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: Optional[int] = None) -> None:
        """Select the epoch's order; ``start`` skips that many of this rank's indices. Without
        ``start``, re-selecting the current epoch keeps its start and a new epoch starts at 0."""
        if start is None:
            start = self.start if epoch == self.epoch else 0
        self.epoch = epoch
        self.start = start

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.num_samples, replacement=self.replacement, generator=g)
        if self.shuffle:  # an epoch longer than the dataset: whole permutations one after another
            reps = -(-self.num_samples // self.length)
            return torch.cat([torch.randperm(self.length, generator=g) for _ in range(reps)])[: self.num_samples]
        return torch.arange(self.num_samples) % self.length

    def __iter__(self) -> Iterator[int]:
        order = self._order()[self.rank: self.per_rank * self.world_size: self.world_size]
        return iter(order[self.start:].tolist())

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)
