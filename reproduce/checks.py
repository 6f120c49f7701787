"""Whether results still hold: `reproduce diff`.

(What the suite covers of each table, `reproduce list`, is reproduce/coverage.py.)

`reproduce diff` (`check_results`) judges a results file three ways:
1. against the reference and the spec: every measured cell's status is recomputed from its value
   and range, and a cell outside tolerance passes only if the spec declares it as an accepted
   deviation (with that status and, for exact cells, that value);
2. against the committed results of the same device (git; `baseline_revision`: HEAD for uncommitted
   work, HEAD~1 when the file is as committed, as in CI): params, MACs, settings and accuracy
   must not move at all, a throughput gain's range must still overlap the accepted one;
3. with `remeasure`, against a fresh measurement: params and MACs of every row, every setting
   cell read again from its recipe (resolved with its bases) or model, and the table's guard gains
   (`guards:` in its spec) timed again in alternating pairs and judged against the file's value by
   the rule of reproduce/guards.py.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from reproduce import guards, report
from reproduce.coverage import _operands
from reproduce.device import resolve
from reproduce.registry import DERIVED_KINDS, NOT_REPORTED, RegistryError, load_table, table_ids
from reproduce.runner import RESULTS_DIR, MeasurementCache, TableRun, write_results

STATIC = ("params", "macs")
EXACT_KINDS = ("params", "macs", "setting", "accuracy")  # a value that must not move between runs


def results_files(ids: list[str] | None, results_dir: Path | None = None) -> list[Path]:
    root = Path(results_dir or RESULTS_DIR)
    tables = set(table_ids())  # figures and other CSVs share the device folders
    files = [p for p in sorted(root.glob("*/*.csv")) if p.parent.name != "reference" and p.stem in tables]
    if ids is not None:
        files = [p for p in files if p.stem in ids]
    return files


# ---------------------------------------------------------------------------------------------
# `reproduce diff`

@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)   # each fails the diff
    moved: list[str] = field(default_factory=list)      # cells that moved within what is accepted
    warnings: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)   # moves accepted by --update
    baseline: str = ""                                   # what the results were compared with


def _spread(cell) -> tuple[float, float] | None:
    low, high = report.parse_number(cell.low), report.parse_number(cell.high)
    return (low[0], high[0]) if low and high else None


def _number(text: str):
    parsed = report.parse_number(text)
    return parsed[0] if parsed else text


def _shown(cell, status: bool = True) -> str:
    """A cell's value with its range (and status): '+19.4 [+18.2, +22.4] within_tolerance'."""
    spread = f" [{cell.low}, {cell.high}]" if cell.low else ""
    return f"{cell.measured or '(nothing)'}{spread}" + (f" {cell.status}" if status else "")


def reference_problems(spec, frame: pd.DataFrame, device_tag: str, complete: bool = True) -> tuple[list, list]:
    """(problems, warnings) of results cells against the reference and the spec's deviations."""
    problems, warnings = [], []
    recorded = {(r.row, r.column): r for r in frame.itertuples()}
    for ref in spec.reference.itertuples():
        name = f"{ref.row}/{ref.column}"
        cell = recorded.get((ref.row, ref.column))
        if cell is None:
            if complete and ref.reported not in NOT_REPORTED:
                problems.append(f"{name}: no result line (run `reproduce table {spec.id}`)")
            continue
        if cell.reported != ref.reported:
            problems.append(f"{name}: reported {cell.reported!r} but the reference says {ref.reported!r} "
                            "(re-run the table)")
            continue
        column = spec.columns[ref.column]
        deviation = spec.deviation(ref.row, ref.column, device_tag)
        status = cell.status
        if cell.measured and status in report.MEASURED_STATUSES:
            spread = _spread(cell) if column.kind in ("gain", "ratio") else None
            status, _ = report.compare(ref.reported, _number(cell.measured), spec.tolerance(column), column.kind,
                                       spread=spread)
            if status != cell.status:
                problems.append(f"{name}: recorded {cell.status}, but reported {ref.reported} and measured "
                                f"{_shown(cell, False)} give {status} (edited by hand, or re-run the table)")
        if status not in report.MEASURED_STATUSES:
            if deviation and status == "pending" and cell.measured == "":
                warnings.append(f"{name}: the spec declares a {deviation.status} here, but the cell is {status}")
            continue
        if deviation is None:
            if status == "mismatch":
                problems.append(f"{name}: undeclared mismatch: reported {ref.reported}, measured {_shown(cell, False)}; "
                                f"fix the cause, or declare it under `deviations:` of row {ref.row} in "
                                f"{spec.spec_path.name} with the reason")
        elif status != deviation.status:
            message = (f"{name}: the spec declares a {deviation.status}, but it is {status} now "
                       f"(measured {_shown(cell, False)}); update the deviation in {spec.spec_path.name}")
            # A timed gain declared a (CPU) mismatch whose noisy range now reaches the band, or whose
            # median lands on the printed value, is no regression: say it, do not fail. An exact kind
            # (params, MACs, settings) that now matches means the declaration is stale: that fails.
            noisy_improvement = (column.kind in ("gain", "ratio") and deviation.status == "mismatch"
                                 and status in ("within_tolerance", "match"))
            (warnings if noisy_improvement else problems).append(message)
        elif not deviation.holds_value(cell.measured):
            problems.append(f"{name}: the spec's deviation expects {deviation.measured}, measured "
                            f"{cell.measured} ({_delta(deviation.measured, cell.measured)}); the value moved")
    return problems, warnings


def accuracy_problems(spec, frame: pd.DataFrame, device: str = "cpu") -> list[str]:
    """A filled accuracy cell needs an accepted run behind it (reproduce/provenance.py) whose number
    is the one written, whatever the CSV says and whether committed or not; a filled derived cell
    (a difference of accuracies) needs both its operands filled."""
    run = TableRun(spec, device, show_progress=False)
    problems, recorded = [], {(r.row, r.column): r for r in frame.itertuples()}
    for cell in frame.itertuples():
        if cell.row not in spec.rows or cell.column not in spec.columns or not cell.measured:
            continue
        row, column = spec.rows[cell.row], spec.columns[cell.column]
        if run.base_kind(column) != "accuracy" or row.cited:
            continue
        name = f"{cell.row}/{cell.column}"
        if column.kind in DERIVED_KINDS:
            empty = [f"{r}/{c}" for r, c in _operands(spec, row, column)
                     if not getattr(recorded.get((r, c)), "measured", "")]
            if empty:
                problems.append(f"{name}: filled with {cell.measured}, but {', '.join(empty)} it is computed "
                                "from is not measured (edited by hand?)")
            continue
        value = run.accuracy_value(row, column)
        if value is None:
            why = run.refused.get((row.id, column.id)) or (
                f"no runs/{spec.id}/{spec.run_name(row.id, column.id)}/result.json")
            problems.append(f"{name}: filled with {cell.measured}, but no accepted run is behind it ({why})")
        elif report.format_measured(value, cell.reported, "accuracy") != cell.measured:
            problems.append(f"{name}: filled with {cell.measured}, but its accepted run says "
                            f"{report.format_measured(value, cell.reported, 'accuracy')} (edited by hand?)")
    return problems


def _delta(old: str, new: str) -> str:
    a, b = report.parse_number(old), report.parse_number(new)
    return f"{b[0] - a[0]:+.4g}" if a and b else "changed"


def compare_with(spec, accepted: pd.DataFrame, new: pd.DataFrame, what: str,
                 judged: set = frozenset()) -> tuple[list, list]:
    """(failures, moves) of `new` cells against `accepted` ones of the same device: exact kinds
    must not move, gains must keep overlapping ranges (except the `judged` ones: guard gains, which
    reproduce/guards.py judges), a measured cell must stay measured."""
    failures, moves = [], []
    old_cells = {(r.row, r.column): r for r in accepted.itertuples()}
    for cell in new.itertuples():
        old = old_cells.get((cell.row, cell.column))
        if old is None or cell.column not in spec.columns or cell.row not in spec.rows:
            continue
        column = spec.columns[cell.column]
        kind = spec.columns[column.of].kind if column.kind in DERIVED_KINDS else column.kind
        name = f"{cell.row}/{cell.column}"
        if not old.measured:
            if cell.measured and cell.status != old.status:
                moves.append(f"{name}: newly measured: {_shown(cell)} (was {old.status})")
            continue
        if not cell.measured:
            failures.append(f"{name}: measured {_shown(old)} in {what}, now {cell.status}: {cell.note[:160]}")
            continue
        if kind in EXACT_KINDS or column.kind == "difference":
            if cell.measured != old.measured:
                failures.append(f"{name}: moved from {old.measured} to {cell.measured} "
                                f"({_delta(old.measured, cell.measured)}) since {what}")
            continue
        if column.kind in ("gain", "ratio") and (cell.row, cell.column) not in judged:
            a, b = _spread(old), _spread(cell)
            if a and b and (b[1] < a[0] or b[0] > a[1]):
                failures.append(f"{name}: moved from {_shown(old)} to {_shown(cell)} "
                                f"({_delta(old.measured, cell.measured)}): its range no longer overlaps the one in {what}")
            elif cell.measured != old.measured or cell.status != old.status:
                how = "ranges overlap" if a and b else f"no range in {what} to compare"
                moves.append(f"{name}: {_shown(old)} → {_shown(cell)} ({_delta(old.measured, cell.measured)}; {how})")
    return failures, moves


def committed_results(path: Path, ref: str = "HEAD") -> tuple[pd.DataFrame | None, str]:
    """The version of a results file committed at git `ref`, and a line saying what it is."""
    folder = path.resolve().parent
    try:
        top = subprocess.run(["git", "-C", str(folder), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True).stdout.strip()
        relative = path.resolve().relative_to(top).as_posix()
        shown = subprocess.run(["git", "-C", top, "show", f"{ref}:{relative}"], capture_output=True, text=True)
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None, "no committed results to compare with (not in a git checkout)"
    if shown.returncode:
        return None, f"no committed results to compare with ({relative} is not in {ref})"
    try:
        return report.read_results(path, text=shown.stdout), f"the results committed at {ref}"
    except ValueError as e:
        return None, f"the results committed at {ref} do not read ({e})"


def baseline_revision(path: Path, against: str = "auto") -> str:
    """The git revision whose committed results `path` is compared with. `auto` (CI's default):
    HEAD when the file differs from HEAD (uncommitted work is compared with what is committed);
    when it equals HEAD (a fresh clone, CI), HEAD~1, the previous state of the branch (for a merge
    commit its first parent: main before the merge), so that a committed edit is compared with
    what came before it, never with itself. Any other value is used as given."""
    if against != "auto":
        return against
    folder = path.resolve().parent

    def git(*args):
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True)

    try:
        tracked = git("ls-files", "--error-unmatch", path.name).returncode == 0
        changed = git("diff", "--quiet", "HEAD", "--", path.name).returncode != 0
        has_parent = git("rev-parse", "--verify", "-q", "HEAD~1").returncode == 0
    except OSError:
        return "HEAD"
    return "HEAD" if (changed or not tracked or not has_parent) else "HEAD~1"


def check_results(path: Path, remeasure: bool = False, against: str = "auto", update: bool = False,
                  device: str = "cpu", show_progress: bool = False) -> Findings:
    """Everything `reproduce diff` says about one results CSV (see the module docstring)."""
    found = Findings()
    try:
        spec = load_table(path.stem)
        frame = report.read_results(path)
    except (RegistryError, ValueError) as e:
        found.problems.append(str(e))
        return found
    device_tag = path.parent.name
    found.problems, found.warnings = reference_problems(spec, frame, device_tag)
    found.problems += accuracy_problems(spec, frame, device)
    for row in spec.rows.values():
        for column_id in row.deviations:
            if not (spec.reference[(spec.reference.row == row.id) & (spec.reference.column == column_id)]).size:
                found.warnings.append(f"{row.id}/{column_id}: a deviation is declared for a cell the paper does not print")

    accepted, found.baseline = committed_results(path, baseline_revision(path, against))
    if accepted is not None:
        failures, moves = compare_with(spec, accepted, frame, found.baseline)
        found.moved += moves
        (found.accepted if update else found.problems).extend(failures)

    if remeasure:
        device = resolve(device)
        here = device.tag == device_tag
        if spec.guards and not here:
            found.warnings.append(f"guard gains not timed again: these results are from {device_tag}, this "
                                  f"machine is {device.tag}")
        fresh, meta, verdicts = _remeasure(spec, device, show_progress, frame if here else None)
        failures, moves = compare_with(spec, frame, fresh, "the results file", judged=set(spec.guards))
        problems, _ = reference_problems(spec, fresh, device_tag, complete=False)
        found.problems += [f"re-measured {p}" for p in problems]
        found.moved += [f"re-measured {m}" for m in moves]
        failures += recipe_changes(spec, frame, fresh)
        failures += [v.line() for v in verdicts if not v.holds]
        found.moved += [v.line() for v in verdicts if v.holds]
        if update:
            found.accepted += failures
            write_results(spec, fresh, path, meta, merge=True)
        else:
            found.problems += failures
    return found


RECIPE_SOURCE = re.compile(r"recipe (\S+) \(resolved sha256 ([0-9a-f]+)\)")  # provenance.recipe_source


def recipe_changes(spec, committed: pd.DataFrame, fresh: pd.DataFrame) -> list[str]:
    """One line per recipe whose resolved content (the hash in its setting cells' notes) is not the
    one the results were written with, even where no printed setting moved."""
    before = {(r.row, r.column): RECIPE_SOURCE.search(r.note or "") for r in committed.itertuples()}
    changed: dict[str, list] = {}  # recipe -> [hash in the results, hash now, cells]
    for cell in fresh.itertuples():
        now, old = RECIPE_SOURCE.search(cell.note or ""), before.get((cell.row, cell.column))
        if now and (old is None or old.group(2) != now.group(2)):
            changed.setdefault(now.group(1), [old.group(2) if old else "none", now.group(2), 0])[2] += 1
    return [f"recipe {recipe} changed since the results were written (resolved sha256 {was} -> {now}, "
            f"{count} setting cell(s)): `reproduce table {spec.id} --columns settings`, review, commit"
            for recipe, (was, now, count) in changed.items()]


def _remeasure(spec, device: str, show_progress: bool, results: pd.DataFrame | None = None):
    """Params and MACs of every row and every setting read again, measured afresh without the
    cache; with `results` (the file's cells, on the device they are from), the guard gains timed
    again and judged against them (reproduce/guards.py): (cells, meta, verdicts)."""
    cache = MeasurementCache(enabled=False)
    static = TableRun(spec, device, kinds=set(STATIC), cache=cache, show_progress=show_progress)
    frames = [static.run()]
    meta, verdicts = static.meta(), []
    if spec.guards and results is not None:
        guard_cells, verdicts, meta = guards.remeasure(spec, device, results)
        frames.append(guard_cells)
    fresh = pd.concat(frames, ignore_index=True)
    kinds = {c.id: (spec.columns[c.of].kind if c.kind in DERIVED_KINDS else c.kind) for c in spec.columns.values()}
    # settings are read again too (from the recipe resolved with its bases, or the built model)
    keep = [kinds[c] in STATIC or kinds[c] == "setting" or (r, c) in spec.guards
            for r, c in zip(fresh.row, fresh.column)]
    return fresh[keep].reset_index(drop=True), meta, verdicts
