"""What the suite covers of each table: `reproduce list`.

A printed cell counts as coverable only when the path that fills it works here (`table_coverage`): its
model builds, its setting resolves from a model or a recipe, its recipe builds its models
(`buildable.recipe_runs`) or its released weights are known (`buildable.released_weights`).
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from reproduce import report
from reproduce.buildable import _cached, model_builds, recipe_runs, released_weights
from reproduce.device import resolve
from reproduce.registry import DERIVED_KINDS, NOT_REPORTED, RECIPES
from reproduce.runner import RESULTS_DIR, TableRun

STATIC = ("params", "macs")
COVERAGE_KINDS = ("static", "throughput", "accuracy", "setting")


def _kind(spec, column_id: str) -> str:
    column = spec.columns[column_id]
    kind = spec.columns[column.of].kind if column.kind in DERIVED_KINDS else column.kind
    return "static" if kind in STATIC else kind


def _operands(spec, row, column) -> list[tuple[str, str]]:
    """The measured cells behind a cell: itself, or the two a derived column combines."""
    if column.kind not in DERIVED_KINDS:
        return [(row.id, column.id)]
    over = (row.id, column.over) if column.over else (row.baseline, column.of) if row.baseline else None
    return [(row.id, column.of)] + ([over] if over else [])


def _cell_coverable(spec, run: TableRun, row_id: str, column_id: str, operand: bool = False) -> bool:
    """Whether the path that fills this cell works here; `operand`: the cell is only an input of a
    derived cell (a gain needs its throughputs measured, not comparable)."""
    row, column = spec.rows[row_id], spec.columns[column_id]
    if row.cited:
        return False
    kind = _kind(spec, column_id)
    if kind == "setting":
        try:
            return not run.setting_value(row, column)[2]  # declared values cover nothing
        except Exception:  # pending: not resolvable here
            return False
    if column.kind in DERIVED_KINDS:
        operands = _operands(spec, row, column)
        return len(operands) == 2 and all(_cell_coverable(spec, run, r, c, operand=True) for r, c in operands)
    if kind == "accuracy":
        recipe = spec.recipe_of(row_id, column_id)
        return bool(recipe and recipe_runs(RECIPES / recipe)[0]) or released_weights(spec, row_id, column_id)
    if row.pending:
        return False
    target = run.target(row, column)
    if kind == "throughput" and (run.protocol_spec is None or (not operand and not run.on_paper_device())):
        return False  # absolute images/s compare only on the paper's device
    return model_builds(target.model, json.loads(target.kwargs), target.form)[0]


def _inputs_digest(spec) -> str:
    """What a table's coverage depends on besides the code: its spec, reference and every recipe."""
    digest = hashlib.sha1()
    for path in [spec.spec_path, *sorted(RECIPES.rglob("*.yaml"))]:
        if path and path.exists():
            digest.update(path.read_bytes())
    digest.update(spec.reference.to_csv(index=False).encode())
    return digest.hexdigest()


@dataclass
class Coverage:
    """Per kind (static, throughput, accuracy, setting): printed cells coverable here, and all."""
    can: Counter = field(default_factory=Counter)
    total: Counter = field(default_factory=Counter)
    statuses: Counter | None = None     # of the last results on this device; None: no results

    def text(self, kind: str) -> str:
        return f"{self.can[kind]}/{self.total[kind]}" if self.total[kind] else "–"

    def results_text(self) -> str:
        if self.statuses is None:
            return "none"
        return " ".join(f"{self.statuses[s]}{report.STATUS_MARK[s] if s != 'cited' else 'c'}"
                        for s in report.STATUSES if self.statuses[s])


def table_coverage(spec, device: str = "cpu", results_dir: Path | None = None) -> Coverage:
    def count():
        run = TableRun(spec, device, show_progress=False)
        can, total = Counter(), Counter()
        for ref in spec.reference.itertuples():
            if ref.reported in NOT_REPORTED:
                continue
            kind = _kind(spec, ref.column)
            total[kind] += 1
            can[kind] += _cell_coverable(spec, run, ref.row, ref.column)
        return True, json.dumps({"can": can, "total": total})

    _, counted = _cached("coverage", [spec.id, device, resolve(device).tag, _inputs_digest(spec)], count)
    numbers = json.loads(counted)
    coverage = Coverage(Counter(numbers["can"]), Counter(numbers["total"]))
    path = Path(results_dir or RESULTS_DIR) / resolve(device).tag / f"{spec.id}.csv"
    if path.exists():
        coverage.statuses = Counter(report.read_results(path)["status"])
    return coverage
