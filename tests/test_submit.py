"""`reproduce submit` / `reproduce jobs` without a scheduler: the job scripts (--dry-run), one job per
distinct run, the refusals and bad input in one line, and the job callable submitit pickles.
The jobs themselves run on a real SLURM in tests/test_submit_slurm.py (`-m slurm --runslurm`)."""
from __future__ import annotations

import json

import cloudpickle
import pytest
from click.testing import CliRunner

from reproduce import submit
from reproduce.cli import main
from reproduce.engine import cells
from reproduce.registry import load_table


@pytest.fixture
def runs(tmp_path, monkeypatch):
    from reproduce import runner

    monkeypatch.setattr(cells, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(runner, "RUNS_DIR", tmp_path / "runs")
    return tmp_path / "runs"


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def one_line_error(result, *parts):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.output
    for part in parts:
        assert part in lines[-1], lines[-1]
    return lines[-1]


def test_dry_run_prints_the_sbatch_script_and_submits_nothing(runs):
    result = invoke("submit", "riformer-2", "identity_label_hard", "--cluster", "slurm", "--scale", "smoke",
                    "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "10", "--partition", "gpu",
                    "--time", "2.5", "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("# riformer-2/identity_label_hard: fills identity_label_hard/top1 (slurm, smoke)\n#!/bin/bash")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --partition=gpu", "#SBATCH --time=150",
                 "#SBATCH --requeue", f"#SBATCH --signal=USR2@{submit.SIGNAL_DELAY_S}",
                 f"#SBATCH --output={runs}/riformer-2/identity_label_hard/submitit/%j_0_log.out",
                 f"-m submitit.core._submit {runs}/riformer-2/identity_label_hard/submitit"):
        assert line in out.splitlines() or line.startswith("-m") and out.rstrip().endswith(line), line
    assert out.count("#!/bin/bash") == 1
    assert not runs.exists()  # no folder, no registry


def test_cells_that_share_a_run_share_a_job(monkeypatch):
    """sit-6's ratio_1 trains one run that fills both its top1_frd and top1_hard cells (ratio_0_5 has
    one run per column)."""
    import reproduce.plan

    spec = load_table("sit-6")
    assert spec.run_name("ratio_1", "top1_frd") == spec.run_name("ratio_1", "top1_hard") == "ratio_1"
    monkeypatch.setattr(reproduce.plan, "pending_accuracy_cells",
                        lambda s: [("ratio_1", "top1_frd"), ("ratio_1", "top1_hard"), ("ratio_0_5", "top1_frd")])
    monkeypatch.setattr(reproduce.plan, "released_weights", lambda *a: None)
    runs, skipped = submit.pending_runs(spec)
    assert [(r.name, r.column, r.cells) for r in runs] == [
        ("ratio_1", None, ["ratio_1/top1_frd", "ratio_1/top1_hard"]),
        ("ratio_0_5--top1_frd", "top1_frd", ["ratio_0_5/top1_frd"])] and not skipped  # a run of its own
    only, _ = submit.pending_runs(spec, rows=("ratio_1",), column="top1_hard")
    assert [(r.name, r.cells) for r in only] == [("ratio_1", ["ratio_1/top1_hard"])]


def test_released_weights_are_evaluated_not_trained():
    runs, skipped = submit.pending_runs(load_table("riformer-6"))
    assert not runs and skipped
    released = [line for line in skipped if "reproduce weights riformer-6 --download" in line]
    assert released and all(line in released or "no recipe trains it" in line for line in skipped)
    trained, _ = submit.pending_runs(load_table("riformer-6"), include_released=True)
    assert trained and all(len(r.cells) == 1 for r in trained)


@pytest.mark.parametrize("args, parts", [
    (["riformer-99", "--cluster", "slurm"], ["unknown table 'riformer-99'"]),
    (["riformer-2", "nosuch", "--cluster", "slurm"], ["table riformer-2 has no row 'nosuch'"]),
    (["riformer-2", "--column", "top5", "--cluster", "slurm"], ["no accuracy column 'top5'", "top1"]),
    (["riformer-6", "--cluster", "slurm", "--scale", "smoke"], ["riformer-6: no pending cell", "nothing to submit"]),
    (["riformer-2", "--cluster", "slurm", "--dry-run"], ["cannot start; missing: ImageNet-1k", "--data"]),
    (["riformer-2", "--cluster", "local", "--nodes", "2"], ["--cluster local runs on this machine"]),
    (["riformer-2", "identity_label_hard", "--cluster", "slurm", "--scale", "smoke", "--tasks-per-node", "3",
      "--dry-run"], ["batch_size 8 does not split over 3 processes"]),
    (["riformer-2", "--cluster", "slurm", "--scale", "smoke", "--time", "0"], ["--time must be positive"]),
])
def test_bad_input_is_one_line(args, parts, runs):
    one_line_error(invoke("submit", *args), *parts)
    assert not (runs / submit.REGISTRY).exists()


def test_no_sbatch_is_one_line(runs, monkeypatch):
    real = submit.shutil.which
    monkeypatch.setattr(submit.shutil, "which", lambda name: None if name == "sbatch" else real(name))
    one_line_error(invoke("submit", "riformer-2", "--cluster", "slurm", "--scale", "smoke"),
                   "sbatch is not on PATH", "scripts/slurm_local.sh start", "--cluster local")


def _registered(runs, run, job_id="41", cluster="slurm"):
    entry = {"job_id": job_id, "cluster": cluster, "table": "riformer-2", "run": run, "row": run, "column": None,
             "cells": [f"{run}/top1"], "scale": "smoke", "data": None, "nodes": 1, "tasks_per_node": 1,
             "gpus_per_node": 0, "submitted": "2026-01-01T00:00:00+00:00", "folder": f"riformer-2/{run}"}
    submit.record(entry)
    return entry


def test_a_running_or_finished_run_is_not_submitted_again(runs, monkeypatch):
    run = "identity_label_no_teacher"
    _registered(runs, run)
    monkeypatch.setattr(submit, "slurm_state", lambda job_id: "RUNNING")
    one_line_error(invoke("submit", "riformer-2", run, "--cluster", "slurm", "--scale", "smoke"),
                   f"riformer-2/{run} is already running as slurm job 41", "reproduce jobs riformer-2")
    monkeypatch.setattr(submit, "slurm_state", lambda job_id: "COMPLETED")
    (runs / "riformer-2" / run).mkdir(parents=True)
    (runs / "riformer-2" / run / "result.json").write_text(json.dumps({"scale": "smoke"}))
    one_line_error(invoke("submit", "riformer-2", run, "--cluster", "slurm", "--scale", "smoke"),
                   f"riformer-2/{run} has finished", "scale smoke", "move that folder away")
    assert len(submit.load_registry()) == 1  # nothing was submitted


def test_a_checkpoint_of_another_scale_is_not_resumed(runs):
    import torch

    run = runs / "riformer-2" / "identity_label_no_teacher"
    run.mkdir(parents=True)
    torch.save({"epoch": 1, "recipe": {"scale": "smoke"}}, run / "checkpoint.pt")
    (tmp := runs.parent / "imagenet").mkdir()
    refused = submit.refusal(submit.pending_runs(load_table("riformer-2"), ("identity_label_no_teacher",))[0][0],
                             "full", [])
    assert refused == (f"riformer-2/identity_label_no_teacher: {run / 'checkpoint.pt'} is a smoke run's checkpoint, "
                       "this is a full run: move that folder away first"), (refused, tmp)
    assert submit.checkpoint_epoch(run / "checkpoint.pt") == 1


def test_jobs_lists_state_cells_and_log(runs, monkeypatch):
    assert "no submitted jobs" in invoke("jobs").output
    entry = _registered(runs, "identity_label_hard", job_id="7")
    log = runs / "riformer-2" / "identity_label_hard" / "submitit" / "7_0_log.out"
    log.parent.mkdir(parents=True)
    log.write_text("epoch 1/2  loss 1.0\nepoch 2/2  loss 0.5\n")
    monkeypatch.setattr(submit, "slurm_state", lambda job_id: "RUNNING" if job_id == "7" else None)
    out = invoke("jobs", "riformer-2", "--tail", "1").output
    assert out.splitlines() == [
        f"riformer-2/identity_label_hard  slurm job 7  RUNNING  (smoke, 1x1 processes, submitted {entry['submitted']})",
        "  identity_label_hard/top1: no result yet",
        "  | epoch 2/2  loss 0.5"]
    # the scheduler forgot it (no accounting): the job's own files say how it ended
    monkeypatch.setattr(submit, "slurm_state", lambda job_id: None)
    assert submit.job_state(entry) == "UNKNOWN"
    (log.parent / "7_0_result.pkl").write_bytes(cloudpickle.dumps(("error", "Traceback ...")))
    assert submit.job_state(entry) == "FAILED"
    (log.parent / "7_0_result.pkl").write_bytes(cloudpickle.dumps(("success", {"top1": 1.0})))
    assert submit.job_state(entry) == "COMPLETED"


def test_a_resubmission_is_recorded_as_the_run_s_latest_job(runs):
    _registered(runs, "identity_label_hard", job_id="7")
    _registered(runs, "identity_label_soft", job_id="8")
    _registered(runs, "identity_label_hard", job_id="9")
    assert [(e["run"], e["job_id"]) for e in submit.latest_jobs("riformer-2")] == [
        ("identity_label_soft", "8"), ("identity_label_hard", "9")]
    assert json.loads((runs / submit.REGISTRY).read_text())["jobs"][0]["job_id"] == "7"  # history kept
    (runs / submit.REGISTRY).write_text("{not json")
    one_line_error(invoke("jobs"), f"{runs / submit.REGISTRY} is not a jobs registry")


def test_the_job_requeues_itself_as_it_is():
    """checkpoint() (what submitit calls on USR2) resubmits this same callable: its next start
    resumes from the run folder, whatever the attempt."""
    job = submit.TrainJob("riformer-2", "identity_label_hard", None, "smoke", None, "/runs/riformer-2/x")
    delayed = job.checkpoint()
    assert delayed.function is job and delayed.args == () and delayed.kwargs == {}
    again = cloudpickle.loads(cloudpickle.dumps(delayed.function))
    assert type(again) is submit.TrainJob and vars(again) == vars(job)
