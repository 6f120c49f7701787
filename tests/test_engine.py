"""The training engine at smoke scale: recipes, loss, resume, bad input. Tiny runs on CPU."""
import errno
import json
from pathlib import Path

import pytest
import torch

import riformer  # noqa: F401  (before timm)
from reproduce.engine import EngineError, checkpoint
from reproduce.engine import train as engine
from reproduce.engine.recipe import RecipeError, load_recipe

import helpers
from helpers import generated, kill_at_step, one_thread  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "recipes" / "riformer" / "base.yaml"

# deterministic: no random augmentation, no mixup, no stochastic depth
DETERMINISTIC = {
    "model": {"kwargs": {"drop_path_rate": 0.0}},
    "data": {"no_aug": True, "mixup": 0.0, "cutmix": 0.0, "re_prob": 0.0, "label_smoothing": 0.0},
}


def write_recipe(folder: Path, fields: dict, name="recipe.yaml", base=BASE) -> Path:
    return helpers.write_recipe(folder, fields, base, name)


# --- recipes ---------------------------------------------------------------------------------

def test_recipe_inherits_and_smoke_overrides(tmp_path):
    path = write_recipe(tmp_path, {"optimizer": {"weight_decay": 0.01}, "smoke": {"epochs": 1}})
    full, smoke = load_recipe(path), load_recipe(path, scale="smoke")
    assert full["optimizer"]["weight_decay"] == 0.01 and full["optimizer"]["name"] == "adamw"  # merged
    assert full["epochs"] == 120 and full["data"]["img_size"] == 224
    assert smoke["epochs"] == 1 and smoke["data"]["img_size"] == 32  # own smoke, then base's smoke


@pytest.mark.parametrize("fields, named", [
    ({"optimizer": {"weight_decy": 0.1}}, "optimizer.weight_decy"),
    ({"epochs": "many"}, "epochs"),
    ({"distill": {"type": "medium"}}, "distill.type"),
    ({"smoke": {"data": {"img_sise": 8}}}, "smoke.data.img_sise"),
])
def test_recipe_errors_name_field_and_file(tmp_path, fields, named):
    path = write_recipe(tmp_path, fields)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert named in message and str(path) in message and "\n" not in message


# --- training --------------------------------------------------------------------------------

def test_loss_falls_on_a_fixed_batch(tmp_path, generated):
    recipe = load_recipe(write_recipe(tmp_path, {**DETERMINISTIC, "schedule": {"warmup_epochs": 0},
                                                 "optimizer": {"lr_base": 1.0e-3}}), scale="smoke")
    run = engine.build(recipe, generated, tmp_path, engine.distributed.setup())
    images, targets = next(iter(run.train_loader))
    run.model.train()
    losses = [engine.training_step(run, images, targets)["loss"] for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0], losses


def family_recipes():
    """One recipe per RIFormer training family (the tables' recipes use the same code paths)."""
    return {
        "ce": "table1/pooling_ce_loss.yaml",
        "soft_no_label": "table2/identity_label_free_soft.yaml",
        "hard_with_label": "table3/affine_label_hard.yaml",
        "affine_imitation": "table4/feat80_rel20_layer4.yaml",
        "teacher_init": "table7/affine_module_imitation.yaml",
    }


@pytest.mark.parametrize("family", list(family_recipes()))
def test_smoke_run_of_every_family(tmp_path, generated, family):
    path = ROOT / "recipes" / "riformer" / family_recipes()[family]
    result = engine.train(load_recipe(path, scale="smoke"), data=generated, output=tmp_path, info={"command": "x"})
    assert result["scale"] == "smoke" and 0 <= result["top1"] <= 100
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["top1"] == result["top1"] and saved["data"]["root"] == generated
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in log] == list(range(result["epochs"]))
    if family == "affine_imitation":  # the row's feat 80 / rel 20 of 120 epochs -> 8 / 2 of 12 at smoke scale
        assert log[1]["rel"] > 0 and log[1]["in"] > 0 and log[1]["out"] > 0
        assert log[1]["lambda_rel"] == pytest.approx(log[1]["rel"] * 1.0)  # Table 10's 1.0, as printed
        assert log[2]["rel"] == 0 and log[7]["in"] > 0
        assert "in" not in log[8]  # its epochs are over: no more hooks, no more teacher
    assert ("teacher_top1" in saved) == (family != "ce")  # Table 5 prints the teacher's accuracy too
    assert (tmp_path / "model_deploy.pt").exists() == result["model"].startswith("riformer")
    assert saved["top1_train"] == saved["top1_deploy"] == saved["top1"]  # the fold is exact
    # the last epoch's per-image evidence, both forms: the numbers derive from it
    from reproduce import evidence

    found, rows, reason = evidence.derive(tmp_path, saved)
    assert reason is None and found["images"] == len(rows) == 16 and found["top1"] == saved["top1"]
    assert all(evidence.class_of(image) == f"class_{target}" for image, target, _ in rows)
    found, _, reason = evidence.derive(tmp_path, saved, "evidence_deploy", {"top1_deploy": saved["top1_deploy"]})
    assert reason is None and found["top1"] == saved["top1_deploy"]


def test_killed_run_resumes_to_the_same_weights(tmp_path, generated, monkeypatch):
    fields = {"smoke": {"epochs": 3, "steps_per_epoch": 2}}  # random augmentation and mixup stay on
    recipe = load_recipe(write_recipe(tmp_path, fields), scale="smoke")
    engine.train(recipe, data=generated, output=tmp_path / "straight")

    real_step = kill_at_step(engine, monkeypatch, 4)  # second step of the second epoch
    with pytest.raises(KeyboardInterrupt):
        engine.train(recipe, data=generated, output=tmp_path / "killed")
    monkeypatch.setattr(engine, "training_step", real_step)
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    engine.train(recipe, data=generated, output=tmp_path / "killed", resume=True)

    straight = torch.load(tmp_path / "straight" / "model.pt")
    resumed = torch.load(tmp_path / "killed" / "model.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    log = [json.loads(line)["epoch"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert log == [0, 1, 2]


# --- bad input -------------------------------------------------------------------------------

def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_full_scale_without_data_names_the_option(tmp_path):
    with pytest.raises(EngineError) as err:
        engine.train(load_recipe(BASE), data=None, output=tmp_path)
    assert "--data" in one_line(err)


def test_missing_data_path(tmp_path):
    with pytest.raises(EngineError) as err:
        engine.train(load_recipe(BASE, scale="smoke"), data=str(tmp_path / "imagenet"), output=tmp_path)
    assert str(tmp_path / "imagenet") in one_line(err)


def test_class_count_mismatch(tmp_path, generated):
    path = write_recipe(tmp_path, {"smoke": {"model": {"num_classes": 10}}})
    with pytest.raises(EngineError) as err:
        engine.train(load_recipe(path, scale="smoke"), data=generated, output=tmp_path)
    message = one_line(err)
    assert "4 classes" in message and "10" in message and "num_classes" in message


def test_teacher_checkpoint_of_wrong_architecture(tmp_path, generated):
    import timm

    wrong = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", num_classes=4).state_dict(), wrong)
    path = write_recipe(tmp_path, {"distill": {"type": "soft"},
                                   "smoke": {"distill": {"teacher": {"checkpoint": str(wrong)}}}})
    with pytest.raises(EngineError) as err:
        engine.train(load_recipe(path, scale="smoke"), data=generated, output=tmp_path / "run")
    message = one_line(err)
    assert str(wrong) in message and "architecture" in message


def test_full_disk_during_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    checkpoint.save_torch({"epoch": 1}, target)

    def fills_the_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", fills_the_disk)
    with pytest.raises(EngineError) as err:
        checkpoint.save_torch({"epoch": 2}, target)
    message = one_line(err)
    assert "No space left" in message and str(target) in message and "intact" in message
    monkeypatch.undo()
    assert torch.load(target)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


@pytest.mark.parametrize("terminal", [True, False])
def test_train_shows_one_bar_and_prints_each_epoch(tmp_path, generated, monkeypatch, capfd, terminal):
    """On a terminal: one progress bar, the running epoch's (a finished epoch's bar is gone, its line
    printed). Piped: no bar at all, the same per-epoch lines."""
    from rich.console import Console

    monkeypatch.setattr(Console, "is_terminal", property(lambda self: terminal))
    shown, original = [], engine.train_one_epoch

    def recording(run, progress):
        losses = original(run, progress)
        shown.append((progress.disable, len(progress.tasks)))
        return losses

    monkeypatch.setattr(engine, "train_one_epoch", recording)
    result = engine.train(load_recipe(BASE, scale="smoke"), data=generated, output=tmp_path)
    assert shown == [(not terminal, 0)] * result["epochs"]
    import re

    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", capfd.readouterr().out)  # the bar's colours and cursor moves
    printed = re.findall(r"epoch (\d+)/(\d+)  loss [0-9.]+  top1 [0-9.]+", out)
    assert printed == [(str(e + 1), str(result["epochs"])) for e in range(result["epochs"])]
