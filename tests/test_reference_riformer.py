"""The RIFormer reference CSVs (Tables 1-10) and the specs of Tables 6 and 8 agree with the data contract."""
import re

import pytest

from reproduce import registry

from helpers import FLAGS, HEADER, UNITS, first_seen, read_reference, read_spec

SNAKE = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)*$")
TABLES = [f"riformer-{n}" for n in range(1, 11)]
SPEC_TABLES = ["riformer-6", "riformer-8"]


@pytest.mark.parametrize("table", TABLES)
def test_reference_follows_the_contract(table):
    header, cells = read_reference(table)
    assert header == HEADER
    assert cells, "no cells"
    keys = [(c["row"], c["column"]) for c in cells]
    assert len(keys) == len(set(keys)), "a (row, column) pair appears twice"
    for c in cells:
        assert len(c) == len(HEADER), c
        assert c["table"] == table
        assert SNAKE.match(c["row"]) and SNAKE.match(c["column"]), c
        assert c["reported"].strip() == c["reported"] != "", c
        assert c["label"], c
        assert c["unit"] in UNITS, c
        assert all(c[m] in ("0", "1") for m in FLAGS), c
    # row-level facts are the same on every cell of a row
    for row in first_seen(c["row"] for c in cells):
        facts = {(c["label"], c["group"], *(c[m] for m in FLAGS)) for c in cells if c["row"] == row}
        assert len(facts) == 1, row


def test_table6_markers_follow_the_labels():
    _, cells = read_reference("riformer-6")
    for c in cells:
        assert c["epochs_600"] == str(int("⋄" in c["label"]))
        assert c["finetuned_384"] == str(int("‡" in c["label"]))
        assert c["in22k"] == str(int("∗" in c["label"]))
        if c["finetuned_384"] == "1" and c["column"] == "img_size":
            assert c["reported"] == "384"
    groups = first_seen(c["group"] for c in cells)
    assert groups == ["Convolution", "Attention", "Spatial MLP", "2D FFT", "Pooling", "None"]


def test_table5_marks_imagenet22k_teachers():
    _, cells = read_reference("riformer-5")
    for c in cells:
        assert c["in22k"] == str(int("∗" in c["label"]))


def test_table10_has_every_model_for_every_hyper_parameter():
    _, cells = read_reference("riformer-10")
    for row in first_seen(c["row"] for c in cells):
        assert [c["column"] for c in cells if c["row"] == row] == ["s12", "s24", "s36", "m36", "m48"], row


@pytest.mark.parametrize("table", SPEC_TABLES)
def test_spec_and_reference_name_the_same_rows_and_columns(table):
    spec = read_spec(table)
    _, cells = read_reference(table)
    assert spec["id"] == table and spec["paper"] == "riformer" and spec["number"] == int(table.split("-")[1])
    assert spec["protocol"] == "riformer"
    # same ids, and the spec lists them in print order
    assert list(spec["rows"]) == first_seen(c["row"] for c in cells)
    derived = {c for c, col in spec["columns"].items() if col.get("derive_reported")}  # not printed
    assert set(spec["columns"]) - derived == {c["column"] for c in cells}
    for row in spec["rows"]:  # a row may lack a column (the gain), never reorder them
        printed = [c["column"] for c in cells if c["row"] == row]
        assert printed == [column for column in spec["columns"] if column in printed], row


@pytest.mark.parametrize("table", SPEC_TABLES)
def test_spec_rows_are_complete(table):
    spec = read_spec(table)
    for row_id, row in spec["rows"].items():
        assert "model" in row, row_id
        assert row.get("macs_convention") in {"fvcore", "fvcore+attn", "fvcore+fft"}, row_id
        assert row.get("baseline") in (None, *spec["rows"]), row_id
        assert row.get("baseline") != row_id
        if "recipe" in row:  # RIFormer/PoolFormer rows; the others are measured from official weights
            assert row["recipe"] == f"riformer/table{spec['number']}/{row_id}.yaml"
            assert (registry.RECIPES / row["recipe"]).exists(), row["recipe"]
        assert (row.get("form") == "deploy") == row["model"].startswith("riformer_"), row_id
        for column in row.get("cell_notes", {}):
            assert column in spec["columns"], (row_id, column)


def test_table6_attention_and_fft_rows_explain_their_convention():
    rows = read_spec("riformer-6")["rows"]
    for row_id, row in rows.items():
        if row["macs_convention"] != "fvcore":
            assert row["macs_convention"] in row.get("note", ""), row_id
    assert rows["deit_s"]["macs_convention"] == "fvcore+attn"
    assert all(rows[r]["macs_convention"] == "fvcore+fft" for r in rows if r.startswith("gfnet"))


def test_table6_printed_gains_follow_from_the_baseline_throughputs():
    """The printed (↑ x%) equals 100*(RIFormer/baseline - 1) of the printed throughputs, at one decimal."""
    rows = read_spec("riformer-6")["rows"]
    _, cells = read_reference("riformer-6")
    value = {(c["row"], c["column"]): c["reported"] for c in cells}
    gains = [c for c in cells if c["column"] == "throughput_gain"]
    assert len(gains) == 5
    for cell in gains:
        baseline = rows[cell["row"]]["baseline"]
        assert value[(baseline, "img_size")] == value[(cell["row"], "img_size")]
        ratio = float(value[(cell["row"], "throughput")]) / float(value[(baseline, "throughput")])
        assert f"{100 * (ratio - 1):.1f}" == cell["reported"], cell["row"]


def test_table6_riformer_shares_size_with_its_poolformer_baseline():
    rows = read_spec("riformer-6")["rows"]
    _, cells = read_reference("riformer-6")
    value = {(c["row"], c["column"]): c["reported"] for c in cells}
    for row_id, row in rows.items():
        if row.get("baseline"):
            for column in ("params", "macs"):
                assert value[(row_id, column)] == value[(row["baseline"], column)], (row_id, column)
