"""The learning check's data: scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes,
shipped inside the package) written as an ImageFolder of PNGs upscaled to 32 px, so that a
`--scale learn` run goes through the suite's real dataset, transforms and loaders.

The train/validation split is fixed: a seeded stratified shuffle (seed 0, 20 % validation), so
every run, machine and CI job sees the same 1,438 training and 359 validation images."""
from __future__ import annotations

from pathlib import Path

import numpy as np

DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2


def split_indices(targets: np.ndarray, seed: int = DIGITS_SPLIT_SEED, val_fraction: float = DIGITS_VAL_FRACTION):
    """(train, validation) indices: per class, a seeded permutation whose first share is validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for k in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == k))
        cut = int(round(len(members) * val_fraction))
        val.extend(members[:cut])
        train.extend(members[cut:])
    return np.sort(train), np.sort(val)


def make_digits_dataset(root, image_size: int = 32, seed: int = DIGITS_SPLIT_SEED) -> Path:
    """Write `root/{train,validation}/digit_<k>/<index>.png` (RGB, `image_size` px, nearest-neighbour
    upscaling of the 8x8 scans' 0-16 grey levels to 0-255). Does nothing if the folder is complete."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    done = root / ".complete"
    if done.exists():
        return root
    digits = load_digits()
    images, targets = digits.images, digits.target
    for split, indices in zip(("train", "validation"), split_indices(targets, seed)):
        for i in indices:
            folder = root / split / f"digit_{targets[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            grey = (images[i] * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
            Image.fromarray(grey).resize((image_size, image_size), Image.NEAREST).convert("RGB").save(
                folder / f"{i:04d}.png")
    done.touch()
    return root
