"""The table registry: every spec loads, bad specs are named precisely, derived references."""
import shutil

import pytest
import yaml

from reproduce import registry


def test_every_registered_table_loads_with_its_reference():
    ids = registry.table_ids()
    assert len(ids) == 25 and ids[0] == "riformer-1" and ids[-1] == "sit-10"
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


@pytest.fixture
def scratch_registry(tmp_path, monkeypatch):
    tables, reference = tmp_path / "tables", tmp_path / "reference"
    tables.mkdir()
    reference.mkdir()
    shutil.copy(registry.REFERENCE_DIR / "riformer-1.csv", reference)
    spec = yaml.safe_load((registry.TABLES_DIR / "riformer-1.yaml").read_text())
    monkeypatch.setattr(registry, "TABLES_DIR", tables)
    monkeypatch.setattr(registry, "REFERENCE_DIR", reference)
    registry.load_table.cache_clear()
    yield tables, spec
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
