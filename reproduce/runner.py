"""Run one table: measure every cell the spec makes measurable, and write the results.

`TableRun` decides which cells a run needs and puts each through the unit of its kind
(reproduce/cells/: static counts, throughput, accuracy, settings; their note texts in
cells/notes.py); it derives gains and differences and lays every cell out with its status.
Measurements are cached on disk one by one (so an interrupted table resumes where it stopped and
a second run is quick); the results CSV and Markdown are written once, atomically, at the end.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
from pathlib import Path

import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from reproduce import files, measure, report
from reproduce.cells import notes
from reproduce.cells.accuracy import Accuracy
from reproduce.cells.settings import Settings
from reproduce.cells.static import StaticCounts
from reproduce.cells.target import Target, target_of
from reproduce.cells.throughput import Throughput
from reproduce.device import resolve
from reproduce.measure import source_fingerprint
from reproduce.registry import DERIVED_KINDS, NOT_REPORTED, ROOT, TableSpec

RESULTS_DIR = ROOT / "results"
RUNS_DIR = ROOT / "runs"
CACHE_DIR = Path(os.environ.get("REPRODUCE_CACHE", ROOT / ".cache" / "measurements"))
MEASURABLE = ("params", "macs", "throughput")


class MeasurementCache:
    """One JSON file per measurement, keyed by everything the number depends on."""

    def __init__(self, folder: Path | None = None, enabled: bool = True):
        self.folder, self.enabled = Path(folder or CACHE_DIR), enabled

    def _path(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha1(key.encode()).hexdigest()}.json"

    def get(self, key: str):
        path = self._path(key)
        if not self.enabled or not path.exists():
            return None
        with contextlib.suppress(ValueError, OSError):
            return json.loads(path.read_text())["value"]
        return None

    def put(self, key: str, value) -> None:
        if self.enabled:
            files.atomic_write_text(self._path(key), json.dumps({"key": key, "value": value}))


class TableRun:
    """Measures the cells of `spec` whose column kinds are in `kinds` on `device`."""

    def __init__(self, spec: TableSpec, device: str = "cpu", kinds: set[str] | None = None,
                 cache: MeasurementCache | None = None, show_progress: bool = True,
                 rows: set[str] | None = None, protocol_overrides: dict | None = None, only: set | None = None):
        self.spec, self.device = spec, resolve(device)  # one Device, passed down to every unit
        self.kinds = kinds
        self.rows = rows                                  # only these rows' cells (None: every row)
        self.only = only  # {(row, column)}: measure just these cells (and their operands), e.g. diff's guards
        self.cache = cache or MeasurementCache()
        self.show_progress = show_progress
        self.fingerprint = source_fingerprint()
        self.values: dict[tuple[str, str], float] = {}   # (row, column) -> measured number
        self.notes: dict[tuple[str, str], str] = {}
        self.failures: dict[Target, str] = {}             # why a target could not be measured
        self.env = self.device.env
        self.device_tag = self.device.tag
        # one unit per cell kind (reproduce/cells/)
        self.static = StaticCounts(self)
        self.throughput = Throughput(self, protocol_overrides)
        self.accuracy = Accuracy(self)
        self.settings = Settings(self)

    # what the units keep, as the commands read it
    protocol_spec = property(lambda self: self.throughput.protocol_spec)
    protocols_used = property(lambda self: self.throughput.protocols_used)
    protocol_overrides = property(lambda self: self.throughput.protocol_overrides)
    ranges = property(lambda self: self.throughput.ranges)
    samples = property(lambda self: self.throughput.samples)
    refused = property(lambda self: self.accuracy.refused)
    origins = property(lambda self: self.accuracy.origins)

    # -- what to measure ------------------------------------------------------------------------
    def wanted(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds

    def target(self, row, column) -> Target:
        return target_of(row, column)

    def _needed_cells(self, kinds) -> list[tuple]:
        """(row, column) pairs of these kinds that the reference prints or a derived column needs."""
        cells = {(r, c) for r, c, v in zip(self.spec.reference["row"], self.spec.reference["column"],
                                           self.spec.reference["reported"])
                 if v not in NOT_REPORTED and (self.rows is None or r in self.rows)}
        if self.only is not None:
            cells &= set(self.only)
        for row_id, col_id in list(cells):
            column = self.spec.columns[col_id]
            if column.kind in DERIVED_KINDS:
                cells.add((row_id, column.of))
                if column.over:
                    cells.add((row_id, column.over))
                elif self.spec.rows[row_id].baseline:
                    cells.add((self.spec.rows[row_id].baseline, column.of))
        out = []
        for row_id, col_id in sorted(cells):
            row, column = self.spec.rows[row_id], self.spec.columns[col_id]
            if column.kind in kinds and not (row.cited or row.pending) and self.target(row, column).model:
                out.append((row, column))
        return out

    def _measure_or_fail(self, target, fn):
        """Run fn(); on failure remember why for the target's cells and return None."""
        if target in self.failures:
            return None
        try:
            return fn()
        except measure.ModelNotImplemented as e:
            self.failures[target] = str(e)
        except Exception as e:  # a broken model must not stop the table; its cells say why
            self.failures[target] = f"measurement failed: {type(e).__name__}: {e}"
        return None

    # -- the units, as the commands call them -----------------------------------------------------
    def _protocol(self, img_size: int) -> measure.Protocol:
        return self.throughput.protocol(img_size)

    def record_throughput(self, row_id: str, column_id: str, result: dict) -> None:
        self.throughput.record(row_id, column_id, result)

    def on_paper_device(self) -> bool:
        return self.throughput.on_paper_device()

    def setting_value(self, row, column) -> tuple[object, str, bool]:
        return self.settings.value(row, column)

    def accuracy_value(self, row, column):
        return self.accuracy.value(row, column, RUNS_DIR)

    # -- derived cells ----------------------------------------------------------------------------
    def _operands(self, row, column) -> tuple[tuple, tuple] | None:
        """The (row, column) cells a derived column divides or subtracts."""
        if column.over:
            return (row.id, column.of), (row.id, column.over)
        if row.baseline:
            return (row.id, column.of), (row.baseline, column.of)
        return None

    def derived_value(self, row, column):
        operands = self._operands(row, column)
        if operands is None:
            return None
        of, over = (self.values.get(o) for o in operands)
        if of is None or over is None or (over == 0 and column.kind != "difference"):
            return None
        if column.kind == "difference":
            return of - over
        ratio = self.throughput.ratio(operands, of, over)
        return 100.0 * (ratio - 1.0) if column.kind == "gain" else ratio

    # -- the cells --------------------------------------------------------------------------------
    def base_kind(self, column) -> str:
        """The measured kind behind a column: a derived column counts as the kind of its operand."""
        return self.spec.columns[column.of].kind if column.kind in DERIVED_KINDS else column.kind

    def cell(self, ref) -> dict | None:
        if ref.reported in NOT_REPORTED:
            return None  # the paper prints a dash: nothing to reproduce
        if self.rows is not None and ref.row not in self.rows:
            return None  # not asked for this time: keep what the previous results said
        row, column = self.spec.rows[ref.row], self.spec.columns[ref.column]
        base = {"table": self.spec.id, "row": row.id, "model": self.target(row, column).model or "",
                "column": column.id, "reported": ref.reported, "unit": ref.unit or column.unit,
                "measured": "", "delta": ""}
        cell_notes = [n for n in (row.cell_notes.get(column.id, ""), ref.note, row.note, column.note) if n]

        deviation = self.spec.deviation(row.id, column.id, self.device_tag)

        def done(status, measured=None, extra=None, device_bound=False, spread=None):
            if extra:
                cell_notes.insert(0, extra)
            if measured is not None:
                state, delta = report.compare(ref.reported, measured, self.spec.tolerance(column), column.kind,
                                              spread=None if device_bound else spread)
                base.update(measured=report.format_measured(measured, ref.reported, column.kind),
                            delta="" if device_bound else report.format_delta(delta, ref.reported))
                if spread:
                    base.update(low=report.format_measured(min(spread), ref.reported, column.kind),
                                high=report.format_measured(max(spread), ref.reported, column.kind))
                how = report.coarser_printing(ref.reported, measured) if state == "within_tolerance" else None
                if how:
                    cell_notes.insert(0, notes.coarser_printing(how))
                status = status or state
            if deviation and status in report.MEASURED_STATUSES:
                cell_notes.insert(0, notes.deviation(self.spec.id, deviation.status, deviation.reason, status))
            return {**base, "status": status, "note": " ".join(cell_notes)}

        if row.cited:
            return done("cited", extra=notes.cited(row.cited))
        if column.kind == "setting":
            return self.settings.cell(row, column, ref, done)
        kind = self.base_kind(column)
        value = (self.derived_value(row, column) if column.kind in DERIVED_KINDS
                 else self.values.get((row.id, column.id)))
        if kind == "accuracy":
            if value is None:
                return done("pending", extra=self.accuracy.pending_note(row, column))
            return done(None, value, extra=self.origins.get((row.id, column.id)))
        if row.pending:
            return done("pending", extra=notes.pending(row.pending))
        target = self.target(row, column)
        if not target.model:
            return done("pending", extra=notes.MODEL_NOT_IMPLEMENTED)
        failure = self.failures.get(target) or (
            column.kind in DERIVED_KINDS and next((f for t, f in self.failures.items() if t.row in
                                                   (row.id, row.baseline)), None))
        if value is None and failure:
            return done("pending", extra=notes.pending(failure))
        if value is None:
            if not self.wanted(kind):
                return None  # not asked for this time: keep what the previous results said
            no_protocol = kind == "throughput" and not self.protocol_spec
            return done("pending", extra=notes.NO_PROTOCOL if no_protocol else notes.NOT_MEASURED)
        if column.kind == "throughput":
            return self.throughput.cell(ref, value, done)
        if kind == "throughput":
            return self.throughput.derived_cell(row, column, value, done, cell_notes)
        return done(None, value)

    def run(self) -> pd.DataFrame:
        self.accuracy.collect(RUNS_DIR)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      disable=not self.show_progress, transient=True) as progress:
            if self.wanted("params") or self.wanted("macs"):
                self.static.measure(progress)
            if self.wanted("throughput"):
                self.throughput.measure(progress)
        cells = [self.cell(ref) for ref in self.spec.reference.itertuples()
                 if self.only is None or (ref.row, ref.column) in self.only]
        return report.cells_frame([c for c in cells if c is not None])

    def meta(self) -> dict:
        meta = {"device": self.env["device"], "device tag": self.device_tag,
                "software": f"torch {self.env['torch']}, timm {self.env['timm']}, python {self.env['python']}",
                "torch threads (counting; timing: see protocol)": self.env["threads"],
                "date": dt.date.today().isoformat(),
                "code fingerprint": self.fingerprint}
        for key in ("cuda", "cudnn", "driver"):
            if self.env.get(key):
                meta[key] = self.env[key]
        return {**meta, **self.throughput.meta()}


def results_paths(table_id: str, device: str, results_dir: Path | None = None) -> tuple[Path, Path]:
    folder = Path(results_dir or RESULTS_DIR) / resolve(device).tag
    return folder / f"{table_id}.csv", folder / f"{table_id}.md"


def run_table(spec: TableSpec, device: str = "cpu", kinds: set[str] | None = None,
              results_dir: Path | None = None, cache: MeasurementCache | None = None,
              show_progress: bool = True, rows: set[str] | None = None,
              protocol_overrides: dict | None = None) -> tuple[pd.DataFrame, Path, Path]:
    """Measure `spec`, merge with earlier results for the kinds (rows) not measured now, write CSV + MD."""
    csv_path, md_path = results_paths(spec.id, device, results_dir)
    run = TableRun(spec, device, kinds, cache, show_progress, rows, protocol_overrides)
    frame = write_results(spec, run.run(), csv_path, run.meta(), merge=kinds is not None or rows is not None)
    return frame, csv_path, md_path


def write_results(spec: TableSpec, frame: pd.DataFrame, csv_path: Path, meta: dict, merge: bool) -> pd.DataFrame:
    """Write the CSV and the Markdown of `frame`, in reference order; with `merge`, the cells of
    the existing file that `frame` does not have are kept."""
    if merge and csv_path.exists():
        previous = report.read_results(csv_path)
        fresh = set(zip(frame["row"], frame["column"]))
        keep = previous[[(r, c) not in fresh for r, c in zip(previous["row"], previous["column"])]]
        frame = pd.concat([frame, keep], ignore_index=True)
    order = {(r, c): i for i, (r, c) in enumerate(zip(spec.reference["row"], spec.reference["column"]))}
    frame = frame.iloc[sorted(range(len(frame)), key=lambda i: order.get((frame.row[i], frame.column[i]), math.inf))]
    frame = frame.reset_index(drop=True)
    report.write_csv(frame, csv_path)
    files.atomic_write_text(csv_path.with_suffix(".md"), report.render_markdown(spec, frame, meta))
    return frame
