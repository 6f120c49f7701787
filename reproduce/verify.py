"""`reproduce verify`: the chain behind every filled accuracy cell, re-checked by anyone.

Without data, each filled accuracy cell of a results CSV is derived again from the per-image
evidence beside its run's result.json (`provenance.accept`: the evidence intact, of this run and
checkpoint, of the split recorded, its targets the classes its folders name, the full ImageNet-1k
val, and the cell's number the one derived). With `--data ROOT`, the checkpoint the result names is
run again on a seeded sample of N of the evidence's images, found in ROOT's split, and each
image's top-1 must be the one the evidence lists (AGREEMENT of them: a different GPU or bf16 may
flip an image whose two best logits tie). A cell that is refused or disagrees fails the command.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from reproduce import evidence, provenance, report
from reproduce.registry import DERIVED_KINDS, RegistryError, load_table
from reproduce.runner import TableRun

AGREEMENT = 0.99  # share of sampled images whose re-run top-1 must equal the evidence's
SAMPLE = 256


@dataclass
class Verdict:
    cell: str          # <table>/<row>/<column>
    ok: bool
    line: str          # what was checked, or why it was refused (one line)


def filled_accuracy_cells(run, frame):
    """(row, column, recorded cell) of every filled, measured (not derived, not cited) accuracy cell."""
    spec = run.spec
    for cell in frame.itertuples():
        if cell.row not in spec.rows or cell.column not in spec.columns or not cell.measured:
            continue
        row, column = spec.rows[cell.row], spec.columns[cell.column]
        if column.kind in DERIVED_KINDS or run.base_kind(column) != "accuracy" or row.cited:
            continue
        yield row, column, cell


def verify_results(path: Path, data: str | None = None, sample: int = SAMPLE, seed: int = 0) -> list[Verdict]:
    """One verdict per filled accuracy cell of the results CSV `path` (none: nothing is filled)."""
    from reproduce import runner

    try:
        spec = load_table(path.stem)
        frame = report.read_results(path)
    except (RegistryError, ValueError) as e:
        return [Verdict(path.stem, False, str(e))]
    run = TableRun(spec, "cpu", show_progress=False)
    verdicts = []
    for row, column, cell in filled_accuracy_cells(run, frame):
        name = f"{spec.id}/{row.id}/{column.id}"
        folder = runner.RUNS_DIR / spec.id / spec.run_name(row.id, column.id)
        value = run.accuracy_value(row, column)
        if value is None:
            why = run.refused.get((row.id, column.id)) or f"no {folder / 'result.json'} is behind it (edited by hand?)"
            verdicts.append(Verdict(name, False, why))
            continue
        derived = report.format_measured(value, cell.reported, "accuracy")
        if derived != cell.measured:
            verdicts.append(Verdict(name, False, f"refused: the CSV says {cell.measured}, its evidence gives {derived}"))
            continue
        result = json.loads((folder / "result.json").read_text())
        line = f"{cell.measured} = its evidence ({result['data']['images']} images)"
        if data is None:
            verdicts.append(Verdict(name, True, line))
            continue
        ok, again = rerun_sample(spec, row, column, result, folder, data, sample, seed)
        verdicts.append(Verdict(name, ok, f"{line}; {again}"))
    return verdicts


def rerun_sample(spec, row, column, result: dict, folder: Path, data: str, sample: int, seed: int):
    """(ok, one line): the result's checkpoint run again on `sample` images of `data` (a seeded
    choice among the evidence's), each top-1 compared with the evidence line of that image."""
    from reproduce.engine import EngineError
    from reproduce.engine.evaluate import evaluate_checkpoint

    record, _ = provenance.DERIVED_FROM[column.source or "top1"]
    _, rows, reason = evidence.derive(folder, result, record, stated={})
    if reason:
        return False, f"refused: {reason}"
    expected = {image: top5[0] for image, _, top5 in rows}
    chosen = random.Random(seed).sample(sorted(expected), min(sample, len(expected)))
    form = "deploy" if record == "evidence_deploy" else result["form"]
    num_classes, kwargs = model_build(result)
    try:
        again = evaluate_checkpoint(result["model"], result["weights"]["path"], data, transform=result["transform"],
                                    img_size=result["img_size"], num_classes=num_classes,
                                    split=result["data"]["split"], batch_size=64, workers=0, form=form,
                                    model_kwargs=kwargs, only=chosen)
    except (EngineError, OSError, ValueError, KeyError) as err:
        return False, f"re-run on {data} failed: {err}"
    if evidence.files_sha256(again["split_images"]) != result["data"]["files_sha256"]:
        return False, (f"{data} ({result['data']['split']}: {len(again['split_images'])} images) is not the split "
                       "it was evaluated on (its file list differs)")
    if evidence.list_sha256(again.get("class_names") or []) != result["data"]["classes_sha256"]:
        return False, f"{data}'s class list is not the one it was evaluated with"
    agree = sum(1 for image, _, top5 in again["predictions"] if top5[0] == expected[image])
    seen = len(again["predictions"])
    line = (f"re-run on {seen} images of {data} (seed {seed}): top-1 agrees with the evidence on {agree}/{seen} "
            f"({100.0 * agree / max(seen, 1):.1f} %)")
    if seen < len(chosen) or agree < AGREEMENT * seen:
        return False, f"{line}: the checkpoint does not compute its evidence (need {AGREEMENT:.0%})"
    return True, line


def model_build(result: dict) -> tuple[int, dict]:
    """(num_classes, model kwargs) the result's model was evaluated with: its recipe's for a
    training run, else what `reproduce eval` recorded (1000 classes by default)."""
    if result.get("recipe"):
        from reproduce.engine.recipe import load_recipe

        model = load_recipe(provenance._recipe_path(result["recipe"]["path"]))["model"]
        return model["num_classes"], dict(model.get("kwargs") or {})
    return int(result.get("num_classes") or 1000), dict(result.get("model_kwargs") or {})
