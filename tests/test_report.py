"""Cell statuses: printed precision, tolerances, truncation, settings; atomic writes."""
import pytest

from reproduce.files import atomic_write_text
from reproduce.report import coarser_printing, compare, parse_number


@pytest.mark.parametrize("text, value, decimals", [
    ("4899.80", 4899.8, 2), ("−2.0", -2.0, 1), ("+84.1%", 84.1, 1), ("(↑ 17.8%)", 17.8, 1), ("3.2×", 3.2, 1),
    ("1e-8", 1e-8, 0), ("10−5", 1e-5, 0), ("1× 10−3", 1e-3, 0), ("12", 12.0, 0),
])
def test_parse_number(text, value, decimals):
    got = parse_number(text)
    assert got[0] == pytest.approx(value) and got[1] == decimals


@pytest.mark.parametrize("text", ["AdamW", "✓", "n/a", "[64, 128]", ""])
def test_parse_number_rejects_text(text):
    assert parse_number(text) is None


def test_compare_at_printed_precision():
    assert compare("1.8", 1.823, 0.1, "macs") == ("match", pytest.approx(0.023))
    assert compare("7.9", 7.834, 0.1, "macs")[0] == "within_tolerance"
    assert compare("1.8", 0.15, 0.1, "macs")[0] == "mismatch"
    assert compare("12", 11.92, 0.1, "params")[0] == "match"


def test_truncated_and_twice_rounded_values_are_within_tolerance_and_say_so():
    assert compare("86", 86.57, 0.1, "params")[0] == "within_tolerance"
    assert coarser_printing("86", 86.57) == "truncated"
    assert compare("25", 24.486, 0.1, "params")[0] == "within_tolerance"
    assert coarser_printing("25", 24.486) == "rounded twice"
    assert coarser_printing("25", 23.9) is None


def test_settings_compare_as_printed():
    assert compare("[1,1,1,11]", "{1, 1, 1, 11}", 0.0, "setting")[0] == "match"
    assert compare("1e-5", 1e-05, 0.0, "setting")[0] == "match"
    assert compare("10−5", "1e-5", 0.0, "setting")[0] == "match"
    assert compare("AdamW", "adamw", 0.0, "setting")[0] == "match"
    assert compare("AdamW", "lamb", 0.0, "setting")[0] == "mismatch"


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "a" / "b.csv"
    atomic_write_text(path, "one\n")
    atomic_write_text(path, "two\n")
    assert path.read_text() == "two\n"
    assert [p.name for p in path.parent.iterdir()] == ["b.csv"]
