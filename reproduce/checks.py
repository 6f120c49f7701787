"""What the suite covers of each table, and whether committed results still hold.

`check_results` is what `reproduce diff` and CI run: it recomputes every cell's status from the
reference and the recorded measurement, so a planted or drifted number shows up as a *new*
mismatch; mismatches already recorded (and explained in their notes) are accepted.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import timm

from reproduce import report
from reproduce.registry import DERIVED_KINDS, NOT_REPORTED, RECIPES, RegistryError, load_table, table_ids
from reproduce.runner import RESULTS_DIR, MeasurementCache, TableRun

STATIC = ("params", "macs")


def table_coverage(spec) -> dict[str, str]:
    """Per column kind: how many printed cells the suite can measure here / in all; and results."""
    known = set(timm.list_models())
    kinds = {c.id: c.kind for c in spec.columns.values()}
    total, can = Counter(), Counter()
    for ref in spec.reference.itertuples():
        kind = kinds[ref.column]
        if kind in DERIVED_KINDS:
            kind = spec.columns[spec.columns[ref.column].of].kind
        kind = "static" if kind in STATIC else kind
        row = spec.rows[ref.row]
        total[kind] += 1
        if kind == "setting":
            can[kind] += bool((spec.columns[ref.column].source or row.source)) and not row.cited
        elif kind == "accuracy":
            recipe = spec.recipe_of(row.id, ref.column)
            can[kind] += bool(recipe and (RECIPES / recipe).exists())  # given ImageNet
        else:
            can[kind] += bool(row.model in known and not row.cited and not row.pending)
    cov = {k: (f"{can[k]}/{total[k]}" if total[k] else "–") for k in ("static", "throughput", "accuracy", "setting")}
    files = results_files([spec.id])
    if files:
        statuses = Counter(report.read_results(files[0])["status"])
        cov["results"] = " ".join(f"{statuses[s]}{report.STATUS_MARK[s][0]}" for s in report.STATUSES
                                  if statuses[s])
    else:
        cov["results"] = "none"
    return cov


def results_files(ids: list[str] | None, results_dir: Path | None = None) -> list[Path]:
    root = Path(results_dir or RESULTS_DIR)
    tables = set(table_ids())  # figures and other CSVs share the device folders
    files = [p for p in sorted(root.glob("*/*.csv")) if p.parent.name != "reference" and p.stem in tables]
    if ids is not None:
        files = [p for p in files if p.stem in ids]
    return files


def check_results(path: Path, remeasure: bool = False) -> tuple[list[str], list[str]]:
    """(problems, warnings) of one results CSV against its table's reference."""
    problems, warnings = [], []
    try:
        spec = load_table(path.stem)
        frame = report.read_results(path)
    except (RegistryError, ValueError) as e:
        return [str(e)], []
    recorded = {(r.row, r.column): r for r in frame.itertuples()}
    for ref in spec.reference.itertuples():
        cell = recorded.get((ref.row, ref.column))
        if cell is None and ref.reported in NOT_REPORTED:
            continue
        if cell is None:
            problems.append(f"{ref.row}/{ref.column}: no result line (run `reproduce table {spec.id}`)")
            continue
        if cell.reported != ref.reported:
            problems.append(f"{ref.row}/{ref.column}: reported {cell.reported!r} but the reference says "
                            f"{ref.reported!r} (re-run the table)")
            continue
        if not cell.measured or cell.status in ("pending", "cited"):
            continue
        column = spec.columns[ref.column]
        status, _ = report.compare(ref.reported, _number(cell.measured), spec.tolerance(column), column.kind)
        if status == "mismatch" and cell.status != "mismatch":
            problems.append(f"{ref.row}/{ref.column}: new mismatch: reported {ref.reported}, measured "
                            f"{cell.measured} (recorded as {cell.status})")
        elif status != cell.status:
            warnings.append(f"{ref.row}/{ref.column}: recorded {cell.status}, recomputed {status}")
    if remeasure:
        problems += _remeasure_static(spec, recorded)
    return problems, warnings


def _number(text: str):
    parsed = report.parse_number(text)
    return parsed[0] if parsed else text


def _remeasure_static(spec, recorded) -> list[str]:
    """Params and MACs are deterministic: measure them again and compare with what was recorded."""
    run = TableRun(spec, "cpu", kinds=set(STATIC), cache=MeasurementCache(enabled=False), show_progress=False)
    fresh = run.run()
    problems = []
    for cell in fresh.itertuples():
        if spec.columns[cell.column].kind not in STATIC or not cell.measured:
            continue
        old = recorded.get((cell.row, cell.column))
        if old is None or not old.measured:
            problems.append(f"{cell.row}/{cell.column}: now measures {cell.measured}, nothing recorded")
        elif old.measured != cell.measured:
            problems.append(f"{cell.row}/{cell.column}: drifted from {old.measured} to {cell.measured}")
    return problems
