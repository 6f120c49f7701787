"""Does a path work here: a model builds, a training recipe builds its models, a release is known.

The lowest of the checks (the table runner asks it before reading a setting from a recipe; `reproduce
list` counts coverage with it). Each answer is cached on disk under .cache/coverage, keyed by what it
depends on and the code fingerprint, so a second `reproduce list` is quick.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import timm

from reproduce import files, measure
from reproduce.registry import ROOT

CACHE_DIR = Path(os.environ.get("REPRODUCE_COVERAGE_CACHE", ROOT / ".cache" / "coverage"))


# ---------------------------------------------------------------------------------------------
# Does a path work here? Each answer is cached on disk under .cache/coverage, keyed by what it
# depends on and the code fingerprint, so a second `reproduce list` is quick.

def _cached(what: str, payload, check) -> tuple[bool, str]:
    key = json.dumps({"what": what, "payload": payload, "code": measure.source_fingerprint()}, sort_keys=True, default=str)
    path = Path(CACHE_DIR) / f"{hashlib.sha1(key.encode()).hexdigest()}.json"
    try:
        ok, why = json.loads(path.read_text())["answer"]
        return bool(ok), str(why)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    ok, why = check()
    files.atomic_write_text(path, json.dumps({"key": key, "answer": [ok, why]}))
    return ok, why


def _build(name: str, kwargs: dict, form: str = "train"):
    """A model at full size: on the meta device where its construction allows, else for real."""
    try:
        return measure.build_model(name, kwargs, form, meta=True)
    except (NotImplementedError, RuntimeError) as e:
        if isinstance(e, measure.MeasureError):
            raise
        return measure.build_model(name, kwargs, form)


def model_builds(name: str | None, kwargs: dict | None = None, form: str = "train") -> tuple[bool, str]:
    """(True, "") if `timm.create_model(name, **kwargs)` builds in `form`, else (False, why)."""
    if not name or name not in timm.list_models():
        return False, f"model not implemented: {name}"

    def check():
        try:
            _build(name, kwargs or {}, form)
            return True, ""
        except Exception as e:  # any failure is the answer
            return False, f"{type(e).__name__}: {e}"

    return _cached("model", [name, kwargs or {}, form], check)


def recipe_runs(recipe_path) -> tuple[bool, str]:
    """Whether a training recipe works here. The dry run's stored outcome decides where there is one
    (`reproduce dry-run`, `make dry-run`: the full-size student and teachers, one optimizer step at the
    real image size, the fold); without one, the recipe must load (full scale) and its student and
    every teacher it trains with must build at full size with `timm.create_model` (no weights are
    loaded), the student with the token mixer the recipe names. Returns (ok, the reason when not)."""
    from reproduce.engine import EngineError, dryrun
    from reproduce.engine.recipe import load_recipe as engine_load_recipe
    from reproduce.engine.train import check_token_mixer

    try:
        recipe = engine_load_recipe(Path(recipe_path))
    except EngineError as e:
        return False, str(e)
    outcome = dryrun.cached_outcome(recipe_path)
    if outcome is not None:
        return outcome.ok, outcome.error
    content = {k: v for k, v in recipe.items() if k not in ("path", "scale")}

    def check():
        model, classes = recipe["model"], recipe["model"]["num_classes"]
        wanted = [("student", model["name"], model.get("kwargs") or {})]
        distill, imitation = recipe.get("distill") or {}, recipe.get("imitation") or {}
        if distill.get("type", "none") != "none":
            wanted.append(("distillation teacher", distill["teacher"].get("model"), distill["teacher"].get("kwargs") or {}))
        if imitation.get("enabled"):
            wanted.append(("imitation teacher", imitation["teacher"].get("model"), imitation["teacher"].get("kwargs") or {}))
        for role, name, kwargs in wanted:
            if not name or name not in timm.list_models():
                return False, f"{role} {name!r} is not a timm model"
            try:
                built = _build(name, {"num_classes": classes, **kwargs})
                if role == "student":
                    check_token_mixer(built, model.get("token_mixer"), str(recipe_path))
            except Exception as e:  # the reason is the answer
                return False, f"{role} {name} does not build: {type(e).__name__}: {e}"
        return True, ""

    return _cached("recipe", content, check)


def released_weights(spec, row_id: str, column_id: str) -> bool:
    """Whether the weights manifest (recipes/weights.yaml) names a release that fills this accuracy cell."""
    from reproduce import weights

    return weights.release_for_cell(spec, row_id, column_id) is not None
