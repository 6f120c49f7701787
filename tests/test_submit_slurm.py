"""`reproduce submit --cluster slurm` on a real one-node SLURM started on this machine
(scripts/slurm_local.sh: Debian's slurm-wlm and munge), not a mock.

Two smoke-scale cells of riformer-2 go out as two jobs. Both are stopped after their first checkpoint
(`scontrol suspend`, so that the moment is exact) and interrupted: one requeued with `scontrol
requeue` (SLURM kills it: SIGTERM, SIGKILL 2 s later), the other given the USR2 that SLURM sends ahead
of a time-out or preemption (submitit calls the job's checkpoint() and requeues it). Each next start
resumes from the run folder's checkpoint.pt; the first ends with the same weights as an uninterrupted
run. Both run folders then hold a result.json whose provenance is refused for one reason only: the
smoke scale. Run with
`python -m pytest -q -m slurm --runslurm tests/test_submit_slurm.py` (root; CI runs it, ~3 minutes).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
TABLE = "riformer-2"
REQUEUED, PLAIN = "identity_label_no_teacher", "identity_label_hard"
SMOKE_REFUSAL = "scale 'smoke': only a full run fills a cell"

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster():
    """A one-node SLURM (started here unless one is up; stopped after if this fixture started it)."""
    if os.geteuid() != 0:
        pytest.skip("starting SLURM needs root (apt-get, munged, slurmd)")
    was_up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0
    started = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    assert started.returncode == 0, f"slurm did not start:\n{started.stdout}\n{started.stderr}"
    yield
    if not was_up:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The suite's code and recipes in a scratch checkout, so that its runs/ is the test's own."""
    root = tmp_path_factory.mktemp("checkout")
    for name in ("reproduce", "riformer", "recipes", "results/reference"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    yield root
    registry = root / "runs" / "jobs.json"
    if registry.is_file():  # a failed test leaves no job of its own behind
        for entry in json.loads(registry.read_text())["jobs"]:
            subprocess.run(["scancel", entry["job_id"]], capture_output=True, timeout=60)


def reproduce(tree: Path, *args, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "reproduce.cli", *args], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert done.returncode == 0, f"reproduce {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def scontrol(*args) -> str:
    done = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"scontrol {' '.join(args)}: {done.stderr.strip()}"
    return done.stdout


def start_now(job_id: str) -> None:
    """SLURM holds a requeued job back two minutes: let it start now (while it is still pending)."""
    for _ in range(20):
        if state(job_id) != "PENDING":
            return
        if subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True,
                          timeout=60).returncode == 0:
            return
        time.sleep(0.5)
    scontrol("update", f"JobId={job_id}", "StartTime=now")


def state(job_id: str) -> str:
    words = scontrol("show", "job", "-o", job_id).split()
    return next(w.removeprefix("JobState=") for w in words if w.startswith("JobState="))


def wait_for(condition, seconds: float, what: str, poll: float = 0.05):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")


def task_pid(job_id: str) -> int:
    """The process of the job's task 0 (step 0, global rank 0: the python submitit runs)."""
    for line in scontrol("listpids", job_id).splitlines()[1:]:
        pid, _, step, _, rank = (line.split() + ["-"] * 5)[:5]
        if step == "0" and rank == "0":
            return int(pid)
    raise AssertionError(f"no task process of job {job_id}: {scontrol('listpids', job_id)}")


def epoch_of(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]


def test_two_cells_through_slurm_one_requeued_mid_run(cluster, tree):
    runs = tree / "runs" / TABLE
    # the same cell trained without interruption, for the weights it must end with (started first: it runs beside)
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    uninterrupted = subprocess.Popen(
        [sys.executable, "-m", "reproduce.cli", "train", TABLE, REQUEUED, "--scale", "smoke", "--output",
         str(tree / "uninterrupted")], cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # stop both jobs right after their first checkpoint (suspended: the moment is exact), watching from
    # before they are submitted (a smoke epoch takes a second or two). Then REQUEUED gets `scontrol requeue`,
    # as from an admin or a preempting scheduler (SLURM kills it and queues it again), and PLAIN the signal
    # SLURM sends ahead of a time-out or preemption (USR2): submitit calls the job's checkpoint() and
    # requeues it itself. The USR2 goes to the suspended task's process (scancel waits on a suspended step;
    # sent after a resume it can come after the run's end on a loaded machine): it is handled the moment
    # the job resumes.
    interrupted, watching = {}, threading.Event()

    def interrupt_at_first_checkpoint():
        while watching.is_set() is False and len(interrupted) < 2:
            for run in {REQUEUED, PLAIN} - set(interrupted):
                if (runs / run / "checkpoint.pt").is_file():
                    found = subprocess.run(["squeue", "-h", "-n", f"reproduce-{TABLE}-{run}", "-o", "%i"],
                                           capture_output=True, text=True).stdout.split()
                    if found and subprocess.run(["scontrol", "suspend", found[0]], timeout=60).returncode == 0:
                        interrupted[run] = found[0]
            time.sleep(0.02)

    watcher = threading.Thread(target=interrupt_at_first_checkpoint, daemon=True)
    watcher.start()
    submitted = reproduce(tree, "submit", TABLE, REQUEUED, PLAIN, "--cluster", "slurm", "--scale", "smoke")
    jobs = {entry["run"]: entry for entry in json.loads((tree / "runs" / "jobs.json").read_text())["jobs"]}
    assert set(jobs) == {REQUEUED, PLAIN}, submitted.stdout
    assert jobs[REQUEUED]["cells"] == [f"{REQUEUED}/top1"] and jobs[PLAIN]["cluster"] == "slurm"
    assert f"{TABLE}/{REQUEUED}: slurm job {jobs[REQUEUED]['job_id']} fills {REQUEUED}/top1" in submitted.stdout
    job = jobs[REQUEUED]["job_id"]
    watcher.join(timeout=300)
    watching.set()
    assert interrupted == {run: jobs[run]["job_id"] for run in (REQUEUED, PLAIN)}, interrupted
    for run in (REQUEUED, PLAIN):
        assert epoch_of(runs / run / "checkpoint.pt") == 1 and not (runs / run / "result.json").exists()
    checkpoint = runs / REQUEUED / "checkpoint.pt"
    scontrol("requeue", job)
    plain = jobs[PLAIN]["job_id"]
    os.kill(task_pid(plain), signal.SIGUSR2)
    scontrol("resume", plain)
    for run in (REQUEUED, PLAIN):
        wait_for(lambda: state(jobs[run]["job_id"]) == "PENDING", 60, f"{run} requeued to PENDING", poll=0.2)
        assert epoch_of(runs / run / "checkpoint.pt") == 1  # nothing lost: the killed run's checkpoint is intact
    # a run that is pending (or running) is not submitted twice
    again = reproduce(tree, "submit", TABLE, REQUEUED, "--cluster", "slurm", "--scale", "smoke", check=False)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert f"{TABLE}/{REQUEUED} is already pending as slurm job {job}" in again.stderr, again.stderr
    scontrol("release", job)  # a job requeued while suspended is held
    for run in (REQUEUED, PLAIN):
        start_now(jobs[run]["job_id"])

    for run in (REQUEUED, PLAIN):
        wait_for(lambda: state(jobs[run]["job_id"]) in ("COMPLETED", "FAILED", "CANCELLED"), 420,
                 f"job {jobs[run]['job_id']} ({run}) to end", poll=0.5)
    listing = reproduce(tree, "jobs", TABLE).stdout
    log = (runs / REQUEUED / "submitit" / f"{job}_0_log.out").read_text()
    for run in (REQUEUED, PLAIN):
        assert state(jobs[run]["job_id"]) == "COMPLETED", f"{run}:\n{listing}\n{log}"

    # each job started twice and resumed from its checkpoint at epoch 1; each epoch trained once
    plain_log = (runs / PLAIN / "submitit" / f"{plain}_0_log.out").read_text()
    assert "Caught signal SIGUSR2" in plain_log and "Calling checkpoint method" in plain_log, plain_log
    for run, text in ((REQUEUED, log), (PLAIN, plain_log)):
        job_id, checkpoint = jobs[run]["job_id"], runs / run / "checkpoint.pt"
        assert text.count(f"job {job_id} (task 0/1") == 2, text
        assert f"resuming from {checkpoint} at epoch 1" in text, text
        assert "Restarts=1" in scontrol("show", "job", job_id)
        epochs = [json.loads(line)["epoch"] for line in (runs / run / "log.jsonl").read_text().splitlines()]
        assert epochs == [0, 1], (run, epochs)
        assert epoch_of(checkpoint) == 2

    # and ends where the uninterrupted run ends, bit for bit
    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stdout.read()
    ours = torch.load(runs / REQUEUED / "model.pt", weights_only=True)
    reference = torch.load(tree / "uninterrupted" / "model.pt", weights_only=True)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)

    # both cells' results pass provenance up to the scale, and only the scale refuses them
    from reproduce import provenance
    from reproduce.registry import load_table

    spec = load_table(TABLE)
    for run in (REQUEUED, PLAIN):
        folder = runs / run
        assert {"result.json", "checkpoint.pt", "model.pt"} <= {p.name for p in folder.iterdir()}
        result = json.loads((folder / "result.json").read_text())
        assert result["scale"] == "smoke" and result["run_dir"] == f"{TABLE}/{run}"
        assert result["command"] == f"reproduce train {TABLE} {run} --scale smoke"
        row = spec.rows[run]
        assert provenance.accept(spec, row, spec.columns["top1"], result, row.model, row.form) == (None, SMOKE_REFUSAL)
        assert f"  {run}/top1: {SMOKE_REFUSAL}" in listing, listing
        assert f"{TABLE}/{run}  slurm job {jobs[run]['job_id']}  COMPLETED" in listing, listing

    # a finished run is not submitted again either
    again = reproduce(tree, "submit", TABLE, PLAIN, "--cluster", "slurm", "--scale", "smoke", check=False)
    assert again.returncode == 2 and "has finished" in again.stderr and len(again.stderr.strip().splitlines()) == 1


def test_a_local_job_of_two_processes_trains_with_torch_distributed(tree):
    """`--cluster local --tasks-per-node 2`: submitit starts two processes, its TorchDistributedEnvironment
    gives them RANK/WORLD_SIZE/MASTER_ADDR, and the engine trains one run with DDP (gloo on CPU)."""
    run = "identity_label_soft"
    folder = tree / "runs" / TABLE / run
    submitted = reproduce(tree, "submit", TABLE, run, "--cluster", "local", "--scale", "smoke", "--tasks-per-node", "2")
    entry = [e for e in json.loads((tree / "runs" / "jobs.json").read_text())["jobs"] if e["run"] == run][0]
    assert entry["cluster"] == "local" and entry["tasks_per_node"] == 2, submitted.stdout
    result_pickle = folder / "submitit" / f"{entry['job_id']}_0_result.pkl"
    wait_for(result_pickle.is_file, 420, f"{result_pickle}", poll=0.5)
    log = (folder / "submitit" / f"{entry['job_id']}_0_log.out").read_text()
    assert f"job {entry['job_id']} (task 0/2" in log and "Job completed successfully" in log, log
    assert (folder / "submitit" / f"{entry['job_id']}_1_log.out").is_file()  # the second process's own log
    assert torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=False)["world"] == 2
    assert json.loads((folder / "result.json").read_text())["scale"] == "smoke"
    listing = reproduce(tree, "jobs", TABLE).stdout
    assert f"{TABLE}/{run}  local job {entry['job_id']}  COMPLETED  (smoke, 1x2 processes" in listing, listing
    assert f"  {run}/top1: {SMOKE_REFUSAL}" in listing, listing
