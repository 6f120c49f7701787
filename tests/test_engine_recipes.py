"""The suite's recipes as data and at their configurations: inheritance rules, smoke runs that build
each row's own teachers, the dry run (one step at full size) and its planted errors, the fold check
at the end of training, and the RePaFormer recipes behind every table that names them."""
import json
import math
from pathlib import Path

import pytest
import timm
import torch
import yaml

import riformer  # noqa: F401  (before timm)
from reproduce.engine import EngineError
from reproduce.engine import train as engine
from reproduce.engine.dryrun import cache_key, cached_outcome, dry_run, recipe_files
from reproduce.engine.imitation import ModuleImitation
from reproduce.engine.recipe import RecipeError, load_recipe
from reproduce.registry import RECIPES, load_table

from helpers import generated, one_thread  # noqa: F401  (fixtures)
from helpers import write_recipe as write

RIFORMER = RECIPES / "riformer"




@pytest.fixture(autouse=True)
def own_dry_run_cache(tmp_path, monkeypatch):
    from reproduce.engine import dryrun

    monkeypatch.setattr(dryrun, "CACHE_DIR", tmp_path / "dryrun-cache")


# --- recipes as data ------------------------------------------------------------------------------

def test_every_recipe_loads_at_both_scales():
    paths = recipe_files()
    assert len(paths) > 80 and any("repaformer" in str(p) for p in paths)
    for path in paths:
        load_recipe(path), load_recipe(path, scale="smoke")


def test_kwargs_belong_to_their_model(tmp_path):
    """Table 9's students once inherited RIFormer's layer_scale_init_value and crashed at build."""
    for path in sorted((RIFORMER / "table9").glob("affine*.yaml")):
        model = load_recipe(path)["model"]
        assert "layer_scale_init_value" not in model["kwargs"], path.name
        timm.create_model(model["name"], num_classes=10, **model["kwargs"])
    same = load_recipe(write(tmp_path, {"model": {"kwargs": {"drop_rate": 0.5}}}, RIFORMER / "base.yaml"))
    assert same["model"]["kwargs"]["layer_scale_init_value"] == 1e-5  # same model: kwargs merge


def test_table4_rows_differ_at_smoke_scale():
    """The imitation epochs follow the row (scaled with the epochs): no two Table 4 rows are one run."""
    seen = {}
    for path in sorted((RIFORMER / "table4").glob("feat*.yaml")):
        recipe = load_recipe(path, scale="smoke")
        im = recipe["imitation"]
        seen[path.stem] = (im["enabled"], tuple(im["layers"]), im["epochs"]["feat"], im["epochs"]["rel"])
    assert len(set(seen.values())) == len(seen) == 8, seen
    assert seen["feat40_rel0_layer6"][2:] == (4, 0) and seen["feat80_rel10_layer6"][2:] == (8, 1)


def test_table5_smoke_builds_each_rows_own_teacher():
    """Reduced, random, but the row's architecture: Swin, Pyramid ViG, GFNet, PoolFormer-M48."""
    expected = {"swin_b_no_mi": "SwinTransformer", "pvig_b_no_mi": "PyramidViG", "gfnet_h_b_no_mi": "GFNet",
                "poolformer_m48_no_mi": "MetaFormerV1"}
    from types import SimpleNamespace

    for row, cls in expected.items():
        recipe = load_recipe(RIFORMER / "table5" / f"{row}.yaml", scale="smoke")
        run = SimpleNamespace(recipe=recipe, ctx=engine.distributed.setup())
        engine.build_models(run)
        assert type(run.teacher).__name__ == cls, row
        assert sum(p.numel() for p in run.teacher.parameters()) < 2e6, row
        run.teacher(torch.randn(2, 3, 32, 32))


def test_lambda_readings(tmp_path):
    student, teacher = (timm.create_model(n, num_classes=4) for n in ("riformer_s12", "poolformer_v1_s12"))
    printed = {"in": 1e-4, "out": 1e-3, "rel": 1.0}
    cfg = {"layers": [1, 3], "lambda_times_batch": printed, "epochs": {"feat": 1, "rel": 1}}
    lam = {r: ModuleImitation(student, teacher, {**cfg, "lambda_reading": r}, 512).lambdas["rel"]
           for r in ("as_printed", "divided_by_batch", "times_batch")}
    assert lam == {"as_printed": 1.0, "divided_by_batch": 1 / 512, "times_batch": 512.0}
    assert ModuleImitation(student, teacher, cfg, 512).lambdas["rel"] == 1.0  # the default reading


def test_imitation_of_token_major_caformer_stages():
    """CAFormer's attention stages run (N, L, C); the student's stages NCHW: compared as tokens."""
    student = timm.create_model("affineformer_s18", num_classes=4)
    teacher = timm.create_model("caformer_s18", num_classes=4)
    cfg = load_recipe(RIFORMER / "table9" / "affine18_caformer_s18.yaml")["imitation"]
    imitation = ModuleImitation(student, teacher, cfg, 512)
    x = torch.randn(2, 3, 64, 64)
    student(x), teacher(x)
    loss, terms = imitation.loss(0)
    assert torch.isfinite(loss) and terms["in"] > 0 and terms["rel"] > 0
    # a teacher imitating itself: every term is zero, also on the token-major stages
    twin = ModuleImitation(teacher, teacher, cfg, 512)
    teacher(x)
    assert all(v == 0 for v in twin.loss(0)[1].values())


# --- the dry run --------------------------------------------------------------------------------

def small(path: Path, tmp_path: Path, name="recipe.yaml", **fields) -> Path:
    """A planted variant of a real recipe, at 64 px so that the test stays quick."""
    return write(tmp_path, {"data": {"img_size": 64}, **fields}, path, name)


def test_dry_run_passes_and_caches(tmp_path):
    path = small(RECIPES / "repaformer" / "repa_poolformer_s12.yaml", tmp_path)
    outcome = dry_run(path)
    assert outcome.ok, outcome.error
    assert outcome.student == "repa_poolformer_s12" and outcome.img_size == 64 and outcome.fold_error < 1e-4
    assert cached_outcome(path).cached and dry_run(path).cached
    before = cache_key(load_recipe(path))
    path.write_text(path.read_text().replace("img_size: 64", "img_size: 96"))
    assert cache_key(load_recipe(path)) != before and cached_outcome(path) is None


def test_dry_run_of_a_token_labeling_recipe_feeds_it_packed_label_maps(tmp_path):
    """LV-ViT teachers train on token labels: the step gets generated maps through the joint
    transform (before: IndexError in dense_targets, a traceback that stopped `dry-run --all`)."""
    path = small(RECIPES / "sit" / "teachers" / "base.yaml", tmp_path,
                 token_labeling={"label_size": 4}, model={"kwargs": {"depth": 2, "img_size": 64}})
    outcome = dry_run(path)
    assert outcome.ok, outcome.error
    assert outcome.student == "lvvit_s" and math.isfinite(outcome.loss)


def test_a_crash_of_the_suite_is_one_line_and_not_cached(tmp_path, monkeypatch):
    from reproduce.engine import dryrun, token_labeling

    def broken(*args, **kwargs):
        raise IndexError("too many indices for tensor of dimension 1")

    monkeypatch.setattr(token_labeling, "dense_targets", broken)
    path = small(RECIPES / "sit" / "teachers" / "base.yaml", tmp_path,
                 token_labeling={"label_size": 4}, model={"kwargs": {"depth": 2, "img_size": 64}})
    outcome = dry_run(path)
    assert not outcome.ok and "the suite crashed (IndexError" in outcome.error and "\n" not in outcome.error
    assert cached_outcome(path) is None


@pytest.mark.parametrize("fields, field", [
    ({"model": {"kwagrs": {}}}, "model.kwagrs"),                                     # unknown key
    ({"model": {"kwargs": {"layer_scale_init_value": 1e-5}}}, "model.kwargs.layer_scale_init_value"),
    ({"imitation": {"enabled": True, "scheme": "module_imitation", "layers": [1, 3, 9, 11],
                    "teacher": {"model": "poolformer_v1_s24"}}}, "imitation.teacher.model"),
    ({"distill": {"type": "soft", "teacher": {"model": "gfnet_h_bb"}}}, "distill.teacher.model"),
])
def test_planted_recipe_errors_fail_the_dry_run_in_one_line(tmp_path, fields, field):
    base = RIFORMER / "table9" / "affine12_no_teacher.yaml" if "imitation" not in fields else RIFORMER / "base.yaml"
    path = small(base, tmp_path, **fields)
    outcome = dry_run(path)
    assert not outcome.ok
    assert f"`{field}`" in outcome.error and str(path.name) in outcome.error and "\n" not in outcome.error


def test_dry_run_loads_a_teacher_file_and_refuses_the_wrong_one(tmp_path):
    wrong = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", num_classes=1000).state_dict(), wrong)
    path = small(RIFORMER / "base.yaml", tmp_path,
                 distill={"type": "soft", "teacher": {"model": "poolformer_v1_s12", "checkpoint": str(wrong)}})
    outcome = dry_run(path)
    assert not outcome.ok and "`distill.teacher.checkpoint`" in outcome.error and "resnet.pth" in outcome.error


def test_train_dry_run_command(tmp_path):
    from click.testing import CliRunner

    from reproduce.cli import main

    path = small(RECIPES / "repaformer" / "repa_poolformer_s12.yaml", tmp_path)
    result = CliRunner().invoke(main, ["train", "repaformer-1", "repa_poolformer_s12", "--dry-run", "--recipe", str(path)])
    assert result.exit_code == 0, result.output
    assert "repaformer-1/repa_poolformer_s12:" in result.output and "fold exact" in result.output
    bad = small(RIFORMER / "base.yaml", tmp_path, name="bad.yaml", model={"kwargs": {"nope": 1}})
    result = CliRunner().invoke(main, ["dry-run", str(bad)])
    assert result.exit_code == 1 and "`model.kwargs.nope`" in result.output


# --- train and deploy form at the end of training -----------------------------------------------

def test_training_ends_in_both_forms(tmp_path, generated):
    recipe = load_recipe(RECIPES / "repaformer" / "repa_poolformer_s12.yaml", scale="smoke")
    result = engine.train(recipe, data=generated, output=tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["deploy_form"] and saved["top1_train"] == saved["top1_deploy"] == result["top1"]
    assert saved["fold_error"] < 1e-5 and (tmp_path / "run" / "model_deploy.pt").exists()


def test_an_inexact_fold_fails_the_run(tmp_path, generated, monkeypatch):
    """RePaViT's released PoolFormer fold leaves the layer scale off the folded bias; plant that."""
    from riformer.repa import ChannelIdleFFN

    real = ChannelIdleFFN.switch_to_deploy

    def drops_a_bias_scale(self):
        real(self)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, torch.nn.Linear) and module.bias is not None:
                    module.bias.add_(0.5)

    monkeypatch.setattr(ChannelIdleFFN, "switch_to_deploy", drops_a_bias_scale)
    recipe = load_recipe(RECIPES / "repaformer" / "repa_poolformer_s12.yaml", scale="smoke")
    with pytest.raises(EngineError) as err:
        engine.train(recipe, data=generated, output=tmp_path / "run")
    assert "not exact" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "result.json").exists() and (tmp_path / "run" / "model.pt").exists()


# --- RePaFormer tables and their recipes ---------------------------------------------------------

def test_repaformer_rows_train_their_own_model():
    """Every RePaFormer row with a recipe trains that row's model at that row's idle ratio."""
    for table in ("repaformer-1", "repaformer-2", "repaformer-3", "repaformer-4", "repaformer-7", "repaformer-8"):
        spec = load_table(table)
        for row in spec.rows.values():
            if not row.recipe:
                continue
            model = load_recipe(RECIPES / row.recipe)["model"]
            assert model["name"] == row.model, (table, row.id)
            want = row.model_kwargs.get("idle_ratio", 0.75 if row.model.startswith("repa_") else None)
            got = model["kwargs"].get("idle_ratio", 0.75 if row.model.startswith("repa_") else None)
            if not row.model.startswith("repa_lvvit"):
                assert want == got, (table, row.id)


def test_repaformer_table7_settings_match_the_recipes():
    from reproduce.runner import MeasurementCache, TableRun

    spec = load_table("repaformer-7")
    frame = TableRun(spec, "cpu", kinds={"setting"}, cache=MeasurementCache(enabled=False), show_progress=False).run()
    assert len(frame) == 117 and set(frame["status"]) == {"match"}, frame[frame.status != "match"]


def test_a_recipe_without_a_required_field_names_it(tmp_path):
    path = tmp_path / "bare.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "repa_deit_tiny", "num_classes": 10}}))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "epochs" in str(err.value) and str(path) in str(err.value)


@pytest.mark.slow
def test_table4_smoke_logs_differ(tmp_path, generated):
    """The eight Table 4 rows at smoke scale: no two give the same log (they did with fixed epochs)."""
    logs = {}
    for path in sorted((RIFORMER / "table4").glob("feat*.yaml")):
        engine.train(load_recipe(path, scale="smoke"), data=generated, output=tmp_path / path.stem)
        logs[path.stem] = (tmp_path / path.stem / "log.jsonl").read_text()
    assert len(set(logs.values())) == len(logs)


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in recipe_files() if "table9" in str(p) or "table5" in str(p)],
                         ids=lambda p: p.stem)
def test_table5_and_table9_recipes_train_at_smoke_scale(tmp_path, generated, path):
    result = engine.train(load_recipe(path, scale="smoke"), data=generated, output=tmp_path)
    assert result["top1_train"] == result["top1_deploy"]
