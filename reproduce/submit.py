"""`reproduce submit` and `reproduce jobs`: a table's pending accuracy cells as cluster jobs.

One job per distinct run (cells that share a run folder share a job), sent through submitit to SLURM
(`--cluster slurm`) or to this machine's processes (`--cluster local`). A job trains its run folder
runs/<table>/<run> with the engine (engine/cells.train_cell), in nodes x tasks-per-node processes;
torch.distributed comes from submitit's environment (TorchDistributedEnvironment exports RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, which engine/distributed.py reads as it reads torchrun's).

The job's callable is a submitit Checkpointable: on SLURM's timeout/preemption signal (USR2, 90 s
before the kill) submitit pickles `checkpoint()`'s DelayedSubmission and requeues the job. Every start
of the job (the first, a requeue by the scheduler or an admin, a resubmission after a crash) resumes
from the run folder's checkpoint.pt when there is one: the last finished epoch, written atomically,
from which the engine continues bit for bit. submitit's own files (the sbatch script, the pickles,
the logs) are in runs/<table>/<run>/submitit/; runs/jobs.json (written atomically) maps each job id
to its run, its cells and its cluster. A result.json written there fills its cells through
provenance as any other run's does (a smoke-scale one never does).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from reproduce.errors import SuiteError

CLUSTERS = ("slurm", "local")
REGISTRY = "jobs.json"
# Job states in which a job still holds its run (squeue/scontrol/sacct spellings, and submitit's local ones).
LIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "CONFIGURING", "COMPLETING",
        "RESIZING", "SIGNALING", "STAGE_OUT", "PREEMPTED", "STOPPED_LIVE"}
MAX_TIMEOUTS = 50       # requeues after a time-out (preemptions do not count): a long run on a short partition
SIGNAL_DELAY_S = 120    # USR2 this long before the time limit: the epoch in flight is lost, not the checkpoint


def runs_root() -> Path:
    from reproduce.engine import cells

    return cells.RUNS


@dataclass
class Run:
    """One distinct run of a table's pending cells: the job that trains it."""
    table: str
    name: str                   # the run folder under runs/<table>/
    row: str
    column: str | None          # the --column of `reproduce train` (None: the row's own recipe)
    recipe: str
    cells: list[str] = field(default_factory=list)  # "row/column" of every pending cell it fills

    @property
    def folder(self) -> Path:
        return runs_root() / self.table / self.name

    @property
    def label(self) -> str:
        return f"{self.table}/{self.name}"


def pending_runs(spec, rows: tuple[str, ...] = (), column: str | None = None,
                 include_released: bool = False) -> tuple[list[Run], list[str]]:
    """The distinct runs behind the table's pending accuracy cells (of ROWS / COLUMN when given), in
    the table's order, and one line per pending cell no job trains (why, and what fills it instead)."""
    from reproduce.plan import pending_accuracy_cells, released_weights

    unknown = [r for r in rows if r not in spec.rows]
    if unknown:
        raise SuiteError(f"table {spec.id} has no row {', '.join(map(repr, unknown))} (rows: {', '.join(spec.rows)})")
    accuracy = [c.id for c in spec.columns_of_kind("accuracy")]
    if column is not None and column not in accuracy:
        raise SuiteError(f"table {spec.id} has no accuracy column {column!r} (its accuracy columns: "
                         f"{', '.join(accuracy)})")
    runs: dict[str, Run] = {}
    skipped = []
    for row_id, column_id in pending_accuracy_cells(spec):
        if rows and row_id not in rows or column and column_id != column:
            continue
        cell = f"{row_id}/{column_id}"
        recipe = spec.recipe_of(row_id, column_id)
        released = released_weights(spec, row_id, column_id)
        if released and not include_released:
            skipped.append(f"{spec.id}/{cell}: released weights {released['id']} fill it by evaluation (minutes): "
                           f"reproduce weights {spec.id} --download, then reproduce table {spec.id} --weights DIR "
                           f"--data ROOT (or --include-released to train it)")
            continue
        if not recipe:
            skipped.append(f"{spec.id}/{cell}: no recipe trains it (it needs an evaluated checkpoint)")
            continue
        name = spec.run_name(row_id, column_id)
        run = runs.setdefault(name, Run(spec.id, name, row_id, column_id if name != row_id else None, recipe))
        run.cells.append(cell)
    return list(runs.values()), skipped


# -- the job ---------------------------------------------------------------------------------------

def _checkpointable():
    import submitit.helpers

    return submitit.helpers.Checkpointable


class TrainJob(_checkpointable()):
    """What each process of a job runs: the engine on the run folder, resumed from its checkpoint."""

    def __init__(self, table: str, row: str, column: str | None, scale: str, data: str | None, output: str):
        self.table, self.row, self.column = table, row, column
        self.scale, self.data, self.output = scale, data, output

    def __call__(self) -> dict:
        import submitit

        from reproduce.engine.cells import train_cell

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # torch.distributed from the job's own environment (env:// init in the engine)
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        checkpoint = Path(self.output) / "checkpoint.pt"
        resume = checkpoint.is_file()
        if env.global_rank == 0:
            start = (f"resuming from {checkpoint} at epoch {checkpoint_epoch(checkpoint)}" if resume
                     else f"starting {self.output}")
            print(f"job {env.job_id} (task {env.global_rank}/{env.num_tasks}, {env.hostname}): {start}", flush=True)
        return train_cell(self.table, self.row, self.column, scale=self.scale, data=self.data, output=Path(self.output),
                          resume=resume, world=env.num_tasks)

    def checkpoint(self, *args, **kwargs):
        """On a time-out or preemption signal: requeue this same job. Its next start resumes from
        checkpoint.pt (the epoch in flight reruns; nothing finished is lost)."""
        import submitit.helpers

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def checkpoint_epoch(path: Path) -> int | None:
    """The epochs a checkpoint.pt holds (memory-mapped: a full-size one is not read whole)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False).get("epoch")
    except Exception:  # noqa: BLE001  (a torn or foreign file: the engine's resume says what is wrong)
        return None


def checkpoint_scale(path: Path) -> str | None:
    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)["recipe"].get("scale")
    except Exception:  # noqa: BLE001
        return None


# -- executors -------------------------------------------------------------------------------------

@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None   # default: one process per GPU (one on a CPU node)
    cpus_per_task: int | None = None
    partition: str | None = None
    hours: float = 24.0

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)


def slurm_parameters(run: Run, res: Resources) -> dict:
    params = {"job_name": f"reproduce-{run.table}-{run.name}", "nodes": res.nodes, "ntasks_per_node": res.tasks,
              "time": max(1, round(res.hours * 60)), "signal_delay_s": SIGNAL_DELAY_S, "stderr_to_stdout": True,
              "additional_parameters": {"requeue": True}}
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.cpus_per_task:
        params["cpus_per_task"] = res.cpus_per_task
    if res.partition:
        params["partition"] = res.partition
    return params


def submitit_folder(run: Run) -> Path:
    return run.folder / "submitit"


def job_script(cluster: str, run: Run, res: Resources) -> str:
    """The job script submitit would submit (sbatch text; for local, the command it starts)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = submitit_folder(run)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    if cluster == "local":
        return f"# local: {res.tasks} process(es) on this machine, {res.hours:g} h limit\n{command}\n"
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(run, res))


def make_executor(cluster: str, run: Run, res: Resources):
    import submitit

    folder = submitit_folder(run)
    if cluster == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=MAX_TIMEOUTS)
        executor.update_parameters(**slurm_parameters(run, res))
        return executor
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=MAX_TIMEOUTS)
    executor.update_parameters(timeout_min=max(1, round(res.hours * 60)), tasks_per_node=res.tasks, nodes=1,
                               gpus_per_node=res.gpus_per_node, signal_delay_s=SIGNAL_DELAY_S, stderr_to_stdout=True)
    return executor


# -- the registry ----------------------------------------------------------------------------------

def registry_path() -> Path:
    return runs_root() / REGISTRY


def load_registry() -> list[dict]:
    path = registry_path()
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())["jobs"]
    except (ValueError, KeyError, TypeError):
        raise SuiteError(f"{path} is not a jobs registry (JSON with a 'jobs' list): move it away") from None


def record(entry: dict) -> None:
    from reproduce import files

    jobs = load_registry() + [entry]
    files.atomic_write_text(registry_path(), json.dumps({"jobs": jobs}, indent=2) + "\n")


def latest_jobs(table: str | None = None) -> list[dict]:
    """The registry's last job of each run (of TABLE), in submission order."""
    last: dict[tuple[str, str], dict] = {}
    for entry in load_registry():
        if table is None or entry["table"] == table:
            last.pop((entry["table"], entry["run"]), None)
            last[(entry["table"], entry["run"])] = entry
    return list(last.values())


# -- state -----------------------------------------------------------------------------------------

def _run(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def slurm_state(job_id: str) -> str | None:
    """The scheduler's word on a job: scontrol (live and recently ended jobs), else sacct (where the
    cluster keeps accounting), else None."""
    text = _run(["scontrol", "show", "job", "-o", job_id])
    if text:
        for word in text.split():
            if word.startswith("JobState="):
                return word.removeprefix("JobState=")
    text = _run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id])
    if text and text.strip():
        return text.strip().splitlines()[-1].split()[0]
    return None


def _process_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    try:  # a zombie (ended, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def file_state(entry: dict) -> str:
    """What the job's own files say: submitit's result pickle, else the run's result.json."""
    folder = runs_root() / entry["table"] / entry["run"]
    pickle = folder / "submitit" / f"{entry['job_id']}_0_result.pkl"
    if pickle.is_file():
        import pickle as pickle_module

        try:
            outcome = pickle_module.loads(pickle.read_bytes())[0]
        except Exception:  # noqa: BLE001
            outcome = "?"
        return "COMPLETED" if outcome == "success" else "FAILED"
    if (folder / "result.json").is_file():
        return "COMPLETED"
    return "UNKNOWN"


def job_state(entry: dict) -> str:
    if entry["cluster"] == "slurm":
        state = slurm_state(entry["job_id"])
        if state:
            return state
    elif _process_alive(entry["job_id"]):
        return "RUNNING"
    return file_state(entry)


def log_path(entry: dict) -> Path:
    return runs_root() / entry["table"] / entry["run"] / "submitit" / f"{entry['job_id']}_0_log.out"


def log_tail(entry: dict, lines: int) -> list[str]:
    path = log_path(entry)
    if not path.is_file():
        return []
    text = path.read_text(errors="replace").replace("\r", "\n")
    return [line for line in text.splitlines() if line.strip()][-lines:]


# -- the commands ----------------------------------------------------------------------------------

def refusal(run: Run, scale: str, jobs: list[dict]) -> str | None:
    """Why RUN may not be submitted now (one line), or None."""
    for entry in jobs:
        if (entry["table"], entry["run"]) == (run.table, run.name):
            state = job_state(entry)
            if state in LIVE:
                return (f"{run.label} is already {state.lower()} as {entry['cluster']} job {entry['job_id']}: "
                        f"see reproduce jobs {run.table}")
    result = run.folder / "result.json"
    if result.is_file():
        try:
            done = json.loads(result.read_text()).get("scale", "?")
        except ValueError:
            done = "?"
        return (f"{run.label} has finished ({result}, scale {done}): move that folder away to train it again")
    checkpoint = run.folder / "checkpoint.pt"
    if checkpoint.is_file():
        found = checkpoint_scale(checkpoint)
        if found != scale:
            return (f"{run.label}: {checkpoint} is a {found or 'unreadable'} run's checkpoint, this is a {scale} run: "
                    "move that folder away first")
    return None


def submit(table: str, rows: tuple[str, ...], column: str | None, cluster: str, res: Resources, scale: str,
           data: str | None, dry_run: bool, include_released: bool = False, echo=print) -> list[dict]:
    """Submit one job per distinct pending run; returns the registry entries written."""
    from reproduce.engine import EngineError
    from reproduce.engine.cells import check_cell
    from reproduce.registry import RegistryError, load_table

    if cluster == "local" and res.nodes != 1:
        raise SuiteError(f"--cluster local runs on this machine: --nodes 1, not {res.nodes}")
    if res.nodes < 1 or res.tasks < 1 or res.gpus_per_node < 0:
        raise SuiteError("--nodes and --tasks-per-node must be at least 1, --gpus-per-node at least 0")
    if res.hours <= 0:
        raise SuiteError(f"--time must be positive hours, got {res.hours:g}")
    try:
        spec = load_table(table)
    except RegistryError as err:
        raise SuiteError(str(err)) from None
    runs, skipped = pending_runs(spec, rows, column, include_released)
    for line in skipped:
        echo(f"skip {line}")
    if not runs:
        which = f" of {', '.join(rows)}" if rows else ""
        raise SuiteError(f"{table}: no pending cell{which}{f' in column {column}' if column else ''} "
                         "that a job trains: nothing to submit")
    if cluster == "slurm" and not dry_run and shutil.which("sbatch") is None:
        raise SuiteError("sbatch is not on PATH: this is no SLURM login node (a one-node cluster here: "
                         "bash scripts/slurm_local.sh start), or use --cluster local")
    world = res.nodes * res.tasks
    for run in runs:
        try:
            recipe = check_cell(run.table, run.row, run.column, scale, data)[3]  # missing data/teachers: before any job
        except EngineError as err:
            raise SuiteError(str(err)) from None
        if recipe["batch_size"] % world:
            raise SuiteError(f"{run.label}: batch_size {recipe['batch_size']} does not split over {world} processes "
                             f"(--nodes {res.nodes} x {res.tasks} per node)")
    jobs, written, refused = load_registry(), [], []
    for run in runs:
        if dry_run:
            echo(f"# {run.label}: fills {', '.join(run.cells)} ({cluster}, {scale})")
            echo(job_script(cluster, run, res))
            continue
        reason = refusal(run, scale, jobs)
        if reason:
            refused.append(reason)
            echo(f"refused: {reason}")
            continue
        run.folder.mkdir(parents=True, exist_ok=True)
        resumes = run.folder / "checkpoint.pt"
        epoch = checkpoint_epoch(resumes) if resumes.is_file() else None
        job = TrainJob(run.table, run.row, run.column, scale, data, str(run.folder.resolve()))
        try:
            submitted = make_executor(cluster, run, res).submit(job)
        except Exception as err:  # noqa: BLE001  (sbatch's own message, in one line)
            message = " ".join(str(err).split())
            raise SuiteError(f"{run.label}: the {cluster} submission failed: {message[:300]}") from None
        entry = {"job_id": str(submitted.job_id), "cluster": cluster, "table": run.table, "run": run.name,
                 "row": run.row, "column": run.column, "cells": run.cells, "scale": scale, "data": data,
                 "nodes": res.nodes, "tasks_per_node": res.tasks, "gpus_per_node": res.gpus_per_node,
                 "submitted": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "folder": str(run.folder.relative_to(runs_root())), "resumed_from_epoch": epoch}
        record(entry)
        jobs.append(entry)
        written.append(entry)
        echo(f"{run.label}: {cluster} job {submitted.job_id} fills {', '.join(run.cells)}"
             + (f"; resumes from its checkpoint (epoch {epoch})" if epoch is not None else "")
             + f"; logs in {submitit_folder(run)}")
    if refused and not written and not dry_run:
        raise SuiteError(refused[0] if len(refused) == 1 else f"all {len(refused)} runs refused (above)")
    return written


def cell_verdicts(entry: dict) -> list[str]:
    """Each cell of the job's run: its value if provenance accepts the run's result.json, else why not."""
    from reproduce.registry import load_table
    from reproduce.runner import TableRun

    spec = load_table(entry["table"])
    table_run = TableRun(spec, "cpu", kinds=set(), show_progress=False)
    out = []
    for cell in entry["cells"]:
        row_id, column_id = cell.split("/")
        value = table_run.accuracy_value(spec.rows[row_id], spec.columns[column_id])
        if value is not None:
            out.append(f"{cell} = {value:.2f}")
        else:
            reason = table_run.refused.get((row_id, column_id))
            out.append(f"{cell}: {reason.split(' refused: ')[-1] if reason else 'no result yet'}")
    return out


def jobs_report(table: str | None, tail: int) -> list[dict]:
    """Every run's last job (of TABLE): id, cluster, state, cells and what provenance says of them, log tail."""
    return [{**entry, "state": job_state(entry), "verdicts": cell_verdicts(entry), "log": log_tail(entry, tail),
             "log_path": str(log_path(entry))} for entry in latest_jobs(table)]

