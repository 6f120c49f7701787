"""The RePaFormer reference CSVs and table specs agree with each other and with the data contract.

Reads only files: results/reference/repaformer-<n>.csv, recipes/tables/repaformer-<n>.yaml and
recipes/protocols/repaformer.yaml (formats in docs/architecture.md and docs/adding-a-table.md).
"""
import pytest
import yaml

from helpers import HEADER, ROOT, first_seen, read_reference, read_spec

TABLES = [1, 2, 3, 4, 7, 8]
KINDS = {"setting", "params", "macs", "throughput", "gain", "ratio", "accuracy"}
NUMERIC_KINDS = {"params", "macs", "throughput", "gain", "ratio", "accuracy"}
CONVENTIONS = {"fvcore", "fvcore+attn"}

# Gain cells whose printed value does not follow from the printed operands (each carries a note).
KNOWN_INCONSISTENT = {
    ("repaformer-1", "repa_swin_tiny", "throughput_gain"),       # 1026.5/611.8 = +67.8, printed +59.6
    ("repaformer-1", "repa_poolformer_s36", "throughput_gain"),  # 1401.6/642.1 = +118.3, printed +119.1
    ("repaformer-2", "repa_deit_tiny", "macs_change"),           # 0.8/1.2 = -33.3, printed -38.5
    ("repaformer-2", "repa_deit_tiny", "throughput_gain"),       # 4295.0/2020.4 = +112.6, printed +32.6
}


def load(number):
    table_id = f"repaformer-{number}"
    header, records = read_reference(table_id)
    return table_id, header, records, read_spec(table_id)


def cells_by_key(records):
    return {(r["row"], r["column"]): r for r in records}


@pytest.mark.parametrize("number", TABLES)
def test_reference_csv_follows_the_contract(number):
    table_id, header, records, _ = load(number)
    assert header == HEADER
    assert records, "empty reference"
    keys = [(r["row"], r["column"]) for r in records]
    assert len(keys) == len(set(keys)), "duplicate (row, column) cells"
    for r in records:
        assert len(r) == len(HEADER)
        assert r["table"] == table_id
        assert r["reported"].strip() == r["reported"] != ""
        assert all(r[flag] in ("0", "1") for flag in HEADER[7:11])
    for row in first_seen(r["row"] for r in records):
        labels = {(r["label"], r["group"]) for r in records if r["row"] == row}  # one per row
        assert len(labels) == 1, (row, labels)


@pytest.mark.parametrize("number", TABLES)
def test_spec_and_reference_name_the_same_rows_and_columns(number):
    table_id, _, records, spec = load(number)
    assert spec["id"] == table_id and spec["paper"] == "repaformer" and spec["number"] == number
    assert (ROOT / "recipes" / "protocols" / f"{spec['protocol']}.yaml").is_file()
    # print order: spec rows in the order the CSV lists them
    assert list(spec["rows"]) == first_seen(r["row"] for r in records)
    assert set(spec["columns"]) == {r["column"] for r in records}
    column_order = list(spec["columns"])
    for row in spec["rows"]:
        row_columns = [r["column"] for r in records if r["row"] == row]
        assert row_columns == sorted(row_columns, key=column_order.index), row


@pytest.mark.parametrize("number", TABLES)
def test_spec_fields_are_consistent(number):
    _, _, records, spec = load(number)
    columns, rows = spec["columns"], spec["rows"]
    defaults = spec.get("defaults", {})
    for name, column in columns.items():
        assert column["kind"] in KINDS, name
        if column["kind"] == "setting":
            assert "source" in column, name
        if column["kind"] in ("gain", "ratio"):
            assert column["of"] in columns, name
            assert ("over" in column) != ("over_row" in column), name
            if "over" in column:
                assert column["over"] in columns, name
        assert column.get("form", "train") in ("train", "deploy"), name
    for row_id, row in rows.items():
        merged = {**defaults, **row}
        assert "model" in row or "cited" in row, row_id
        assert merged.get("macs_convention", "fvcore") in CONVENTIONS, row_id
        assert merged.get("form", "train") in ("train", "deploy"), row_id
        if "baseline" in row:
            assert row["baseline"] in rows and row["baseline"] != row_id, row_id
        for column in row.get("cell_notes", {}):
            assert column in columns, (row_id, column)
    # every over_row gain cell sits in a row that names its baseline
    for r in records:
        if "over_row" in columns[r["column"]]:
            assert "baseline" in rows[r["row"]], (r["row"], r["column"])


@pytest.mark.parametrize("number", TABLES)
def test_units_and_numbers_match_the_spec(number):
    _, _, records, spec = load(number)
    for r in records:
        column = spec["columns"][r["column"]]
        assert r["unit"] == column.get("unit", ""), (r["row"], r["column"])
        if column["kind"] in NUMERIC_KINDS:
            float(r["reported"])  # printed numbers are transcribed without their unit sign


@pytest.mark.parametrize("number", [1, 2])
def test_printed_gains_follow_from_the_printed_operands(number):
    """Catches transcription slips: a change cell must match its operands unless known and noted."""
    table_id, _, records, spec = load(number)
    cells = cells_by_key(records)
    checked = 0
    for (row, name), cell in cells.items():
        column = spec["columns"][name]
        if column["kind"] != "gain":
            continue
        of = float(cells[(row, column["of"])]["reported"])
        if "over" in column:
            over = float(cells[(row, column["over"])]["reported"])
        else:
            over = float(cells[(spec["rows"][row]["baseline"], column["of"])]["reported"])
        computed = 100 * (of / over - 1)
        checked += 1
        if (table_id, row, name) in KNOWN_INCONSISTENT:
            assert abs(computed - float(cell["reported"])) > 0.1 and cell["note"], (row, name)
        else:
            assert abs(computed - float(cell["reported"])) <= 0.1, (row, name, computed)
    assert checked == 45  # 15 models x 3 change columns in each table


def test_table3_repa_rows_repeat_table4():
    _, _, t3, _ = load(3)
    _, _, t4, _ = load(4)
    t3_cells, t4_cells = cells_by_key(t3), cells_by_key(t4)
    for row in ("repa_deit_base_25", "repa_swin_base_25"):
        for column in ("params", "macs", "throughput", "top1"):
            assert t3_cells[(row, column)]["reported"] == t4_cells[(row, column)]["reported"]


def test_protocol_is_data():
    protocol = yaml.safe_load((ROOT / "recipes" / "protocols" / "repaformer.yaml").read_text())
    assert protocol["name"] == "repaformer"
    assert protocol["batch_size"] == 128 and protocol["dtype"] == "float32"
    for key, kind in (("paper_device", str), ("img_size", int), ("runs", int), ("repeats", int),
                      ("warmup", int), ("channels_last", bool), ("statistic", str)):
        assert isinstance(protocol[key], kind), key
    assert protocol["assumptions"] and all(isinstance(a, str) for a in protocol["assumptions"])
