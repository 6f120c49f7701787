"""The cell units of reproduce/cells/, each on its own: static counts, throughput (groups, paired
rounds, the device-bound note), accuracy (refused and pending), settings (recipe, model, declared),
and the note texts. Small models and real table specs; fast."""
import copy

import pytest
from helpers import scratch_table

from reproduce import measure, runner
from reproduce.cells import notes
from reproduce.cells.throughput import connected_groups
from reproduce.registry import load_table

SPEC = {
    "id": "riformer-6", "paper": "riformer", "number": 6, "title": "two rows of Table 6", "protocol": "riformer",
    "columns": {"params": {"kind": "params", "unit": "M"}, "macs": {"kind": "macs", "unit": "G"},
                "throughput": {"kind": "throughput", "unit": "img/s"},
                "throughput_gain": {"kind": "gain", "unit": "%", "of": "throughput", "over_row": "baseline"},
                "top1": {"kind": "accuracy", "unit": "%"}},
    "defaults": {"img_size": 64},
    "rows": {"poolformer_s12": {"model": "poolformer_v1_s12"},
             "riformer_s12": {"model": "riformer_s12", "form": "deploy", "baseline": "poolformer_s12"}},
}


@pytest.fixture
def run(tmp_path, monkeypatch):
    scratch_table(tmp_path, monkeypatch, copy.deepcopy(SPEC), "riformer-6")
    yield runner.TableRun(load_table("riformer-6"), show_progress=False)
    load_table.cache_clear()


class Progress:
    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass

    def advance(self, *args):
        pass


def test_static_counts_each_model_once_and_cache_every_count(run, monkeypatch):
    built = []
    plain = measure.build_model
    monkeypatch.setattr(measure, "build_model", lambda *a, **k: built.append(a[0]) or plain(*a, **k))
    run.kinds = {"params", "macs"}
    run.static.measure(Progress())
    assert sorted(built) == ["poolformer_v1_s12", "riformer_s12"]  # one build for both counts
    assert run.values[("riformer_s12", "params")] == pytest.approx(11.915176)
    again = runner.TableRun(run.spec, show_progress=False, kinds={"params", "macs"})
    again.static.measure(Progress())
    assert sorted(built) == ["poolformer_v1_s12", "riformer_s12"] and again.values == run.values  # cached


def test_a_model_that_fails_to_build_leaves_its_cells_pending_with_why(run, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no such layer")

    monkeypatch.setattr(measure, "build_model", broken)
    run.kinds = {"params"}
    cells = run.run().set_index(["row", "column"])
    assert cells.loc[("riformer_s12", "params"), "status"] == "pending"
    assert "pending: measurement failed: RuntimeError: no such layer" in cells.loc[("riformer_s12", "params"), "note"]


def test_throughput_gains_use_the_paired_rounds_of_one_session(run):
    rounds = {"img_per_s": 0, "batch_size": 2, "notes": [], "session": "s"}
    run.record_throughput("poolformer_s12", "throughput",
                          {**rounds, **measure.summarize([10.0, 10.0, 12.0]), "session": "s"})
    run.record_throughput("riformer_s12", "throughput", {**rounds, **measure.summarize([12.0, 11.0, 18.0])})
    row, column = run.spec.rows["riformer_s12"], run.spec.columns["throughput_gain"]
    assert run.derived_value(row, column) == pytest.approx(20.0)  # median of 1.2, 1.1, 1.5
    low, high, how = run.throughput.derived_range(column, run._operands(row, column))
    assert (round(low, 6), round(high, 6), how) == (10.0, 50.0, "over 3 interleaved rounds")
    run.throughput.samples[("riformer_s12", "throughput")] = ("another session", [12.0, 11.0, 18.0])
    assert run.derived_value(row, column) == pytest.approx(100 * (12.0 / 10.0 - 1))  # ratio of medians


def test_an_absolute_throughput_off_the_paper_device_is_pending_with_the_command(run):
    run.record_throughput("riformer_s12", "throughput",
                          {**measure.summarize([12.0, 11.0, 18.0]), "batch_size": 2, "notes": [], "session": "s"})
    cell = run.cell(next(r for r in run.spec.reference.itertuples()
                         if (r.row, r.column) == ("riformer_s12", "throughput")))
    assert cell["status"] == "pending" and cell["measured"] == "12.0000"
    assert cell["note"].startswith("absolute images/s are device-bound: printed on NVIDIA A100 80GB")
    assert "(batch 2, median of 3 timings, range 11.0–18.0)" in cell["note"]


def test_connected_groups_join_every_gain_into_one_timing_group():
    assert connected_groups(list("abcde"), [("a", "b"), ("c", "d"), ("b", "d")]) == [["a", "b", "c", "d"], ["e"]]


def test_accuracy_without_a_run_is_pending_with_its_command_and_a_bad_file_is_refused(run, tmp_path):
    row, column = run.spec.rows["riformer_s12"], run.spec.columns["top1"]
    assert run.accuracy_value(row, column) is None and not run.refused
    assert run.accuracy.pending_note(row, column).endswith(
        "`reproduce eval riformer_s12 --checkpoint FILE --data /path/to/imagenet --img-size 64 --deploy "
        "--output runs/riformer-6/riformer_s12`")
    folder = tmp_path / "runs" / "riformer-6" / "riformer_s12"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text("{not json")
    assert run.accuracy_value(row, column) is None
    assert run.refused[("riformer_s12", "top1")].endswith("result.json is not valid JSON")
    assert run.accuracy.pending_note(row, column).startswith(run.refused[("riformer_s12", "top1")] + ". ")


def test_settings_read_the_recipe_or_the_built_model_and_a_spec_value_is_only_declared():
    repa = load_table("repaformer-7")
    run = runner.TableRun(repa, show_progress=False, kinds={"setting"})
    row = next(iter(repa.rows.values()))
    value, where, declared = run.setting_value(row, repa.columns["epochs"])
    from reproduce import provenance
    assert where == f"{provenance.recipe_source(row.recipe)}: epochs" and not declared  # names its resolved hash
    sit = load_table("sit-2")
    run = runner.TableRun(sit, show_progress=False, kinds={"setting"})
    value, where, declared = run.setting_value(sit.rows["sit_ti"], sit.columns["embed_dim"])
    assert (value, where, declared) == (320, "the built model sit_ti: embed_dim of its blocks", False)


def test_the_note_texts_are_the_committed_ones():
    """A change of wording changes results/: these are the words the committed files carry."""
    assert notes.NOT_MEASURED == "pending: not measured"
    assert notes.deviation("t", "mismatch", "why", "mismatch") == "Accepted mismatch (declared in t.yaml): why"
    assert notes.deviation("t", "within_tolerance", "why", "mismatch") == \
        "The spec declares this cell a within tolerance (why), but it is mismatch now."
    assert notes.gain_range("gain", 13.439, 31.081, "over 7 interleaved rounds") == \
        "median of per-round ratios; range +13.4 to +31.1 over 7 interleaved rounds."
    assert notes.setting_read("recipe r.yaml: data.img_size", 224) == \
        "read from recipe r.yaml: data.img_size. Params, MACs and throughput are measured at the spec's img_size 224."
