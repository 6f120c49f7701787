"""No setting cell compares a value with the spec it came from (issue 12): every committed setting
cell says where its value was read, reading that source again gives the recorded value, and only
a value the spec alone gives is `declared`."""
import copy

import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import scratch_table

from reproduce import cli, measure, provenance, registry, report, runner

DEVICE = measure.device_tag("cpu")


def setting_tables():
    return [t for t in registry.table_ids() if registry.load_table(t).columns_of_kind("setting")]


def committed_results(table):
    """The committed results of `table`, of whichever CPU measured them (this host's tag may differ)."""
    found = sorted(p for p in runner.RESULTS_DIR.glob(f"cpu-*/{table}.csv"))
    assert found, f"no committed CPU results of {table}"
    return found


@pytest.mark.parametrize("table", setting_tables())
def test_every_committed_setting_cell_was_read_where_its_note_says(table):
    spec = registry.load_table(table)
    frame = pd.concat([report.read_results(p) for p in committed_results(table)])
    run = runner.TableRun(spec, "cpu", show_progress=False)
    settings = [c for c in frame.itertuples() if spec.columns[c.column].kind == "setting"]
    assert settings
    for cell in settings:
        name = f"{table} {cell.row}/{cell.column}"
        if cell.status == "cited":
            continue
        if cell.status == "pending":
            assert not cell.measured and cell.note, name
            continue
        value, where, declared = run.setting_value(spec.rows[cell.row], spec.columns[cell.column])
        if cell.status == "declared":
            assert declared and not cell.measured and cell.note.startswith("declared:"), name
            continue
        assert not declared, f"{name}: {cell.status} but its value only comes from the spec ({where})"
        assert where.startswith(("recipe ", "the built model ")), name
        assert f"read from {where}." in cell.note, name
        assert cell.measured == report.format_measured(value, cell.reported, "setting"), name


SPEC = {
    "id": "riformer-6", "paper": "riformer", "number": 6, "title": "image sizes", "protocol": "riformer",
    "columns": {"img_size": {"kind": "setting", "source": "img_size"}},
    "rows": {"deit_s": {"model": "deit_small_patch16_224"},
             "riformer_s12_384": {"model": "riformer_s12", "img_size": 384, "form": "deploy",
                                  "recipe": "riformer/table6/riformer_s12_384.yaml"}},
}


def table_cells(results):
    result = CliRunner().invoke(cli.main, ["table", "riformer-6", "--results-dir", str(results), "--quiet"])
    assert result.exit_code == 0, result.output
    return report.read_results(results / DEVICE / "riformer-6.csv").set_index("row")


def test_a_value_typed_in_the_spec_is_declared_never_a_match(tmp_path, monkeypatch):
    results = scratch_table(tmp_path, monkeypatch, copy.deepcopy(SPEC), "riformer-6")
    cells = table_cells(results)
    assert set(cells["status"]) == {"declared"}
    assert cells.loc["deit_s", "measured"] == "" and "the spec's row field img_size" in cells.loc["deit_s", "note"]


def test_image_sizes_are_read_from_the_recipe_else_from_the_model(tmp_path, monkeypatch):
    spec = copy.deepcopy(SPEC)
    spec["columns"]["img_size"]["source"] = ["recipe.data.img_size", "model.img_size"]
    spec["rows"]["deit_s"]["img_size"] = 384  # a wrong size in the spec does not make the model's
    results = scratch_table(tmp_path, monkeypatch, spec, "riformer-6")
    cells = table_cells(results)
    assert cells.loc["deit_s", "status"] == "match"
    assert cells.loc["deit_s", "note"].startswith("read from the built model deit_small_patch16_224: its patch embedding.")
    assert "measured at the spec's img_size 384" in cells.loc["deit_s", "note"]
    short = provenance.recipe_hash(registry.RECIPES / "riformer/table6/riformer_s12_384.yaml")[:12]
    assert cells.loc["riformer_s12_384", "note"].startswith(
        f"read from recipe riformer/table6/riformer_s12_384.yaml (resolved sha256 {short}): data.img_size.")
    registry.load_table.cache_clear()
