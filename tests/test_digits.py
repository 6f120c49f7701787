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


def test_every_sit_recipe_loads_at_learn_scale_with_its_tiny_teachers():
    """The SiT students and their LV-ViT teachers at learn scale: 32 px, width 64, 4 blocks, digits;
    the student's FRD teacher is its own LV-ViT's learn shape, the ‡ rows' CNN teacher a tiny PoolFormer."""
    from pathlib import Path

    teacher = load_recipe("recipes/sit/teachers/lvvit_ti.yaml", scale="learn")
    assert teacher["token_labeling"]["label_root"] is None and teacher["token_labeling"]["label_size"] == 2
    assert teacher["token_labeling"]["label_teacher"]["model"] == "poolformer_v1_s12"
    shape = {k: teacher["model"]["kwargs"][k] for k in ("img_size", "embed_dim", "depth", "num_heads")}
    for name in ("sit_ti", "sit_ti_dist"):
        student = load_recipe(f"recipes/sit/{name}.yaml", scale="learn")
        assert student["data"]["digits"] and student["data"]["img_size"] == 32 and student["model"]["num_classes"] == 10
        assert {k: student["model"]["kwargs"][k] for k in shape} == shape == student["frd"]["teacher"]["kwargs"]
        assert student["model"]["init_from"] == "teacher"
    assert student["frd"]["cnn_teacher"]["kwargs"] == {"layers": [1, 1, 1, 1], "embed_dims": [16, 32, 64, 128]}
    for path in sorted(Path("recipes/sit").rglob("*.yaml")):  # every one still loads at learn scale
        load_recipe(path, scale="learn")


def test_label_maps_made_by_a_teacher_are_its_dense_scores_in_the_published_format(tmp_path):
    """generate_label.py's maps: the head at every position of the last feature map; on a 1x1 map
    that is exactly the teacher's logits. A learn run names the teacher's file as one it needs."""
    import timm
    import torch
    from timm.data import create_dataset

    from reproduce.engine.data import make_generated_dataset
    from reproduce.engine.dryrun import needed_files
    from reproduce.engine.token_labeling import dense_scores, label_map_path, make_teacher_label_maps

    torch.manual_seed(0)
    teacher = timm.create_model("poolformer_v1_s12", num_classes=10, layers=[1, 1, 1, 1],
                                embed_dims=[16, 32, 64, 128]).eval()
    x = torch.randn(3, 3, 64, 64)
    dense = dense_scores(teacher, x)
    assert dense.shape == (3, 10, 2, 2)
    with torch.no_grad():
        assert torch.allclose(dense_scores(teacher, x[..., :32, :32]).flatten(1), teacher(x[..., :32, :32]), atol=1e-5)
        assert torch.allclose(dense[:, :, 0, 0], teacher.forward_head(teacher.forward_features(x)[:, :, :1, :1]), atol=1e-5)
    root = make_generated_dataset(tmp_path / "data", classes=4, images_per_class=2, image_size=40)
    images = create_dataset("", root=str(root), split="train")
    maps = make_teacher_label_maps(images, tmp_path / "maps", teacher, 64, source="a")
    first = torch.load(label_map_path(maps, images.reader.samples[0][0]))
    assert first.dtype == torch.float16 and first.shape == (2, 5, 2, 2)
    assert (first[0][:-1] >= first[0][1:]).all()  # top-5 scores, best first, of 5 distinct classes
    assert all(len(set(first[1][:, i, j].long().tolist())) == 5 for i in range(2) for j in range(2))
    stamp = (maps / ".complete").stat().st_mtime_ns
    make_teacher_label_maps(images, maps, teacher, 64, source="a")
    assert (maps / ".complete").stat().st_mtime_ns == stamp  # made once per teacher file
    make_teacher_label_maps(images, maps, teacher, 64, source="b")
    assert (maps / ".complete").read_text() == "b"
    recipe = load_recipe("recipes/sit/teachers/lvvit_ti.yaml", scale="learn")
    recipe["token_labeling"]["label_teacher"]["checkpoint"] = "trained/poolformer.pt"
    assert ("token_labeling.label_teacher.checkpoint", "trained/poolformer.pt") in needed_files(recipe)
