"""The learning check (docs/training.md, "Learning check"): tiny-width models of the recipes
(`--scale learn`) trained through `reproduce.engine.train.train` on sklearn's handwritten digits
(real images, engine/digits.py) reach each recipe's `learn_threshold` on the fixed validation split,
and a planted bug (shuffled labels, a flipped distillation sign, a teacher in train mode, token
labels from a shuffled map) makes the same check fail.

The teachers are trained first, on the same data: the tiny PoolFormer (CE), then the tiny LV-ViT by
token labeling on maps that PoolFormer makes, then the SiT student from and distilled by that LV-ViT.

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


def learn(recipe_path, output, data, teacher=None, checkpoints=None, fields=None):
    """Train RECIPE at learn scale on DATA. TEACHER: the distillation/imitation teacher's weights;
    CHECKPOINTS: {teacher section: weights}, e.g. {"frd.teacher": path}; FIELDS: {"a.b": value}."""
    recipe = load_recipe(RECIPES / recipe_path, scale="learn")
    for where in ("distill", "imitation"):
        if teacher is not None and where in recipe:
            recipe[where]["teacher"]["checkpoint"] = str(teacher)
    settings = {**{f"{k}.checkpoint": str(v) for k, v in (checkpoints or {}).items()}, **(fields or {})}
    for field, value in settings.items():
        *sections, last = field.split(".")
        node = recipe
        for section in sections:
            node = node[section]
        node[last] = value
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


# --- SiT: the LV-ViT teacher by token labeling, then the student by FRD ---------------------------

LVVIT = "sit/teachers/lvvit_ti.yaml"   # token labeling (maps made by the trained PoolFormer)
SIT = "sit/sit_ti_dist.yaml"           # SiT-Ti‡: TSM + RTSM, FRD (L_token, L_logits) + L_hard


@pytest.fixture(scope="module")
def lvvit_teacher(digits, poolformer_teacher, tmp_path_factory):
    """The tiny LV-ViT trained first by token labeling; its label maps are made by the PoolFormer."""
    output = tmp_path_factory.mktemp("lvvit")
    threshold, result = learn(LVVIT, output, digits, checkpoints={"token_labeling.label_teacher": poolformer_teacher})
    print(f"LV-ViT (token labeling): top-1 {result['top1']:.2f}")
    assert result["top1"] >= threshold, f"the LV-ViT teacher reaches only {result['top1']:.2f}"
    maps = sorted((output / "teacher-labels").glob("*/*.pt"))
    assert len(maps) == 1438  # one map per training image, in the published (2, 5, h, w) layout
    return output / "model.pt"


def sit_teachers(lvvit_teacher, poolformer_teacher):
    return {"frd.teacher": lvvit_teacher, "frd.cnn_teacher": poolformer_teacher}


class TeacherTargets:
    """The direct check of the teachers' mode: at every step, the FRD targets (the LV-ViT's logits and
    block tokens, the CNN teacher's logits) must equal what the same teachers, loaded afresh from their
    checkpoints in eval mode, give on the same batch. `worst`: the largest relative difference seen."""

    def __init__(self, monkeypatch, lvvit_checkpoint, cnn_checkpoint):
        import torch

        from reproduce.engine import frd
        from reproduce.engine.distill import build_teacher

        recipe = load_recipe(RECIPES / SIT, scale="learn")
        recipe["frd"]["teacher"]["checkpoint"] = str(lvvit_checkpoint)
        recipe["frd"]["cnn_teacher"]["checkpoint"] = str(cnn_checkpoint)
        lvvit = build_teacher(recipe, "frd.teacher", 10, "reference", False)
        cnn = build_teacher(recipe, "frd.cnn_teacher", 10, "reference", False)
        self.worst, self.steps, images = 0.0, 0, {}
        call, compute = frd.FeatureRecalibrationDistillation.__call__, frd.FRDLoss.compute

        def relative(got, want):
            return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))

        def recording_call(objective, train_forward, batch, targets):
            images["batch"] = batch
            return call(objective, train_forward, batch, targets)

        def checking_compute(loss, out, targets, teacher_logits=None, teacher_tokens=(), cnn_logits=None):
            with torch.no_grad():
                logits, tokens = lvvit.forward_block_tokens(images["batch"])
                worst = [relative(teacher_logits, logits), relative(cnn_logits, cnn(images["batch"]))]
                worst += [relative(teacher_tokens[t], tokens[t]) for _, t in loss.pairs]
            self.worst, self.steps = max(self.worst, *worst), self.steps + 1
            return compute(loss, out, targets, teacher_logits, teacher_tokens, cnn_logits)

        monkeypatch.setattr(frd.FeatureRecalibrationDistillation, "__call__", recording_call)
        monkeypatch.setattr(frd.FRDLoss, "compute", checking_compute)


def test_sit_frd_learns_from_its_trained_lvvit(digits, lvvit_teacher, poolformer_teacher, tmp_path, monkeypatch):
    """SiT-Ti‡ started from its LV-ViT and trained by FRD + L_hard; its teachers stay in eval mode
    (the check that the planted train-mode teacher below fails)."""
    targets = TeacherTargets(monkeypatch, lvvit_teacher, poolformer_teacher)
    threshold, result = learn(SIT, tmp_path, digits, checkpoints=sit_teachers(lvvit_teacher, poolformer_teacher))
    print(f"SiT-Ti‡ (FRD + hard): top-1 {result['top1_train']:.2f} trained, {result['top1_deploy']:.2f} deploy "
          f"(teacher {result.get('teacher_top1'):.2f}); targets vs eval-mode teachers {targets.worst:.1e}")
    assert result["top1"] >= threshold
    assert result["deploy_form"] and abs(result["top1_deploy"] - result["top1_train"]) <= 0.2
    assert targets.steps == 4 * (1438 // 32) and targets.worst < 1e-5  # every step (the last partial batch dropped)


def test_planted_flipped_frd_sign_fails_the_check(digits, lvvit_teacher, poolformer_teacher, tmp_path, monkeypatch):
    """L_token and L_logits subtracted instead of added: the student runs away from its teacher."""
    from reproduce.engine import EngineError
    from reproduce.engine import frd

    original = frd.FRDLoss.compute

    def flipped(self, *args, **kwargs):
        total, terms = original(self, *args, **kwargs)
        return total - 2 * sum(self.lambdas[k] * terms[k] for k in ("token", "logits")), terms

    monkeypatch.setattr(frd.FRDLoss, "compute", flipped)
    try:
        threshold, result = learn(SIT, tmp_path, digits, checkpoints=sit_teachers(lvvit_teacher, poolformer_teacher))
    except EngineError as err:  # diverged to a non-finite loss
        assert "loss is" in str(err)
        return
    assert result["top1"] < threshold - 50


def test_planted_teacher_in_train_mode_fails_the_check(digits, lvvit_teacher, poolformer_teacher, tmp_path,
                                                       monkeypatch):
    """A loop that puts every module it holds in train mode each epoch: the LV-ViT's stem BatchNorms
    then normalise with the batch's statistics (and overwrite their running ones), so the targets are
    no longer the trained teacher's."""
    from reproduce.engine import train as engine

    original = engine.train_one_epoch

    def teachers_in_train_mode(run, progress):
        run.objective.teacher.train()
        run.objective.cnn_teacher.train()
        return original(run, progress)

    targets = TeacherTargets(monkeypatch, lvvit_teacher, poolformer_teacher)
    monkeypatch.setattr(engine, "train_one_epoch", teachers_in_train_mode)
    threshold, result = learn(SIT, tmp_path, digits, checkpoints=sit_teachers(lvvit_teacher, poolformer_teacher))
    print(f"teacher in train mode: top-1 {result['top1']:.2f}; targets vs eval-mode teachers {targets.worst:.1e}")
    assert targets.worst > 1e-2


def test_planted_shuffled_label_maps_fail_the_check(digits, poolformer_teacher, tmp_path):
    """The PoolFormer's maps, each moved to another training image: token labeling then learns noise."""
    import numpy as np
    import torch
    from timm.data import create_dataset

    from reproduce.engine.distill import build_teacher
    from reproduce.engine.token_labeling import label_map_path, make_teacher_label_maps

    recipe = load_recipe(RECIPES / LVVIT, scale="learn")
    recipe["token_labeling"]["label_teacher"]["checkpoint"] = str(poolformer_teacher)
    teacher = build_teacher(recipe, "token_labeling.label_teacher", 10, "label-map teacher", False)
    images = create_dataset("", root=str(digits), split="train")
    made = make_teacher_label_maps(images, tmp_path / "maps", teacher, 32)
    paths = [label_map_path(made, path) for path, _ in images.reader.samples]
    maps = [torch.load(p) for p in paths]
    for path, i in zip(paths, np.random.default_rng(1).permutation(len(paths))):
        torch.save(maps[i], path)
    threshold, result = learn(LVVIT, tmp_path / "run", digits, fields={"token_labeling.label_root": str(made)})
    assert result["top1"] < threshold - 50
