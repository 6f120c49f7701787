"""Which accuracy cell a run fills, and evaluating a checkpoint into one.

Below the command line (reproduce/engine/cli.py and the weights manifest both call it): `cell_run`
resolves TABLE ROW [--column] to its recipe and run folder, `cell_of_output` reads a run folder back
to its cell, `evaluate_into_cell` evaluates a checkpoint and writes its result.json with provenance.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from reproduce.engine import EngineError

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
RUNS = ROOT / "runs"


def cell_run(table: str, row: str, column: str | None, recipe_option: str | None = None) -> tuple[Path, str, str | None]:
    """(recipe, run folder name, column) of the accuracy cell(s) TABLE ROW [--column COLUMN] trains."""
    from reproduce.registry import RegistryError, load_table

    try:
        spec = load_table(table)
    except RegistryError as err:
        if recipe_option:  # an explicit --recipe outside the registry: TABLE ROW only name the run folder
            return Path(recipe_option), row, column
        raise EngineError(str(err)) from None
    if row not in spec.rows:
        raise EngineError(f"table {table} has no row {row!r} (rows: {', '.join(spec.rows)})")
    spec_row = spec.rows[row]
    own_runs = [c for c in spec.columns if c in spec_row.recipes]  # in the table's column order
    if column is None and own_runs and not spec_row.recipe:
        raise EngineError(f"row {row} of {table} trains one run per column: add --column ({', '.join(own_runs)})")
    if column is not None and column not in own_runs:
        own = f"its columns: {', '.join(own_runs)}" if own_runs else "drop --column"
        own += "; without --column it trains the row's own recipe" if own_runs and spec_row.recipe else ""
        raise EngineError(f"row {row} of {table} has no recipe of its own for column {column!r} ({own})")
    recipe = recipe_option or (spec.recipe_of(row, column) if column else spec_row.recipe)
    if not recipe:
        raise EngineError(f"row {row} of {table} has no `recipe:` in recipes/tables/{table}.yaml")
    return (Path(recipe) if recipe_option else RECIPES / recipe), spec.run_name(row, column) if column else row, column


def command_line(table, row, column, scale, data, nproc, recipe_option) -> str:
    """The `reproduce train` command that trains this cell (recorded in its result.json)."""
    parts = ["reproduce", "train", table, row] + (["--column", column] if column else []) + ["--scale", scale]
    if data:
        parts += ["--data", data]
    if nproc > 1:
        parts += ["--nproc", str(nproc)]
    if recipe_option:
        parts += ["--recipe", recipe_option]
    return shlex.join(parts)


def check_cell(table: str, row: str, column: str | None, scale: str, data: str | None,
               recipe_option: str | None = None) -> tuple[Path, str, str | None, dict]:
    """(recipe, run folder name, column, loaded recipe) of a cell to train, or an EngineError naming in
    one line what is missing (teacher/init checkpoints, data): checked before any work starts."""
    from reproduce.engine.dryrun import missing_files
    from reproduce.engine.recipe import load_recipe

    path, run_name, column = cell_run(table, row, column, recipe_option)
    recipe = load_recipe(path, scale=scale)
    missing = missing_files(recipe, data, need_data=scale == "full", table=table)
    if missing:
        raise EngineError(f"{table}/{run_name} cannot start; missing: {'; '.join(missing)}")
    return path, run_name, column, recipe


def train_cell(table: str, row: str, column: str | None, *, scale: str, data: str | None, output: Path | None = None,
               resume: bool = False, recipe_option: str | None = None, world: int = 1) -> dict:
    """Train the cell's recipe into its run folder (`output`, default runs/<table>/<run>) and evaluate it:
    what `reproduce train` and a `reproduce submit` job run in each process."""
    from reproduce.engine.train import train

    path, run_name, column, recipe = check_cell(table, row, column, scale, data, recipe_option)
    output = Path(output) if output else RUNS / table / run_name
    info = {"table": table, "row": row, "column": column,
            "recipe": str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path),
            "command": command_line(table, row, column, scale, data, world, recipe_option)}
    return train(recipe, data=data, output=output, resume=resume, info=info)


def cell_of_output(output: Path | None) -> dict:
    """{table, row, column} of a run folder runs/<table>/<row>[--<column>] (else all None)."""
    if output is None or Path(output).resolve().parent.parent != RUNS.resolve():
        return {"table": None, "row": None, "column": None}
    row, _, column = Path(output).name.partition("--")
    return {"table": Path(output).parent.name, "row": row, "column": column or None}


def evaluate_into_cell(model, checkpoint, data, *, transform, img_size, form, output, cell, split="validation",
                       num_classes=1000, batch_size=128, workers=4, release=None, model_kwargs=None) -> dict:
    """Evaluate a checkpoint and, if `output` is given, write its result.json with provenance."""
    from reproduce import provenance
    from reproduce.engine.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(model, checkpoint, data, transform=transform, img_size=img_size,
                                 num_classes=num_classes, split=split, batch_size=batch_size, workers=workers,
                                 form=form, model_kwargs=model_kwargs)
    if output:
        provenance.write_result(
            Path(output) / "result.json", cell=cell, metrics=result, model=model, form=form, img_size=img_size,
            weights={"path": str(Path(checkpoint).resolve()), "release": release, "layout": result["layout"]},
            data={"root": str(data), "split": split, "images": result["images"], "classes": result["classes"]},
            transform=transform, scale="full", device=result["device"], num_classes=num_classes,
            model_kwargs=model_kwargs or {})  # how `reproduce verify --data` builds the model again
    return result


def evaluate_table(spec, weights_dir, data, *, batch_size=128, workers=None, echo=print) -> list[str]:
    """Evaluate every row of `spec` whose release file is in `weights_dir`, with the release's
    transform, into the cell's run folder (result.json with provenance). Returns the rows done."""
    from reproduce.weights import (EVAL_WORKERS, WeightsError, accuracy_rows, column_releases, find,
                                   release_for_cell, transform_of)

    done = []
    printed = set(zip(spec.reference["row"], spec.reference["column"]))
    for row in map(spec.rows.get, accuracy_rows(spec)):
        own_columns = column_releases(spec.id, row.id)
        folders = {}  # run folder -> (column, release, whether the release is that column's own model)
        for column in spec.columns_of_kind("accuracy"):
            release = release_for_cell(spec, row.id, column.id) if (row.id, column.id) in printed else None
            if release is not None:
                folders.setdefault(spec.run_name(row.id, column.id), (column, release, column.id in own_columns))
        evaluated = False
        for folder, (column, release, by_column) in folders.items():
            path = find(release, weights_dir)
            if path is None:
                continue
            form = column.form or row.form
            model = release.model if by_column else row.model
            try:
                result = evaluate_into_cell(
                    model, str(path), data, transform=transform_of(release), img_size=row.img_size, form=form,
                    output=RUNS / spec.id / folder, cell={"table": spec.id, "row": row.id,
                                                          "column": column.id if folder != row.id else None},
                    batch_size=batch_size, workers=EVAL_WORKERS if workers is None else workers, release=release.name,
                    model_kwargs=None if by_column else row.model_kwargs)
            except EngineError as err:
                raise WeightsError(f"{spec.id}/{row.id}: {err}") from None
            echo(f"{spec.id}/{folder}: {release.local_name} -> top-1 {result['top1']:.2f} "
                 f"({result['images']} images, {form} form)")
            evaluated = True
        if evaluated:
            done.append(row.id)
    return done
