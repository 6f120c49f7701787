"""Where an accuracy number comes from: the one writer of result.json, and the check that a
result belongs to the table cell it is found under.

Every result.json (`reproduce eval`, `reproduce table --weights`, the end of `reproduce train`) is
written by `write_result`, with this schema (SCHEMA = 3):

    schema, table, row, column        the cell (column null: every accuracy cell of the row's run)
    top1, top5                        in %
    model, form, img_size             what was evaluated (form: train | deploy)
    weights: {path, sha256, release, layout}     the evaluated checkpoint (release: manifest name; a
                                                 training run names its final model.pt)
    recipe:  {path, sha256}                      for a training run (sha256 of the recipe resolved with
                                                 all its `base:` files: `recipe_hash`)
    data:    {root, split, images, classes, files_sha256, classes_sha256}   (the split's sorted file
                                                 list, the data root's class list)
    evidence: {file, sha256, images}             the per-image evidence beside it (reproduce/evidence.py);
                                                 evidence_deploy: a training run's folded form
    run_dir                           the folder it was written to (runs/<table>/<row>[--<column>])
    transform: {resize, crop, interpolation, mean, std}
    scale                             full | smoke
    software: {torch, timm, python}, device, date, command
    (anything else the writer adds: epochs, teacher_top1, ...)

`accept(spec, row, column, result)` says whether a result may fill the cell (value, None) or why
not (None, one-line reason). A result is taken only if it names this table and row (and this
column when the cell has a run of its own), evaluated the cell's model (or trained its recipe,
unchanged since: its resolved hash, epochs, model and image size), in the cell's form and image
size, with the cell's release's eval transform (an evaluated checkpoint of a cell the manifest
fills), at scale full, on ImageNet-1k val (IMAGENET_VAL: 50,000 images of 1,000 classes), from the
run folder it is found in, and if the checkpoint it names still has the sha256 it recorded. A
result missing a field this needs is refused (one line naming the field), never trusted. The value
is then derived from the evidence (`derived_value`), never read from result.json.
"""
from __future__ import annotations

import datetime as dt
import platform
import shlex
import sys
from pathlib import Path

SCHEMA = 3  # 2: the recipe hash covers its `base:` files; checkpoint hash and run_dir required
#            3: per-image evidence beside result.json (reproduce/evidence.py); accuracies derived from it
# What an accepted accuracy was measured on. Tests monkeypatch this (not a user option) to accept
# results on generated data; nothing else changes it.
IMAGENET_VAL = {"images": 50000, "classes": 1000}
VAL_SPLITS = ("validation", "val", "valid", "eval", "evaluation")


def file_sha256(path) -> str:
    from riformer.checkpoints import sha256

    return sha256(path)


def recipe_hash(path) -> str:
    """sha256 of a recipe resolved with all its `base:` files (the engine's reading, smoke section
    included), so that an edit of any file in the chain changes it."""
    import hashlib
    import json

    from reproduce.engine.recipe import _read

    resolved = _read(Path(path).resolve())
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()


def recipe_source(recipe: str) -> str:
    """How a setting cell's note names the recipe it was read from: its path and the short hash of
    its resolved content (`recipe_hash`), so that any change of the recipe or of a `base:` file it
    inherits shows in the committed results (and `reproduce diff --remeasure` fails on it)."""
    return f"recipe {recipe} (resolved sha256 {recipe_hash(_recipe_path(recipe))[:SHORT_HASH]})"


SHORT_HASH = 12


def software() -> dict:
    import timm
    import torch

    return {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()}


def command_line() -> str:
    return shlex.join(["reproduce", *sys.argv[1:]])


def write_result(path, *, cell: dict, metrics: dict, model: str, form: str, img_size: int, data: dict,
                 transform: dict, scale: str, device: str, weights: dict | None = None,
                 recipe: dict | None = None, command: str | None = None, deploy_predictions=None, **extra) -> dict:
    """Write `path` (atomically) with the full provenance, and the per-image evidence beside it
    (reproduce/evidence.py, written first); returns what was written.

    `cell`: {table, row, column}; `metrics`: {top1, top5, images, predictions, class_names} (as
    engine.evaluate returns them with predictions=True); `data`: {root, split, images, classes};
    `weights`: {path, sha256?, release?, layout?} (sha256 computed if absent); `recipe`: {path, sha256?};
    `deploy_predictions`: the folded model's (a training run's `top1_deploy`)."""
    import json

    from reproduce import evidence, files

    if weights is not None and not weights.get("sha256") and Path(weights["path"]).is_file():
        weights = {**weights, "sha256": file_sha256(weights["path"])}
    if recipe is not None and not recipe.get("sha256") and _recipe_path(recipe["path"]).is_file():
        recipe = {**recipe, "sha256": recipe_hash(_recipe_path(recipe["path"]))}
    run_dir = "/".join(Path(path).resolve().parent.parts[-2:])
    records = {}
    predictions = metrics.get("predictions")
    if predictions is not None:
        data = {**data, "files_sha256": evidence.files_sha256(p[0] for p in predictions),
                "classes_sha256": evidence.list_sha256(metrics.get("class_names") or [])}
        header = {"run_dir": run_dir, "checkpoint_sha256": (weights or {}).get("sha256"), "model": model,
                  "form": form, "img_size": img_size, "split": data.get("split"), **{k: cell.get(k) for k in
                                                                                    ("table", "row", "column")}}
        records["evidence"] = evidence.write(Path(path).parent / evidence.FILE, predictions, header)
        if deploy_predictions is not None:
            records["evidence_deploy"] = evidence.write(Path(path).parent / evidence.DEPLOY_FILE, deploy_predictions,
                                                        {**header, "form": "deploy"})
    result = {"schema": SCHEMA, **{k: cell.get(k) for k in ("table", "row", "column")},
              "top1": metrics["top1"], "top5": metrics["top5"], "images": metrics.get("images"), "model": model,
              "form": form,
              "img_size": img_size, "weights": weights, "recipe": recipe, "data": data, "transform": transform,
              "scale": scale, "run_dir": run_dir, **records,
              "software": software(), "device": device,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": command or command_line(), **extra}
    files.atomic_write_text(Path(path), json.dumps(result, indent=2) + "\n")
    return result


def _recipe_path(recipe: str) -> Path:
    from reproduce.registry import RECIPES, ROOT

    path = Path(recipe)
    # under the registry's recipes folder first (the one the tables read), then the checkout
    for candidate in (RECIPES / path.as_posix().removeprefix("recipes/"), RECIPES / path, ROOT / path):
        if candidate.is_file():
            return candidate
    return path


# What every result.json that fills a cell must carry (dotted: inside a section).
REQUIRED = ("schema", "table", "row", "top1", "top5", "model", "form", "img_size", "scale", "run_dir",
            "data.split", "data.images", "data.classes", "data.files_sha256", "data.classes_sha256",
            "weights.path", "weights.sha256", "evidence.file", "evidence.sha256")
# The metric a column reads (`source:`) and the evidence it is derived from.
DERIVED_FROM = {"top1": ("evidence", "top1"), "top5": ("evidence", "top5"),
                "top1_deploy": ("evidence_deploy", "top1")}


def _field(result: dict, dotted: str):
    node = result
    for key in dotted.split("."):
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    return node


def accept(spec, row, column, result: dict, model: str | None, form: str, folder=None):
    """(value, None) if `result` may fill the cell (spec, row, column), else (None, reason). The
    value is derived from the evidence beside result.json in `folder` (default: the cell's run
    folder under runs/), never read from result.json."""
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        return None, (f"no provenance of schema {SCHEMA} (hand-written, or written before result.json recorded "
                      "it): evaluate or train it again")
    missing = [f for f in REQUIRED if _field(result, f) is None]
    if result.get("recipe") is not None and not _field(result, "recipe.sha256"):
        missing.append("recipe.sha256")
    if missing:
        return None, f"it lacks {', '.join(missing)}: only `reproduce eval`/`train` write a result that fills a cell"
    where = (result.get("table"), result.get("row"))
    if where != (spec.id, row.id):
        return None, f"it is the result of {where[0]}/{where[1]}, not of {spec.id}/{row.id}"
    own_run = spec.run_name(row.id, column.id) != row.id
    if result.get("column") not in ((column.id,) if own_run else (None, column.id)):
        named = result.get("column") or "the whole row"
        return None, f"it was run for {named}, not for column {column.id} (each of these cells needs its own run)"
    own = f"{spec.id}/{spec.run_name(row.id, column.id)}"
    if result["run_dir"] != own:
        return None, f"it was written in runs/{result['run_dir']}, not in runs/{own} (copied from another run)"
    if result["scale"] != "full":
        return None, f"scale {result['scale']!r}: only a full run fills a cell"
    for name, value in (("top1", result["top1"]), ("top5", result["top5"])):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 100:
            return None, f"its {name} {value!r} is not a percentage"
    data = result["data"]
    images = data["images"] if result.get("images") is None else result["images"]
    if data["split"] not in VAL_SPLITS or data["images"] != IMAGENET_VAL["images"] \
            or images != data["images"] or data["classes"] != IMAGENET_VAL["classes"]:
        counted = data["images"] if images == data["images"] else f"{data['images']} (evaluated: {images})"
        return None, (f"data {data.get('root')} ({data.get('split')}: {counted} images, "
                      f"{data.get('classes')} classes) is not ImageNet-1k val ({IMAGENET_VAL['images']} images, "
                      f"{IMAGENET_VAL['classes']} classes)")
    recipe = result.get("recipe")
    expected = spec.recipe_of(row.id, column.id)
    if recipe:
        if not expected:
            return None, f"it trained {recipe['path']}, the cell has no recipe (it needs an evaluated checkpoint)"
        if Path(recipe["path"]).as_posix().removeprefix("recipes/") != Path(expected).as_posix():
            return None, f"it trained {recipe['path']}, the cell's recipe is {expected}"
        path = _recipe_path(recipe["path"])
        if not path.is_file():
            return None, f"recipe {recipe['path']} is no longer there to verify its hash"
        from reproduce.engine import EngineError
        from reproduce.engine.recipe import load_recipe

        try:
            resolved, trained = recipe_hash(path), load_recipe(path)
        except EngineError as e:
            return None, f"its recipe does not load ({e})"
        if resolved != recipe["sha256"]:
            return None, (f"recipe {recipe['path']} (resolved with its base: files) changed since the run "
                          "(sha256 differs): train it again")
        for name, ran, wanted in (("epochs", result.get("epochs"), trained["epochs"]),
                                  ("model", result["model"], trained["model"]["name"]),
                                  ("img_size", result["img_size"], trained["data"]["img_size"])):
            if ran != wanted:
                return None, f"its {name} {ran!r} is not its recipe's {wanted!r} ({recipe['path']})"
    if model and result["model"] != model:
        return None, f"it evaluated {result['model']}, not this row's {model}"
    if not recipe and result["form"] != form:
        return None, f"it evaluated the {result['form']} form, the cell is the {form} form"
    if result["img_size"] != row.img_size:
        return None, f"it evaluated at {result['img_size']} px, the row is at {row.img_size}"
    refused = _wrong_transform(spec, row, column, result)
    if refused:
        return None, refused
    weights = result["weights"]
    path = Path(weights["path"])
    if not path.is_file():
        return None, f"checkpoint {path} is no longer there to verify its sha256"
    if file_sha256(path) != weights["sha256"]:
        return None, f"checkpoint {path} changed since it was evaluated (sha256 differs): evaluate it again"
    return derived_value(result, column.source or "top1", folder or _runs() / result["run_dir"])


def derived_value(result: dict, source: str, folder):
    """(value of `source` recomputed from the evidence in `folder`, None) or (None, reason): the
    evidence must be intact, of this run and checkpoint, agree with result.json's numbers and cover
    the full ImageNet-1k val."""
    from reproduce import evidence

    if source not in DERIVED_FROM:
        return None, f"its {source} is not derived from per-image evidence (derivable: {', '.join(DERIVED_FROM)})"
    record, metric = DERIVED_FROM[source]
    stated = {"top1_deploy": result.get("top1_deploy")} if record == "evidence_deploy" else None
    found, _, reason = evidence.derive(folder, result, record, stated)
    if reason:
        return None, reason
    if (found["images"], found["classes"]) != (IMAGENET_VAL["images"], IMAGENET_VAL["classes"]) \
            or found["images"] != result["data"]["images"]:
        return None, (f"its evidence holds {found['images']} images of {found['classes']} classes "
                      f"(result.json says {result['data']['images']}), not the full ImageNet-1k val "
                      f"({IMAGENET_VAL['images']} images, {IMAGENET_VAL['classes']} classes)")
    return found[metric], None


def _runs() -> Path:
    from reproduce.registry import ROOT

    return ROOT / "runs"


def _wrong_transform(spec, row, column, result: dict) -> str | None:
    """Why an evaluated checkpoint's transform is not the cell's (the manifest release's), or None."""
    from reproduce import weights

    evaluated = result.get("weights") and not result.get("recipe")  # a trained run evaluates by its recipe
    release = weights.release_for_cell(spec, row.id, column.id) if evaluated else None
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
    if result.get("recipe"):
        return f"trained here: {result['recipe']['path']} ({result.get('epochs', '?')} epochs)."
    if weights:
        return f"evaluated checkpoint {weights['path']} (sha256 {str(weights.get('sha256'))[:12]})."
    return f"trained here: {result['recipe']['path']} ({result.get('epochs', '?')} epochs)."
