"""`reproduce plan`: what each pending accuracy cell costs to fill, before any GPU time is spent.

Per pending accuracy cell, the path that fills it and an *estimate* of its cost (docs/training.md,
"What a table costs"):

  * released weights (the weights manifest, `released_weights`): one evaluation of 50,000 images,
    forward only: 50,000 x MACs x 2 FLOP;
  * a training recipe (`TableSpec.recipe_of`): epochs x 1,281,167 ImageNet-1k images, each costing
    3 x the student's forward MACs (forward + backward ~ 3 forwards) plus one forward of every teacher
    (distillation, module imitation: forward only), x 2 FLOP per MAC;

over a stated rate: the paper's GPU's peak (dense tensor-core TFLOP/s at the recipe's precision) x
a utilization, both printed and overridable (`--gpu a100 --utilization 0.4 --gpus 8`). GPU-hours
are the sum over GPUs; wall-clock hours divide them by `--gpus`.

And, where measured (`--measure-rates`, cached like every measurement): the training-step images/s
of the recipe's own configuration (student + teachers, recipe batch or the largest that fits, its
AMP dtype) on the current device, a few steps timed after a warm-up, giving device-hours on this
device and the utilization it reached (the calibration of `--utilization`).

Cells whose runs are the same recipe are one run: counted once in every total, and each names the
cells it shares its run with.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pandas as pd

from reproduce import files, measure
from reproduce.registry import DERIVED_KINDS, NOT_REPORTED, PAPERS, RECIPES, RegistryError, load_recipe, load_table
from reproduce.device import resolve
from reproduce.measure import source_fingerprint
from reproduce.runner import RESULTS_DIR, MeasurementCache, TableRun

TRAIN_IMAGES = 1_281_167   # ImageNet-1k train
EVAL_IMAGES = 50_000       # ImageNet-1k validation
FLOP_PER_MAC = 2
TRAIN_STEP_FORWARDS = 3    # forward + backward ~ 3 forward passes of the student

# Dense peak TFLOP/s by precision (vendors' datasheets, no sparsity). "fp32" is the plain FP32 rate.
GPUS = {
    "a100": {"label": "NVIDIA A100 (SXM)", "bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5},
    "v100": {"label": "NVIDIA V100 (SXM2)", "fp16": 125, "bf16": None, "tf32": None, "fp32": 15.7},
    "a6000": {"label": "NVIDIA RTX A6000", "bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7},
    "h100": {"label": "NVIDIA H100 (SXM)", "bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67},
    "h200": {"label": "NVIDIA H200 (SXM)", "bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67},
}
DEFAULT_GPU, DEFAULT_UTILIZATION, DEFAULT_GPUS = "a100", 0.4, 8


class PlanError(ValueError):
    """A plan cannot be made as asked; the message names the thing to fix."""


def released_weights(spec, row_id: str, column_id: str) -> dict | None:
    """The released checkpoint that fills this cell by evaluation: {"id", "model"} or None (the one
    place the plan asks the weights manifest: reproduce/weights.py)."""
    from reproduce import weights

    release = weights.release_for_cell(spec, row_id, column_id)
    return None if release is None else {"id": release.name, "model": release.model}


def precision_of(recipe: dict) -> str:
    """The peak a recipe's steps run at: its AMP dtype, else TF32 (PyTorch's default for convs)."""
    return {"bf16": "bf16", "fp16": "fp16"}.get(str(recipe.get("amp", "off")), "tf32")


def peak_flops(gpu: str, precision: str) -> float:
    try:
        spec = GPUS[gpu]
    except KeyError:
        raise PlanError(f"unknown GPU '{gpu}'; known: {', '.join(GPUS)}") from None
    tflops = spec.get(precision) or spec["fp32"]  # V100 has no bf16/TF32 tensor cores
    return tflops * 1e12


def gpu_of_device(name: str) -> str | None:
    """Our GPU key for a device name ('NVIDIA H200' -> 'h200'), or None (a CPU, an unknown GPU)."""
    low = name.lower().replace(" ", "")
    return next((key for key in GPUS if key in low), None)


def teachers_of(recipe: dict) -> list[dict]:
    """Every model a training step forwards without gradients: each section's `teacher` that is on
    (`distill.type` not none, `imitation.enabled`, or any other section with `enabled: true`)."""
    found = []
    for section, cfg in recipe.items():
        if not isinstance(cfg, dict) or not isinstance(cfg.get("teacher"), dict):
            continue
        on = cfg.get("type", "none") != "none" if "type" in cfg else bool(cfg.get("enabled"))
        if on and cfg["teacher"].get("model"):
            found.append({"role": section, "model": cfg["teacher"]["model"], "kwargs": cfg["teacher"].get("kwargs") or {}})
    return found


# ---------------------------------------------------------------------------------------------
# MACs (fvcore, cached; the GPU machine has no fvcore: then from the cache or left out)


@lru_cache(maxsize=None)
def _fvcore_available() -> bool:
    """Checked once, before building any model to count (the GPU machine has no fvcore)."""
    try:
        import fvcore.nn  # noqa: F401
    except ImportError:
        return False
    return True


MACS_FAILURES: dict[str, str] = {}   # model -> why its MACs could not be counted (shown in the cell's note)


def count_macs_cached(model: str, kwargs: dict, img_size: int, cache: MeasurementCache) -> float | None:
    key = measure.cache_key(kind="macs", model=model, kwargs=json.dumps(kwargs, sort_keys=True), form="train",
                            img_size=img_size, convention="fvcore+attn", code=source_fingerprint())
    value = cache.get(key)
    if value is None and not _fvcore_available():
        MACS_FAILURES[model] = "MACs not counted here (fvcore missing): run `reproduce plan` where it is"
        return None
    if value is None:
        try:
            built = measure.build_model(model, kwargs, for_counting=True)
            value = measure.count_macs(built, img_size, "fvcore+attn")
        except ImportError:   # no fvcore here (the GPU machine): the estimate stays blank
            MACS_FAILURES[model] = "MACs not counted here (fvcore missing): run `reproduce plan` where it is"
            return None
        except Exception as e:  # a model the recipe cannot build: its cells say why, the plan goes on
            MACS_FAILURES[model] = f"MACs of {model} not counted ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            return None
        cache.put(key, value)
    return value


def _counting_kwargs(kwargs: dict, num_classes: int | None) -> dict:
    # drop rates change no MAC; num_classes changes the head
    kept = {k: v for k, v in kwargs.items() if not k.startswith("drop")}
    return {**kept, **({"num_classes": num_classes} if num_classes else {})}


# ---------------------------------------------------------------------------------------------
# Training-step rate on the current device


def _rate_key(recipe_path: str, recipe: dict, device: str, batch_size, img_size) -> str:
    config = {k: v for k, v in recipe.items() if k != "path"}  # the same on every machine
    return measure.cache_key(kind="train_rate", recipe=recipe_path, config=json.dumps(config, sort_keys=True, default=str),
                             device=resolve(device).tag, batch_size=batch_size, img_size=img_size,
                             code=source_fingerprint())


def measure_train_rate(recipe: dict, device: str, steps: int = 3, warmup: int = 1, batch_size: int | None = None,
                       img_size: int | None = None) -> dict:
    """Images/s of the recipe's training step on `device`: student forward + backward + AdamW update,
    every teacher forward under no_grad, at the recipe's AMP dtype (CUDA) and batch (halved on
    out-of-memory). Teachers carry random weights: the rate does not depend on them. Not included:
    data loading, augmentation, module imitation's feature losses (small next to the forwards)."""
    import torch
    import torch.nn.functional as F

    import timm

    model_cfg = recipe["model"]
    size = img_size or recipe["data"]["img_size"]
    num_classes = model_cfg.get("num_classes", 1000)
    student = timm.create_model(model_cfg["name"], num_classes=num_classes, **model_cfg.get("kwargs", {}))
    student = student.to(device).train()
    teachers = [measure.build_model(t["model"], {**t["kwargs"], "num_classes": num_classes}).to(device)
                for t in teachers_of(recipe)]
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(recipe.get("amp")))
    use_amp = device.startswith("cuda") and dtype is not None
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
    batch = batch_size or recipe["batch_size"]
    notes = []

    def one_step(x, y):
        with torch.autocast(device.split(":")[0], dtype=dtype or torch.float32, enabled=use_amp):
            logits = student(x)
            loss = F.cross_entropy(logits, y)
            for teacher in teachers:
                with torch.no_grad():
                    soft = teacher(x).float().softmax(-1)
                loss = loss + F.kl_div(logits.float().log_softmax(-1), soft, reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    while True:
        try:
            x = torch.randn(batch, 3, size, size, device=device)
            y = torch.randint(0, num_classes, (batch,), device=device)
            for _ in range(warmup):
                one_step(x, y)
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                one_step(x, y)
            sync()
            seconds = time.perf_counter() - start
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise measure.MeasureError("out of memory at batch size 1") from None
            batch //= 2
            notes.append(f"out of memory: batch halved to {batch}")
            x = y = None
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return {"img_per_s": batch * steps / seconds, "batch_size": batch, "steps": steps, "img_size": size,
            "amp": str(recipe.get("amp")) if use_amp else "off", "notes": notes}


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class Settings:
    gpu: str = DEFAULT_GPU
    utilization: float = DEFAULT_UTILIZATION
    gpus: int = DEFAULT_GPUS
    device: str = "cpu"

    def __post_init__(self):
        if self.gpu not in GPUS:
            raise PlanError(f"unknown GPU '{self.gpu}'; known: {', '.join(GPUS)}")
        if not 0 < self.utilization <= 1:
            raise PlanError(f"--utilization must be in (0, 1], got {self.utilization}")
        if self.gpus < 1:
            raise PlanError(f"--gpus must be at least 1, got {self.gpus}")


@dataclass
class RunCost:
    """One run (a recipe, or one evaluation of released weights) and what it costs."""
    key: str
    path: str                 # recipe | weights
    images: int
    step_gmacs: float | None  # per image, student x3 + teachers (training) or forward (evaluation)
    precision: str
    epochs: int | None = None
    student: str = ""
    teachers: str = ""
    rate: dict | None = None  # measured images/s on the current device
    cells: list = field(default_factory=list)

    def gpu_hours(self, settings: Settings) -> float | None:
        if self.step_gmacs is None:
            return None
        flops = self.images * self.step_gmacs * 1e9 * FLOP_PER_MAC
        return flops / (peak_flops(settings.gpu, self.precision) * settings.utilization) / 3600

    def device_hours(self) -> float | None:
        return self.images / self.rate["img_per_s"] / 3600 if self.rate else None


def pending_accuracy_cells(spec) -> list[tuple[str, str]]:
    """(row, column) of the printed accuracy cells that no result fills yet (derived cells follow)."""
    run = TableRun(spec, "cpu", kinds=set(), show_progress=False)
    cells = []
    for ref in spec.reference.itertuples():
        row, column = spec.rows[ref.row], spec.columns[ref.column]
        if column.kind != "accuracy" or column.kind in DERIVED_KINDS or ref.reported in NOT_REPORTED or row.cited:
            continue
        if run.accuracy_value(row, column) is None:
            cells.append((row.id, column.id))
    return cells


class Planner:
    def __init__(self, settings: Settings, cache: MeasurementCache | None = None):
        self.settings, self.cache = settings, cache or MeasurementCache()
        self.runs: dict[str, RunCost] = {}
        self.rows: list[dict] = []

    def _recipe_run(self, recipe_path: str) -> RunCost:
        if recipe_path in self.runs:
            return self.runs[recipe_path]
        recipe = load_recipe(recipe_path)
        size, num_classes = recipe["data"]["img_size"], recipe["model"].get("num_classes")
        student_cfg = recipe["model"]
        student = count_macs_cached(student_cfg["name"], _counting_kwargs(student_cfg.get("kwargs", {}), num_classes),
                                    size, self.cache)
        teachers = teachers_of(recipe)
        teacher_macs = [count_macs_cached(t["model"], _counting_kwargs(t["kwargs"], num_classes), size, self.cache)
                        for t in teachers]
        step = (None if student is None or None in teacher_macs
                else TRAIN_STEP_FORWARDS * student + sum(teacher_macs))
        cost = RunCost(key=recipe_path, path="recipe", images=recipe["epochs"] * TRAIN_IMAGES, step_gmacs=step,
                       precision=precision_of(recipe), epochs=recipe["epochs"], student=student_cfg["name"],
                       teachers=" + ".join(f"{t['model']} ({t['role']})" for t in teachers))
        cost.rate = self.cache.get(_rate_key(recipe_path, recipe, self.settings.device, None, None))
        self.runs[recipe_path] = cost
        return cost

    def _weights_run(self, weights: dict, img_size: int) -> RunCost:
        key = f"weights:{weights['id']}"
        if key not in self.runs:
            macs = count_macs_cached(weights["model"], {}, img_size, self.cache)
            self.runs[key] = RunCost(key=key, path="weights", images=EVAL_IMAGES, step_gmacs=macs, precision="tf32",
                                     student=weights["model"])
        return self.runs[key]

    def add_table(self, spec) -> None:
        for row_id, column_id in pending_accuracy_cells(spec):
            cell = f"{spec.id}/{row_id}/{column_id}"
            recipe = spec.recipe_of(row_id, column_id)
            weights = released_weights(spec, row_id, column_id)
            training = self._recipe_run(recipe) if recipe and (RECIPES / recipe).exists() else None
            run = self._weights_run(weights, spec.rows[row_id].img_size) if weights else training
            note = ""
            if run is None:
                note = (f"recipe {recipe} not written yet" if recipe else
                        "no recipe and no released weights: needs trained weights (`reproduce eval`)")
            elif weights and training:
                saved = training.gpu_hours(self.settings), run.gpu_hours(self.settings)
                if None not in saved and saved[1] > 0:
                    note = f"from released weights: {saved[0] / saved[1]:.0f}x cheaper than training ({saved[0]:.0f} GPU-h)"
            if run is not None:
                run.cells.append(cell)
            self.rows.append({"table": spec.id, "paper": spec.paper, "row": row_id, "column": column_id,
                              "cell": cell, "run": run, "note": note})

    # -- output -------------------------------------------------------------------------------------
    def frame(self) -> pd.DataFrame:
        s = self.settings
        out = []
        for r in self.rows:
            run: RunCost | None = r["run"]
            gpu_h = run.gpu_hours(s) if run else None
            dev_h = run.device_hours() if run else None
            out.append({
                "table": r["table"], "row": r["row"], "column": r["column"],
                "path": run.path if run else "none", "run": run.key if run else "",
                "shared_with": "; ".join(c for c in run.cells if c != r["cell"]) if run else "",
                "epochs": run.epochs if run and run.epochs else "", "images": run.images if run else "",
                "student": run.student if run else "", "teachers": run.teachers if run else "",
                "step_gmacs": _fmt(run.step_gmacs if run else None, 3), "precision": run.precision if run else "",
                "gpu": s.gpu, "peak_tflops": _fmt(peak_flops(s.gpu, run.precision) / 1e12 if run else None, 1),
                "utilization": s.utilization, "gpu_hours_estimate": _fmt(gpu_h, 1),
                "wall_hours_estimate": _fmt(gpu_h / s.gpus if gpu_h is not None else None, 1), "gpus": s.gpus,
                "device": resolve(s.device).tag,
                "device_img_per_s": _fmt(run.rate["img_per_s"] if run and run.rate else None, 2),
                "device_hours_estimate": _fmt(dev_h, 1),
                "note": r["note"] or ("" if not run or run.step_gmacs is not None else self._macs_note(run)),
            })
        return pd.DataFrame(out)

    @staticmethod
    def _macs_note(run: RunCost) -> str:
        models = [run.student] + [t.split(" (")[0] for t in run.teachers.split(" + ") if t]
        return "; ".join(dict.fromkeys(MACS_FAILURES[m] for m in models if m in MACS_FAILURES)) or "MACs not counted"

    def totals(self, by: str) -> pd.DataFrame:
        """Per table or per paper: cells, distinct runs, GPU-hours (each run counted once)."""
        s = self.settings
        groups: dict[str, dict] = {}
        for r in self.rows:
            g = groups.setdefault(r[by], {by: r[by], "pending_cells": 0, "cells_without_path": 0, "runs": {}})
            g["pending_cells"] += 1
            if r["run"] is None:
                g["cells_without_path"] += 1
            else:
                g["runs"][r["run"].key] = r["run"]
        lines = []
        for g in groups.values():
            runs = list(g.pop("runs").values())
            hours = [run.gpu_hours(s) for run in runs]
            device = [run.device_hours() for run in runs]
            counted = [h for h in hours if h is not None]
            lines.append({**g, "runs": len(runs), "runs_counted": len(counted),
                          "gpu_hours_estimate": _fmt(sum(counted), 0),
                          "wall_days_estimate": _fmt(sum(counted) / s.gpus / 24, 1),
                          "device_hours_estimate": _fmt(sum(d for d in device if d is not None), 0)
                          if any(d is not None for d in device) else "",
                          "runs_with_device_rate": sum(d is not None for d in device)})
        return pd.DataFrame(lines)

    def calibration(self) -> list[str]:
        """What the measured rates say of `--utilization` on the current device's GPU."""
        gpu = gpu_of_device(measure.device_name(self.settings.device)) if self.settings.device.startswith("cuda") else None
        lines = []
        for run in self.runs.values():
            if run.rate and run.step_gmacs and gpu:
                util = run.rate["img_per_s"] * run.step_gmacs * 1e9 * FLOP_PER_MAC / peak_flops(gpu, run.precision)
                lines.append(f"{run.key}: {run.rate['img_per_s']:.0f} img/s at batch {run.rate['batch_size']} = "
                             f"{util:.0%} of the {GPUS[gpu]['label']}'s {run.precision} peak")
        return lines

    def measure_rates(self, steps: int, seconds: float, batch_size: int | None = None, img_size: int | None = None,
                      echo=print) -> None:
        """Time a few training steps of each run's recipe, largest estimate first, until `seconds` pass."""
        start = time.perf_counter()
        order = sorted((r for r in self.runs.values() if r.path == "recipe"),
                       key=lambda r: -(r.gpu_hours(self.settings) or r.images))
        for run in order:
            if time.perf_counter() - start > seconds:
                echo(f"plan: rate budget of {seconds:.0f} s spent; the rest keep their cached rates or none")
                break
            recipe = load_recipe(run.key)
            key = _rate_key(run.key, recipe, self.settings.device, batch_size, img_size)
            rate = self.cache.get(key)
            if rate is None:
                try:
                    rate = measure_train_rate(recipe, self.settings.device, steps, batch_size=batch_size,
                                              img_size=img_size)
                except (measure.MeasureError, measure.ModelNotImplemented, RuntimeError) as e:
                    echo(f"plan: {run.key}: no rate ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                    continue
                self.cache.put(key, rate)
            run.rate = rate
            echo(f"plan: {run.key}: {rate['img_per_s']:.1f} img/s (batch {rate['batch_size']})")


def _fmt(value, digits):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return round(float(value), digits) if digits else int(round(value))


def render_markdown(planner: Planner, tables: list[str]) -> str:
    s = planner.settings
    per_table, per_paper = planner.totals("table"), planner.totals("paper")
    lines = [f"# What the pending accuracy cells cost ({', '.join(tables) if len(tables) < 6 else f'{len(tables)} tables'})",
             "", "**Estimates**, not measurements: GPU-hours = images x (3 x student MACs + teachers' MACs) x 2 FLOP "
             f"/ ({GPUS[s.gpu]['label']} peak at the recipe's precision x utilization {s.utilization}); wall-clock "
             f"on {s.gpus} GPU(s). Each run is counted once, however many cells it fills (docs/training.md, "
             "'What a table costs'). Released weights: 50,000 images x forward MACs.", ""]
    if planner.calibration():
        lines += ["Measured on this device (calibration of the utilization):", "",
                  *[f"- {c}" for c in planner.calibration()], ""]
    for title, frame in (("Per paper", per_paper), ("Per table", per_table)):
        lines += [f"## {title}", "", frame.to_markdown(index=False) if len(frame) else "(no pending cells)", ""]
    detail = planner.frame()
    if len(detail):
        shown = detail[["table", "row", "column", "path", "run", "shared_with", "step_gmacs", "gpu_hours_estimate",
                        "device_hours_estimate", "note"]]
        lines += ["## Per cell", "", shown.to_markdown(index=False), ""]
    return "\n".join(lines)


def plan_paths(tables: list[str], all_tables: bool, device: str, results_dir: Path | None) -> tuple[Path, Path]:
    folder = Path(results_dir or RESULTS_DIR) / resolve(device).tag
    stem = "plan" if all_tables else "plan-" + "+".join(tables)
    return folder / f"{stem}.csv", folder / f"{stem}.md"


def make_plan(table_ids: list[str], settings: Settings, cache: MeasurementCache | None = None) -> Planner:
    planner = Planner(settings, cache)
    for table_id in table_ids:
        try:
            planner.add_table(load_table(table_id))
        except RegistryError as e:
            raise PlanError(str(e)) from None
    return planner


def write_plan(planner: Planner, tables: list[str], all_tables: bool, results_dir: Path | None) -> tuple[Path, Path]:
    csv_path, md_path = plan_paths(tables, all_tables, planner.settings.device, results_dir)
    files.atomic_write_text(csv_path, planner.frame().to_csv(index=False))
    files.atomic_write_text(md_path, render_markdown(planner, tables))
    return csv_path, md_path


# ---------------------------------------------------------------------------------------------
# Command line: `reproduce plan [TABLE ...|--all]`

import click  # noqa: E402


@click.command("plan", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("table_ids", nargs=-1)
@click.option("--all", "all_tables", is_flag=True, help="every registered table")
@click.option("--gpu", default=DEFAULT_GPU, show_default=True, type=click.Choice(list(GPUS)),
              help="the GPU the GPU-hours are estimated on")
@click.option("--utilization", default=DEFAULT_UTILIZATION, show_default=True, type=float,
              help="fraction of the GPU's peak a training step reaches")
@click.option("--gpus", default=DEFAULT_GPUS, show_default=True, type=int, help="GPUs per run (wall-clock = GPU-h / gpus)")
@click.option("--device", default="cpu", show_default=True, help="where --measure-rates times training steps")
@click.option("--measure-rates", is_flag=True, help="time a few training steps of each recipe on --device (cached)")
@click.option("--steps", default=3, show_default=True, type=click.IntRange(min=1), help="timed steps per recipe")
@click.option("--rate-seconds", default=600.0, show_default=True, help="stop measuring rates after this many seconds")
@click.option("--batch-size", type=click.IntRange(min=1), help="rates at this batch instead of the recipe's (toy runs)")
@click.option("--img-size", type=click.IntRange(min=16), help="rates at this size instead of the recipe's (toy runs)")
@click.option("--results-dir", type=click.Path(path_type=Path), help="results root (default: results/)")
def plan_command(table_ids, all_tables, gpu, utilization, gpus, device, measure_rates, steps, rate_seconds,
                 batch_size, img_size, results_dir):
    """What each pending accuracy cell costs to fill: path, estimate, totals per table and paper."""
    from rich.console import Console
    from rich.table import Table

    from reproduce.errors import SuiteError
    from reproduce.errors import device as _device
    from reproduce.errors import table_id as _table_id
    from reproduce.registry import table_ids as all_ids

    if not table_ids and not all_tables:
        raise SuiteError("name a table id (e.g. riformer-6) or pass --all")
    ids = all_ids() if all_tables else [_table_id(t) for t in table_ids]
    try:
        settings = Settings(gpu=gpu, utilization=utilization, gpus=gpus, device=_device(device))
        planner = make_plan(ids, settings)
        if measure_rates:
            planner.measure_rates(steps, rate_seconds, batch_size, img_size, echo=lambda m: click.echo(m, err=True))
    except PlanError as e:
        raise SuiteError(str(e)) from None
    csv_path, md_path = write_plan(planner, ids, all_tables, results_dir)
    per_table = planner.totals("table")
    rates = bool(len(per_table)) and per_table["runs_with_device_rate"].sum() > 0
    headers = ["table", "pending", "no path", "runs (costed)", f"GPU-h {gpu}", f"days on {gpus}"]
    grid = Table(*headers, *(["device-h (est.)"] if rates else []),
                 caption=f"estimates: images x (3 x student + teachers) MACs x 2 / ({GPUS[gpu]['label']} peak x "
                         f"{utilization}); each run counted once; a run is costed when its MACs could be "
                         f"counted. Per cell: {csv_path}")
    for line in per_table.itertuples():
        costed = line.runs_counted > 0
        grid.add_row(line.table, str(line.pending_cells), str(line.cells_without_path),
                     f"{line.runs} ({line.runs_counted})", str(line.gpu_hours_estimate) if costed else "–",
                     str(line.wall_days_estimate) if costed else "–",
                     *([str(line.device_hours_estimate) or "–"] if rates else []))
    out = Console()
    out.print(grid)
    for line in planner.totals("paper").itertuples():
        out.print(f"{line.paper}: {line.pending_cells} pending cells, {line.runs} distinct runs, "
                  f"~{line.gpu_hours_estimate} GPU-h on {gpu} (~{line.wall_days_estimate} days on {gpus})",
                  highlight=False)
    for line in planner.calibration():
        out.print(f"calibration: {line}", highlight=False)
    Console(stderr=True).print(f"plan: wrote {csv_path} and {md_path.name}", highlight=False)
