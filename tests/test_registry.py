"""The table registry: every spec loads, bad specs are named precisely, derived references."""
import shutil

import pytest
import yaml

from reproduce import registry


def test_every_registered_table_loads_with_its_reference():
    ids = registry.table_ids()
    assert len(ids) == 26 and ids[0] == "riformer-1" and ids[-1] == "sit-10"
    for table_id in ids:
        spec = registry.load_table(table_id)
        assert set(spec.reference["row"]) <= set(spec.rows)


def test_table_ids_resolve_loosely_and_fail_with_the_closest():
    assert registry.resolve_table_id("RIFormer6") == "riformer-6"
    with pytest.raises(registry.RegistryError, match="Did you mean 'sit-3'"):
        registry.resolve_table_id("sit-33")


def test_gains_the_paper_does_not_print_are_derived_from_printed_throughputs():
    ref = registry.load_table("riformer-8").reference
    gain = ref[(ref.row == "riformer_s12") & (ref.column == "throughput_gain")].iloc[0]
    assert gain.reported == "+17.8" and "not printed" in gain.note and "4160.18" in gain.note


def _scratch(tmp_path, monkeypatch, table_id):
    """A registry holding only `table_id`'s reference, for specs the test writes: (tables dir, spec)."""
    tables, reference = tmp_path / "tables", tmp_path / "reference"
    tables.mkdir()
    reference.mkdir()
    shutil.copy(registry.REFERENCE_DIR / f"{table_id}.csv", reference)
    spec = yaml.safe_load((registry.TABLES_DIR / f"{table_id}.yaml").read_text())
    monkeypatch.setattr(registry, "TABLES_DIR", tables)
    monkeypatch.setattr(registry, "REFERENCE_DIR", reference)
    registry.load_table.cache_clear()
    return tables, spec


@pytest.fixture
def scratch_registry(tmp_path, monkeypatch):
    yield _scratch(tmp_path, monkeypatch, "riformer-1")
    registry.load_table.cache_clear()


@pytest.mark.parametrize("break_spec, message", [
    (lambda s: s["columns"]["top1"].update(knd="accuracy"), "column 'top1' has unknown field(s) ['knd']"),
    (lambda s: s["columns"]["top1"].update(kind="accurate"), "column 'top1' has kind 'accurate'"),
    (lambda s: s.pop("rows"), "missing field 'rows'"),
    (lambda s: s["rows"].popitem(), "rows in the reference CSV but not in the spec"),
    (lambda s: s.update(paper="rif"), "paper 'rif'"),
])
def test_a_bad_spec_names_the_file_and_the_field(scratch_registry, break_spec, message):
    tables, spec = scratch_registry
    break_spec(spec)
    (tables / "riformer-1.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(registry.RegistryError) as error:
        registry.load_table("riformer-1")
    assert message in str(error.value) and "riformer-1.yaml" in str(error.value)


@pytest.fixture
def scratch_sit5(tmp_path, monkeypatch):
    """sit-5 (one teacher per column) in a scratch registry, its rows editable."""
    tables, spec = _scratch(tmp_path, monkeypatch, "sit-5")

    def write(**rows):
        for row, fields in rows.items():
            spec["rows"][row].update(fields)
        (tables / "sit-5.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        registry.load_table.cache_clear()
        return registry.load_table("sit-5")

    yield write
    registry.load_table.cache_clear()


def test_a_row_with_one_recipe_per_column_gives_each_cell_its_own_run(scratch_sit5, tmp_path, monkeypatch):
    import json

    from reproduce import runner
    from reproduce.engine import EngineError
    from reproduce.engine.cells import cell_run

    spec = scratch_sit5(scratch={"recipes": {"self": "sit/table5/scratch_self.yaml",
                                             "cait": "sit/table5/scratch_cait.yaml"}},
                        fine_tuning={"recipes": {}, "recipe": None})
    assert spec.recipe_of("scratch", "self") == "sit/table5/scratch_self.yaml"
    assert spec.recipe_of("scratch", "regnet") is None  # no recipe of its own, and no row recipe
    assert [spec.run_name("scratch", c) for c in ("self", "cait")] == ["scratch--self", "scratch--cait"]
    # A row without recipes still gives each cell its own folder: its columns read the same number
    # (top-1 with another teacher), so one result cannot fill them all.
    assert spec.run_name("fine_tuning", "self") == "fine_tuning--self"

    # `reproduce train` asks which column; each column trains into its own folder.
    with pytest.raises(EngineError, match=r"add --column \(self, cait\)"):
        cell_run("sit-5", "scratch", None)
    with pytest.raises(EngineError, match="no recipe of its own for column 'regnet'"):
        cell_run("sit-5", "scratch", "regnet")
    recipe, run_name, _ = cell_run("sit-5", "scratch", "cait")
    assert recipe.name == "scratch_cait.yaml" and run_name == "scratch--cait"

    # One result fills one cell: the CaiT column stays pending although the Self run finished.
    monkeypatch.setattr(runner, "RUNS_DIR", tmp_path / "runs")
    folder = tmp_path / "runs" / "sit-5" / "scratch--self"
    folder.mkdir(parents=True)
    from helpers import evaluated

    from reproduce import provenance

    (folder / "model.pt").write_bytes(b"trained")  # what `reproduce train` leaves beside its result
    trained = registry.load_recipe("sit/table5/scratch_self.yaml")
    provenance.write_result(folder / "result.json", cell={"table": "sit-5", "row": "scratch", "column": "self"},
                            metrics=evaluated(79.5, 95.0), model=trained["model"]["name"], form="deploy",
                            img_size=224, recipe={"path": "recipes/sit/table5/scratch_self.yaml"}, transform={},
                            scale="full", weights={"path": str(folder / "model.pt")}, epochs=trained["epochs"],
                            data={"root": "/imagenet", "split": "validation", "images": 50000, "classes": 1000},
                            device="cpu")
    run = runner.TableRun(spec, "cpu", kinds={"accuracy"}, show_progress=False)
    frame = run.run().set_index(["row", "column"])
    assert frame.loc[("scratch", "self"), "measured"] == "79.500", frame.loc[("scratch", "self"), "note"]
    assert frame.loc[("scratch", "cait"), "status"] == "pending"
    assert "reproduce train sit-5 scratch --column cait " in frame.loc[("scratch", "cait"), "note"]  # its own run


def test_a_recipe_for_a_column_that_is_not_an_accuracy_column_is_refused(scratch_sit5):
    with pytest.raises(registry.RegistryError, match="'selfie', which is not an accuracy column"):
        scratch_sit5(scratch={"recipes": {"selfie": "sit/x.yaml"}})
