"""What one measured cell measures: a model in a form at a size."""
from __future__ import annotations

import json
from dataclasses import dataclass

from reproduce import measure


@dataclass(frozen=True)
class Target:
    """What one measured cell measures: a model in a form at a size (hashable, for grouping)."""
    row: str
    role: str          # "" for the row's model, else the row field the column names (e.g. teacher)
    model: str | None
    kwargs: str        # JSON of the model kwargs
    img_size: int
    form: str
    convention: str

    @property
    def label(self) -> str:
        return self.row + (f" ({self.role})" if self.role else "") + (f" [{self.form}]" if self.form != "train" else "")

    def build(self, for_counting=False):
        return measure.build_model(self.model, json.loads(self.kwargs), self.form, for_counting=for_counting)


def target_of(row, column) -> Target:
    """The model a cell of `row` in `column` measures: the row's, or the row field `model_from` names."""
    model = row.settings.get(column.model_from) if column.model_from else row.model
    return Target(row.id, column.model_from or "", model, json.dumps(row.model_kwargs, sort_keys=True),
                  row.img_size, column.form or row.form, row.macs_convention)
