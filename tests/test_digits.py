"""The learning check's fixed pieces, fast (the check itself: tests/test_learning.py, -m learning)."""
import numpy as np
import pytest

from reproduce.engine import EngineError
from reproduce.engine.digits import split_indices
from reproduce.engine.recipe import RecipeError, load_recipe


def test_the_digits_split_is_fixed_stratified_and_disjoint():
    from sklearn.datasets import load_digits

    targets = load_digits().target
    train, val = split_indices(targets)
    again = split_indices(targets)
    assert (len(train), len(val)) == (1438, 359)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not set(train) & set(val) and len(set(train) | set(val)) == len(targets)
    assert all(abs((targets[val] == k).sum() - 0.2 * (targets == k).sum()) <= 0.5 for k in range(10))
    assert not np.array_equal(val, split_indices(targets, seed=1)[1])


def test_learn_scale_is_the_row_at_a_tiny_width_on_digits():
    recipe = load_recipe("recipes/riformer/table3/affine_label_free_soft.yaml", scale="learn")
    assert recipe["scale"] == "learn" and recipe["data"]["digits"] and recipe["model"]["num_classes"] == 10
    assert recipe["model"]["name"] == "riformer_s12" and recipe["model"]["kwargs"]["layers"] == [1, 1, 1, 1]
    assert recipe["distill"]["type"] == "soft" and recipe["distill"]["use_label"] is False  # the row's own
    assert recipe["learn_threshold"] == 90.0
    with pytest.raises(RecipeError, match="scale must be one of full, smoke, learn"):
        load_recipe("recipes/riformer/base.yaml", scale="tiny")


def test_a_learn_run_refuses_a_random_teacher():
    """Smoke runs may distil from random teachers; a learn run must be given the trained one."""
    from types import SimpleNamespace

    import torch

    from reproduce.engine.train import build_models

    recipe = load_recipe("recipes/riformer/table3/affine_label_free_soft.yaml", scale="learn")
    run = SimpleNamespace(recipe=recipe, ctx=SimpleNamespace(device=torch.device("cpu")))
    with pytest.raises(EngineError, match="needs trained weights: set `distill.teacher.checkpoint:`"):
        build_models(run)
