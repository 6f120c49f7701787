"""One loader for every checkpoint path, official layouts, released weights and result provenance.

Official layouts come from tests/fixtures/official_layouts/<family>.json: key names and shapes
dumped from each release's own model code (no code of theirs is here). A test writes random
tensors in that layout, wrapped as the release wraps them, and loads them through
`reproduce eval`, the teacher path and `timm.create_model(checkpoint_path=)`: strict, exact.
"""
import argparse
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import riformer  # noqa: F401
import timm
from helpers import attach_evidence, one_thread  # noqa: F401
from reproduce import provenance, runner, weights
from reproduce.cli import main
from reproduce.engine.data import make_generated_dataset
from reproduce.engine.distill import build_teacher
from reproduce.registry import load_table
from riformer.checkpoints import CheckpointError, load_checkpoint, load_model

FIXTURES = Path(__file__).parent / "fixtures" / "official_layouts"
# The larger models (5-15 s each here) run under `make test-slow`; every layout runs there.
SLOW = {"lvvit_tl", "repaswin", "pvt", "sit", "gfnet", "vig", "swin_mlp", "caformer"}
LAYOUTS = [pytest.param(p.stem, marks=pytest.mark.slow) if p.stem in SLOW else p.stem
           for p in sorted(FIXTURES.glob("*.json"))]
CLASSES = 2  # the fixtures' 1000-class heads are written with 2 rows, to match the generated data


def official_file(family, folder, classes=CLASSES, seed=0):
    """A file in the release's layout and wrapping, random values; (path, fixture)."""
    fixture = json.loads((FIXTURES / f"{family}.json").read_text())
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in fixture["keys"].items():
        shape = [classes if d == 1000 else d for d in shape]
        if key.endswith(("num_batches_tracked", "relative_position_index")):
            state[key] = torch.zeros(shape, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.02
    wrapping = fixture["wrapping"]
    obj = {"plain": state, "model": {"model": state},
           "mmpretrain": {"meta": {"mmpretrain_version": "1.0.0rc7"}, "state_dict": state},
           "deit": {"model": state, "epoch": 299, "args": argparse.Namespace(model="x", lr=4e-3, output_dir="out"),
                    "optimizer": {"state": {}, "param_groups": []}}}[wrapping]
    path = Path(folder) / f"{family}.pth"
    torch.save(obj, path)
    return path, fixture



@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_generated_dataset(tmp_path_factory.mktemp("data"), classes=CLASSES, images_per_class=2,
                                  image_size=32)


@pytest.mark.parametrize("family", LAYOUTS)
def test_official_layout_loads_on_every_path(family, tmp_path, tiny_data):
    path, fixture = official_file(family, tmp_path)
    name = fixture["model"]
    # timm.create_model(checkpoint_path=): strict, through the family's layouts
    via_timm = timm.create_model(name, num_classes=CLASSES, checkpoint_path=str(path)).eval()
    # the loader itself, reporting the layout it recognised
    report = load_checkpoint(timm.create_model(name, num_classes=CLASSES), path)
    assert report.layout == fixture["layout"] and not report.missing and not report.unexpected
    # a distillation teacher (and init_from: the same load_into)
    recipe = {"path": str(tmp_path / "recipe.yaml"), "scale": "full",
              "distill": {"teacher": {"model": name, "checkpoint": str(path)}}}
    teacher = build_teacher(recipe, "distill.teacher", CLASSES, "teacher", random_ok=False)
    for (key, a), b in zip(via_timm.state_dict().items(), teacher.state_dict().values()):
        assert torch.equal(a, b), key
    # reproduce eval, which writes the cell's result.json with its provenance
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["eval", name, "--checkpoint", str(path), "--data", str(tiny_data),
                                       "--num-classes", str(CLASSES), "--img-size", str(via_timm.pretrained_cfg
                                       ["input_size"][-1]), "--batch-size", "4", "--workers", "0",
                                       "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{fixture['layout']} layout" in result.output
    written = json.loads((out / "result.json").read_text())
    assert written["weights"]["sha256"] == provenance.file_sha256(path) and written["data"]["images"] == 4


@pytest.mark.parametrize("family", ["convformer", pytest.param("caformer", marks=pytest.mark.slow)])
def test_authors_metaformer_file_gets_the_authors_head_norm(family, tmp_path):
    """sail-sg/metaformer's MlpHead norm is nn.LayerNorm(eps=1e-5) (metaformer_baselines.py MlpHead);
    timm's port builds it with 1e-6. No weight holds eps: loading the authors' file sets theirs (float64
    logits then agree to ~1e-14 with their code, docs/weights.md); timm's own hub layout keeps timm's."""
    path, fixture = official_file(family, tmp_path)
    assert load_model(fixture["model"], path, num_classes=CLASSES).head.fc.norm.eps == 1e-5
    via_timm = timm.create_model(fixture["model"], num_classes=CLASSES, checkpoint_path=str(path))
    assert via_timm.head.fc.norm.eps == 1e-5
    hub_layout = tmp_path / "timm_layout.pth"
    torch.save(via_timm.state_dict(), hub_layout)
    assert load_model(fixture["model"], hub_layout, num_classes=CLASSES).head.fc.norm.eps == 1e-6


def test_a_planted_key_fault_is_refused(tmp_path):
    """The fit is strict: drop one tensor of an official file, or give it a wrong shape."""
    path, fixture = official_file("riformer", tmp_path)
    obj = torch.load(path, weights_only=False)
    obj["state_dict"].pop("backbone.network.2.1.norm2.weight")
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=r"open-mmlab/mmpretrain layout.*1 missing.*network\.2\.1\.norm2"):
        load_model("riformer_s12", path, num_classes=CLASSES)


def _with_extras(family, folder):
    """An official file plus what releases carry beside the model's tensors: DeiT-style files a
    second 'model_ema' entry and a distillation head/token, mmcv's EMAHook its `ema_*` buffers."""
    path, fixture = official_file(family, folder)
    obj = torch.load(path, weights_only=False)
    state = obj["state_dict"] if fixture["wrapping"] == "mmpretrain" else obj.get("model", obj)
    weights = dict(state)
    if fixture["wrapping"] == "mmpretrain":
        state.update({"ema_" + k.replace(".", "_"): v + 1 for k, v in weights.items()})
        dropped = "ema_backbone_patch_embed_proj_weight"
    else:
        state.update({"head_dist.weight": torch.zeros(CLASSES, 8), "head_dist.bias": torch.zeros(CLASSES),
                      "dist_token": torch.zeros(1, 1, 8)})
        dropped = "head_dist.{weight,bias}, dist_token"
        if fixture["wrapping"] == "deit":
            obj["model_ema"] = {k: v + 1 for k, v in weights.items()}
    torch.save(obj, path)
    return path, fixture, dropped


@pytest.mark.parametrize("family", ["riformer", "repavit", "poolformer", "sit_teacher"])
def test_extra_keys_of_a_release_are_dropped_and_named_in_one_line(family, tmp_path, caplog):
    path, fixture, dropped = _with_extras(family, tmp_path)
    (tmp_path / "plain").mkdir()
    plain, _ = official_file(family, tmp_path / "plain")
    with caplog.at_level("WARNING", logger="riformer.checkpoints"):
        model = load_model(fixture["model"], path, num_classes=CLASSES)
    lines = [r.getMessage() for r in caplog.records if r.name == "riformer.checkpoints"]
    assert len(lines) == 1 and "\n" not in lines[0] and dropped in lines[0] and fixture["layout"] in lines[0]
    assert model.checkpoint_report.unexpected
    reference = load_model(fixture["model"], plain, num_classes=CLASSES)  # the model's tensors, not the EMA's
    for (key, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("fault", ["missing", "misshaped", "inside_a_module"])
def test_extras_do_not_excuse_a_missing_or_misshaped_key(fault, tmp_path):
    path, fixture, _ = _with_extras("riformer", tmp_path)
    obj = torch.load(path, weights_only=False)
    key = "backbone.network.2.1.norm2.weight"
    if fault == "missing":
        obj["state_dict"].pop(key)
    elif fault == "misshaped":
        obj["state_dict"][key] = torch.zeros(3)
    else:  # a tensor of a module the model has, under a name it has not: another architecture
        obj["state_dict"]["backbone.network.2.1.norm3.weight"] = torch.zeros(3)
    torch.save(obj, path)
    expect = {"missing": "1 missing.*network\\.2\\.1\\.norm2", "misshaped": "network\\.2\\.1\\.norm2.* is \\(3,\\)",
              "inside_a_module": "unexpected"}[fault]
    with pytest.raises(CheckpointError, match=expect):
        load_model("riformer_s12", path, num_classes=CLASSES)


def test_train_form_release_folds_for_deploy_and_forms_are_recognised(tmp_path):
    path, _ = official_file("riformer", tmp_path)
    train = load_model("riformer_s12", path, num_classes=CLASSES)
    folded = load_model("riformer_s12", path, form="deploy", num_classes=CLASSES)
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(train(x), folded(x), atol=1e-5)
    deploy_file = tmp_path / "deploy.pt"
    torch.save(folded.state_dict(), deploy_file)
    assert torch.equal(load_model("riformer_s12", deploy_file, form="deploy", num_classes=CLASSES)(x), folded(x))
    with pytest.raises(CheckpointError, match="holds the deploy form of riformer_s12.*--deploy"):
        load_model("riformer_s12", deploy_file, num_classes=CLASSES)
    with pytest.raises(CheckpointError, match="holds the train form of riformer_s12"):
        load_checkpoint(folded, path)


def test_sit_student_from_teacher_only_when_asked(tmp_path):
    path, _ = official_file("sit_teacher", tmp_path)
    with pytest.raises(CheckpointError, match="missing"):
        timm.create_model("sit_ti", num_classes=CLASSES, checkpoint_path=str(path))
    student = timm.create_model("sit_ti", num_classes=CLASSES)
    from riformer.sit import STUDENT_ONLY
    report = load_checkpoint(student, path, allow_missing=STUDENT_ONLY)
    assert report.missing and all(k.startswith(STUDENT_ONLY) for k in report.missing)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "pickled_module", "other_architecture", "empty"])
def test_bad_checkpoints_are_one_line_errors(kind, tmp_path, tiny_data):
    path = tmp_path / "bad.pth"
    if kind in ("truncated", "other_architecture"):
        good, _ = official_file("pvt" if kind == "other_architecture" else "poolformer", tmp_path)
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2] if kind == "truncated" else data)
    elif kind == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 100)
    elif kind == "pickled_module":
        torch.save(torch.nn.Linear(2, 2), path)
    else:
        torch.save({}, path)
    expected = {"truncated": "not a complete PyTorch checkpoint", "garbage": "not a",
                "pickled_module": "pickled Python objects", "other_architecture": "another architecture",
                "empty": "not a state dict"}[kind]
    with pytest.raises(CheckpointError, match=expected):
        load_model("poolformer_v1_s12", path, num_classes=CLASSES)
    result = CliRunner().invoke(main, ["eval", "poolformer_v1_s12", "--checkpoint", str(path), "--data",
                                       str(tiny_data), "--num-classes", str(CLASSES), "--workers", "0"])
    assert result.exit_code == 1 and expected in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


# --- provenance and acceptance --------------------------------------------------------------------

def _result(spec_id="riformer-6", row="poolformer_s12", column=None, images=50000, classes=1000, path=None, **kw):
    weights_path = path
    result = {"schema": provenance.SCHEMA, "table": spec_id, "row": row, "column": column, "top1": 77.2, "top5": 93.5,
            "model": kw.get("model", "poolformer_v1_s12"), "form": kw.get("form", "train"),
            "img_size": kw.get("img_size", 224), "scale": "full",
            "run_dir": kw.get("run_dir", f"{spec_id}/{row}" + (f"--{column}" if column else "")),
            "weights": {"path": str(weights_path), "sha256": provenance.file_sha256(weights_path)},
            "data": {"root": "/imagenet", "split": "validation", "images": images, "classes": classes},
            # sail-sg/poolformer default_cfgs poolformer_s crop_pct 0.9: resize 248, crop 224 (the manifest's)
            "transform": kw.get("transform", {"resize": 248, "crop": 224, "interpolation": "bicubic",
                                              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})}
    attach_evidence(result, Path(weights_path).parent)  # beside it, as `reproduce eval` writes it
    return result


def test_acceptance_refuses_what_does_not_belong_to_the_cell(tmp_path):
    spec = load_table("riformer-6")
    row, column = spec.rows["poolformer_s12"], spec.columns["top1"]
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"weights")

    def check(result):
        return provenance.accept(spec, row, column, result, "poolformer_v1_s12", "train", folder=tmp_path)

    assert check(_result(path=ckpt)) == (77.2, None)
    assert "not of riformer-6/poolformer_s12" in check(_result(row="poolformer_s24", path=ckpt))[1]
    assert "not ImageNet-1k val" in check(_result(images=16, classes=4, path=ckpt))[1]
    assert "evaluated sit_ti" in check(_result(path=ckpt, model="sit_ti"))[1]
    assert "no provenance" in check({"top1": 1.0, "scale": "full"})[1]
    # the planted fault: the release evaluated with another transform (resize 256 instead of 248) is refused
    other = {"resize": 256, "crop": 224, "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
             "std": [0.229, 0.224, 0.225]}
    assert "resize 256 / crop 224" in check(_result(path=ckpt, transform=other))[1]
    assert "resize 248 / crop 224" in check(_result(path=ckpt, transform=other))[1]
    assert "no recorded transform" in check(_result(path=ckpt, transform=None))[1]
    ckpt.write_bytes(b"other weights")
    assert "sha256 differs" in check(_result(path=tmp_path / "w.pth") | {"weights": {
        "path": str(ckpt), "sha256": "0" * 64}})[1]


def test_sit_tables_need_one_run_per_cell(tmp_path):
    spec = load_table("sit-6")
    # ratio 1 is the unslimmed LV-ViT-Ti teacher: one run (its recipe) fills both columns
    assert spec.run_name("ratio_1", "top1_frd") == spec.run_name("ratio_1", "top1_hard") == "ratio_1"
    assert spec.run_name("ratio_0_75", "top1_frd") != spec.run_name("ratio_0_75", "top1_hard")
    row, column = spec.rows["ratio_0_75"], spec.columns["top1_hard"]
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"w")
    result = _result("sit-6", "ratio_0_75", None, path=ckpt, model="sit_ti")
    assert "needs its own run" in provenance.accept(spec, row, column, result, "sit_ti", "train", tmp_path)[1]
    result["column"] = "top1_frd"
    assert "needs its own run" in provenance.accept(spec, row, column, result, "sit_ti", "train", tmp_path)[1]
    result = _result("sit-6", "ratio_0_75", "top1_hard", path=ckpt, model="sit_ti")
    assert provenance.accept(spec, row, column, result, "sit_ti", "train", tmp_path) == (77.2, None)


def test_manifest_api():
    release = weights.release_of("riformer-6", "riformer_s12")
    assert release.project == "open-mmlab/mmpretrain" and release.form == "train"
    assert ("riformer-6", "riformer_s12") in weights.cells_of(release.name)
    assert weights.transform_of(release)["resize"] == 248
    assert "IN-21k" in weights.why_none("riformer-6", "mlp_mixer_b16")
    assert weights.transform_of(weights.release_of("riformer-6", "deit_s"))["crop"] == 224  # from timm's cfg


def top1_cells(results):
    import pandas as pd

    cells = pd.read_csv(next(Path(results).rglob("riformer-6.csv")), dtype=str, keep_default_na=False)
    return cells[cells.column == "top1"].set_index("row")


def test_table_with_released_weights_end_to_end(tmp_path, monkeypatch):
    """Three families' official files in DIR: evaluated, then refused (generated data is not
    ImageNet-1k val); with the test-only override of the val counts the cells fill."""
    monkeypatch.setattr(runner, "RUNS_DIR", tmp_path / "runs")
    import reproduce.engine.cells as engine_cells
    monkeypatch.setattr(engine_cells, "RUNS", tmp_path / "runs")
    folder = tmp_path / "weights"
    folder.mkdir()
    for family, release in (("poolformer", "poolformer_s12"), ("pvt", "pvt_small"), ("gfnet", "gfnet_h_ti")):
        path, _ = official_file(family, tmp_path, classes=1000)
        path.rename(folder / weights.releases()[release].local_name)
    data = make_generated_dataset(tmp_path / "gen", classes=2, images_per_class=2, image_size=32)
    args = ["table", "riformer-6", "--columns", "accuracy", "--weights", str(folder), "--data", str(data),
            "--results-dir", str(tmp_path / "results"), "--quiet"]
    monkeypatch.setattr(weights, "EVAL_WORKERS", 0)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "evaluated 3 row(s)" in result.output
    cells = top1_cells(tmp_path / "results")
    assert cells.loc["pvt_small", "status"] == "pending" and "not ImageNet-1k val" in cells.loc["pvt_small", "note"]
    monkeypatch.setattr(provenance, "IMAGENET_VAL", {"images": 4, "classes": 2})
    result = CliRunner().invoke(main, args[:4] + args[8:])  # the same table, without re-evaluating
    cells = top1_cells(tmp_path / "results")
    assert result.exit_code == 0, result.output
    for row, file in (("poolformer_s12", "poolformer_s12.pth.tar"), ("pvt_small", "pvt_small.pth"),
                      ("gfnet_h_ti", "gfnet-h-ti.pth")):
        assert cells.loc[row, "status"] != "pending" and f"released weights {file}" in cells.loc[row, "note"], \
            cells.loc[row, "note"]
    assert cells.loc["riformer_s12", "status"] == "pending"


def test_published_checksum_is_verified(tmp_path):
    release = weights.release_of("riformer-6", "riformer_s12")
    (tmp_path / release.local_name).write_bytes(b"not the published file")
    with pytest.raises(weights.WeightsError, match="not the published 6741ce71"):
        weights.find(release, tmp_path)


def test_download_without_network_is_one_line(tmp_path):
    with pytest.raises(weights.WeightsError, match="cannot download poolformer_s12"):
        weights.download(weights.releases()["poolformer_s12"], tmp_path)
