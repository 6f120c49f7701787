"""The learning check (docs/training.md, "Learning check"): tiny-width models of the recipes
(`--scale learn`) trained through `reproduce.engine.train.train` on sklearn's handwritten digits
(real images, engine/digits.py) reach each recipe's `learn_threshold` on the fixed validation split,
and a planted bug (shuffled labels, a flipped distillation sign) makes the same check fail.

Minutes on 2 cores, so out of `make test`: `python -m pytest -q -m learning --runlearning`
(its own step in .ci/run)."""
import shutil
from pathlib import Path

import pytest

from reproduce.engine import distill
from reproduce.engine.digits import make_digits_dataset
from reproduce.engine.recipe import load_recipe
from reproduce.engine.train import train

pytestmark = pytest.mark.learning
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
IMITATION = "riformer/table4/feat80_rel20_layer4.yaml"  # module imitation (4 layers) + label-free soft KD


def learn(recipe_path, output, data, teacher=None):
    """Train RECIPE at learn scale on DATA (the distillation/imitation teacher's weights: TEACHER)."""
    recipe = load_recipe(RECIPES / recipe_path, scale="learn")
    for where in ("distill", "imitation"):
        if teacher is not None and where in recipe:
            recipe[where]["teacher"]["checkpoint"] = str(teacher)
    result = train(recipe, data=str(data), output=output)
    return recipe["learn_threshold"], result


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_digits_dataset(tmp_path_factory.mktemp("digits"), image_size=32)


@pytest.fixture(scope="module")
def poolformer_teacher(digits, tmp_path_factory):
    """The tiny PoolFormer of Table 1's CE row, trained first: every teacher of the checks below."""
    output = tmp_path_factory.mktemp("teacher")
    threshold, result = learn("riformer/table1/pooling_ce_loss.yaml", output, digits)
    assert result["top1"] >= threshold, f"the PoolFormer teacher reaches only {result['top1']:.2f}"
    return output / "model.pt"


def test_riformer_ce_learns_and_its_fold_keeps_the_accuracy(digits, tmp_path):
    threshold, result = learn("riformer/base.yaml", tmp_path, digits)
    print(f"RIFormer CE: top-1 {result['top1_train']:.2f} trained, {result['top1_deploy']:.2f} folded")
    assert result["top1"] >= threshold
    assert result["deploy_form"] and abs(result["top1_deploy"] - result["top1_train"]) <= 0.2


def test_planted_shuffled_labels_fail_the_check(digits, tmp_path):
    """The same run on a copy of the data whose training images sit under permuted class folders."""
    import numpy as np

    shuffled = tmp_path / "shuffled"
    shutil.copytree(digits / "validation", shuffled / "validation")
    rng = np.random.default_rng(1)
    files = sorted((digits / "train").glob("*/*.png"))
    labels = rng.permutation([f.parent.name for f in files])
    for f, label in zip(files, labels):
        (shuffled / "train" / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, shuffled / "train" / label / f.name)
    threshold, result = learn("riformer/base.yaml", tmp_path / "run", shuffled)
    assert result["top1"] < threshold - 50  # chance is 10 %


@pytest.mark.parametrize("recipe", ["riformer/table3/affine_label_free_soft.yaml",
                                    "riformer/table3/affine_label_free_hard.yaml", IMITATION])
def test_riformer_distillation_learns_from_a_trained_teacher(recipe, digits, poolformer_teacher, tmp_path):
    """Label-free: the teacher is the only target, so the student learns only if distillation (and
    module imitation, which adds to it) works."""
    threshold, result = learn(recipe, tmp_path, digits, poolformer_teacher)
    print(f"{recipe}: top-1 {result['top1']:.2f} (teacher {result.get('teacher_top1')})")
    assert result["top1"] >= threshold
    assert abs(result["top1_deploy"] - result["top1_train"]) <= 0.2


def test_planted_flipped_distillation_sign_fails_the_check(digits, poolformer_teacher, tmp_path, monkeypatch):
    original = distill.soft_distillation
    monkeypatch.setattr(distill, "soft_distillation", lambda s, t, tau: -original(s, t, tau))
    threshold, result = learn("riformer/table3/affine_label_free_soft.yaml", tmp_path, digits, poolformer_teacher)
    assert result["top1"] < threshold - 50


def test_repaformer_learns_and_its_fold_keeps_the_trained_batchnorm(digits, tmp_path):
    threshold, result = learn("repaformer/repa_poolformer_s12.yaml", tmp_path, digits)
    print(f"RePa-PoolFormer: top-1 {result['top1_train']:.2f} trained, {result['top1_deploy']:.2f} folded")
    assert result["top1"] >= threshold
    assert result["deploy_form"] and abs(result["top1_deploy"] - result["top1_train"]) <= 0.2


def test_planted_fold_that_ignores_batchnorm_statistics_fails(digits, tmp_path, monkeypatch):
    """A fold without the running statistics is exact on fresh BatchNorms (mean 0, var 1), so only a
    trained model shows it: train() must refuse the deploy form."""
    import torch

    from reproduce.engine import EngineError
    from riformer import repa

    def scale_shift_without_statistics(bn):
        return bn.weight / torch.sqrt(torch.ones_like(bn.running_var) + bn.eps), bn.bias

    monkeypatch.setattr(repa, "_bn_scale_shift", scale_shift_without_statistics)
    with pytest.raises(EngineError, match="folded model does not compute what the trained one does"):
        learn("repaformer/repa_poolformer_s12.yaml", tmp_path, digits)


def test_planted_flipped_imitation_sign_fails_the_check(digits, poolformer_teacher, tmp_path, monkeypatch):
    from reproduce.engine import EngineError
    from reproduce.engine.imitation import ModuleImitation

    original = ModuleImitation.loss

    def flipped(self, epoch):
        total, logged = original(self, epoch)
        return -total, logged

    monkeypatch.setattr(ModuleImitation, "loss", flipped)
    try:
        threshold, result = learn(IMITATION, tmp_path, digits, poolformer_teacher)
    except EngineError as err:  # the flipped relation term diverges: the run stops on a non-finite loss
        assert "loss is" in str(err)
        return
    assert result["top1"] < threshold - 50
