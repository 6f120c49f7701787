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
from pathlib import Path

import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from reproduce import measure, report
from reproduce.registry import ROOT, TableSpec, load_protocol, load_recipe

RESULTS_DIR = ROOT / "results"
RUNS_DIR = ROOT / "runs"
CACHE_DIR = ROOT / ".cache" / "measurements"
MEASURABLE = ("params", "macs", "throughput")


def source_fingerprint() -> str:
    """Hash of the code that defines models and counting: a change invalidates cached numbers."""
    digest = hashlib.sha1()
    for folder in (ROOT / "riformer", ROOT / "reproduce"):
        for path in sorted(folder.glob("*.py")):
            if path.name in ("measure.py", "op_counters.py") or folder.name == "riformer":
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


class MeasurementCache:
    """One JSON file per measurement, keyed by everything the number depends on."""

    def __init__(self, folder: Path = CACHE_DIR, enabled: bool = True):
        self.folder, self.enabled = Path(folder), enabled

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
            report.atomic_write_text(self._path(key), json.dumps({"key": key, "value": value}))


def accuracy_command(spec: TableSpec, row_id: str) -> str:
    return (f"reproduce train {spec.id} {row_id} --data /path/to/imagenet --scale full --nproc 8 "
            f"&& reproduce table {spec.id} --columns accuracy")


def _dig(data, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            raise KeyError(part)
        data = data[part]
    return data


class TableRun:
    """Measures the cells of `spec` whose column kinds are in `kinds` on `device`."""

    def __init__(self, spec: TableSpec, device: str = "cpu", kinds: set[str] | None = None,
                 cache: MeasurementCache | None = None, show_progress: bool = True):
        self.spec, self.device = spec, measure.resolve_device(device)
        self.kinds = kinds
        self.cache = cache or MeasurementCache()
        self.show_progress = show_progress
        self.fingerprint = source_fingerprint()
        self.protocol_spec = load_protocol(spec.protocol) if spec.protocol else None
        self.values: dict[tuple[str, str], float] = {}   # (row, column) -> measured number
        self.notes: dict[tuple[str, str], str] = {}
        self.failures: dict[str, str] = {}                # row -> why its model could not be measured
        self._models: dict[str, object] = {}              # model whose attributes settings read
        self.protocols_used: dict[int, measure.Protocol] = {}
        self.env = measure.environment(self.device)

    # -- what to measure ------------------------------------------------------------------------
    def wanted(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds

    def measurable_rows(self):
        return [r for r in self.spec.rows.values() if not (r.cited or r.pending) and r.model]

    def _form(self, row, column) -> str:
        return column.form or row.form

    def _needed_cells(self, kinds) -> list[tuple]:
        """(row, column) pairs of these kinds that the reference prints or a gain/ratio needs."""
        cells = set(zip(self.spec.reference["row"], self.spec.reference["column"]))
        for row_id, col_id in list(cells):
            column = self.spec.columns[col_id]
            if column.kind in ("gain", "ratio"):
                cells.add((row_id, column.of))
                if column.over:
                    cells.add((row_id, column.over))
                elif self.spec.rows[row_id].baseline:
                    cells.add((self.spec.rows[row_id].baseline, column.of))
        rows = {r.id: r for r in self.measurable_rows()}
        return [(rows[r], self.spec.columns[c]) for r, c in sorted(cells)
                if r in rows and self.spec.columns[c].kind in kinds]

    # -- static columns ---------------------------------------------------------------------------
    def _static_key(self, row, form, kind, column):
        return measure.cache_key(kind=kind, model=row.model, kwargs=row.model_kwargs, form=form,
                                 img_size=row.img_size if kind == "macs" else None,
                                 convention=row.macs_convention if kind == "macs" else None,
                                 code=self.fingerprint)

    def measure_static(self, progress):
        cells = self._needed_cells([k for k in ("params", "macs") if self.wanted(k)])
        groups: dict[tuple, list] = {}
        for row, column in cells:
            groups.setdefault((row.id, self._form(row, column)), []).append((row, column))
        task = progress.add_task(f"{self.spec.id}: params & MACs", total=len(groups))
        for (row_id, form), members in groups.items():
            progress.update(task, description=f"{self.spec.id}: params & MACs · {row_id} ({form})")
            model = None
            for row, column in members:
                key = self._static_key(row, form, column.kind, column)
                value = self.cache.get(key)
                if value is None and row.id not in self.failures:
                    try:
                        model = model or measure.build_model(row.model, row.model_kwargs, form, for_counting=True)
                        value = (measure.count_params(model) if column.kind == "params"
                                 else measure.count_macs(model, row.img_size, row.macs_convention))
                    except measure.ModelNotImplemented as e:
                        self.failures[row.id] = str(e)
                        continue
                    except Exception as e:  # a broken model must not stop the table; it is reported
                        self.failures[row.id] = f"measurement failed: {type(e).__name__}: {e}"
                        continue
                    self.cache.put(key, value)
                if value is not None:
                    self.values[(row.id, column.id)] = value
            del model
            progress.advance(task)

    # -- throughput -------------------------------------------------------------------------------
    def _protocol(self, img_size: int) -> measure.Protocol:
        if img_size not in self.protocols_used:
            self.protocols_used[img_size] = measure.Protocol.for_device(self.protocol_spec, self.device, img_size)
        return self.protocols_used[img_size]

    def _throughput_units(self):
        """(row, form) to time, and the pairs whose ratio a gain/ratio column reports."""
        cells = self._needed_cells(["throughput"])
        units = {(row.id, self._form(row, column)): row for row, column in cells}
        pairs = []
        for col in self.spec.columns_of_kind("gain", "ratio"):
            if self.spec.columns[col.of].kind != "throughput":
                continue
            for row in self.measurable_rows():
                a = (row.id, self._form(row, self.spec.columns[col.of]))
                if col.over:
                    b = (row.id, self._form(row, self.spec.columns[col.over]))
                elif row.baseline and row.baseline in self.spec.rows:
                    base = self.spec.rows[row.baseline]
                    b = (base.id, self._form(base, self.spec.columns[col.of]))
                else:
                    continue
                if a in units and b in units and (a, b) not in pairs and (b, a) not in pairs:
                    pairs.append((a, b))
        return units, pairs, cells

    def measure_throughput(self, progress):
        if self.protocol_spec is None:
            return
        units, pairs, cells = self._throughput_units()
        results: dict[tuple, dict] = {}

        def key(unit):
            row = units[unit]
            proto = self._protocol(row.img_size)
            return measure.cache_key(kind="throughput", model=row.model, kwargs=row.model_kwargs, form=unit[1],
                                     img_size=row.img_size, protocol=proto.__dict__,
                                     device=measure.device_tag(self.device), code=self.fingerprint)

        for unit in units:
            cached = self.cache.get(key(unit))
            if cached:
                results[unit] = cached
        # Time each pair interleaved (a, b, a, b, ...) so that drift in the machine's speed hits
        # both sides of a gain alike; then the units that are in no pair.
        groups = [list(p) for p in pairs] + [[u] for u in units if not any(u in p for p in pairs)]
        todo = [[u for u in g if u not in results] for g in groups]
        todo = [g for g in todo if g]
        task = progress.add_task(f"{self.spec.id}: throughput", total=len(todo))
        for group in todo:
            group = [u for u in group if u not in results and units[u].id not in self.failures]
            progress.update(task, description=f"{self.spec.id}: throughput · {' vs '.join(r for r, _ in group)}")
            timers = {}
            for unit in group:
                row = units[unit]
                try:
                    model = measure.build_model(row.model, row.model_kwargs, unit[1])
                    timers[unit] = measure.Timer(model, row.img_size, self._protocol(row.img_size), self.device)
                except measure.ModelNotImplemented as e:
                    self.failures[row.id] = str(e)
                except Exception as e:
                    self.failures[row.id] = f"throughput failed: {type(e).__name__}: {e}"
            samples = {u: [] for u in timers}
            for _ in range(max((t.protocol.repeats for t in timers.values()), default=0)):
                for unit, timer in timers.items():
                    samples[unit].append(timer.sample())
            for unit, timer in timers.items():
                result = {**measure.summarize(samples[unit]), "batch_size": timer.batch_size,
                          "notes": timer.notes, "interleaved_with": [u[0] for u in timers if u != unit]}
                results[unit] = result
                self.cache.put(key(unit), result)
            timers.clear()
            progress.advance(task)
        for row, column in cells:
            result = results.get((row.id, self._form(row, column)))
            if result:
                self.values[(row.id, column.id)] = result["img_per_s"]
                spread = (f"batch {result['batch_size']}, median of {len(result['samples'])} timings, "
                          f"range {result['min']:.1f}–{result['max']:.1f}")
                self.notes[(row.id, column.id)] = "; ".join([spread, *(result.get("notes") or [])])

    # -- derived, settings, accuracy -----------------------------------------------------------------
    def derived_value(self, row, column):
        of = self.values.get((row.id, column.of))
        if column.over:
            over = self.values.get((row.id, column.over))
        elif row.baseline:
            over = self.values.get((row.baseline, column.of))
        else:
            return None
        if of is None or over is None or over == 0:
            return None
        return 100.0 * (of / over - 1.0) if column.kind == "gain" else of / over

    def setting_value(self, row, column):
        source = column.source or row.source
        if source is None:
            raise KeyError("no 'source' for this setting in the spec")
        if source.startswith("recipe."):
            recipe = row.recipe or column.recipe
            if not recipe:
                raise KeyError("the row has no recipe")
            value = _dig(load_recipe(recipe), source[len("recipe."):])
        elif source.startswith("model_kwargs."):
            value = _dig(row.model_kwargs, source[len("model_kwargs."):])
        elif source.startswith("model."):
            value = self._model_attribute(row, source[len("model."):])
        elif source in ("img_size", "model", "form", "macs_convention", "baseline"):
            value = getattr(row, source)
        else:
            value = _dig(row.settings, source)
        mapping = column.values or row.values or {}
        for k, v in mapping.items():
            if str(k).lower() == str(value).lower():
                return str(v)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)

    def _model_attribute(self, row, attribute):
        """An architecture setting read off the built model (e.g. embed_dim), not off the spec."""
        if not row.model:
            raise KeyError("the row has no model")
        if row.id not in self._models:
            self._models.clear()  # keep one model alive at a time
            self._models[row.id] = measure.build_model(row.model, row.model_kwargs, row.form)
        value = getattr(self._models[row.id], attribute, None)
        if value is None:
            raise KeyError(f"{row.model} has no attribute '{attribute}'")
        return f"[{', '.join(map(str, value))}]" if isinstance(value, (list, tuple)) else value

    def accuracy_value(self, row, column):
        path = RUNS_DIR / self.spec.id / row.id / "result.json"
        if not path.exists():
            return None
        result = json.loads(path.read_text())
        if result.get("scale") != "full":
            return None
        return result.get(column.source or "top1")

    # -- the cells --------------------------------------------------------------------------------
    def cell(self, ref) -> dict:
        row, column = self.spec.rows[ref.row], self.spec.columns[ref.column]
        base = {"table": self.spec.id, "row": row.id, "model": row.model or "", "column": column.id,
                "reported": ref.reported, "unit": ref.unit or column.unit, "measured": "", "delta": ""}
        notes = [n for n in (row.note, row.cell_notes.get(column.id, ""), column.note) if n]

        def done(status, measured=None, extra=None):
            if extra:
                notes.insert(0, extra)
            if measured is not None:
                state, delta = report.compare(ref.reported, measured, self.spec.tolerance(column), column.kind)
                base.update(measured=report.format_measured(measured, ref.reported),
                            delta=report.format_delta(delta, ref.reported))
                status = status or state
            return {**base, "status": status, "note": " ".join(notes)}

        if row.cited:
            return done("cited", extra=f"cited: {row.cited}")
        if column.kind == "setting":
            try:
                return done(None, self.setting_value(row, column))
            except measure.ModelNotImplemented as e:
                return done("pending", extra=f"pending: {e}")
            except (KeyError, OSError, ValueError) as e:
                return done("pending", extra=f"setting not resolvable yet ({e}); fix the spec or recipe")
        if column.kind == "accuracy":
            value = self.accuracy_value(row, column)
            if value is not None:
                return done(None, value)
            if row.recipe:
                return done("pending", extra=f"needs ImageNet-1k: `{accuracy_command(self.spec, row.id)}`")
            return done("pending", extra="needs ImageNet-1k and a training recipe the suite does not have yet")
        if row.pending:
            return done("pending", extra=f"pending: {row.pending}")
        if not row.model:
            return done("pending", extra="pending: model not implemented")
        if row.id in self.failures:
            return done("pending", extra=f"pending: {self.failures[row.id]}")
        if column.kind in ("gain", "ratio"):
            value = self.derived_value(row, column)
        else:
            value = self.values.get((row.id, column.id))
        if value is None:
            if not self.wanted(column.kind if column.kind not in ("gain", "ratio") else "throughput"):
                return None  # not asked for this time: keep what the previous results said
            return done("pending", extra="pending: not measured (no throughput protocol for this table)"
                        if column.kind in ("throughput", "gain", "ratio") and not self.protocol_spec
                        else "pending: not measured")
        if column.kind == "throughput":
            return self._throughput_cell(ref, value, done)
        return done(None, value)

    def _throughput_cell(self, ref, value, done):
        extra = self.notes.get((ref.row, ref.column), "")
        paper_device = self.protocol_spec.get("paper_device", "the paper's GPU")
        ours = self.env["device"]
        if measure.same_device(paper_device, ours):
            return done(None, value, extra)
        return done("pending", value,
                    f"absolute images/s are device-bound: printed on {paper_device}, measured here on {ours} "
                    f"({extra}); the gain columns carry the comparison; to compare absolutes run "
                    f"`reproduce table {self.spec.id} --columns throughput --device cuda` on {paper_device}.")

    def run(self) -> pd.DataFrame:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      disable=not self.show_progress, transient=True) as progress:
            if self.wanted("params") or self.wanted("macs"):
                self.measure_static(progress)
            if self.wanted("throughput"):
                self.measure_throughput(progress)
        cells = [self.cell(ref) for ref in self.spec.reference.itertuples()]
        return report.cells_frame([c for c in cells if c is not None])

    def meta(self) -> dict:
        meta = {"device": self.env["device"], "device tag": measure.device_tag(self.device),
                "software": f"torch {self.env['torch']}, timm {self.env['timm']}, python {self.env['python']}",
                "threads": self.env["threads"], "date": dt.date.today().isoformat(),
                "code fingerprint": self.fingerprint}
        for key in ("cuda", "cudnn", "driver"):
            if self.env.get(key):
                meta[key] = self.env[key]
        if self.protocol_spec:
            meta["paper protocol"] = self.protocol_spec.get("summary", self.protocol_spec.get("name"))
            for size, proto in sorted(self.protocols_used.items()):
                meta[f"protocol run here @{size}"] = (
                    f"batch {proto.batch_size}, {proto.runs} runs × {proto.repeats} repeats (median), "
                    f"warmup {proto.warmup}, {proto.dtype}, channels_last={proto.channels_last}, "
                    f"compile={proto.compile}, interleaved with the baseline of each gain")
        return meta


def results_paths(table_id: str, device: str, results_dir: Path | None = None) -> tuple[Path, Path]:
    folder = Path(results_dir or RESULTS_DIR) / measure.device_tag(device)
    return folder / f"{table_id}.csv", folder / f"{table_id}.md"


def run_table(spec: TableSpec, device: str = "cpu", kinds: set[str] | None = None,
              results_dir: Path | None = None, cache: MeasurementCache | None = None,
              show_progress: bool = True) -> tuple[pd.DataFrame, Path, Path]:
    """Measure `spec`, merge with earlier results for the kinds not measured now, write CSV + MD."""
    csv_path, md_path = results_paths(spec.id, device, results_dir)
    run = TableRun(spec, device, kinds, cache, show_progress)
    frame = run.run()
    if kinds is not None and csv_path.exists():
        previous = report.read_results(csv_path)
        fresh = set(zip(frame["row"], frame["column"]))
        keep = previous[[(r, c) not in fresh for r, c in zip(previous["row"], previous["column"])]]
        frame = pd.concat([frame, keep], ignore_index=True)
    order = {(r, c): i for i, (r, c) in enumerate(zip(spec.reference["row"], spec.reference["column"]))}
    frame = frame.iloc[sorted(range(len(frame)), key=lambda i: order.get((frame.row[i], frame.column[i]), math.inf))]
    frame = frame.reset_index(drop=True)
    report.write_csv(frame, csv_path)
    report.atomic_write_text(md_path, report.render_markdown(spec, frame, run.meta()))
    return frame, csv_path, md_path
