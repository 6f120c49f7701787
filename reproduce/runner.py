"""Run one table: measure every cell the spec makes measurable, and write the results.

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
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from reproduce import files, measure, provenance, report, weights
from reproduce.buildable import recipe_runs
from reproduce.measure import source_fingerprint
from reproduce.registry import (DERIVED_KINDS, NOT_REPORTED, RECIPES, ROOT, TableSpec, _show, load_protocol,
                               load_recipe)

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


def accuracy_command(spec: TableSpec, row_id: str, column_id: str | None = None) -> str:
    column = f" --column {column_id}" if column_id in spec.rows[row_id].recipes else ""
    return (f"reproduce train {spec.id} {row_id}{column} --data /path/to/imagenet --scale full --nproc 8 "
            f"&& reproduce table {spec.id} --columns accuracy")


def _dig(data, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            raise KeyError(part)
        data = data[part]
    return data


class SourceDoesNotApply(KeyError):
    """A setting source that this row lacks (no recipe): the next source of the list is tried."""


class RecipeDoesNotRun(KeyError):
    """A recipe-sourced setting whose recipe does not build its models: the cell stays pending."""


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


class TableRun:
    """Measures the cells of `spec` whose column kinds are in `kinds` on `device`."""

    def __init__(self, spec: TableSpec, device: str = "cpu", kinds: set[str] | None = None,
                 cache: MeasurementCache | None = None, show_progress: bool = True,
                 rows: set[str] | None = None, protocol_overrides: dict | None = None, only: set | None = None):
        self.spec, self.device = spec, measure.resolve_device(device)
        self.kinds = kinds
        self.rows = rows                                  # only these rows' cells (None: every row)
        self.protocol_overrides = {k: v for k, v in (protocol_overrides or {}).items() if v is not None}
        self.only = only  # {(row, column)}: measure just these cells (and their operands), e.g. diff's guards
        self.cache = cache or MeasurementCache()
        self.show_progress = show_progress
        self.fingerprint = source_fingerprint()
        self.protocol_spec = load_protocol(spec.protocol) if spec.protocol else None
        self.values: dict[tuple[str, str], float] = {}   # (row, column) -> measured number
        self.notes: dict[tuple[str, str], str] = {}
        self.ranges: dict[tuple[str, str], tuple[float, float]] = {}  # timing min/max of throughput cells
        self.samples: dict[tuple[str, str], tuple] = {}   # (timing session, per-round images/s)
        self.failures: dict[Target, str] = {}             # why a target could not be measured
        self.refused: dict[tuple[str, str], str] = {}     # accuracy results refused, and why
        self.origins: dict[tuple[str, str], str] = {}     # where an accepted accuracy comes from
        self._models: dict[tuple, object] = {}            # model whose attributes settings read
        self._reference_models: dict[str, object] = {}    # models a setting compares with (Table 8)
        self.protocols_used: dict[int, measure.Protocol] = {}
        self.env = measure.environment(self.device)
        self.device_tag = measure.device_tag(self.device)

    # -- what to measure ------------------------------------------------------------------------
    def wanted(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds

    def target(self, row, column) -> Target:
        model = row.settings.get(column.model_from) if column.model_from else row.model
        return Target(row.id, column.model_from or "", model, json.dumps(row.model_kwargs, sort_keys=True),
                      row.img_size, column.form or row.form, row.macs_convention)

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

    # -- static columns ---------------------------------------------------------------------------
    def measure_static(self, progress):
        cells = self._needed_cells([k for k in ("params", "macs") if self.wanted(k)])
        groups: dict[Target, list] = {}
        for row, column in cells:
            groups.setdefault(self.target(row, column), []).append(column)
        task = progress.add_task(f"{self.spec.id}: params & MACs", total=len(groups))
        for target, columns in groups.items():
            progress.update(task, description=f"{self.spec.id}: params & MACs · {target.label}")
            model = None
            for column in columns:
                macs = column.kind == "macs"
                key = measure.cache_key(kind=column.kind, model=target.model, kwargs=target.kwargs, form=target.form,
                                        img_size=target.img_size if macs else None,
                                        convention=target.convention if macs else None, code=self.fingerprint)
                value = self.cache.get(key)
                if value is None:
                    model = model or self._measure_or_fail(target, lambda: target.build(for_counting=True))
                    if model is None:
                        break
                    value = self._measure_or_fail(
                        target, lambda m=model: measure.count_macs(m, target.img_size, target.convention) if macs
                        else measure.count_params(m))
                    if value is None:
                        break
                    self.cache.put(key, value)
                self.values[(target.row, column.id)] = value
            progress.advance(task)

    # -- throughput -------------------------------------------------------------------------------
    def _protocol(self, img_size: int) -> measure.Protocol:
        if img_size not in self.protocols_used:
            protocol = measure.Protocol.for_device(self.protocol_spec, self.device, img_size)
            # e.g. the GPU session's fewer passes (batch size and dtype stay the paper's)
            self.protocols_used[img_size] = replace(protocol, **self.protocol_overrides)
        return self.protocols_used[img_size]

    def _throughput_pairs(self, targets) -> list[tuple[Target, Target]]:
        """Pairs of targets whose throughput ratio a gain/ratio column reports."""
        pairs = []
        for col in self.spec.columns_of_kind(*DERIVED_KINDS):
            of = self.spec.columns[col.of]
            if of.kind != "throughput":
                continue
            for row in self.spec.rows.values():
                if col.over:
                    a, b = self.target(row, of), self.target(row, self.spec.columns[col.over])
                elif row.baseline:
                    a, b = self.target(row, of), self.target(self.spec.rows[row.baseline], of)
                else:
                    continue
                if a in targets and b in targets and a != b and (a, b) not in pairs and (b, a) not in pairs:
                    pairs.append((a, b))
        return pairs

    def measure_throughput(self, progress):
        if self.protocol_spec is None:
            return
        cells = self._needed_cells(["throughput"])
        targets = {self.target(row, column) for row, column in cells}
        results: dict[Target, dict] = {}

        # Every target linked to another through a gain is timed in one interleaved group
        # (measure.time_interleaved), so that each gain compares timings taken side by side. A group
        # is cached as a whole (its members' key names the group) and timed again as a whole, so a
        # gain never pairs timings of two sessions.
        groups = _connected_groups(sorted(targets, key=str), self._throughput_pairs(targets))
        group_of = {t: group for group in groups for t in group}

        def key(t: Target):
            return measure.cache_key(kind="throughput", model=t.model, kwargs=t.kwargs, form=t.form,
                                     img_size=t.img_size, protocol=self._protocol(t.img_size).__dict__,
                                     device=measure.device_tag(self.device), code=self.fingerprint,
                                     group=sorted(f"{u.model}|{u.form}|{u.img_size}|{u.kwargs}" for u in group_of[t]))

        for t in targets:
            if cached := self.cache.get(key(t)):
                results[t] = cached
        todo = [g for g in groups if any(t not in results for t in g)]
        task = progress.add_task(f"{self.spec.id}: throughput", total=len(todo))
        for group in todo:
            progress.update(task, description=f"{self.spec.id}: throughput · {' vs '.join(t.label for t in group)}")
            timers = {}
            for t in group:
                timer = self._measure_or_fail(
                    t, lambda: measure.Timer(t.build(), t.img_size, self._protocol(t.img_size), self.device))
                if timer:
                    timers[t] = timer
            session = hashlib.sha1(f"{dt.datetime.now().isoformat()}{sorted(map(str, timers))}".encode()).hexdigest()[:12]
            for t, result in measure.time_interleaved(timers).items():
                results[t] = {**result, "session": session, "interleaved_with": [u.label for u in timers if u != t]}
                self.cache.put(key(t), results[t])
            timers.clear()
            progress.advance(task)
        for row, column in cells:
            result = results.get(self.target(row, column))
            if result:
                self.values[(row.id, column.id)] = result["img_per_s"]
                self.ranges[(row.id, column.id)] = (result["min"], result["max"])
                self.samples[(row.id, column.id)] = (result.get("session"), result["samples"])
                spread = (f"batch {result['batch_size']}, median of {len(result['samples'])} timings, "
                          f"range {result['min']:.1f}–{result['max']:.1f}")
                self.notes[(row.id, column.id)] = "; ".join([spread, *(result.get("notes") or [])])

    # -- derived, settings, accuracy -----------------------------------------------------------------
    def _operands(self, row, column) -> tuple[tuple, tuple] | None:
        """The (row, column) cells a derived column divides or subtracts."""
        if column.over:
            return (row.id, column.of), (row.id, column.over)
        if row.baseline:
            return (row.id, column.of), (row.baseline, column.of)
        return None

    def _paired_ratios(self, operands) -> list[float] | None:
        """Per-round ratios of two throughputs timed interleaved in one session, else None."""
        (sa, a), (sb, b) = (self.samples.get(o, (None, [])) for o in operands)
        if sa is None or sa != sb or len(a) != len(b) or not a:
            return None
        return [x / y for x, y in zip(a, b)]

    def derived_range(self, row, column) -> tuple[float, float, str] | None:
        """A throughput gain's range: over the paired rounds if timed side by side, else the
        crude bound from the two timing ranges (slowest over fastest and the reverse)."""
        operands = self._operands(row, column)
        if not operands or not all(o in self.ranges for o in operands):
            return None
        scale = (lambda r: 100 * (r - 1)) if column.kind == "gain" else (lambda r: r)
        ratios = self._paired_ratios(operands)
        if ratios:
            return scale(min(ratios)), scale(max(ratios)), f"over {len(ratios)} interleaved rounds"
        (a_lo, a_hi), (b_lo, b_hi) = (self.ranges[o] for o in operands)
        return scale(a_lo / b_hi), scale(a_hi / b_lo), "from the two timing ranges"

    def derived_value(self, row, column):
        operands = self._operands(row, column)
        if operands is None:
            return None
        of, over = (self.values.get(o) for o in operands)
        if of is None or over is None or (over == 0 and column.kind != "difference"):
            return None
        if column.kind == "difference":
            return of - over
        # Throughputs timed side by side: the median of the per-round ratios cancels drift
        # that a ratio of two medians keeps.
        ratios = self._paired_ratios(operands)
        ratio = statistics.median(ratios) if ratios else of / over
        return 100.0 * (ratio - 1.0) if column.kind == "gain" else ratio

    def setting_value(self, row, column) -> tuple[object, str, bool]:
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
                value, where, declared = self._read_setting(row, column, source)
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

    def _read_setting(self, row, column, source: str):
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
            return value, f"the built model {self.target(row, column).model}: {where}", False
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
        target = self.target(row, column)
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

    def accuracy_value(self, row, column):
        """The cell's result.json value if its provenance says it belongs to this cell
        (reproduce/provenance.py); otherwise None, with the reason kept for the cell's note."""
        from reproduce import provenance

        path = RUNS_DIR / self.spec.id / self.spec.run_name(row.id, column.id) / "result.json"
        if not path.exists():
            return None
        try:
            result = json.loads(path.read_text())
        except ValueError:
            self.refused[(row.id, column.id)] = f"{path} is not valid JSON"
            return None
        model = self.target(row, column).model
        if column.id in weights.column_releases(self.spec.id, row.id):
            model = weights.release_of(self.spec.id, row.id, column.id).model  # that column's own model
        value, reason = provenance.accept(self.spec, row, column, result, model, column.form or row.form,
                                          folder=path.parent)
        if reason:
            self.refused[(row.id, column.id)] = f"{_show(path)} refused: {reason}"
            return None
        self.origins[(row.id, column.id)] = provenance.origin_note(result)
        return value

    # -- the cells --------------------------------------------------------------------------------
    def base_kind(self, column) -> str:
        """The measured kind behind a column: a derived column counts as the kind of its operand."""
        return self.spec.columns[column.of].kind if column.kind in DERIVED_KINDS else column.kind

    def pending_accuracy_note(self, row, column) -> str:
        if column.kind in DERIVED_KINDS:
            return f"pending: computed from {column.of} and {column.over or 'the baseline row'}, which need ImageNet-1k"
        refused = self.refused.get((row.id, column.id))
        prefix = f"{refused}. " if refused else ""
        release = weights.release_for_cell(self.spec, row.id, column.id)
        if release is not None:  # the fast path first: minutes of evaluation instead of a training run
            prefix += (f"released weights {release.local_name} ({release.project}): `reproduce table {self.spec.id} "
                        f"--columns accuracy --weights DIR --data /path/to/imagenet`; or ")
        recipe = self.spec.recipe_of(row.id, column.id)
        if recipe and (RECIPES / recipe).exists():
            return f"{prefix}needs ImageNet-1k: `{accuracy_command(self.spec, row.id, column.id)}`"
        model = self.target(row, column).model or (release.model if release else None)
        if model is None:  # a row of several models (one per column): its cell note names each
            return f"{prefix}needs ImageNet-1k and the trained weights of this column's model"
        return f"{prefix}needs ImageNet-1k and trained weights: `{self.eval_command(row, column, model)}`"

    def eval_command(self, row, column, model: str) -> str:
        """The `reproduce eval` line whose result.json provenance.accept takes for this cell: the
        model, the row's image size and form (a default left out), written to the cell's run folder."""
        size = f" --img-size {row.img_size}" if row.img_size != 224 else ""
        deploy = " --deploy" if (column.form or row.form) == "deploy" else ""
        return (f"reproduce eval {model} --checkpoint FILE --data /path/to/imagenet{size}{deploy} "
                f"--output runs/{self.spec.id}/{self.spec.run_name(row.id, column.id)}")

    def cell(self, ref) -> dict | None:
        if ref.reported in NOT_REPORTED:
            return None  # the paper prints a dash: nothing to reproduce
        if self.rows is not None and ref.row not in self.rows:
            return None  # not asked for this time: keep what the previous results said
        row, column = self.spec.rows[ref.row], self.spec.columns[ref.column]
        base = {"table": self.spec.id, "row": row.id, "model": self.target(row, column).model or "",
                "column": column.id, "reported": ref.reported, "unit": ref.unit or column.unit,
                "measured": "", "delta": ""}
        notes = [n for n in (row.cell_notes.get(column.id, ""), ref.note, row.note, column.note) if n]

        deviation = self.spec.deviation(row.id, column.id, self.device_tag)

        def done(status, measured=None, extra=None, device_bound=False, spread=None):
            if extra:
                notes.insert(0, extra)
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
                    notes.insert(0, f"the printed value is the measured one {how} at the printed precision.")
                status = status or state
            if deviation and status in report.MEASURED_STATUSES:
                said = deviation.status.replace("_", " ")
                notes.insert(0, f"Accepted {said} (declared in {self.spec.id}.yaml): {deviation.reason}"
                             if status == deviation.status else
                             f"The spec declares this cell a {said} ({deviation.reason}), but it is {status} now.")
            return {**base, "status": status, "note": " ".join(notes)}

        if row.cited:
            return done("cited", extra=f"cited: {row.cited}")
        if column.kind == "setting":
            return self._setting_cell(row, column, ref, done)
        kind = self.base_kind(column)
        value = (self.derived_value(row, column) if column.kind in DERIVED_KINDS
                 else self.values.get((row.id, column.id)))
        if kind == "accuracy":
            if value is None:
                return done("pending", extra=self.pending_accuracy_note(row, column))
            return done(None, value, extra=self.origins.get((row.id, column.id)))
        if row.pending:
            return done("pending", extra=f"pending: {row.pending}")
        target = self.target(row, column)
        if not target.model:
            return done("pending", extra="pending: model not implemented")
        failure = self.failures.get(target) or (
            column.kind in DERIVED_KINDS and next((f for t, f in self.failures.items() if t.row in
                                                   (row.id, row.baseline)), None))
        if value is None and failure:
            return done("pending", extra=f"pending: {failure}")
        if value is None:
            if not self.wanted(kind):
                return None  # not asked for this time: keep what the previous results said
            no_protocol = kind == "throughput" and not self.protocol_spec
            return done("pending", extra="pending: no throughput protocol for this table" if no_protocol
                        else "pending: not measured")
        if column.kind == "throughput":
            return self._throughput_cell(ref, value, done)
        spread = self.derived_range(row, column) if kind == "throughput" else None
        if spread:
            low, high, how = spread
            shown = "{:+.1f} to {:+.1f}" if column.kind == "gain" else "{:.2f} to {:.2f}"
            notes.insert(0, ("median of per-round ratios; " if "rounds" in how else "")
                         + f"range {shown.format(low, high)} {how}.")
        if kind == "throughput" and not self.on_paper_device():
            notes.append(f"Gain measured on {self.env['device']} ({self.protocol_used_text()}); the paper's is on "
                         f"{self.protocol_spec.get('paper_device')}: gains travel better than absolute images/s, but "
                         "the relative cost of layers (pooling, norms, matmuls) still differs between devices.")
        return done(None, value, spread=spread[:2] if spread else None)

    def _setting_cell(self, row, column, ref, done):
        try:
            value, where, declared = self.setting_value(row, column)
        except measure.ModelNotImplemented as e:
            return done("pending", extra=f"pending: {e}")
        except RecipeDoesNotRun as e:
            return done("pending", extra=f"pending: {e.args[0]}")
        except (KeyError, OSError, ValueError, measure.MeasureError) as e:
            why = e.args[0] if isinstance(e, KeyError) and e.args else e
            return done("pending", extra=f"setting not resolvable yet ({why}); fix the spec or recipe")
        if declared:
            if report.compare(ref.reported, value, 0.0, "setting")[0] == "match":
                return done("declared", extra=f"declared: {where} gives {value}; nothing reads it from a model "
                                              "or a recipe.")
            return done("mismatch", extra=f"the spec declares {value} ({where}), the paper prints {ref.reported}.")
        extra = f"read from {where}."
        sources = column.source if isinstance(column.source, list) else [column.source]
        if any(str(x).endswith("img_size") for x in sources) and value != row.img_size:
            extra += f" Params, MACs and throughput are measured at the spec's img_size {row.img_size}."
        return done(None, value, extra=extra)

    def on_paper_device(self) -> bool:
        return measure.same_device(self.protocol_spec.get("paper_device", ""), self.env["device"])

    def protocol_used_text(self) -> str:
        return "; ".join(f"@{size}: {p.describe()}" for size, p in sorted(self.protocols_used.items())) or "cached"

    def _throughput_cell(self, ref, value, done):
        extra = self.notes.get((ref.row, ref.column), "")
        paper_device = self.protocol_spec.get("paper_device", "the paper's GPU")
        ours = self.env["device"]
        spread = self.ranges.get((ref.row, ref.column))
        if self.on_paper_device():
            return done(None, value, extra, spread=spread)
        why = (f"absolute images/s are device-bound: printed on {paper_device}, measured here on {ours} "
               f"({extra}); the gain columns carry the comparison; to compare absolutes run "
               f"`reproduce table {self.spec.id} --columns throughput --device cuda` on {paper_device}.")
        return done("pending", value, extra=why, device_bound=True, spread=spread)

    def collect_accuracy(self):
        for ref in self.spec.reference.itertuples():
            row, column = self.spec.rows[ref.row], self.spec.columns[ref.column]
            if column.kind == "accuracy" and not row.cited:
                value = self.accuracy_value(row, column)
                if value is not None:
                    self.values[(row.id, column.id)] = value

    def run(self) -> pd.DataFrame:
        self.collect_accuracy()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      disable=not self.show_progress, transient=True) as progress:
            if self.wanted("params") or self.wanted("macs"):
                self.measure_static(progress)
            if self.wanted("throughput"):
                self.measure_throughput(progress)
        cells = [self.cell(ref) for ref in self.spec.reference.itertuples()
                 if self.only is None or (ref.row, ref.column) in self.only]
        return report.cells_frame([c for c in cells if c is not None])

    def meta(self) -> dict:
        meta = {"device": self.env["device"], "device tag": measure.device_tag(self.device),
                "software": f"torch {self.env['torch']}, timm {self.env['timm']}, python {self.env['python']}",
                "torch threads (counting; timing: see protocol)": self.env["threads"],
                "date": dt.date.today().isoformat(),
                "code fingerprint": self.fingerprint}
        for key in ("cuda", "cudnn", "driver"):
            if self.env.get(key):
                meta[key] = self.env[key]
        if self.protocol_spec:
            meta["paper protocol"] = self.protocol_spec.get("summary", self.protocol_spec.get("name"))
            for size, proto in sorted(self.protocols_used.items()):
                meta[f"protocol run here @{size}"] = proto.describe() + ", interleaved with the baseline of each gain"
            if self.protocol_overrides:
                meta["protocol overridden"] = ", ".join(f"{k}={v}" for k, v in self.protocol_overrides.items())
        return meta


def _connected_groups(items: list, pairs: list[tuple]) -> list[list]:
    """Items joined by pairs into groups (connected components), in first-seen order."""
    group_of = {item: [item] for item in items}
    for a, b in pairs:
        if group_of[a] is not group_of[b]:
            merged = group_of[a] + group_of[b]
            for item in merged:
                group_of[item] = merged
    seen, groups = set(), []
    for item in items:
        if id(group_of[item]) not in seen:
            seen.add(id(group_of[item]))
            groups.append(group_of[item])
    return groups


def results_paths(table_id: str, device: str, results_dir: Path | None = None) -> tuple[Path, Path]:
    folder = Path(results_dir or RESULTS_DIR) / measure.device_tag(device)
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
