"""SiT (ECCV 2022) Tables 2-10: reference CSVs and table specs agree with each other and with
the data contracts of docs/architecture.md and docs/adding-a-table.md."""
import pytest
import yaml

from helpers import FLAGS, HEADER, ROOT, UNITS, first_seen, read_reference, read_spec

TABLE_IDS = [f"sit-{n}" for n in range(2, 11)]
NOT_REPORTED = "-"   # a printed dash: the paper has no value there


@pytest.mark.parametrize("table_id", TABLE_IDS)
def test_reference_follows_the_documented_format(table_id):
    header, cells = read_reference(table_id)
    assert header == HEADER
    assert cells
    for cell in cells:
        assert len(cell) == len(HEADER), cell
        assert cell["table"] == table_id
        assert cell["row"] and cell["row"] == cell["row"].lower() and " " not in cell["row"]
        assert cell["column"] and cell["column"] == cell["column"].lower()
        assert cell["reported"], cell
        assert cell["unit"] in UNITS
        assert all(cell[flag] in ("0", "1") for flag in FLAGS)
        if cell["unit"]:   # a quantity: a plain number (signed for differences) or a dash
            if cell["reported"] != NOT_REPORTED:
                float(cell["reported"])


@pytest.mark.parametrize("table_id", TABLE_IDS)
def test_each_printed_cell_appears_once(table_id):
    _, cells = read_reference(table_id)
    keys = [(c["row"], c["column"]) for c in cells]
    assert len(keys) == len(set(keys))
    labels = {}
    for c in cells:   # one label per row id
        assert labels.setdefault(c["row"], c["label"]) == c["label"]


@pytest.mark.parametrize("table_id", TABLE_IDS)
def test_spec_and_reference_name_the_same_rows_and_columns_in_print_order(table_id):
    spec = read_spec(table_id)
    _, cells = read_reference(table_id)
    assert spec["id"] == table_id
    assert spec["paper"] == "sit" and spec["number"] == int(table_id.split("-")[1])
    assert (ROOT / "recipes" / "protocols" / f"{spec['protocol']}.yaml").exists()
    assert list(spec["rows"]) == first_seen(c["row"] for c in cells)
    assert list(spec["columns"]) == first_seen(c["column"] for c in cells)


@pytest.mark.parametrize("table_id", TABLE_IDS)
def test_spec_references_resolve(table_id):
    """Operands, baselines and cell notes name things the table has."""
    spec = read_spec(table_id)
    columns, rows = spec["columns"], spec["rows"]
    for column in columns.values():
        for operand in ("of", "over"):
            if operand in column:
                assert column[operand] in columns
    for row_id, row in rows.items():
        row = {**spec.get("defaults", {}), **row}
        assert "model" in row, row_id
        if "baseline" in row:
            assert row["baseline"] in rows
        for column in row.get("cell_notes", {}):
            assert column in columns, (row_id, column)
        for column in columns.values():
            if "model_from" in column:
                assert column["model_from"] in row, (row_id, column)
        if row["model"] is None:   # nothing to build: the row must say why
            assert "pending" in row or "cited" in row, row_id


def test_unit_and_flags_agree_with_the_spec():
    """Each reference cell's unit is its column's unit; ‡ cells are the SiT‡ columns/rows."""
    for table_id in TABLE_IDS:
        spec = read_spec(table_id)
        _, cells = read_reference(table_id)
        for cell in cells:
            if cell["reported"] == NOT_REPORTED:
                continue
            assert cell["unit"] == spec["columns"][cell["column"]].get("unit", ""), (table_id, cell)


def test_table3_distilled_rows_are_flagged_and_distinct():
    _, cells = read_reference("sit-3")
    flagged = {c["row"] for c in cells if c["cnn_teacher"] == "1"}
    assert flagged == {"sit_ti_dist", "sit_xs_dist", "sit_s_dist", "sit_m_dist"}
    params = {c["row"]: c["reported"] for c in cells if c["column"] == "params"}
    assert (params["sit_ti"], params["sit_ti_dist"]) == ("15.9", "16.2")


def test_table2_speedups_are_student_over_teacher_throughput():
    """The printed speed-ups follow from the printed throughputs (a transcription check)."""
    _, cells = read_reference("sit-2")
    by_row = {}
    for c in cells:
        by_row.setdefault(c["row"], {})[c["column"]] = c["reported"]
    for row, values in by_row.items():
        ratio = float(values["throughput"]) / float(values["teacher_throughput"])
        assert f"{ratio:.1f}" == values["speedup"], row
        for top1, drop in (("top1", "top1_drop"), ("top1_cnn", "top1_cnn_drop")):
            if drop in values:
                difference = float(values[top1]) - float(values["teacher_top1"])
                assert f"{difference:+.1f}" == f"{float(values[drop]):+.1f}", (row, drop)


def test_baseline_models_are_known_to_timm():
    """Every model that is not one of ours (SiT students, LV-ViT teachers) is a timm name."""
    import riformer  # noqa: F401  (must precede timm: installs the torchvision shim)
    import timm

    known = set(timm.list_models())
    for table_id in TABLE_IDS:
        spec = read_spec(table_id)
        for row_id, row in spec["rows"].items():
            model = {**spec.get("defaults", {}), **row}["model"]
            if model and not model.startswith(("sit_", "lvvit_")):
                assert model in known, (table_id, row_id, model)


@pytest.mark.parametrize("table_id", TABLE_IDS)
def test_registry_loads_the_table(table_id):
    from reproduce.registry import load_table

    spec = load_table(table_id)
    assert spec.paper == "sit" and spec.protocol == "sit"
    assert set(spec.rows) == set(spec.reference["row"])


def test_protocol_has_the_shared_shape():
    protocol = yaml.safe_load((ROOT / "recipes" / "protocols" / "sit.yaml").read_text())
    for key in ("name", "paper_device", "batch_size", "dtype", "img_size", "runs", "repeats",
                "warmup", "channels_last", "statistic", "assumptions"):
        assert key in protocol, key
    assert protocol["name"] == "sit" and protocol["channels_last"] is False
    assert protocol["assumptions"] and all(isinstance(a, str) for a in protocol["assumptions"])
