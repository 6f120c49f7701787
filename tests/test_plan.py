"""`reproduce plan`: one cell's estimate checked by hand, runs shared by cells counted once, the
released-weights path, the one-line errors. MACs are counted for real once (PoolFormer-S12)."""
import json

import pytest
from click.testing import CliRunner

from reproduce import plan
from reproduce.cli import main
from reproduce.registry import TableSpec, load_recipe, load_table
from reproduce.runner import MeasurementCache

A100_BF16 = 312e12   # dense bf16 peak, the A100 datasheet


@pytest.fixture
def cache(tmp_path):
    return MeasurementCache(tmp_path / "cache")


@pytest.fixture
def fake_macs(monkeypatch):
    """G-MACs per model without fvcore (the arithmetic, not the counting, is under test)."""
    macs = {"poolformer_v1_s12": 1.8, "riformer_s12": 1.8, "gfnet_h_b": 15.5, "poolformer_v1_s9": 1.4,
            "poolformer_v1_xs12": 1.3}
    monkeypatch.setattr(plan, "count_macs_cached", lambda model, kwargs, img_size, cache: macs.get(model))
    return macs


def test_one_cell_by_hand(cache, monkeypatch):
    """riformer-8 PoolFormer-S12: no teacher; epochs x images x 3 x MACs x 2 over peak x utilization.
    Its MACs are counted for real by the plan (the other rows' teachers would take a minute)."""
    real = plan.count_macs_cached
    monkeypatch.setattr(plan, "count_macs_cached", lambda model, kwargs, img_size, cache:
                        real(model, kwargs, img_size, cache) if model == "poolformer_v1_s12" else 1.0)
    epochs = load_recipe("riformer/table8/poolformer_s12.yaml")["epochs"]
    assert epochs == 120   # Table 8 trains 120 epochs
    planner = plan.make_plan(["riformer-8"], plan.Settings(gpu="a100", utilization=0.4, gpus=8), cache)
    line = planner.frame().set_index("row").loc["poolformer_s12"]
    macs = line["step_gmacs"] / 3
    assert 1.7 < macs < 1.9   # PoolFormer-S12: 1.8 G (RIFormer Table 6), counted by fvcore
    by_hand = epochs * 1_281_167 * 3 * macs * 1e9 * 2 / (A100_BF16 * 0.4) / 3600
    assert line["path"] == "recipe" and line["teachers"] == "" and line["precision"] == "bf16"
    assert line["gpu_hours_estimate"] == pytest.approx(by_hand, abs=0.05)
    assert line["wall_hours_estimate"] == pytest.approx(by_hand / 8, abs=0.05)


def test_teachers_are_forward_only(fake_macs, cache):
    planner = plan.make_plan(["riformer-8"], plan.Settings(), cache)
    line = planner.frame().set_index("row").loc["riformer_s12"]   # KD from GFNet-H-B, imitation of PoolFormer-S12
    assert line["step_gmacs"] == pytest.approx(3 * 1.8 + 15.5 + 1.8)
    assert "gfnet_h_b (distill)" in line["teachers"] and "poolformer_v1_s12 (imitation)" in line["teachers"]


def test_cells_sharing_a_run_are_counted_once(fake_macs, cache, monkeypatch):
    """Two rows trained by one recipe: one run in the totals, each cell naming the other."""
    shared = "riformer/table8/riformer_s12.yaml"
    original = TableSpec.recipe_of
    monkeypatch.setattr(TableSpec, "recipe_of", lambda self, row, column: shared if row in
                        ("riformer_s12", "poolformer_s9") else original(self, row, column))
    planner = plan.make_plan(["riformer-8"], plan.Settings(), cache)
    frame = planner.frame().set_index("row")
    assert frame.loc["poolformer_s9", "shared_with"] == "riformer-8/riformer_s12/top1"
    assert frame.loc["riformer_s12", "shared_with"] == "riformer-8/poolformer_s9/top1"
    total = planner.totals("table").iloc[0]
    assert total["pending_cells"] == 4 and total["runs"] == 3
    one_each = {r: frame.loc[r, "gpu_hours_estimate"] for r in ("poolformer_s12", "poolformer_xs12", "riformer_s12")}
    assert total["gpu_hours_estimate"] == pytest.approx(sum(one_each.values()), abs=1)


def test_released_weights_are_one_evaluation_and_say_how_much_cheaper(fake_macs, cache, monkeypatch):
    monkeypatch.setattr(plan, "released_weights", lambda spec, row, column:
                        {"id": "poolformer_s12.pth.tar", "model": "poolformer_v1_s12"} if row == "poolformer_s12" else None)
    planner = plan.make_plan(["riformer-8"], plan.Settings(), cache)
    line = planner.frame().set_index("row").loc["poolformer_s12"]
    assert line["path"] == "weights" and line["images"] == 50_000
    assert line["step_gmacs"] == pytest.approx(1.8) and "cheaper than training" in line["note"]


def test_a_measured_accuracy_is_no_longer_pending(fake_macs, cache, monkeypatch, tmp_path):
    from reproduce import runner

    monkeypatch.setattr(runner, "RUNS_DIR", tmp_path / "runs")
    from helpers import write_accepted_result

    write_accepted_result(tmp_path / "runs", "riformer-8", "poolformer_s12", 77.1)
    rows = set(plan.make_plan(["riformer-8"], plan.Settings(), cache).frame()["row"])
    assert "poolformer_s12" not in rows and "riformer_s12" in rows


def test_plan_command_prints_totals_and_writes_csv(fake_macs, tmp_path):
    result = CliRunner().invoke(main, ["plan", "riformer-8", "--gpu", "v100", "--gpus", "4",
                                       "--results-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "riformer-8" in result.output and "GPU-h" in result.output and "days on 4" in result.output
    written = list(tmp_path.glob("*/plan-riformer-8.csv"))
    assert written and "gpu_hours_estimate" in written[0].read_text().splitlines()[0]


@pytest.mark.parametrize("args, message", [
    ([], "name a table id"),
    (["riformer-88"], "unknown table"),
    (["riformer-8", "--utilization", "0"], "--utilization must be in (0, 1]"),
])
def test_bad_input_is_one_line(args, message, fake_macs, tmp_path):
    result = CliRunner().invoke(main, ["plan", *args, "--results-dir", str(tmp_path)])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_recipes_of_every_table_load(fake_macs, cache):
    """Every pending accuracy cell of every table gets a path or says why it has none."""
    planner = plan.make_plan([t for t in ("riformer-6", "sit-2", "repaformer-7")], plan.Settings(), cache)
    frame = planner.frame()
    assert len(frame) and ((frame["path"] != "none") | (frame["note"] != "")).all()
    assert set(frame["table"]) <= {"riformer-6", "sit-2", "repaformer-7"}
    assert load_table("riformer-6").id == "riformer-6"
