"""Settings cells: a hyper-parameter read from the row's recipe (resolved with its bases), or an
architecture setting read off the built model; a value only the spec gives is `declared`."""
from __future__ import annotations

import json

from reproduce import measure, provenance, report
from reproduce.buildable import recipe_runs
from reproduce.cells import notes
from reproduce.registry import RECIPES, load_recipe


class SourceDoesNotApply(KeyError):
    """A setting source that this row lacks (no recipe): the next source of the list is tried."""


class RecipeDoesNotRun(KeyError):
    """A recipe-sourced setting whose recipe does not build its models: the cell stays pending."""


def _dig(data, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            raise KeyError(part)
        data = data[part]
    return data


class Settings:
    """Reads the setting cells of a table run (`run`: runner.TableRun)."""

    def __init__(self, run):
        self.run = run
        self._models: dict[tuple, object] = {}            # model whose attributes settings read
        self._reference_models: dict[str, object] = {}    # models a setting compares with (Table 8)

    def value(self, row, column) -> tuple[object, str, bool]:
        """(value as printed, where it was read, declared): a setting read from the built model or
        the recipe; `declared` when only the spec gives it (a row field or model_kwargs), so that it
        can never count as a match. A list of sources is tried in order (e.g. the recipe's image
        size for rows that have a recipe, else the model's)."""
        sources = column.source or row.source
        if sources is None:
            raise KeyError("no 'source' for this setting in the spec")
        skipped = []
        for source in [sources] if isinstance(sources, str) else sources:
            try:
                value, where, declared = self._read(row, column, source)
                break
            except SourceDoesNotApply as e:
                skipped.append(str(e))
        else:
            raise KeyError("; ".join(skipped))
        mapping = column.values or row.values or {}
        for k, v in mapping.items():
            if str(k).lower() == str(value).lower():
                return str(v), where, declared
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            value = str(value)
        return value, where, declared

    def _read(self, row, column, source: str):
        if source.startswith("recipe."):
            recipe = row.recipe or column.recipe
            if not recipe:
                raise SourceDoesNotApply("the row has no recipe")
            if not (RECIPES / recipe).is_file():
                raise SourceDoesNotApply(f"the row's recipe {recipe} is not written yet")
            runs, why = recipe_runs(RECIPES / recipe)
            if not runs:
                raise RecipeDoesNotRun(f"recipe {recipe} does not build its models: {why}")
            path = source[len("recipe."):]
            return _dig(load_recipe(recipe), path), f"{provenance.recipe_source(recipe)}: {path}", False
        if source.startswith("model."):
            what = source[len("model."):]
            value, where = self._model_attribute(row, column, what)
            return value, f"the built model {self.run.target(row, column).model}: {where}", False
        if source.startswith("model_kwargs."):
            return _dig(row.model_kwargs, source[len("model_kwargs."):]), f"the spec's {source}", True
        if source in ("img_size", "model", "form", "macs_convention", "baseline"):
            return getattr(row, source), f"the spec's row field {source}", True
        return _dig(row.settings, source), f"the spec's row field {source}", True

    def _built(self, name: str, kwargs: str, form: str):
        """The model at full size on the meta device (its structure is all settings read), kept
        one at a time; a model whose construction needs real tensors is built for real."""
        key = (name, kwargs, form)
        if key not in self._models:
            self._models.clear()
            try:
                model = measure.build_model(name, json.loads(kwargs), form, meta=True)
            except (NotImplementedError, RuntimeError) as e:  # construction that needs real tensors
                if isinstance(e, measure.MeasureError):
                    raise
                model = measure.build_model(name, json.loads(kwargs), form)
            self._models[key] = model
        return self._models[key]

    def _model_attribute(self, row, column, attribute) -> tuple[object, str]:
        """An architecture setting read off the built model (e.g. embed_dim), not off the spec."""
        target = self.run.target(row, column)
        if not target.model:
            raise KeyError("the row has no model")
        model = self._built(target.model, target.kwargs, target.form)
        if attribute in measure.ARCHITECTURE_KEYS:
            value, where = measure.architecture(model)[attribute], f"{attribute} of its blocks"
        elif attribute == "img_size":
            value, where = measure.input_size(model)
        elif attribute == "idle_ratio":
            value, where = measure.idle_ratio(model), "the idle ratio of its channel-idle FFNs"
        elif attribute.startswith("removed_from."):
            reference = attribute[len("removed_from."):]
            value = measure.removed_from(model, self._reference_model(reference))
            where = f"its blocks compared with {reference}'s"
        else:
            value, where = getattr(model, attribute, None), f"its attribute {attribute}"
        if value is None:
            raise KeyError(f"{target.model} has no attribute '{attribute}'")
        if isinstance(value, (list, tuple)):
            value = f"[{', '.join(map(str, value))}]"
        return value, where

    def _reference_model(self, name: str):
        if name not in self._reference_models:
            self._reference_models[name] = measure.build_model(name, meta=True)
        return self._reference_models[name]

    def cell(self, row, column, ref, done):
        try:
            value, where, declared = self.value(row, column)
        except measure.ModelNotImplemented as e:
            return done("pending", extra=notes.pending(e))
        except RecipeDoesNotRun as e:
            return done("pending", extra=notes.pending(e.args[0]))
        except (KeyError, OSError, ValueError, measure.MeasureError) as e:
            why = e.args[0] if isinstance(e, KeyError) and e.args else e
            return done("pending", extra=notes.setting_unresolvable(why))
        if declared:
            if report.compare(ref.reported, value, 0.0, "setting")[0] == "match":
                return done("declared", extra=notes.setting_declared(where, value))
            return done("mismatch", extra=notes.setting_declared_mismatch(where, value, ref.reported))
        sources = column.source if isinstance(column.source, list) else [column.source]
        other_size = any(str(x).endswith("img_size") for x in sources) and value != row.img_size
        return done(None, value, extra=notes.setting_read(where, row.img_size if other_size else None))
