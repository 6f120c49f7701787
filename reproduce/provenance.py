"""Where an accuracy number comes from: the one writer of result.json, and the check that a
result belongs to the table cell it is found under.

Every result.json (`reproduce eval`, `reproduce table --weights`, the end of `reproduce train`) is
written by `write_result`, with this schema (SCHEMA = 1):

    schema, table, row, column        the cell (column null: every accuracy cell of the row's run)
    top1, top5                        in %
    model, form, img_size             what was evaluated (form: train | deploy)
    weights: {path, sha256, release, layout}     for an evaluated checkpoint (release: manifest name)
    recipe:  {path, sha256}                      for a training run
    data:    {root, split, images, classes}
    transform: {resize, crop, interpolation, mean, std}
    scale                             full | smoke
    software: {torch, timm, python}, device, date, command
    (anything else the writer adds: epochs, teacher_top1, ...)

`accept(spec, row, column, result)` says whether a result may fill the cell (value, None) or why
not (None, one-line reason). A result is taken only if it names this table and row (and this
column when the cell has a run of its own), evaluated the cell's model (or trained its recipe,
unchanged since), in the cell's form and image size, with the cell's release's eval transform (an
evaluated checkpoint of a cell the manifest fills), at scale full, on ImageNet-1k val
(IMAGENET_VAL: 50,000 images of 1,000 classes), and if the checkpoint it names still has the
sha256 it recorded.
"""
from __future__ import annotations

import datetime as dt
import platform
import shlex
import sys
from pathlib import Path

SCHEMA = 1
# What an accepted accuracy was measured on. Tests monkeypatch this (not a user option) to accept
# results on generated data; nothing else changes it.
IMAGENET_VAL = {"images": 50000, "classes": 1000}
VAL_SPLITS = ("validation", "val", "valid", "eval", "evaluation")


def file_sha256(path) -> str:
    from riformer.checkpoints import sha256

    return sha256(path)


def software() -> dict:
    import timm
    import torch

    return {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()}


def command_line() -> str:
    return shlex.join(["reproduce", *sys.argv[1:]])


def write_result(path, *, cell: dict, metrics: dict, model: str, form: str, img_size: int, data: dict,
                 transform: dict, scale: str, device: str, weights: dict | None = None,
                 recipe: dict | None = None, command: str | None = None, **extra) -> dict:
    """Write `path` (atomically) with the full provenance; returns what was written.

    `cell`: {table, row, column}; `metrics`: {top1, top5, ...}; `data`: {root, split, images, classes};
    `weights`: {path, sha256?, release?, layout?} (sha256 computed if absent); `recipe`: {path, sha256?}."""
    from reproduce import files

    if weights is not None and not weights.get("sha256") and Path(weights["path"]).is_file():
        weights = {**weights, "sha256": file_sha256(weights["path"])}
    if recipe is not None and not recipe.get("sha256") and _recipe_path(recipe["path"]).is_file():
        recipe = {**recipe, "sha256": file_sha256(_recipe_path(recipe["path"]))}
    result = {"schema": SCHEMA, **{k: cell.get(k) for k in ("table", "row", "column")},
              "top1": metrics["top1"], "top5": metrics["top5"], "images": metrics.get("images"), "model": model,
              "form": form,
              "img_size": img_size, "weights": weights, "recipe": recipe, "data": data, "transform": transform,
              "scale": scale, "software": software(), "device": device,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": command or command_line(), **extra}
    import json

    files.atomic_write_text(Path(path), json.dumps(result, indent=2) + "\n")
    return result


def _recipe_path(recipe: str) -> Path:
    from reproduce.registry import RECIPES, ROOT

    path = Path(recipe)
    for base in (ROOT, RECIPES):
        if (base / path).is_file():
            return base / path
    return path


def accept(spec, row, column, result: dict, model: str | None, form: str):
    """(value, None) if `result` may fill the cell (spec, row, column), else (None, reason)."""
    if result.get("schema") != SCHEMA:
        return None, "no provenance (written before result.json recorded it): evaluate or train it again"
    where = (result.get("table"), result.get("row"))
    if where != (spec.id, row.id):
        return None, f"it is the result of {where[0]}/{where[1]}, not of {spec.id}/{row.id}"
    own_run = spec.run_name(row.id, column.id) != row.id
    if result.get("column") not in ((column.id,) if own_run else (None, column.id)):
        named = result.get("column") or "the whole row"
        return None, f"it was run for {named}, not for column {column.id} (each of these cells needs its own run)"
    if result.get("scale") != "full":
        return None, f"scale {result.get('scale')!r}: only a full run fills a cell"
    if model and result.get("model") != model:
        return None, f"it evaluated {result.get('model')}, not this row's {model}"
    if result.get("weights") and result.get("form") != form:
        return None, f"it evaluated the {result.get('form')} form, the cell is the {form} form"
    if result.get("img_size") != row.img_size:
        return None, f"it evaluated at {result.get('img_size')} px, the row is at {row.img_size}"
    refused = _wrong_transform(spec, row, column, result)
    if refused:
        return None, refused
    data = result.get("data") or {}
    if data.get("split") not in VAL_SPLITS or data.get("images") != IMAGENET_VAL["images"] \
            or data.get("classes") != IMAGENET_VAL["classes"]:
        return None, (f"data {data.get('root')} ({data.get('split')}: {data.get('images')} images, "
                      f"{data.get('classes')} classes) is not ImageNet-1k val ({IMAGENET_VAL['images']} images, "
                      f"{IMAGENET_VAL['classes']} classes)")
    recipe = result.get("recipe")
    expected = spec.recipe_of(row.id, column.id)
    if recipe:
        if expected and Path(recipe["path"]).as_posix().removeprefix("recipes/") != Path(expected).as_posix():
            return None, f"it trained {recipe['path']}, the cell's recipe is {expected}"
        path = _recipe_path(recipe["path"])
        if recipe.get("sha256") and (not path.is_file() or file_sha256(path) != recipe["sha256"]):
            return None, f"recipe {recipe['path']} changed since the run (sha256 differs): train it again"
    weights = result.get("weights")
    if weights:
        path = Path(weights["path"])
        if not path.is_file():
            return None, f"checkpoint {path} is no longer there to verify its sha256"
        if weights.get("sha256") and file_sha256(path) != weights["sha256"]:
            return None, f"checkpoint {path} changed since it was evaluated (sha256 differs): evaluate it again"
    if not (recipe or weights):
        return None, "it names neither the checkpoint nor the recipe it comes from"
    return result.get(column.source or "top1"), None


def _wrong_transform(spec, row, column, result: dict) -> str | None:
    """Why an evaluated checkpoint's transform is not the cell's (the manifest release's), or None."""
    from reproduce import weights

    release = weights.release_for_cell(spec, row.id, column.id) if result.get("weights") else None
    if release is None:
        return None
    expected = weights.transform_of(release)
    if weights.same_transform(result.get("transform"), expected):
        return None
    got = weights.describe_transform(result["transform"]) if result.get("transform") else "no recorded transform"
    return (f"it was evaluated with {got}, the cell's is {weights.describe_transform(expected)} "
            f"({weights.transform_source(release)}): evaluate it again without transform flags")


def origin_note(result: dict) -> str:
    """How the cell's number was obtained, for its note."""
    weights = result.get("weights") or {}
    if weights.get("release"):
        return f"released weights {Path(weights['path']).name} ({weights['release']})."
    if weights:
        return f"evaluated checkpoint {weights['path']} (sha256 {str(weights.get('sha256'))[:12]})."
    return f"trained here: {result['recipe']['path']} ({result.get('epochs', '?')} epochs)."
