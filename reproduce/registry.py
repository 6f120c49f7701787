"""The table registry: every mission table, its columns, rows, models, recipes and tolerances.

A table is data: `recipes/tables/<id>.yaml` (the spec, see docs/adding-a-table.md) and
`results/reference/<id>.csv` (the printed numbers). This module loads and validates both, and is
the only place that knows where they live.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
TABLES_DIR = RECIPES / "tables"
REFERENCE_DIR = ROOT / "results" / "reference"

REFERENCE_COLUMNS = ["table", "row", "label", "group", "column", "reported", "unit",
                     "epochs_600", "finetuned_384", "cnn_teacher", "in22k", "note"]
COLUMN_KINDS = ("setting", "params", "macs", "throughput", "gain", "ratio", "difference", "accuracy")
DERIVED_KINDS = ("gain", "ratio", "difference")   # computed from two other cells
NOT_REPORTED = ("-", "–", "—")                        # a printed dash: the paper has no value there
# Absolute tolerance in the column's unit when a spec gives none; None = never compared.
DEFAULT_TOLERANCE = {"setting": 0.0, "params": 0.1, "macs": 0.1, "throughput": None, "gain": 5.0,
                     "ratio": 0.2, "difference": 0.3, "accuracy": 0.3}
PAPERS = ("riformer", "repaformer", "sit")


class RegistryError(ValueError):
    """A table id, spec or reference file is wrong; the message names the thing to fix."""


@dataclass(frozen=True)
class ColumnSpec:
    id: str
    kind: str
    unit: str = ""
    tolerance: float | None = None
    form: str | None = None        # train | deploy: overrides the row's form
    of: str | None = None          # gain/ratio: numerator column
    over: str | None = None        # gain/ratio: denominator column of the same row
    over_row: str | None = None    # gain/ratio: "baseline" = the same column in the row's baseline
    model_from: str | None = None  # measure the model named in this row field (e.g. teacher)
    derive_reported: bool = False  # gain/ratio the paper does not print: computed from printed operands
    source: str | list | None = None  # setting: where the value is read (a list: the first that resolves)
    values: dict | None = None     # setting: value -> printed form
    recipe: str | None = None      # setting: recipe used for every row of this column (Table 10)
    note: str = ""


DEVIATION_STATUSES = ("mismatch", "within_tolerance")


@dataclass(frozen=True)
class Deviation:
    """A cell the spec accepts outside (or at the edge of) its tolerance, and why.

    `reproduce diff` passes a cell outside tolerance only when its row declares it here, with the
    status it must have, the reason (written into the cell's note) and, for cells that are exact
    (params, MACs, settings), the value it must measure, so a moved number fails as well."""
    status: str
    reason: str
    measured: str | None = None    # the value expected, as text; None for noisy cells (gains)
    device: str | None = None      # device-tag prefix it holds on (cpu, cuda-...); None: every device
    within: float | None = None    # the accepted ± around `measured` (declared, never inferred from its digits)

    def applies_to(self, device_tag: str) -> bool:
        return self.device is None or device_tag.startswith(self.device)

    def holds_value(self, measured: str) -> bool:
        """Whether a measured value (at the precision the results file records) is within the
        declared window `within` of the declared one; text values must be equal."""
        if self.measured is None:
            return True
        from reproduce.report import _norm_text, parse_number

        want, got = parse_number(self.measured), parse_number(measured)
        if want and got:
            return abs(got[0] - want[0]) <= (self.within or 0.0) + 1e-12
        return _norm_text(self.measured) == _norm_text(measured)


@dataclass(frozen=True)
class RowSpec:
    id: str
    model: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    img_size: int = 224
    form: str = "train"
    macs_convention: str = "fvcore"
    baseline: str | None = None
    recipe: str | None = None      # the one training run behind every accuracy cell of the row
    recipes: dict = field(default_factory=dict)  # {accuracy column: recipe}: one run per cell
    pending: str | None = None
    cited: str | None = None
    note: str = ""
    cell_notes: dict = field(default_factory=dict)
    source: str | None = None      # setting source shared by the row's cells (Table 10)
    values: dict | None = None
    deviations: dict = field(default_factory=dict)  # {column: Deviation}: accepted, with the reason
    settings: dict = field(default_factory=dict)   # any other field: settings the columns can read


@dataclass(frozen=True)
class TableSpec:
    id: str
    paper: str
    number: int
    title: str
    protocol: str | None
    columns: dict[str, ColumnSpec]
    rows: dict[str, RowSpec]
    reference: pd.DataFrame = field(repr=False, compare=False)
    spec_path: Path = field(repr=False, compare=False, default=None)
    guards: tuple = ()             # (row, column) gains `reproduce diff --remeasure` times again (CI)

    def columns_of_kind(self, *kinds: str) -> list[ColumnSpec]:
        return [c for c in self.columns.values() if c.kind in kinds]

    def tolerance(self, column: ColumnSpec) -> float | None:
        return column.tolerance if column.tolerance is not None else DEFAULT_TOLERANCE[column.kind]

    def deviation(self, row_id: str, column_id: str, device_tag: str) -> Deviation | None:
        """The accepted deviation of this cell on this device, if the spec declares one."""
        found = self.rows[row_id].deviations.get(column_id)
        return found if found and found.applies_to(device_tag) else None

    # One run per accuracy cell: which recipe trains it and which run folder holds its result.
    def recipe_of(self, row_id: str, column_id: str) -> str | None:
        """The recipe (path under recipes/) whose run fills this accuracy cell, if the spec names one.

        A row's `recipes: {column: recipe}` gives each column its own run (SiT Table 5: one teacher
        per column); a row's `recipe:` is one run whose result fills the row's own accuracy cells.
        A `model_from` column (e.g. the teacher's top-1) is another model: no row recipe fills it."""
        row, column = self.rows[row_id], self.columns[column_id]
        if column_id in row.recipes:
            return row.recipes[column_id]
        return None if column.model_from else row.recipe

    def run_name(self, row_id: str, column_id: str) -> str:
        """The folder under runs/<table>/ whose result.json fills this accuracy cell.

        A cell has a folder of its own (`<row>--<column>`) when its column has its own recipe, or
        when the row has no recipe and another accuracy column of the row reads the same number
        (SiT Tables 5-6: one run per teacher / objective, so one result cannot fill both)."""
        row, column = self.rows[row_id], self.columns[column_id]
        if column_id in row.recipes or (not row.recipe and self._shares_a_number(row, column)):
            return f"{row_id}--{column_id}"
        return f"{row_id}--{column.model_from}" if column.model_from else row_id

    def _shares_a_number(self, row, column) -> bool:
        same = [c for c in self.columns.values() if c.kind == "accuracy" and not c.model_from
                and (c.source or "top1") == (column.source or "top1") and c.id not in row.recipes]
        return not column.model_from and len(same) > 1


_ROW_FIELDS = {f for f in RowSpec.__dataclass_fields__ if f not in ("id", "settings")}
_COLUMN_FIELDS = {f for f in ColumnSpec.__dataclass_fields__ if f != "id"}
_TABLE_FIELDS = {"id", "paper", "number", "title", "protocol", "columns", "rows", "defaults", "notes", "reasons",
                 "guards", "deviations"}
_DEVIATION_FIELDS = {"status", "reason", "measured", "within", "device"}


def _sort_key(table_id: str):
    paper, number = table_id.rsplit("-", 1)
    return (PAPERS.index(paper) if paper in PAPERS else len(PAPERS), paper, int(number))


def table_ids() -> list[str]:
    """Ids of every table that has a spec, in paper order."""
    return sorted((p.stem for p in TABLES_DIR.glob("*.yaml")), key=_sort_key)


def unknown_table_message(table_id: str) -> str:
    ids = table_ids()
    close = difflib.get_close_matches(table_id, ids, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown table '{table_id}'.{hint} Known tables: {', '.join(ids)}"


def _show(path: Path) -> str:
    """A path as a user would type it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _fail(path: Path, message: str):
    raise RegistryError(f"{_show(path)}: {message}")


def _check_fields(path, where, data, allowed):
    if not isinstance(data, dict):
        _fail(path, f"{where} must be a mapping, got {type(data).__name__}")
    unknown = set(data) - allowed
    if unknown:
        _fail(path, f"{where} has unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def _column(path, cid, data) -> ColumnSpec:
    _check_fields(path, f"column '{cid}'", data, _COLUMN_FIELDS)
    if data.get("kind") not in COLUMN_KINDS:
        _fail(path, f"column '{cid}' has kind {data.get('kind')!r}; expected one of {COLUMN_KINDS}")
    if data["kind"] in DERIVED_KINDS and not data.get("of"):
        _fail(path, f"column '{cid}' ({data['kind']}) needs 'of:'")
    if data["kind"] in DERIVED_KINDS and not (data.get("over") or data.get("over_row")):
        _fail(path, f"column '{cid}' ({data['kind']}) needs 'over:' or 'over_row: baseline'")
    if data.get("form") not in (None, "train", "deploy"):
        _fail(path, f"column '{cid}' has form {data['form']!r}; expected train or deploy")
    return ColumnSpec(id=cid, **data)


def _deviations(path, rid, data, reasons) -> dict:
    """A row's `deviations: {column: {status, reason, measured, device}}`; `reason` may name an
    entry of the spec's `reasons:` (one text shared by many cells)."""
    if not isinstance(data, dict):
        _fail(path, f"row '{rid}' has deviations {data!r}; expected a mapping {{column: {{status, reason, ...}}}}")
    out = {}
    for cid, dev in data.items():
        where = f"row '{rid}', deviation of '{cid}'"
        _check_fields(path, where, dev, _DEVIATION_FIELDS)
        if dev.get("status") not in DEVIATION_STATUSES:
            _fail(path, f"{where} has status {dev.get('status')!r}; expected one of {DEVIATION_STATUSES}")
        reason = reasons.get(dev.get("reason"), dev.get("reason"))
        if not isinstance(reason, str) or not reason.strip():
            _fail(path, f"{where} needs a `reason:` (text, or a key of the spec's `reasons:`)")
        measured, within = dev.get("measured"), dev.get("within")
        from reproduce.report import parse_number

        if measured is not None and parse_number(str(measured)) and within is None:
            _fail(path, f"{where} needs `within:` (the accepted ± around measured {measured}, in the cell's unit; "
                        "0 for exact): the window is never inferred from the digits written")
        if within is not None and (isinstance(within, bool) or not isinstance(within, (int, float)) or within < 0
                                   or measured is None):
            _fail(path, f"{where} has within {within!r}; expected a number >= 0 beside a numeric `measured:`")
        out[cid] = Deviation(status=dev["status"], reason=" ".join(reason.split()),
                             measured=None if measured is None else str(measured), device=dev.get("device"),
                             within=None if within is None else float(within))
    return out


def _row(path, rid, data, defaults, reasons) -> RowSpec:
    merged = {**defaults, **(data or {})}
    if "deviations" in merged:
        merged["deviations"] = _deviations(path, rid, merged["deviations"] or {}, reasons)
    known = {k: v for k, v in merged.items() if k in _ROW_FIELDS}
    settings = {k: v for k, v in merged.items() if k not in _ROW_FIELDS}
    if known.get("form", "train") not in ("train", "deploy"):
        _fail(path, f"row '{rid}' has form {known['form']!r}; expected train or deploy")
    if known.get("model_kwargs") is None:
        known.pop("model_kwargs", None)
    if not isinstance(known.get("recipes", {}), dict):
        _fail(path, f"row '{rid}' has recipes {known['recipes']!r}; expected a mapping {{column: recipe}}")
    return RowSpec(id=rid, settings=settings, **known)


def read_reference(table_id: str) -> pd.DataFrame:
    path = REFERENCE_DIR / f"{table_id}.csv"
    if not path.exists():
        raise RegistryError(f"no reference CSV for {table_id}: expected {_show(path)}")
    ref = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(ref.columns) != REFERENCE_COLUMNS:
        _fail(path, f"header must be {','.join(REFERENCE_COLUMNS)}")
    dup = ref[ref.duplicated(["row", "column"], keep=False)]
    if len(dup):
        _fail(path, f"duplicate (row, column) cells: {dup[['row', 'column']].values.tolist()[:5]}")
    return ref


@lru_cache(maxsize=None)
def load_table(table_id: str) -> TableSpec:
    path = TABLES_DIR / f"{table_id}.yaml"
    if not path.exists():
        raise RegistryError(unknown_table_message(table_id))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RegistryError(f"{_show(path)}: not valid YAML: {e}") from None
    _check_fields(path, "the spec", data, _TABLE_FIELDS)
    for key in ("paper", "number", "title", "columns", "rows"):
        if key not in data:
            _fail(path, f"missing field '{key}'")
    if data.get("id", table_id) != table_id:
        _fail(path, f"id {data['id']!r} does not match the file name")
    if data["paper"] not in PAPERS:
        _fail(path, f"paper {data['paper']!r}; expected one of {PAPERS}")
    columns = {cid: _column(path, cid, c) for cid, c in data["columns"].items()}
    defaults = data.get("defaults") or {}
    reasons = data.get("reasons") or {}
    if not isinstance(reasons, dict):
        _fail(path, "`reasons:` must be a mapping {name: text}")
    rows = {rid: _row(path, rid, r, defaults, reasons) for rid, r in data["rows"].items()}
    # `deviations: {row: {column: ...}}` at the top level of a spec: the same as in each row
    table_deviations = data.get("deviations") or {}
    if not isinstance(table_deviations, dict):
        _fail(path, "`deviations:` must be a mapping {row: {column: {status, reason, ...}}}")
    for rid, devs in table_deviations.items():
        if rid not in rows:
            _fail(path, f"`deviations:` names row '{rid}', which is not a row")
        rows[rid] = replace(rows[rid], deviations={**rows[rid].deviations, **_deviations(path, rid, devs, reasons)})
    for row in rows.values():
        if row.baseline and row.baseline not in rows:
            _fail(path, f"row '{row.id}' has baseline '{row.baseline}', which is not a row")
        for col in columns.values():
            if col.model_from and col.model_from not in row.settings and not (row.cited or row.pending):
                _fail(path, f"row '{row.id}' lacks field '{col.model_from}' that column '{col.id}' measures")
        for cid in row.recipes:
            if cid not in columns or columns[cid].kind != "accuracy":
                _fail(path, f"row '{row.id}' names a recipe for '{cid}', which is not an accuracy column")
        for cid in row.deviations:
            if cid not in columns:
                _fail(path, f"row '{row.id}' declares a deviation of '{cid}', which is not a column")
    guards = tuple(tuple(str(g).split("/", 1)) for g in data.get("guards") or ())
    for guard in guards:
        if len(guard) != 2 or guard[0] not in rows or guard[1] not in columns \
                or columns[guard[1]].kind not in DERIVED_KINDS:
            _fail(path, f"guard {'/'.join(guard)!r} must be 'row/column' of a gain or ratio column")
    for col in columns.values():
        for ref_col in (col.of, col.over):
            if ref_col and ref_col not in columns:
                _fail(path, f"column '{col.id}' refers to unknown column '{ref_col}'")
    reference = _with_derived_references(read_reference(table_id), columns, rows)
    missing_rows = sorted(set(reference["row"]) - set(rows))
    missing_cols = sorted(set(reference["column"]) - set(columns))
    if missing_rows:
        _fail(path, f"rows in the reference CSV but not in the spec: {missing_rows}")
    if missing_cols:
        _fail(path, f"columns in the reference CSV but not in the spec: {missing_cols}")
    return TableSpec(id=table_id, paper=data["paper"], number=int(data["number"]), title=data["title"],
                     protocol=data.get("protocol"), columns=columns, rows=rows, reference=reference,
                     spec_path=path, guards=guards)


def _with_derived_references(ref: pd.DataFrame, columns: dict, rows: dict) -> pd.DataFrame:
    """Add the cells of `derive_reported` columns: the paper's gain computed from its printed operands.

    RIFormer Table 8 prints each model's throughput but not the gains it argues with; deriving them
    (and saying so in the note) lets the measured gains be compared with the paper's claim.
    """
    printed = {(r.row, r.column): r for r in ref.itertuples()}
    extra = []
    for col in columns.values():
        if not col.derive_reported:
            continue
        for row in rows.values():
            over_row = row.id if col.over else row.baseline
            a, b = printed.get((row.id, col.of)), printed.get((over_row, col.over or col.of))
            if not (a and b and over_row) or (row.id, col.id) in printed:
                continue
            x, y = float(a.reported), float(b.reported)
            value = f"{100 * (x / y - 1):+.1f}" if col.kind == "gain" else f"{x / y:.2f}"
            extra.append({**a._asdict(), "column": col.id, "reported": value, "unit": col.unit,
                          "note": f"not printed: computed from the printed {col.of} ({a.reported} over "
                                  f"{b.reported} of {b.label})"})
    if not extra:
        return ref
    extra = pd.DataFrame(extra).drop(columns="Index")
    return pd.concat([ref, extra], ignore_index=True)


def resolve_table_id(table_id: str) -> str:
    """Accept 'riformer-6', 'RIFormer-6', 'riformer6'; raise with the known ids otherwise."""
    canonical = re.sub(r"^([a-z]+)-?(\d+)$", r"\1-\2", table_id.strip().lower())
    if canonical in table_ids():
        return canonical
    raise RegistryError(unknown_table_message(table_id))


def load_recipe(relpath: str) -> dict:
    """A training recipe by its path under recipes/ (the engine resolves `base:` inheritance)."""
    from reproduce.engine.recipe import load_recipe as engine_load_recipe

    return engine_load_recipe(RECIPES / relpath)


def load_protocol(name: str) -> dict:
    path = RECIPES / "protocols" / f"{name}.yaml"
    if not path.exists():
        raise RegistryError(f"unknown throughput protocol '{name}': expected {_show(path)}")
    return yaml.safe_load(path.read_text())
