"""Accuracy cells: a run's result.json, taken only if its provenance says it belongs to the cell
(reproduce/provenance.py); otherwise pending, with the command that fills it."""
from __future__ import annotations

import json
from pathlib import Path

from reproduce import weights
from reproduce.cells import notes
from reproduce.registry import DERIVED_KINDS, RECIPES, _show


class Accuracy:
    """Reads the accuracy cells of a table run (`run`: runner.TableRun) from `runs_dir`."""

    def __init__(self, run):
        self.run = run
        self.refused: dict[tuple[str, str], str] = {}     # accuracy results refused, and why
        self.origins: dict[tuple[str, str], str] = {}     # where an accepted accuracy comes from

    def value(self, row, column, runs_dir: Path):
        """The cell's result.json value if its provenance says it belongs to this cell
        (reproduce/provenance.py); otherwise None, with the reason kept for the cell's note."""
        from reproduce import provenance

        spec = self.run.spec
        path = runs_dir / spec.id / spec.run_name(row.id, column.id) / "result.json"
        if not path.exists():
            return None
        try:
            result = json.loads(path.read_text())
        except ValueError:
            self.refused[(row.id, column.id)] = notes.not_json(path)
            return None
        model = weights.column_model(spec.id, row.id, column.id) or self.run.target(row, column).model
        value, reason = provenance.accept(spec, row, column, result, model, column.form or row.form,
                                          folder=path.parent)
        if reason:
            self.refused[(row.id, column.id)] = notes.refused(_show(path), reason)
            return None
        self.origins[(row.id, column.id)] = provenance.origin_note(result)
        return value

    def collect(self, runs_dir: Path) -> None:
        """Every accuracy cell of the table that an accepted run fills."""
        spec = self.run.spec
        for ref in spec.reference.itertuples():
            row, column = spec.rows[ref.row], spec.columns[ref.column]
            if column.kind == "accuracy" and not row.cited:
                value = self.value(row, column, runs_dir)
                if value is not None:
                    self.run.values[(row.id, column.id)] = value

    def pending_note(self, row, column) -> str:
        spec = self.run.spec
        if column.kind in DERIVED_KINDS:
            return notes.accuracy_derived_pending(column)
        release = weights.release_for_cell(spec, row.id, column.id)
        recipe = spec.recipe_of(row.id, column.id)
        model = (weights.column_model(spec.id, row.id, column.id) or self.run.target(row, column).model
                 or (release.model if release else None))  # the model provenance will accept for the cell
        return notes.accuracy_pending(spec, row, column, self.refused.get((row.id, column.id)), release,
                                      bool(recipe and (RECIPES / recipe).exists()), model)
