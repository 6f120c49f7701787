"""SiT training: FRD terms by hand, heads and optimizer groups, init from the teacher, token labeling,
every SiT recipe's smoke run, resume, bad input. Tiny models on CPU."""
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

import riformer  # noqa: F401  (before timm)
import riformer.sit
from reproduce.engine import EngineError
from reproduce.engine import frd, token_labeling
from reproduce.engine import train as engine
from reproduce.engine.recipe import RecipeError, load_recipe
from reproduce.registry import RECIPES, load_table

from helpers import kill_at_step, one_thread  # noqa: F401  (autouse fixture)

SIT = RECIPES / "sit"
SIT_RECIPES = sorted(p for p in SIT.rglob("*.yaml") if p.name != "base.yaml")
TINY = dict(img_size=64, embed_dim=32, depth=4, num_heads=2)
DETERMINISTIC = {"model": {"kwargs": {"drop_path_rate": 0.0}},
                 "data": {"no_aug": True, "mixup": 0.0, "cutmix": 0.0, "re_prob": 0.0, "label_smoothing": 0.0,
                          "repeated_aug": False}}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    from reproduce.engine.data import make_generated_dataset

    return str(make_generated_dataset(tmp_path_factory.mktemp("data"), classes=4, images_per_class=8, image_size=40))


def write_recipe(folder: Path, fields: dict, base=SIT / "sit_ti.yaml", name="recipe.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump({"base": str(base), **fields}))
    return path


def build(path, data, output, **overrides):
    return engine.build(load_recipe(path, scale="smoke"), data, Path(output), engine.distributed.setup())


# --- FRD by hand ---------------------------------------------------------------------------------

def tiny_students():
    torch.manual_seed(0)
    student = timm.create_model("sit_ti_dist", num_classes=5, stage_depths=(1, 1, 1, 1), **TINY).double().train()
    teacher = timm.create_model("lvvit_ti", num_classes=5, **TINY).double().eval()
    cnn = timm.create_model("regnety_160", num_classes=5, depth=6, w0=8, wa=8.0, wm=1.5, group_size=8).double().eval()
    for p in student.tsm.parameters():  # TSM scale 1 and small weights hide mistakes: perturb them
        p.data.add_(torch.randn_like(p) * 0.3)
    return student, teacher, cnn


def hand_recovered_tokens(student, x):
    """SiT's student forward written out: blocks, TSM after each stage, RTSM after every block."""
    t = student.embed(x)
    out = []
    for i, block in enumerate(student.blocks):
        t = block(t)
        if i in student.slim_after:
            t = torch.cat([t[:, :2], student.tsm[student.slim_after.index(i)](t[:, 2:])], dim=1)
        out.append(student.rtsm[i](t[:, 2:]))
    t = student.norm(t)
    return student.head(t[:, 0]), student.head_dist(t[:, 1]), out


def test_frd_terms_equal_the_hand_computation_in_float64():
    student, teacher, cnn = tiny_students()
    x, y = torch.randn(3, 3, 64, 64, dtype=torch.float64), torch.tensor([0, 3, 4])
    cfg = {"lambda_token": 2.0, "lambda_logits": 2.0, "lambda_hard": 1.0, "tau": 1.0}
    loss = frd.FRDLoss(cfg, label_smoothing=0.0, pairs=frd.block_pairs(4, 4, "same"))
    out = frd.FRDStudent(student, [0, 1, 2, 3], torch.nn.ModuleList())(x)
    t_logits, t_tokens = frd.teacher_outputs(teacher, x, student.grid_size, True)
    total, terms = loss.compute(out, y, t_logits, t_tokens, cnn(x))

    # by hand, from the modules
    z_cls, z_dist, rec = hand_recovered_tokens(student, x)
    t = teacher.embed(x)
    teacher_tokens = []
    for block in teacher.blocks:
        t = block(t)
        teacher_tokens.append(t[:, 1:])
    z_t = teacher.head(teacher.norm(t)[:, 0])
    l_cls = -torch.log_softmax(z_cls, -1)[torch.arange(3), y].mean()
    l_token = sum(((s - u) ** 2).sum() / s.numel() for s, u in zip(rec, teacher_tokens)) / 4  # Eq. 6, official mean
    p_t = torch.softmax(z_t, -1)
    l_logits = (p_t * (torch.log(p_t) - torch.log_softmax(z_cls, -1))).sum() / 3  # KL(teacher || student)
    l_hard = -torch.log_softmax(z_dist, -1)[torch.arange(3), cnn(x).argmax(-1)].mean()
    for name, value in (("cls", l_cls), ("token", l_token), ("logits", l_logits), ("hard", l_hard)):
        assert torch.allclose(terms[name], value, rtol=1e-12, atol=0), name
    assert l_token > 0 and l_logits > 0
    assert torch.allclose(total, l_cls + 2 * l_token + 2 * l_logits + 1 * l_hard, rtol=1e-12, atol=0)


def test_hard_term_reaches_the_distillation_head_only():
    student, teacher, cnn = tiny_students()
    x, y = torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.tensor([1, 2])
    loss = frd.FRDLoss({"lambda_token": 2.0, "lambda_logits": 2.0, "lambda_hard": 1.0}, 0.0, frd.block_pairs(4, 4, "same"))
    out = frd.FRDStudent(student, [0, 1, 2, 3], torch.nn.ModuleList())(x)
    _, terms = loss.compute(out, y, *frd.teacher_outputs(teacher, x, student.grid_size, True), cnn(x))
    heads = [student.head.weight, student.head_dist.weight]
    hard = torch.autograd.grad(terms["hard"], heads, retain_graph=True, allow_unused=True)
    soft = torch.autograd.grad(terms["cls"] + terms["logits"], heads, allow_unused=True)
    assert hard[0] is None and hard[1].abs().sum() > 0          # L_hard: distillation head, not class head
    assert soft[0].abs().sum() > 0 and soft[1] is None          # L_cls, L_logits: class head only


def test_block_pairs():
    assert frd.block_pairs(4, 4, "same") == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert frd.block_pairs(16, 24, "uniform")[:3] == [(0, 1), (1, 2), (2, 4)] and frd.block_pairs(16, 24, "uniform")[-1] == (15, 23)
    assert frd.block_pairs(16, 4, "uniform") == [(3, 0), (7, 1), (11, 2), (15, 3)]


# --- optimization and initialization (through the engine, as a run builds them) ------------------

STUDENT_RECIPES = [p for p in SIT_RECIPES if "teachers" not in p.parts and p.name != "sit_ti_paper_lr.yaml"]


@pytest.mark.parametrize("path", STUDENT_RECIPES, ids=lambda p: str(p.relative_to(SIT)))
def test_sit_students_train_at_the_official_scripts_lr(path):
    # exp/*/train.sh --lr 2e-4, main.py x batch/512, RTSM x5: 4e-4 / 2e-3 at batch 1024 (not the
    # paper's batch/1024 formula, which is sit_ti_paper_lr.yaml)
    recipe = load_recipe(path)
    lr, recalibration_lr = engine.peak_lrs(recipe)
    assert recipe["batch_size"] == 1024
    assert lr == pytest.approx(4e-4, rel=1e-12)
    if recipe["optimizer"].get("recalibration_lr_base") is not None:
        assert recalibration_lr == pytest.approx(2e-3, rel=1e-12)


def test_paper_lr_variant_is_the_formula_of_sec_4_1():
    lr, recalibration_lr = engine.peak_lrs(load_recipe(SIT / "sit_ti_paper_lr.yaml"))
    assert (lr, recalibration_lr) == pytest.approx((2e-4, 1e-3), rel=1e-12)


def test_sit_l_trains_with_gradient_checkpointing_as_official(tmp_path, generated):
    # models/lvvit.py: sit_lvvit_large(..., with_cp=True); the other students without
    assert build(SIT / "sit_l.yaml", generated, tmp_path / "l").model.grad_checkpointing is True
    assert build(SIT / "sit_ti.yaml", generated, tmp_path / "ti").model.grad_checkpointing is False


@pytest.mark.parametrize("student, teacher", [("sit_ti", "lvvit_ti"), ("sit_l", "lvvit_l")])
def test_teacher_recipe_trains_the_shape_and_resolution_its_student_copies(student, teacher):
    # SiT-Ti copies a 320-wide, 14-deep LV-ViT-Ti (not TL's 240-wide lvvit_t); SiT-L an 18x18-grid LV-ViT-L
    s_recipe, t_recipe = load_recipe(SIT / f"{student}.yaml"), load_recipe(SIT / "teachers" / f"{teacher}.yaml")
    assert s_recipe["frd"]["teacher"]["model"] == t_recipe["model"]["name"] == teacher
    assert s_recipe["data"]["img_size"] == t_recipe["data"]["img_size"]
    assert t_recipe["token_labeling"]["label_size"] == t_recipe["data"]["img_size"] // 16
    with torch.device("meta"):
        s_model = timm.create_model(student, img_size=s_recipe["data"]["img_size"])
        t_model = timm.create_model(teacher, img_size=t_recipe["data"]["img_size"])
    assert (s_model.embed_dim, len(s_model.blocks), s_model.pos_embed.shape) == \
        (t_model.embed_dim, len(t_model.blocks), t_model.pos_embed.shape)


def test_recalibration_branch_trains_at_five_times_the_lr(tmp_path, generated):
    run = build(SIT / "sit_ti.yaml", generated, tmp_path)
    groups = {g["name"]: g for g in run.optimizer.param_groups}
    assert groups["recalibration"]["lr"] == pytest.approx(5 * groups["backbone"]["lr"])
    assert (groups["backbone"]["lr"], groups["recalibration"]["lr"]) == pytest.approx(engine.peak_lrs(run.recipe))
    assert groups["backbone_no_decay"]["lr"] == groups["backbone"]["lr"] and groups["backbone_no_decay"]["weight_decay"] == 0
    names = {id(p): n for n, p in run.model.named_parameters()}
    recal = {names[id(p)] for p in groups["recalibration"]["params"]}
    assert recal == {n for n, p in run.model.named_parameters() if n.startswith("rtsm.")} and recal
    every = [names[id(p)] for g in groups.values() for p in g["params"]]
    assert len(every) == len(set(every)) and not any(n.startswith("aux_head") for n in every)  # frozen, as official
    assert not any(p.requires_grad for p in run.model.aux_head.parameters())


def test_student_starts_from_its_teacher_tensor_by_tensor(tmp_path, generated):
    run = build(SIT / "sit_ti.yaml", generated, tmp_path)
    student, teacher = run.model.state_dict(), run.objective.teacher.state_dict()
    new = [k for k in student if k.startswith(("tsm.", "rtsm."))]
    shared = [k for k in student if k not in new]
    assert new and set(shared) == set(teacher)  # every teacher tensor has its place in the student
    for key in shared:
        assert torch.equal(student[key], teacher[key]), key


# --- token labeling ------------------------------------------------------------------------------

def test_token_targets_by_hand():
    """A whole-image box and a label grid equal to the map: RoIAlign samples the cell centres exactly."""
    h = w = 4
    scores = torch.rand(2, 5, h, w) * 5
    classes = torch.stack([torch.randperm(6)[:5] for _ in range(2 * h * w)]).reshape(2, h, w, 5).permute(0, 3, 1, 2)
    packed = torch.stack([token_labeling.pack_target(torch.stack([scores[b], classes[b].float()]),
                                                     torch.tensor([0., 0., 1., 1.]), 3) for b in range(2)])
    cls, tokens = token_labeling.dense_targets(packed, 6, label_size=4, smoothing=0.1)
    dense = torch.zeros(2, 6, h, w).scatter_(1, classes, scores)
    want = torch.softmax(dense, 1).flatten(2).transpose(1, 2) * (1 - 0.1 + 0.1 / 6) + 0.1 / 6
    assert torch.allclose(tokens, want, atol=1e-6)
    assert torch.allclose(cls, torch.softmax(dense.mean((2, 3)), 1) * (1 - 0.1 + 0.1 / 6) + 0.1 / 6, atol=1e-6)


def test_roi_align_equals_torchvision_reference():
    import sys

    import torchvision.ops  # noqa: F401

    reference = sys.modules["torchvision.ops.roi_align"]._roi_align.__wrapped__  # torchvision's python kernel
    maps = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    rois = torch.tensor([[0, -0.5, -0.5, 6.5, 5.5], [1, 0.3, 1.2, 3.1, 2.0], [1, 2.2, -0.3, 6.4, 5.4]],
                        dtype=torch.float64)
    for size in ((1, 1), (4, 4), (3, 5)):
        ours = token_labeling.roi_align(maps, rois, size)
        assert torch.allclose(ours, reference(maps, rois, 1.0, size[0], size[1], -1, False), atol=1e-12)


def test_mix_token_logits_are_swapped_back():
    """Without blocks every patch logit depends on its own patch: after MixToken and the swap back,
    image b's patch logits are exactly its unmixed ones."""
    model = timm.create_model("lvvit_ti", num_classes=4, img_size=64, embed_dim=32, depth=0, num_heads=2).eval()
    x = torch.randn(3, 3, 64, 64)
    _, plain = model.forward_dense(x)
    _, mixed = model.forward_dense(x, mix_box=(1, 0, 3, 2))
    assert torch.allclose(plain, mixed, atol=1e-6)
    _, no_swap = model.forward_dense(x[[2, 1, 0]])
    grid = no_swap.reshape(3, 4, 4, 4)
    assert not torch.allclose(plain.reshape(3, 4, 4, 4)[0, 1:3, 0:2], grid[0, 1:3, 0:2])  # the box did mix


@pytest.mark.parametrize("op, args", [("Rotate", (17.0,)), ("ShearX", (0.23,)), ("ShearY", (-0.27,)),
                                      ("TranslateXRel", (0.31,)), ("TranslateYRel", (-0.21,))])
def test_label_map_follows_the_image_augmentation(op, args):
    """An image whose pixels carry their label cell's index, moved by timm's op: the warped map
    names the same cell at (almost) every cell centre."""
    from PIL import Image
    from timm.data.auto_augment import NAME_TO_OP

    h, w, k = 6, 8, 9
    index = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)
    label = torch.cat([torch.ones(1, 5, h, w), index.expand(1, 5, h, w)])
    pixels = index[0, 0].repeat_interleave(k, 0).repeat_interleave(k, 1).numpy().astype("int32")
    img = NAME_TO_OP[op](Image.fromarray(pixels, mode="I"), *args, resample=Image.NEAREST, fillcolor=-1)
    moved = torch.from_numpy(__import__("numpy").array(img))[k // 2::k, k // 2::k].float()
    warped = token_labeling.warp_label_map(label, token_labeling._pil_affine(op, args, w * k, h * k), w * k, h * k)
    inside = warped[0, 0] > 0
    same = torch.where(inside, warped[1, 0] == moved, moved < 0)  # same cell, or outside in both
    assert same.float().mean() > 0.9 and inside.float().mean() < 1  # (cells on a boundary may differ)


def test_missing_label_maps_are_one_line(tmp_path, generated):
    path = write_recipe(tmp_path, {"token_labeling": {"label_root": str(tmp_path / "maps")}},
                        base=SIT / "teachers" / "lvvit_ti.yaml")
    recipe = load_recipe(path, scale="smoke")
    recipe["token_labeling"]["label_root"] = str(tmp_path / "maps")
    from reproduce.engine.data import build_dataset

    images = build_dataset(recipe["data"], generated, "train", True, 64, 0.9)
    token_labeling.make_generated_label_maps(images, tmp_path / "maps", 4)
    victim = token_labeling.label_map_path(tmp_path / "maps", images.reader.samples[5][0])
    victim.unlink()
    with pytest.raises(EngineError) as err:
        engine.build(recipe, generated, tmp_path / "run", engine.distributed.setup())
    message = one_line(err)
    assert "missing for 1 of 32" in message and str(victim) in message


# --- every SiT recipe's smoke run ----------------------------------------------------------------

@pytest.mark.parametrize("path", SIT_RECIPES, ids=lambda p: str(p.relative_to(SIT)))
def test_every_sit_recipe_builds_its_row_and_trains_a_step(tmp_path, generated, path):
    """The recipe's own student and teachers at smoke size: build, one optimizer step, finite terms."""
    recipe = load_recipe(path, scale="smoke")
    run = engine.build(recipe, generated, tmp_path, engine.distributed.setup())
    assert type(run.model).__name__ == timm.create_model(recipe["model"]["name"], num_classes=4,
                                                         **recipe["model"]["kwargs"]).__class__.__name__
    images, targets = next(iter(run.train_loader))
    run.model.train()
    terms = engine.training_step(run, images, targets)
    assert all(math.isfinite(v) for v in terms.values())
    frd_cfg = recipe.get("frd", {})
    if frd_cfg.get("enabled"):
        for term in ("token", "logits", "hard"):  # a term runs exactly when its lambda is set
            assert (terms[term] != 0) == bool(frd_cfg.get(f"lambda_{term}")), term
        assert type(run.objective.teacher).__name__ if run.objective.teacher is not None else True
    else:
        assert terms["dense"] > 0 and terms["cls"] > 0  # token labeling


@pytest.mark.parametrize("path", ["sit_ti.yaml", "sit_ti_dist.yaml", "teachers/lvvit_ti.yaml",
                                  "table5/fine_tuning_structure_regnet.yaml"])
def test_smoke_run_end_to_end(tmp_path, generated, path):
    result = engine.train(load_recipe(SIT / path, scale="smoke"), data=generated, output=tmp_path, info={"command": "x"})
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["top1"] == result["top1"] and saved["scale"] == "smoke"
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in log] == [0, 1]
    if path.startswith("sit"):
        assert (tmp_path / "model_deploy.pt").exists()
        assert not any(k.startswith("rtsm.") for k in torch.load(tmp_path / "model_deploy.pt"))


@pytest.mark.slow  # ~2-4 s each on 2 cores; the fast test above builds and steps every recipe
@pytest.mark.parametrize("path", SIT_RECIPES, ids=lambda p: str(p.relative_to(SIT)))
def test_every_sit_recipe_smoke_run_end_to_end(tmp_path, generated, path):
    engine.train(load_recipe(path, scale="smoke"), data=generated, output=tmp_path, info={"command": "x"})
    assert json.loads((tmp_path / "result.json").read_text())["scale"] == "smoke"


def test_killed_sit_run_resumes_to_the_same_weights(tmp_path, generated, monkeypatch):
    # random augmentation, mixup and repeated augmentation on; a teacher evaluated at the start; hint projections
    path = write_recipe(tmp_path, {"smoke": {"epochs": 3, "steps_per_epoch": 2}},
                        base=SIT / "table5" / "fine_tuning_structure_regnet.yaml")
    recipe = load_recipe(path, scale="smoke")
    engine.train(recipe, data=generated, output=tmp_path / "straight")
    real_step = kill_at_step(engine, monkeypatch, 4)  # second step of the second epoch
    with pytest.raises(KeyboardInterrupt):
        engine.train(recipe, data=generated, output=tmp_path / "killed")
    monkeypatch.setattr(engine, "training_step", real_step)
    engine.train(recipe, data=generated, output=tmp_path / "killed", resume=True)
    straight, resumed = torch.load(tmp_path / "straight" / "model.pt"), torch.load(tmp_path / "killed" / "model.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert ckpt["objective"]  # the hint projections resume too
    straight_ckpt = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(straight_ckpt["objective"][k], ckpt["objective"][k]) for k in ckpt["objective"])


# --- bad input -----------------------------------------------------------------------------------

def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_teacher_of_the_wrong_width(tmp_path, generated):
    path = write_recipe(tmp_path, {"smoke": {"frd": {"teacher": {"kwargs": {"embed_dim": 48}}}}})
    with pytest.raises(RecipeError) as err:
        build(path, generated, tmp_path / "run")
    message = one_line(err)
    assert str(path) in message and "frd.teacher.model" in message and "width 48" in message and "width 32" in message


def test_teacher_of_the_wrong_architecture_for_init(tmp_path, generated):
    path = write_recipe(tmp_path, {"frd": {"lambda_token": 0.0}, "model": {"kwargs": {"recalibration": False}},
                                   "optimizer": {"recalibration_lr_base": None},
                                   "smoke": {"frd": {"teacher": {"kwargs": {"depth": 5}}}}})
    with pytest.raises(EngineError) as err:
        build(path, generated, tmp_path / "run")
    assert "cannot initialize the student" in one_line(err) and "lvvit_ti" in str(err.value)


def test_student_checkpoint_without_tsm(tmp_path, generated):
    teacher_weights = tmp_path / "teacher.pth"
    torch.save(timm.create_model("lvvit_ti", num_classes=4, **TINY).state_dict(), teacher_weights)
    path = write_recipe(tmp_path, {"model": {"init_from": str(teacher_weights)}})
    with pytest.raises(EngineError) as err:
        build(path, generated, tmp_path / "run")
    message = one_line(err)
    assert str(teacher_weights) in message and "TSM" in message and "init_from: teacher" in message


def test_timm_loader_refuses_a_student_checkpoint_without_tsm(tmp_path):
    student = timm.create_model("sit_ti", num_classes=4, stage_depths=(1, 1, 1, 1), **TINY)
    state = {k: v for k, v in student.state_dict().items() if not k.startswith("tsm.")}
    torch.save(state, tmp_path / "no_tsm.pth")
    with pytest.raises(ValueError, match=r"does not fit sit_ti: .* first missing tsm\."):  # the model function's loader
        riformer.sit.sit_ti(num_classes=4, stage_depths=(1, 1, 1, 1), checkpoint_path=str(tmp_path / "no_tsm.pth"), **TINY)


@pytest.mark.parametrize("fields, named", [
    ({"frd": {"lambda_hard": 1.0}}, "frd.lambda_hard"),                               # no distillation head
    ({"model": {"kwargs": {"recalibration": False}}}, "frd.lambda_token"),            # no RTSM for L_token
    ({"frd": {"lambda_token": 0.0}}, "model.kwargs.recalibration"),                   # an RTSM nothing trains
])
def test_lambda_for_a_term_the_model_cannot_produce(tmp_path, generated, fields, named):
    path = write_recipe(tmp_path, fields)
    with pytest.raises(RecipeError) as err:
        build(path, generated, tmp_path / "run")
    message = one_line(err)
    assert str(path) in message and named in message


def test_distilled_student_without_lambda_hard(tmp_path, generated):
    path = write_recipe(tmp_path, {"frd": {"lambda_hard": 0.0}}, base=SIT / "sit_ti_dist.yaml")
    with pytest.raises(RecipeError) as err:
        build(path, generated, tmp_path / "run")
    assert "frd.lambda_hard" in one_line(err) and "distillation head" in str(err.value)


# --- the tables name runnable recipes -----------------------------------------------------------

def test_every_sit_accuracy_cell_names_a_recipe_that_exists():
    from reproduce.registry import table_ids

    for table_id in [t for t in table_ids() if t.startswith("sit-")]:
        spec = load_table(table_id)
        for ref in spec.reference.itertuples():
            column, row = spec.columns[ref.column], spec.rows[ref.row]
            if column.kind != "accuracy" or row.cited or ref.reported in ("-", "–"):
                continue
            recipe = spec.recipe_of(row.id, column.id)
            if recipe is None:  # other papers' released weights: filled by `reproduce eval`
                assert ref.column in row.recipes or row.model not in (None,) or "reproduce eval" in \
                    row.cell_notes.get(column.id, ""), (table_id, row.id, column.id)
                continue
            assert (RECIPES / recipe).is_file(), (table_id, row.id, column.id, recipe)
            if recipe.startswith("sit/") and row.model and not column.model_from and column.id not in row.recipes:
                assert load_recipe(RECIPES / recipe)["model"]["name"] == row.model, (table_id, row.id)
