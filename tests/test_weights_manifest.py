"""The weights manifest (recipes/weights.yaml) against the tables it fills.

Every row with accuracy cells is listed (a release, or why there is none); a release fills only cells
of its own model at its own image size; a column-level release (e.g. one teacher's top-1 per column)
is evaluated into that column's run and fills only that cell.
"""
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import riformer  # noqa: F401
import timm
from helpers import one_thread  # noqa: F401
from reproduce import provenance, runner, weights
from reproduce.cli import main
from reproduce.engine.data import make_generated_dataset
from reproduce.registry import load_table, table_ids

SPECS = {table: load_table(table) for table in table_ids()}


def test_every_accuracy_row_of_every_table_is_in_the_manifest():
    unlisted = {table: weights.unlisted(spec) for table, spec in SPECS.items() if weights.unlisted(spec)}
    assert not unlisted, f"rows with accuracy cells that recipes/weights.yaml does not mention: {unlisted}"


def test_manifest_entries_fit_the_cells_they_fill():
    problems = []
    for table, rows in weights._manifest()["tables"].items():
        spec = SPECS[table]
        for row_id, entry in rows.items():
            where = f"{table}/{row_id}"
            if row_id not in spec.rows:
                problems.append(f"{where}: no such row")
                continue
            row = spec.rows[row_id]
            if isinstance(entry, str):
                release = weights.releases()[entry]
                if (release.model, release.img_size) != (row.model, row.img_size):
                    problems.append(f"{where}: release {entry} is {release.model} at {release.img_size} px, "
                                    f"the row {row.model} at {row.img_size} px")
                if release.port_of:  # a whole-row entry is evaluated as the row's model: another padding's file
                    problems.append(f"{where}: {entry} is a port (its own model): name it per column")
                continue
            folders = {}
            for column_id, release in weights.column_releases(table, row_id).items():
                column = spec.columns.get(column_id)
                if column is None or column.kind != "accuracy":
                    problems.append(f"{where}: {column_id} is not an accuracy column")
                    continue
                model = row.settings.get(column.model_from) if column.model_from else row.model
                if row.model is not None or column.model_from:  # sit-5's teacher row names no model
                    if release.model != model and not (release.port_of == model and _same_tensors(model, release)):
                        problems.append(f"{where}/{column_id}: {release.name} is {release.model}, the cell's "
                                        f"model is {model}")
                if release.img_size != row.img_size:
                    problems.append(f"{where}/{column_id}: {release.name} is not at {row.img_size} px")
                folders.setdefault(spec.run_name(row_id, column_id), set()).add(release.name)
            problems += [f"{where}: {sorted(names)} would write the same run {folder}"
                         for folder, names in folders.items() if len(names) > 1]
    assert not problems, problems


@lru_cache(maxsize=None)
def _same_tensors(model: str, release) -> bool:
    """A port (sit-3: tf_efficientnet_b1 for efficientnet_b1) has every tensor of the row's model, same
    names and shapes: the row's params/MACs stay the row's, the accuracy is the file's own model's."""
    with torch.device("meta"):
        ours, theirs = timm.create_model(model), timm.create_model(release.model)
    return {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_a_port_fills_only_the_row_whose_tensors_it_has(monkeypatch):
    """Planted: tf_efficientnet_b1's file named for B2's row, and a port named for the whole row."""
    import dataclasses

    manifest = dict(weights._manifest())
    tables = {**manifest["tables"], "sit-3": {**manifest["tables"]["sit-3"],
                                              "efficientnet_b2": {"top1": "tf_efficientnet_b1_aa"}}}
    releases = {**manifest["releases"], "tf_efficientnet_b1_aa": dataclasses.replace(
        manifest["releases"]["tf_efficientnet_b1_aa"], img_size=260)}
    monkeypatch.setattr(weights, "_manifest", lambda: {**manifest, "tables": tables, "releases": releases})
    with pytest.raises(AssertionError, match="efficientnet_b2/top1: tf_efficientnet_b1_aa is tf_efficientnet_b1"):
        test_manifest_entries_fit_the_cells_they_fill()
    tables["sit-3"] = {**manifest["tables"]["sit-3"], "efficientnet_b1": "tf_efficientnet_b1_aa"}
    with pytest.raises(AssertionError, match="is a port"):
        test_manifest_entries_fit_the_cells_they_fill()


def test_a_teacher_column_names_the_teacher_its_row_trains_with():
    """riformer-5, sit-2: the model a teacher's top-1 column evaluates is the row recipe's teacher."""
    from reproduce.registry import load_recipe

    checked = 0
    for spec in SPECS.values():
        for column in spec.columns.values():
            if not (column.model_from or "").startswith("teacher"):
                continue
            for row in spec.rows.values():
                if row.recipe and row.settings.get(column.model_from):
                    recipe = load_recipe(row.recipe)
                    teacher = ((recipe.get("distill") or {}).get("teacher") or (recipe.get("frd") or {}).get("teacher")
                               or {})
                    assert teacher.get("model") == row.settings[column.model_from], f"{spec.id}/{row.id}"
                    checked += 1
    assert checked >= 8


def test_every_release_names_a_model_and_a_source():
    for release in weights.releases().values():
        assert timm.is_model(release.model), f"{release.name}: {release.model} is not a registered model"
        if release.timm_tag:
            cfg = timm.models.get_pretrained_cfg(release.timm_tag)
            assert cfg is not None, release.timm_tag
            assert release.timm_tag.split(".")[0] == release.model, release.name
            if release.transform_source.startswith("timm pretrained cfg"):  # written out: it must be the cfg's
                assert weights.transform_of(release) == weights.transform_from_cfg(cfg, release.img_size), release.name
        else:
            assert release.file and release.url.startswith("https://") and release.layout, release.name
            assert release.transform and release.transform_source, f"{release.name}: transform and its source"


@pytest.fixture
def scratch_manifest(tmp_path, monkeypatch):
    """The real manifest with `changes` applied to its tables, read instead of recipes/weights.yaml."""
    def write(**tables):
        data = yaml.safe_load(weights.MANIFEST.read_text())
        data["releases"].update(tables.pop("releases", {}))
        for table, rows in tables.items():
            data["tables"].setdefault(table, {}).update(rows)
        path = tmp_path / "weights.yaml"
        path.write_text(yaml.safe_dump(data))
        monkeypatch.setattr(weights, "MANIFEST", path)
        weights._manifest.cache_clear()

    yield write
    weights._manifest.cache_clear()


def test_a_removed_row_is_reported_unlisted(scratch_manifest):
    data = yaml.safe_load(weights.MANIFEST.read_text())
    first = next(iter(data["tables"]["riformer-6"]))
    scratch_manifest()
    del weights._manifest()["tables"]["riformer-6"][first]
    assert weights.unlisted(SPECS["riformer-6"]) == [first]


def test_a_column_release_fills_only_its_own_cell(tmp_path, monkeypatch, scratch_manifest):
    """sit-5's teacher row: one teacher per column. A release named for the `cait` column is
    evaluated into runs/sit-5/teacher--cait with its own model, and fills that cell alone."""
    monkeypatch.setattr(runner, "RUNS_DIR", tmp_path / "runs")
    import reproduce.engine.cells as engine_cells
    monkeypatch.setattr(engine_cells, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(weights, "EVAL_WORKERS", 0)
    transform = {"resize": 36, "crop": 32, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    scratch_manifest(releases={"stand_in": {"project": "test", "model": "pvig_ti_224", "file": "stand_in.pth",
                                            "url": "https://example.org/stand_in.pth", "layout": "ours",
                                            "transform": transform, "transform_source": "this test"}},
                     **{"sit-5": {"teacher": {"cait": "stand_in", "none": "the others: not in this test"}}})
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(timm.create_model("pvig_ti_224").state_dict(), folder / "stand_in.pth")
    data = make_generated_dataset(tmp_path / "gen", classes=2, images_per_class=2, image_size=32)
    args = ["table", "sit-5", "--columns", "accuracy", "--results-dir", str(tmp_path / "results"), "--quiet"]

    result = CliRunner().invoke(main, args)  # before: the cell's note names the fast path
    cells = _cells(tmp_path / "results", "sit-5")
    assert "released weights stand_in.pth (test)" in cells.loc[("teacher", "cait"), "note"]
    assert "stand_in" not in cells.loc[("teacher", "regnet"), "note"]

    result = CliRunner().invoke(main, args + ["--weights", str(folder), "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "sit-5" / "teacher--cait" / "result.json").is_file()
    assert not (tmp_path / "runs" / "sit-5" / "teacher").exists()
    monkeypatch.setattr(provenance, "IMAGENET_VAL", {"images": 4, "classes": 2})
    CliRunner().invoke(main, args)
    cells = _cells(tmp_path / "results", "sit-5")
    assert cells.loc[("teacher", "cait"), "status"] != "pending"
    assert "released weights stand_in.pth (stand_in)" in cells.loc[("teacher", "cait"), "note"]
    assert (cells.xs("teacher", level="row").drop("cait").status == "pending").all()


def _cells(results, table):
    import pandas as pd

    cells = pd.read_csv(next(Path(results).rglob(f"{table}.csv")), dtype=str, keep_default_na=False)
    return cells.set_index(["row", "column"])


def test_recipes_name_teacher_files_as_their_releases_are_saved():
    """A teacher checkpoint a recipe names is the file `reproduce weights --download` saves (its
    release's name), so a downloaded folder is found by the recipes that use it."""
    from reproduce.engine.dryrun import recipe_files
    from reproduce.engine.recipe import load_recipe

    saved_as = {}
    for release in weights.releases().values():
        saved_as.setdefault(release.model, set()).add(release.local_name)
    wrong = set()
    for path in recipe_files():
        recipe = load_recipe(path)
        for section in ("distill", "frd", "imitation"):
            for teacher in (recipe.get(section) or {}).values():
                if isinstance(teacher, dict) and teacher.get("checkpoint") and teacher.get("model") in saved_as:
                    if Path(teacher["checkpoint"]).name not in saved_as[teacher["model"]]:
                        wrong.add(f"{path.name}: {teacher['checkpoint']} (release: {saved_as[teacher['model']]})")
    assert not wrong, sorted(wrong)


def test_weights_command_lists_every_row_and_what_the_folder_holds(tmp_path, scratch_manifest):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "pvt_small.pth").write_bytes(b"x")                       # no published checksum: found
    (folder / weights.releases()["riformer_s12"].local_name).write_bytes(b"not it")  # fails its checksum
    result = CliRunner().invoke(main, ["weights", "riformer-6", "sit-5", "--weights", str(folder)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()  # piped: plain lines, at most 80 columns but for a URL

    def line(*parts):
        return next((text for text in lines if all(part in text for part in parts)), None)

    assert line("  pvt_small: pvt_small.pth (whai362/PVT): ✓")
    assert line("  riformer_s12: ", "not the published") or line("6741ce71")
    assert line("  teacher/cait: cait_s24_224.fb_dist_in1k.safetensors (timm): missing")
    assert line("  scratch: none: ablation students")   # sit-5: why nothing fills it
    too_wide = [text for text in lines if len(text) > 80]  # only one URL, path or command, kept whole to be copied
    assert all(" " not in text.strip().removeprefix("url: ") or text.strip().startswith("`reproduce ")
               for text in too_wide), too_wide
    scratch_manifest()
    del weights._manifest()["tables"]["sit-5"]["scratch"]
    result = CliRunner().invoke(main, ["weights", "sit-5", "--weights", str(folder)])
    assert "  scratch: not in recipes/weights.yaml" in result.output


def test_each_file_is_listed_with_url_size_top1_and_transform():
    """issue 25: a manual download needs no YAML. Sizes are computed, and say so: RSB-ResNet-50 has
    25,610,205 state-dict elements (timm resnet50: parameters and BatchNorm buffers) -> about 102 MB."""
    result = CliRunner().invoke(main, ["weights", "riformer-6", "--weights", "/nonexistent"])
    block = " ".join(result.output.split("  rsb_resnet50: ")[1].split("\n  rsb_resnet101")[0].split())  # unwrapped
    assert "resnet50.a2_in1k.safetensors (timm): missing" in block
    assert "url: https://huggingface.co/timm/resnet50.a2_in1k" in block
    assert "size: about 102 MB (estimated: 25.61 M float32 elements x 4 bytes)" in block
    assert "top-1: 79.83 (pytorch-image-models results/results-imagenet.csv resnet50.a2_in1k)" in block
    assert "transform: resize 235 / crop 224 / bicubic / mean-std ImageNet" in block
    assert weights.tensor_elements("resnet50") == 25_610_205  # 25,557,032 params + 53,120 BN statistics + 53 counters


def test_download_refuses_share_pages_and_keeps_no_partial_file(tmp_path, monkeypatch):
    with pytest.raises(weights.WeightsError, match="share page, not a file"):
        weights.download(weights.releases()["sit_ti"], tmp_path)
    import io
    import urllib.request

    class Page(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(weights, "_unresolved", lambda url: None)  # as if the host resolved
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Page(b"<!DOCTYPE html><html>sign in</html>"))
    with pytest.raises(weights.WeightsError, match="returned a web page"):
        weights.download(weights.releases()["pvt_small"], tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Page(b"PK\x03\x04 not the published file"))
    with pytest.raises(weights.WeightsError, match="not the published 6741ce71"):
        weights.download(weights.releases()["riformer_s12"], tmp_path)
    assert list(tmp_path.iterdir()) == []


# Releases whose published top-1 is not yet written in the manifest (each still to be read from its source).
TOP1_NOT_RECORDED: set[str] = set()


def filled_cells():
    """(release, table, row, column, printed value) for every reference accuracy cell a release fills."""
    for table in weights.tables():
        spec = SPECS[table]
        printed = {(r, c): v for r, c, v in zip(spec.reference["row"], spec.reference["column"],
                                                 spec.reference["reported"])}
        for row in weights.accuracy_rows(spec):
            for column in spec.columns_of_kind("accuracy"):
                release = weights.release_for_cell(spec, row, column.id)
                if release is not None and (row, column.id) in printed:
                    yield release, table, row, column.id, float(printed[row, column.id])


def test_published_top1_of_each_release_is_the_cell_it_fills():
    """Fixtures: each release's `top1` with its `top1_source` (authors' README / timm's results-imagenet.csv).
    A release mapped to the wrong file (e.g. RSB's 600-epoch a1 for the 300-epoch A2 the table prints:
    a1 76.42/80.38 vs printed 75.5/79.8) is more than the tolerance away."""
    tolerance = weights.top1_tolerance()
    far = [f"{table}/{row}/{column}: {release.name} published {release.top1} ({release.top1_source}), printed {value}"
           for release, table, row, column, value in filled_cells()
           if release.top1 is not None and abs(release.top1 - value) > tolerance]
    assert not far, far
    assert all(r.top1_source for r in weights.releases().values() if r.top1 is not None)
    missing = {n for n, r in weights.releases().items() if r.top1 is None}
    assert missing == TOP1_NOT_RECORDED, f"published top-1 missing for {sorted(missing - TOP1_NOT_RECORDED)}"


def test_rsb_resnets_are_the_300_epoch_a2_weights():
    # timm results-imagenet.csv: a2 75.52/79.83/81.34/81.76 (= printed 75.5/79.8/81.3/81.8); a1 76.42/80.38/81.49/82.00
    tags = {weights.releases()[f"rsb_resnet{d}"].timm_tag for d in (34, 50, 101, 152)}
    assert tags == {f"resnet{d}.a2_in1k" for d in (34, 50, 101, 152)}
    assert weights.transform_of(weights.releases()["rsb_resnet50"])["resize"] == 235  # timm cfg crop_pct 0.95


def test_a_wrong_top1_mapping_is_caught(monkeypatch):
    """The planted fault: RSB-ResNet-50 back on the a1 weights (published 80.38) fails the comparison."""
    import dataclasses

    manifest = dict(weights._manifest())
    manifest["releases"] = {**manifest["releases"], "rsb_resnet50": dataclasses.replace(
        manifest["releases"]["rsb_resnet50"], timm_tag="resnet50.a1_in1k", top1=80.38)}
    monkeypatch.setattr(weights, "_manifest", lambda: manifest)
    with pytest.raises(AssertionError, match="rsb_resnet50"):
        test_published_top1_of_each_release_is_the_cell_it_fills()


# --- the one eval-transform rule -------------------------------------------------------------------

def test_transform_comes_from_the_release_then_timm_cfg_then_flags():
    # manifest: mmpretrain imagenet_bs128_poolformer_medium_224.py ResizeEdge 236 (RIFormer-M36)
    transform, source = weights.resolve_transform("riformer_m36", 224)
    assert transform["resize"] == 236 and "riformer_m36" in source
    # manifest: Pyramid ViG mean = std = 0.5, crop_pct 0.95 -> 235
    vig, _ = weights.resolve_transform("pvig_b_224", 224)
    assert (vig["resize"], vig["mean"]) == (235, [0.5, 0.5, 0.5])
    # not in the manifest: timm's pretrained cfg (tf_efficientnet_b5.ns_jft_in1k: 456 px, crop_pct 0.934 -> 488)
    effnet, source = weights.resolve_transform("tf_efficientnet_b5", 456)
    assert (effnet["resize"], effnet["crop"]) == (488, 456) and "timm's pretrained cfg" in source
    # flags override, and say so
    flagged, source = weights.resolve_transform("riformer_m36", 224, crop_pct=0.9, mean=[0.5] * 3)
    assert flagged["resize"] == 248 and flagged["mean"] == [0.5] * 3 and "overridden" in source
    # a file named as a release is that release, whatever its model's other releases
    by_file, _ = weights.resolve_transform("swin_base_patch4_window7_224", 224,
                                           "/w/swin_base_patch4_window7_224_22kto1k.pth")
    assert by_file["resize"] == 256


def test_nfnet_f1_is_squashed_as_timm_cfg_says():
    """timm dm_nfnet_f1.dm_in1k: test_input_size 320, crop_pct 0.91, crop_mode 'squash'."""
    cfg = timm.models.get_pretrained_cfg("dm_nfnet_f1.dm_in1k")
    assert weights.transform_from_cfg(cfg, 320) == weights.transform_of(weights.releases()["nfnet_f1"])
    from PIL import Image
    from reproduce.engine.data import eval_transform

    image = Image.new("RGB", (400, 300))
    image.paste((255, 0, 0), (0, 0, 40, 300))  # a red band on the left edge: squash keeps it, a short-side resize crops it
    squash = eval_transform(weights.transform_of(weights.releases()["nfnet_f1"]))(image)
    centre = eval_transform({**weights.transform_of(weights.releases()["nfnet_f1"]), "crop_mode": "center"})(image)
    assert squash.shape == centre.shape == (3, 320, 320)
    assert squash[0, :, 0].mean() > 1.0 > centre[0, :, 0].mean()


def test_reproduce_eval_prints_and_records_the_release_transform(tmp_path, one_thread):
    """`reproduce eval` on a file named as the release: its transform (mmpretrain ResizeEdge 236 for M36),
    printed and recorded; a flag overrides it and the record says so."""
    data = make_generated_dataset(tmp_path / "data", classes=4, images_per_class=1, image_size=32)
    model = timm.create_model("riformer_m36", num_classes=4)
    path = tmp_path / "riformer-m36_32xb128_in1k_20230406-2fcb9d9b.pth"
    torch.save(model.state_dict(), path)
    args = ["eval", "riformer_m36", "--checkpoint", str(path), "--data", str(data), "--num-classes", "4",
            "--workers", "0", "--batch-size", "4"]
    out = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "a")])
    assert out.exit_code == 0, out.output
    assert "transform: resize 236 / crop 224 / bicubic" in out.output and "release riformer_m36" in out.output
    written = yaml.safe_load((tmp_path / "a" / "result.json").read_text())
    assert written["transform"]["resize"] == 236 and written["weights"]["release"] == "riformer_m36"
    out = CliRunner().invoke(main, [*args, "--resize", "250", "--output", str(tmp_path / "b")])
    assert out.exit_code == 0 and "resize 250" in out.output and "overridden: resize" in out.output
    assert yaml.safe_load((tmp_path / "b" / "result.json").read_text())["transform"]["resize"] == 250


def test_a_training_run_evaluates_with_its_release_transform():
    """The training recipes' own evaluation follows the same rule: mmpretrain's RIFormer test pipelines
    (configs/_base_/datasets/imagenet_bs128_poolformer_medium_224.py ResizeEdge 236;
    imagenet_bs128_riformer_small_384.py 426; _medium_384.py 404), not the recipe's crop_pct (0.95 -> 235, 1.0 -> 384)."""
    from reproduce.engine.recipe import load_recipe

    resize = {}
    for name in ("riformer_m36", "riformer_s12_384", "riformer_m48_384"):
        recipe = load_recipe(f"recipes/riformer/table6/{name}.yaml")
        resize[name] = weights.recipe_transform(recipe["model"]["name"], recipe["data"])[0]["resize"]
    assert resize == {"riformer_m36": 236, "riformer_s12_384": 426, "riformer_m48_384": 404}
    # a size no release has (the smoke scale): the recipe's crop_pct
    assert weights.recipe_transform("riformer_m36", {"img_size": 32, "crop_pct": 0.8})[0]["resize"] == 40


def test_weights_download_offline_is_one_line_per_file_without_retries(tmp_path, monkeypatch):
    """The real download path, offline: each file fails on one line naming its host, and no client is
    started on a host that does not resolve (huggingface_hub's retries cost about 23 s and ten warning
    lines per file: 32 files were some 12 minutes of back-off)."""
    import socket

    import huggingface_hub

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    started = []
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: started.append(a))
    monkeypatch.chdir(tmp_path)
    weights._unresolved_host.cache_clear()
    try:
        result = CliRunner().invoke(main, ["weights", "sit-3", "--weights", "w", "--download"])
    finally:
        weights._unresolved_host.cache_clear()
    assert result.exit_code == 2, result.output
    failed = [line for line in result.output.splitlines() if line.startswith("failed: ")]
    direct = [r for r in _releases_of("sit-3") if not weights.needs_browser(r)]
    assert len(failed) >= len(direct) > 1 and not started
    assert all("cannot be reached (Name or service not known)" in line for line in failed)
    assert any("huggingface.co cannot be reached" in line for line in failed)
    assert any("github.com cannot be reached" in line for line in failed)


def test_hub_retry_warnings_stay_off_the_screen(tmp_path, monkeypatch, caplog):
    """Where the host resolves but the hub fails, its retry warnings are not printed over the one line."""
    import logging
    import socket

    import huggingface_hub

    def failing_hub(*args, **kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 8s [Retry 5/5].")
        raise OSError("connection reset")

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing_hub)
    before = logging.getLogger("huggingface_hub").level
    weights._unresolved_host.cache_clear()
    try:
        with pytest.raises(weights.WeightsError, match=r"cannot download regnety_160_deit .*: connection reset; "):
            weights.download(weights.releases()["regnety_160_deit"], tmp_path)
    finally:
        weights._unresolved_host.cache_clear()
    assert "Retry" not in caplog.text
    assert logging.getLogger("huggingface_hub").level == before  # put back as it was


def test_weights_download_tries_every_file_and_names_the_browser_ones(tmp_path, monkeypatch):
    """Offline: every direct link is tried and fails on its own line (the planted fault of issue 25:
    stopping at the first failure left the rest untried); Drive share pages are listed as browser-only;
    the listing carries URL, published top-1 and transform; a missing folder is said."""
    tried = []

    def offline(release, weights_dir):
        tried.append((release.name, str(weights_dir)))
        raise weights.WeightsError(f"cannot download {release.name}: offline")

    monkeypatch.setattr(weights, "download", offline)
    monkeypatch.chdir(tmp_path)  # the recipes' teacher paths (checkpoints/...) are relative
    folder = tmp_path / "absent"
    result = CliRunner().invoke(main, ["weights", "sit-2", "sit-3", "--weights", str(folder), "--download"])
    assert result.exit_code == 2, result.output  # SuiteError: the count of failures, after all were tried
    out = result.output.splitlines()
    assert f"weights folder {folder} does not exist" in " ".join(result.output.split())
    direct = {(r.name, str(folder)) for t in ("sit-2", "sit-3") for r in _releases_of(t) if not weights.needs_browser(r)}
    # and the teacher the sit-2 recipes load that a direct link publishes: into the folder the recipes read
    direct.add(("regnety_160_deit", "checkpoints"))
    assert set(tried) == direct and len(direct) > 1
    assert sum(line.startswith("failed: cannot download") for line in out) == len(direct)
    assert any("need a browser (Google Drive share pages" in line for line in out)
    saved_as = out.index(f"  {folder / 'SiT-T.pth'}")
    assert out[saved_as + 1].strip().startswith("https://drive.google.com/")
    sit_ti = result.output.split("  sit_ti/top1: ")[1].split("\n  sit_ti/")[0]
    assert "top-1: 80.1" in sit_ti and "resize 256 / crop 224 / bicubic" in sit_ti and "drive.google.com" in sit_ti
    assert "open it in a browser" in sit_ti


def _releases_of(table):
    spec = SPECS[table]
    found = {}
    for row in weights.accuracy_rows(spec):
        for release in (weights.column_releases(table, row) or {None: weights.release_of(table, row)}).values():
            if release is not None:
                found[release.name] = release
    return found.values()


def test_repa_rows_say_where_the_files_are_hosted_and_what_is_unknown():
    """Ackesnal/RePaViT README.md sec. 5 points to huggingface.co/Ackesnal/RePaViT/tree/main: a RePa row
    must say so (not read as 'no weights exist') and say what is unknown."""
    repa = [(t, r, weights.why_none(t, r)) for t in weights.tables() for r in weights._manifest()["tables"][t]
            if r.startswith("repa_") and "huggingface" in (weights.why_none(t, r) or "")]
    assert len(repa) > 20
    bad = [f"{t}/{r}" for t, r, why in repa if "hosted at huggingface.co/Ackesnal/RePaViT" not in why
           or "unknown" not in why]
    assert not bad, bad


# --- the authors' numbers, as fixtures with their source ---------------------------------------------
# release: (timm tag or URL, image size, published top-1, resize of its eval transform). Sources:
#   csv   huggingface/pytorch-image-models @aa4b5850 results/results-imagenet.csv (model,img_size,top1,...,crop_pct)
#   cfg   timm 1.0.31 get_pretrained_cfg(tag): input/test size, crop_pct (resize = floor(size / crop_pct))
#   deit  facebookresearch/deit @7e160fe README_deit.md: the '* Acc@1' line of each `main.py --eval`; datasets.py
#         build_transform Resize(int(224 / 0.875)) = 256 (--eval-crop-ratio 0.875)
#   swin  microsoft/Swin-Transformer README.md ImageNet-1K table; data/build.py TEST.CROP int(256/224 * 224) = 256
#   pvt   whai362/PVT classification/README.md 'PVTv1 on ImageNet-1K' (Acc@1); datasets.py int(256/224 * 224) = 256
#   gfnet raoyongming/GFNet README.md Model Zoo (acc@1); datasets.py int(256/224 * 224) = 256
#   mlp   microsoft/Swin-Transformer MODELHUB.md 'ImageNet-1K Pretrained Swin MLP Models' (acc@1); data/build.py
#         TEST.CROP int(256/224 * size): 292 at 256, 256 at 224
#   meta  sail-sg/metaformer @64c534a README.md model tables (URL, Top1 Acc); metaformer_baselines.py _cfg
#         crop_pct 1.0 (timm validate.py: resize = size)
AUTHORS = {
    "tf_efficientnet_b1_aa": ("tf_efficientnet_b1.aa_in1k", 240, 78.840, 272),  # csv; cfg crop_pct 0.882
    "tf_efficientnet_b2_aa": ("tf_efficientnet_b2.aa_in1k", 260, 80.074, 292),  # csv; cfg 0.89
    "tf_efficientnet_b3_aa": ("tf_efficientnet_b3.aa_in1k", 300, 81.648, 331),  # csv; cfg 0.904
    "tf_efficientnet_b4_aa": ("tf_efficientnet_b4.aa_in1k", 380, 83.040, 412),  # csv; cfg 0.922
    "tf_efficientnet_b6_aa": ("tf_efficientnet_b6.aa_in1k", 528, 84.124, 560),  # csv; cfg 0.942
    "tf_efficientnetv2_s": ("tf_efficientnetv2_s.in1k", 384, 83.900, 384),      # csv; cfg test 384, crop 1.0
    "tf_efficientnetv2_m": ("tf_efficientnetv2_m.in1k", 480, 85.208, 480),      # csv; cfg test 480, squash
    "deit_tiny": ("deit_tiny_patch16_224.fb_in1k", 224, 72.202, 256),           # deit
    "deit_small": ("deit_small_patch16_224.fb_in1k", 224, 79.854, 256),         # deit
    "deit_base": ("deit_base_patch16_224.fb_in1k", 224, 81.846, 256),           # deit
    "deit_tiny_dist": ("deit_tiny_distilled_patch16_224.fb_in1k", 224, 74.476, 256),   # deit
    "deit_small_dist": ("deit_small_distilled_patch16_224.fb_in1k", 224, 81.164, 256),  # deit
    "deit_base_dist": ("deit_base_distilled_patch16_224.fb_in1k", 224, 83.372, 256),    # deit
    "swin_tiny": ("swin_tiny_patch4_window7_224.ms_in1k", 224, 81.2, 256),      # swin
    "swin_small": ("swin_small_patch4_window7_224.ms_in1k", 224, 83.2, 256),    # swin
    "swin_base": ("swin_base_patch4_window7_224.ms_in1k", 224, 83.5, 256),      # swin
    "randformer_s12": ("https://huggingface.co/sail/dl/resolve/main/randformer/randformer_s12.pth", 224, 76.6, 224),
    "poolformerv2_s12": ("https://huggingface.co/sail/dl/resolve/main/poolformerv2/poolformerv2_s12.pth", 224, 78.0, 224),
    "convformer_s18": ("https://huggingface.co/sail/dl/resolve/main/convformer/convformer_s18.pth", 224, 83.0, 224),
    "caformer_s18": ("https://huggingface.co/sail/dl/resolve/main/caformer/caformer_s18.pth", 224, 83.6, 224),
    "convformer_s18_384": ("https://huggingface.co/sail/dl/resolve/main/convformer/convformer_s18_384.pth", 384, 84.4, 384),
    "convformer_s36_384": ("https://huggingface.co/sail/dl/resolve/main/convformer/convformer_s36_384.pth", 384, 85.4, 384),
    "convformer_m36_384": ("https://huggingface.co/sail/dl/resolve/main/convformer/convformer_m36_384.pth", 384, 85.6, 384),
    "convformer_b36_384": ("https://huggingface.co/sail/dl/resolve/main/convformer/convformer_b36_384.pth", 384, 85.7, 384),
    "pvt_small": ("https://github.com/whai362/PVT/releases/download/v2/pvt_small.pth", 224, 79.8, 256),     # pvt
    "pvt_medium": ("https://github.com/whai362/PVT/releases/download/v2/pvt_medium.pth", 224, 81.2, 256),   # pvt
    "pvt_large": ("https://github.com/whai362/PVT/releases/download/v2/pvt_large.pth", 224, 81.7, 256),     # pvt
    "gfnet_h_ti": ("https://cloud.tsinghua.edu.cn/f/b22dd45eccbe462cbbfb/?dl=1", 224, 80.1, 256),            # gfnet
    "gfnet_h_s": ("https://cloud.tsinghua.edu.cn/f/5229cb4d1daf48e69675/?dl=1", 224, 81.5, 256),             # gfnet
    "gfnet_h_b": ("https://cloud.tsinghua.edu.cn/f/954c5af21e824ba6b40c/?dl=1", 224, 82.9, 256),             # gfnet
    "gfnet_b": ("https://cloud.tsinghua.edu.cn/f/2fbf264597af4d72afb3/?dl=1", 224, 80.7, 256),               # gfnet
    "swin_mlp_tiny_c6": ("https://github.com/SwinTransformer/storage/releases/download/v1.0.5/"
                         "swin_mlp_tiny_c6_patch4_window8_256.pth", 256, 79.7, 292),                          # mlp
    "swin_mlp_base": ("https://github.com/SwinTransformer/storage/releases/download/v1.0.5/"
                      "swin_mlp_base_patch4_window7_224.pth", 224, 81.3, 256),                                # mlp
    "resmlp_b24": ("https://dl.fbaipublicfiles.com/deit/resmlpB_24_no_dist.pth", 224, 81.034, 256),          # csv
}
# sit-3's third-party rows (issue 20): the release that fills each, or None where no file's published top-1 is
# the printed one (LeViT-256/384 80.1/81.6 vs 81.5/82.6; CaiT-S36/M36 released at 384 only; LV-ViT-L at 448/512).
SIT3 = {"efficientnet_b1": "tf_efficientnet_b1_aa", "efficientnet_b2": "tf_efficientnet_b2_aa",
        "efficientnet_b3": "tf_efficientnet_b3_aa", "efficientnet_b4": "tf_efficientnet_b4_aa",
        "efficientnet_b6": "tf_efficientnet_b6_aa", "efficientnetv2_s": "tf_efficientnetv2_s",
        "efficientnetv2_m": "tf_efficientnetv2_m", "swin_b": "swin_base", "levit_256": None, "levit_384": None,
        "cait_s36": None, "cait_m36": None, "lvvit_l": None}


def test_releases_are_the_authors_files_numbers_and_transforms():
    wrong = []
    for name, (where, img_size, top1, resize) in AUTHORS.items():
        release = weights.releases()[name]
        found = (release.timm_tag or release.url, release.img_size, release.top1, weights.transform_of(release)["resize"])
        if found != (where, img_size, top1, resize):
            wrong.append(f"{name}: manifest {found}, the authors' {(where, img_size, top1, resize)}")
    assert not wrong, wrong


@pytest.mark.parametrize("plant", [
    {"release": "tf_efficientnet_b1_aa", "timm_tag": "tf_efficientnet_b1.in1k"},   # the standard-preprocessing file
    {"release": "tf_efficientnet_b1_aa", "top1": 79.1},                            # the paper's number typed in
    {"release": "deit_small", "transform": {}},                                    # back on timm's 248
    {"release": "convformer_s18_384", "img_size": 224},
])
def test_a_planted_wrong_tag_top1_or_transform_fails(monkeypatch, plant):
    import dataclasses

    manifest = dict(weights._manifest())
    name = plant.pop("release")
    manifest["releases"] = {**manifest["releases"], name: dataclasses.replace(manifest["releases"][name], **plant)}
    monkeypatch.setattr(weights, "_manifest", lambda: manifest)
    with pytest.raises(AssertionError, match=name):
        test_releases_are_the_authors_files_numbers_and_transforms()


def test_a_timm_cfg_transform_written_in_the_manifest_is_the_cfgs(monkeypatch):
    """Planted: tf_efficientnetv2_m's transform without crop_mode squash (timm's cfg has it)."""
    import dataclasses

    manifest = dict(weights._manifest())
    release = manifest["releases"]["tf_efficientnetv2_m"]
    manifest["releases"] = {**manifest["releases"], "tf_efficientnetv2_m": dataclasses.replace(
        release, transform={k: v for k, v in release.transform.items() if k != "crop_mode"})}
    monkeypatch.setattr(weights, "_manifest", lambda: manifest)
    with pytest.raises(AssertionError, match="tf_efficientnetv2_m"):
        test_every_release_names_a_model_and_a_source()


def test_sit3_third_party_rows_are_filled_by_their_released_weights(tmp_path, monkeypatch):
    for row, name in SIT3.items():
        release = weights.release_for_cell(SPECS["sit-3"], row, "top1")
        assert (release.name if release else None) == name, row
        if name is None:
            assert weights.why_none("sit-3", row), f"sit-3/{row}: say why nothing fills it"
    # the cell's note names the fast path, then an eval command of the model provenance accepts (the port's own)
    monkeypatch.setattr(runner, "RUNS_DIR", tmp_path / "runs")
    result = CliRunner().invoke(main, ["table", "sit-3", "--columns", "accuracy", "--results-dir", str(tmp_path),
                                       "--rows", "efficientnet_b1,levit_256", "--quiet"])
    assert result.exit_code == 0, result.output
    note = _cells(tmp_path, "sit-3").loc[("efficientnet_b1", "top1"), "note"]
    assert "released weights tf_efficientnet_b1.aa_in1k.safetensors (timm)" in note
    assert "`reproduce eval tf_efficientnet_b1 --checkpoint FILE --data /path/to/imagenet --img-size 240 " in note
    assert "reproduce eval efficientnet_b1 " not in note


def test_deit_and_swin_follow_one_rule_the_authors_eval():
    """issue 25: five DeiT and three Swin releases followed timm's 248 where the authors' code uses 256. One
    rule per release: the authors' eval (resize 256), and the top-1 the authors measured with it."""
    for release in weights.releases().values():
        if release.model.startswith(("deit_", "swin_base_patch4", "swin_small_patch4", "swin_tiny_patch4")):
            transform = weights.transform_of(release)
            assert (transform["resize"], transform["crop"]) == (256, 224), release.name
            assert release.top1_source.startswith(("facebookresearch/deit", "microsoft/Swin-Transformer")), release.name


def test_missing_teacher_and_init_files_say_where_they_come_from():
    """issue 20/25: every file a recipe loads has a way to get it: a release fetched by `reproduce weights`
    (into the recipe's folder), a share page to open, or the recipe that trains it."""
    from reproduce.engine.cells import cell_run
    from reproduce.engine.dryrun import how_to_get, needed_files, recipe_files
    from reproduce.engine.recipe import load_recipe

    paths = {path for recipe in recipe_files() for _, path in needed_files(load_recipe(recipe))}
    unknown = [p for p in paths if how_to_get(p).startswith("not in recipes/weights.yaml")]
    assert not unknown, unknown
    assert how_to_get("checkpoints/convformer_s18_384.pth") == \
        "`reproduce weights riformer-6 --download` (saves it as checkpoints/convformer_s18_384.pth)"
    assert "`reproduce weights riformer-9 --download`" in how_to_get("checkpoints/randformer_s12.pth")
    assert "open https://drive.google.com/" in how_to_get("checkpoints/sit_lvvit_ti.pth")
    hint = how_to_get("runs/riformer-6/riformer_s12/model.pt")
    assert hint == "the recipe that trains it: `reproduce train riformer-6 riformer_s12 --data /path/to/imagenet`"
    recipe, run, _ = cell_run("riformer-6", "riformer_s12", None)  # the command writes runs/riformer-6/riformer_s12
    assert run == "riformer_s12" and recipe.name == "riformer_s12.yaml"


def test_weights_command_shows_and_fetches_the_teachers_into_their_recipe_folder(tmp_path, monkeypatch):
    """riformer-9's imitation teachers (sail-sg/metaformer): listed with URL and top-1, and `--download`
    saves them where the recipes read them (checkpoints/), whatever --weights says."""
    fetched = []
    monkeypatch.setattr(weights, "download", lambda release, folder: fetched.append((release.local_name, str(folder))))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["weights", "riformer-9", "--weights", str(tmp_path / "w"), "--download"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert ("checkpoints/randformer_s12.pth (1 recipe), sail-sg/metaformer: missing get: `reproduce weights "
            "riformer-9 --download`") in text
    assert "url: https://huggingface.co/sail/dl/resolve/main/randformer/randformer_s12.pth" in text
    assert "top-1: 76.6 (sail-sg/metaformer README.md randformer_s12 224)" in text
    assert {("randformer_s12.pth", "checkpoints"), ("poolformerv2_s12.pth", "checkpoints"),
            ("convformer_s18.pth", "checkpoints"), ("caformer_s18.pth", "checkpoints"),
            ("gfnet-h-b.pth", "checkpoints")} == set(fetched)


def test_repa_mixer_recipes_evaluate_with_mean_std_half():
    """Ackesnal/RePaViT datasets.py build_transform: Normalize((0.5,)*3, (0.5,)*3) when 'MlpMixer' is in the
    model name, ImageNet's otherwise; resize int(224 / 0.875) = 256 (main.py --eval_crop_ratio 0.875)."""
    from reproduce.engine.recipe import load_recipe

    for name, mean in (("repa_mixer_b16", [0.5] * 3), ("repa_mixer_l16", [0.5] * 3),
                       ("repa_deit_small", [0.485, 0.456, 0.406]), ("repa_poolformer_s12", [0.485, 0.456, 0.406])):
        recipe = load_recipe(f"recipes/repaformer/{name}.yaml")
        transform = weights.recipe_transform(recipe["model"]["name"], recipe["data"])[0]
        assert (transform["resize"], transform["mean"], transform["std"][0]) == (256, mean, 0.5 if mean[0] == 0.5
                                                                                 else 0.229), name
