"""Atomic checkpoints and the random state that makes `--resume` continue bit for bit."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from reproduce import files
from reproduce.engine import EngineError


def _atomic_write(path: Path, write) -> None:
    """files.atomic_write, with the error a training run can act on."""
    try:
        files.atomic_write(path, write)
    except OSError as err:
        kept = "the previous one is intact" if path.exists() else "no previous one exists"
        raise EngineError(f"could not write {path} ({err.strerror or err}); {kept}: free space in "
                          f"{path.parent} and rerun with --resume") from None


def save_torch(obj, path) -> None:
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def save_json(obj, path) -> None:
    _atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"nothing to resume: {path} does not exist (run without --resume to start)")
    return torch.load(path, map_location="cpu", weights_only=False)
