"""Random streams as pure functions of where training is, so a resumed run replays them.

Lightning's ``seed_everything`` seeds every process once, identically on every DDP rank, and a
run resumed from a checkpoint starts from that seed again rather than from where the killed
run was. Here randomness is re-seeded from keys instead: the model's per step (`seed_step`:
dropout, drop path, Mixup/CutMix, MixToken boxes) and the data's per sample
(`refiner_pl.data.resume`: augmentation). The keys include the rank, so ranks draw
differently, as timm seeds them (``seed + rank``).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["derive_seed", "derive_seeds", "global_seed", "seed_all", "seed_cpu", "seed_step"]


def global_seed() -> int:
    """The run's seed: the one ``seed_everything`` (the CLI's ``seed_everything``) set, else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def derive_seeds(count: int, *keys: int) -> np.ndarray:
    """`count` independent 64-bit seeds from `keys` (numpy's SeedSequence mixes them)."""
    return np.random.SeedSequence([int(key) for key in keys]).generate_state(count, np.uint64)


def derive_seed(*keys: int) -> int:
    """One 64-bit seed from `keys`: equal keys give equal seeds, any other key another one."""
    return int(derive_seeds(1, *keys)[0])


def seed_all(seed: int) -> None:
    """Seeds Python's `random`, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_step(epoch: int, batch_idx: int, rank: int, base: int | None = None) -> int:
    """Seeds every global RNG for one training step; returns the seed it used."""
    seed = derive_seed(global_seed() if base is None else base, epoch, batch_idx, rank)
    seed_all(seed)
    return seed


def seed_cpu(seed: int) -> None:
    """Seeds Python's `random`, numpy's global RNG and torch's CPU generator (not CUDA's).

    For data pipelines, which run on the CPU: re-seeding CUDA per sample would cost a call
    per device. The training step re-seeds everything itself (`seed_step`), so what a sample
    leaves in the global RNGs of the main process does not carry into the model.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)
