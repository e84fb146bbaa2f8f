"""A training loader that a mid-epoch resume continues exactly where the killed run was.

Three parts, each a pure function of (seed, epoch, position) rather than of a random state
that a restart would lose:

* `ResumableSampler` orders the epoch with an epoch-seeded index sampler (a
  ``DistributedSampler``, or timm's repeated-augmentation sampler), pairs every position with
  its own seed, and starts after the batches the fit loop has already trained this epoch;
* `SeededSamples` seeds the augmentation of each sample from that seed, so an image gets the
  same crop and flip in any worker process, with any number of workers, before and after a
  resume;
* `ResumableDataLoader` creates its iterator at the first batch request rather than on
  ``iter()``.

Lightning restores the loop position from the checkpoint (the batch index to continue from)
and, for the data, only calls ``state_dict``/``load_state_dict`` of a stateful loader, which
would still not cover the augmentation's random state. Its restore of loader states is also
skipped when ``configure_optimizers`` asks for ``trainer.estimated_stepping_batches``, as the
schedule here does (Lightning issue 20550). So the sampler reads the position the fit loop
resumes from (``batch_progress.current.ready``: the batches of this epoch it has trained)
when the epoch's iteration starts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from refiner_pl.seeding import derive_seeds, seed_cpu

__all__ = ["ResumableDataLoader", "ResumableSampler", "SeededSamples"]

_LIGHTNING_RESUME_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


class ResumableSampler(DistributedSampler):
    """``(index, seed)`` keys of one rank's share of an epoch, from a given batch on.

    Args:
        indices: The epoch's dataset indices for this rank; its order must depend only on
            its ``set_epoch`` value (``DistributedSampler``, `RepeatAugDistributedSampler`).
        seed: The run's seed; the per-sample seeds derive from (seed, epoch, rank, position).
        rank: This process's global rank.
        batch_size: Samples per batch (batches are never partial: the loader drops the last).
        batches_done: Called when an epoch's iteration starts: how many batches of it are
            already trained (non-zero only after a mid-epoch resume).

    It is a ``DistributedSampler`` so that Lightning keeps it under DDP instead of wrapping
    it: `indices` already shards by rank.
    """

    def __init__(
        self,
        indices: DistributedSampler,
        seed: int,
        rank: int,
        batch_size: int,
        batches_done: Callable[[], int] = lambda: 0,
    ) -> None:
        # DistributedSampler.__init__ is not called: it would need a process group; the
        # attributes Lightning and users read are set here.
        self.indices = indices
        self.dataset = indices.dataset
        self.num_replicas = indices.num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = True
        self.drop_last = False
        self.epoch = 0
        self.batch_size = batch_size
        self.batches_done = batches_done

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.indices.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(self.indices)
        seeds = derive_seeds(len(order), self.seed, self.epoch, self.rank)
        start = min(self.batches_done() * self.batch_size, len(order))
        for position in range(start, len(order)):
            yield order[position], int(seeds[position])


class SeededSamples(Dataset):
    """`dataset` read with `ResumableSampler` keys: each sample's randomness is its own seed's.

    An ``(index, seed)`` key seeds Python's `random`, numpy and torch's CPU generator with
    ``seed``, then returns ``dataset[index]``; a plain index (e.g. from the sequential
    sampler Lightning swaps in for ``overfit_batches``) is passed through. The global RNGs are
    not put back afterwards (saving numpy's state costs more than the seeding): in the main
    process (``num_workers=0``) the training step re-seeds them before it draws anything.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            index, seed = key
            seed_cpu(seed)
            return self.dataset[index]
        return self.dataset[key]


class ResumableDataLoader(DataLoader):
    """A DataLoader whose iterator is created at the first batch request, not on ``iter()``.

    Lightning calls ``iter()`` on the train loader while it sets up, before it restores a
    checkpoint's loop position and sets the sampler's epoch; worker processes would start
    drawing indices from the sampler right then. Deferring the iterator lets the sampler see
    the resumed epoch and position. Everything else is the plain DataLoader.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Lightning tells a loader resumable by its state_dict/load_state_dict, and warns on
        # a mid-epoch resume without them that the results are unreliable; this one resumes
        # from the loop position instead, so the warning is wrong for it.
        warnings.filterwarnings("ignore", message=_LIGHTNING_RESUME_WARNING)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        yield from super().__iter__()
