"""Issue 19: a number the suite did not measure never reaches a results file. Each forgery is
planted the way a user would (a result.json typed or edited, a checkpoint swapped, a result copied
between cells, a base recipe edited, a pending cell of the results CSV edited) and must be refused
by `reproduce table` (the cell stays pending, its note names the reason in one line) or fail
`reproduce diff`."""
import copy
import json
import shutil

import pytest
import yaml
from click.testing import CliRunner
from helpers import evaluated, read_spec, scratch_table

from reproduce import cli, measure, provenance, registry, report

ROW = "identity_label_soft"
RECIPE = "riformer/table2/identity_label_soft.yaml"


def invoke(*args):
    return CliRunner().invoke(cli.main, list(map(str, args)))


@pytest.fixture
def table(tmp_path, monkeypatch):
    """RIFormer Table 2 (as committed) in a scratch registry whose riformer recipes are a copy
    (so that a test may edit a base file); returns (results dir, runs dir)."""
    results = scratch_table(tmp_path, monkeypatch, read_spec("riformer-2"), "riformer-2")
    recipes = registry.RECIPES / "riformer"
    recipes.unlink()
    shutil.copytree(registry.ROOT / "recipes" / "riformer", recipes)
    yield results, tmp_path / "runs"
    registry.load_table.cache_clear()


def genuine(runs, row=ROW, recipe=RECIPE, **changes):
    """What `reproduce train` writes at the end of a full run of the row's recipe (its model.pt
    beside it), through the one writer; `changes` then edit the JSON as a forger would."""
    from reproduce.engine.recipe import load_recipe

    folder = runs / "riformer-2" / row
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.pt").write_bytes(f"trained weights of {row}".encode())  # each run its own checkpoint
    trained = load_recipe(registry.RECIPES / recipe)
    provenance.write_result(
        folder / "result.json", cell={"table": "riformer-2", "row": row, "column": None},
        metrics=evaluated(73.64, 91.5), model=trained["model"]["name"], form="train",
        img_size=trained["data"]["img_size"], recipe={"path": f"recipes/{recipe}"},
        weights={"path": str(folder / "model.pt"), "layout": "ours"},
        data={"root": "/imagenet", "split": "validation", "images": 50000, "classes": 1000},
        transform={}, scale="full", device="cuda", epochs=trained["epochs"])
    result = json.loads((folder / "result.json").read_text())
    for dotted, value in changes.items():
        node, *path = result, *dotted.split(".")
        for key in path[:-1]:
            node = node[key]
        if value is DELETE:
            node.pop(path[-1])
        else:
            node[path[-1]] = value
    (folder / "result.json").write_text(json.dumps(result))
    return folder / "result.json"


DELETE = object()


def cell(results, row=ROW, column="top1"):
    frame = report.read_results(results / measure.device_tag("cpu") / "riformer-2.csv")
    return frame.set_index(["row", "column"]).loc[(row, column)]


def table_cell(results, row=ROW):
    outcome = invoke("table", "riformer-2", "--results-dir", results, "--quiet")
    assert outcome.exit_code == 0, outcome.output
    return cell(results, row)


def refused(results, reason):
    filled = table_cell(results)
    assert filled.status == "pending" and filled.measured == "", filled.note
    assert "result.json refused: " in filled.note and "Traceback" not in filled.note, filled.note
    line = filled.note.split("result.json refused: ", 1)[1].split(". needs ImageNet-1k", 1)[0]
    assert reason in line and "\n" not in line, line
    return filled


def test_a_genuine_full_run_fills_the_cell_and_passes_the_diff(table):
    results, runs = table
    genuine(runs)
    filled = table_cell(results)
    assert (filled.measured, filled.status) == ("73.6400", "match"), filled.note
    assert "trained here: recipes/riformer/table2/identity_label_soft.yaml (120 epochs)" in filled.note
    outcome = invoke("diff", "riformer-2", "--results-dir", results)
    assert outcome.exit_code == 0, outcome.output


def test_a_hand_typed_result_is_refused(table):
    results, runs = table
    folder = runs / "riformer-2" / ROW
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(
        {"top1": 73.64, "scale": "full", "images": 50000, "recipe": {"path": f"recipes/{RECIPE}"},
         "data": {"root": "/nowhere"}}))
    refused(results, "no provenance of schema")
    # the same with a schema number typed in: every missing field is named
    (folder / "result.json").write_text(json.dumps(
        {"schema": provenance.SCHEMA, "table": "riformer-2", "row": ROW, "top1": 73.64, "scale": "full",
         "images": 50000, "recipe": {"path": f"recipes/{RECIPE}"}, "data": {"root": "/nowhere"}}))
    filled = refused(results, "it lacks top5, model")
    assert "weights.sha256" in filled.note and "recipe.sha256" in filled.note


@pytest.mark.parametrize("changes, reason", [
    ({"top5": DELETE}, "it lacks top5"),
    ({"weights.sha256": DELETE}, "it lacks weights.sha256"),
    ({"recipe.sha256": DELETE}, "it lacks recipe.sha256"),
    ({"scale": "smoke"}, "scale 'smoke'"),
    ({"epochs": 2}, "its epochs 2 is not its recipe's 120"),               # a smoke run relabelled full
    ({"data.images": 49000}, "(validation: 49000 (evaluated: 50000) images, 1000 classes) is not ImageNet-1k val"),
    ({"images": 16}, "(validation: 50000 (evaluated: 16) images, 1000 classes) is not ImageNet-1k val"),
    ({"model": "poolformer_v1_s12"}, "its model 'poolformer_v1_s12' is not its recipe's 'riformer_s12'"),
    ({"img_size": 160}, "its img_size 160 is not its recipe's 224"),
    ({"recipe.path": "recipes/riformer/table2/identity_label_hard.yaml"}, "the cell's recipe is riformer/table2"),
    ({"weights.sha256": "0" * 64}, "changed since it was evaluated (sha256 differs)"),
    ({"recipe.sha256": "0" * 64}, "changed since the run (sha256 differs)"),
    ({"top1": "73.64"}, "its top1 '73.64' is not a percentage"),
])
def test_an_edited_result_is_refused(table, changes, reason):
    results, runs = table
    genuine(runs, **changes)
    refused(results, reason)


def test_a_checkpoint_swapped_for_another_file_is_refused(table):
    results, runs = table
    path = genuine(runs)
    (path.parent / "model.pt").write_bytes(b"any other file")
    refused(results, "changed since it was evaluated (sha256 differs)")


def test_an_edit_of_a_base_recipe_makes_the_result_stale(table):
    results, runs = table
    genuine(runs)
    assert table_cell(results).status == "match"
    base = registry.RECIPES / "riformer" / "base.yaml"
    text = base.read_text()
    assert "epochs: 120" in text
    base.write_text(text.replace("epochs: 120", "epochs: 3"))
    refused(results, "(resolved with its base: files) changed since the run")


def test_a_result_copied_from_another_cell_is_refused(table):
    results, runs = table
    other = genuine(runs, row="identity_label_hard", recipe="riformer/table2/identity_label_hard.yaml")
    copied = runs / "riformer-2" / ROW
    copied.mkdir(parents=True)
    result = json.loads(other.read_text())
    result.update(row=ROW, recipe={"path": f"recipes/{RECIPE}", "sha256": provenance.recipe_hash(
        registry.RECIPES / RECIPE)})
    (copied / "result.json").write_text(json.dumps(result))
    refused(results, "it was written in runs/riformer-2/identity_label_hard, not in runs/riformer-2/identity_label_soft")


def hand_fill(results):
    """The pending top-1 cell of ROW filled by hand in the results CSV with the printed value."""
    table_cell(results)
    path = results / measure.device_tag("cpu") / "riformer-2.csv"
    frame = report.read_results(path)
    at = (frame.row == ROW) & (frame.column == "top1")
    assert frame.loc[at, "status"].item() == "pending"
    frame.loc[at, ["measured", "delta", "status", "note"]] = ["73.6400", "+0.00", "match", ""]
    report.write_csv(frame, path)


def test_a_pending_cell_edited_in_the_results_csv_fails_the_diff(table):
    results, runs = table
    hand_fill(results)
    outcome = invoke("diff", "riformer-2", "--results-dir", results)
    assert outcome.exit_code == 1, outcome.output
    assert (f"{ROW}/top1: filled with 73.6400, but no accepted run is behind it "
            f"(no runs/riformer-2/{ROW}/result.json)") in outcome.output

    genuine(runs, epochs=2)  # a run is there, but refused: the diff says why
    outcome = invoke("diff", "riformer-2", "--results-dir", results)
    assert outcome.exit_code == 1 and "its epochs 2 is not its recipe's 120" in outcome.output


def test_a_filled_cell_whose_number_differs_from_its_run_fails_the_diff(table):
    results, runs = table
    genuine(runs)
    table_cell(results)
    path = results / measure.device_tag("cpu") / "riformer-2.csv"
    frame = report.read_results(path)
    at = (frame.row == ROW) & (frame.column == "top1")
    frame.loc[at, ["measured", "delta"]] = ["72.3100", "-1.33"]
    frame.loc[at, "status"] = report.compare("73.64", 72.31, registry.load_table("riformer-2").tolerance(
        registry.load_table("riformer-2").columns["top1"]), "accuracy")[0]
    report.write_csv(frame, path)
    outcome = invoke("diff", "riformer-2", "--results-dir", results)
    assert outcome.exit_code == 1
    assert f"{ROW}/top1: filled with 72.3100, but its accepted run says 73.6400" in outcome.output


def test_a_recipe_edited_after_its_results_fails_the_remeasured_diff(table):
    """`diff --remeasure` reads every setting cell again from its recipe, resolved with its bases."""
    results, _ = table
    table_cell(results)
    assert invoke("diff", "riformer-2", "--remeasure", "--results-dir", results).exit_code == 0
    base = registry.RECIPES / "riformer" / "table1" / "identity_ce_loss.yaml"
    recipe = registry.RECIPES / RECIPE
    recipe.write_text(recipe.read_text().replace("type: soft", "type: hard"))
    outcome = invoke("diff", "riformer-2", "--remeasure", "--results-dir", results)
    assert outcome.exit_code == 1, outcome.output
    assert f"re-measured {ROW}/teacher: undeclared mismatch" in outcome.output or \
           f"{ROW}/teacher: moved from soft to hard" in outcome.output, outcome.output
    assert base.is_file()


def test_a_base_recipe_edit_no_printed_setting_shows_is_in_the_notes_and_fails_the_remeasured_diff(table):
    """Epochs are no column of Table 2: the edit moves no printed setting, only the recipe's hash."""
    results, _ = table
    before = table_cell(results)
    settings = cell(results, column="teacher")
    short = provenance.recipe_hash(registry.RECIPES / RECIPE)[:12]
    assert f"read from recipe {RECIPE} (resolved sha256 {short}): distill.type." in settings.note
    base = registry.RECIPES / "riformer" / "base.yaml"
    base.write_text(base.read_text().replace("epochs: 120", "epochs: 3"))
    outcome = invoke("diff", "riformer-2", "--remeasure", "--results-dir", results)
    assert outcome.exit_code == 1, outcome.output
    now = provenance.recipe_hash(registry.RECIPES / RECIPE)[:12]
    assert (f"recipe {RECIPE} changed since the results were written (resolved sha256 {short} -> {now}, "
            "3 setting cell(s))") in outcome.output, outcome.output
    assert table_cell(results).status == before.status  # regenerated: the new hash is in the note
    assert f"(resolved sha256 {now}): distill.type." in cell(results, column="teacher").note
    assert invoke("diff", "riformer-2", "--remeasure", "--results-dir", results).exit_code == 0
