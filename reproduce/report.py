"""The one report writer: cell statuses, the long results CSV and the paper-shaped Markdown.

The results CSV is a contract (docs/architecture.md): one line per cell,
`table,row,model,column,reported,measured,low,high,unit,delta,status,note`.
"""
from __future__ import annotations

import io
import math
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from reproduce.files import atomic_write_text

RESULT_COLUMNS = ["table", "row", "model", "column", "reported", "measured", "low", "high", "unit", "delta",
                  "status", "note"]
# declared: a setting whose value only the spec gives (nothing reads it from a model or recipe), so
# it is never a `match`; the cell says what the spec declares.
STATUSES = ("match", "within_tolerance", "mismatch", "declared", "pending", "cited")
STATUS_MARK = {"match": "✓", "within_tolerance": "≈", "mismatch": "✗", "declared": "◇", "pending": "…",
               "cited": "cited"}
MEASURED_STATUSES = ("match", "within_tolerance", "mismatch")

_MINUS = str.maketrans({"−": "-", "–": "-", "×": "x"})


def parse_number(text) -> tuple[float, int] | None:
    """The value and printed decimals of a printed number, or None if it is not one.

    Understands '4899.80', '−2.0', '+84.1%', '(↑ 17.8%)', '3.2×', '1e-8', '10−5', '1× 10−3'.
    """
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    s = str(text).translate(_MINUS).strip().strip("()").replace("↑", "").replace("↓", "-")
    s = s.replace(" ", "").rstrip("%x")
    m = re.fullmatch(r"([+-]?\d+(?:\.\d+)?)?x?10\^?([+-]?\d+)", s)  # 10−5, 1x10−3
    if m and ("10" in s) and not re.fullmatch(r"[+-]?\d+(\.\d+)?", s):
        mantissa = float(m.group(1)) if m.group(1) else 1.0
        return mantissa * 10 ** int(m.group(2)), 0
    if re.fullmatch(r"[+-]?\d+(\.\d+)?[eE][+-]?\d+", s):
        return float(s), 0
    if re.fullmatch(r"[+-]?\d+(\.\d+)?", s):
        decimals = len(s.split(".")[1]) if "." in s else 0
        return float(s), decimals
    return None


def _norm_text(value) -> str:
    """Settings compare without case, spaces or bracket style: {1,1,1,11} == [1, 1, 1, 11]."""
    text = str(value).translate(_MINUS).lower().translate(str.maketrans("{}()", "[][]"))
    return re.sub(r"\s+", "", text)


def round_half_up(value: float, decimals: int) -> float:
    """Rounding as papers print: 24.5 -> 25 (Python's round() would give 24)."""
    quantum = Decimal(1).scaleb(-decimals)
    return float(Decimal(repr(float(value))).quantize(quantum, rounding=ROUND_HALF_UP))


def coarser_printing(reported: str, measured: float) -> str | None:
    """How a printed value that rounding does not give can still come from `measured`.

    Papers often truncate (86.57 M printed as 86) or round twice (24.49 -> 24.5 -> 25, when a
    number is copied from another paper that printed one more decimal). Returns which, or None.
    """
    ref = parse_number(reported)
    if ref is None:
        return None
    value, decimals = ref
    scale = 10 ** decimals
    if math.floor(abs(measured) * scale + 1e-9) / scale == abs(value) and (measured >= 0) == (value >= 0):
        return "truncated"
    if round_half_up(round_half_up(measured, decimals + 1), decimals) == value:
        return "rounded twice"
    return None


def compare(reported: str, measured, tolerance: float | None, kind: str,
            spread: tuple[float, float] | None = None) -> tuple[str, float | None]:
    """Status and delta (measured - reported) of one cell.

    `spread` is the (low, high) range of a noisy value (a throughput gain over its timing rounds):
    the cell is within tolerance when any of the range reaches the tolerance band around the printed
    value, and a mismatch only when the whole range lies outside it (docs/benchmarking.md)."""
    ref = parse_number(reported)
    if kind == "setting":
        got = parse_number(measured) if not isinstance(measured, (int, float)) else (float(measured), 0)
        if ref and got:
            return ("match" if math.isclose(ref[0], got[0], rel_tol=1e-9) else "mismatch"), None
        return ("match" if _norm_text(reported) == _norm_text(measured) else "mismatch"), None
    if ref is None:
        return "mismatch", None
    value, decimals = ref
    delta = float(measured) - value
    if round_half_up(float(measured), decimals) == value:
        return "match", delta
    if tolerance is not None and (abs(delta) <= tolerance + 1e-9 or coarser_printing(reported, float(measured))):
        return "within_tolerance", delta
    if tolerance is not None and spread is not None:
        low, high = min(spread), max(spread)
        if low <= value + tolerance + 1e-9 and high >= value - tolerance - 1e-9:
            return "within_tolerance", delta
    return "mismatch", delta


EXACT_DECIMALS = 6  # params in M to the parameter, MACs in G to the thousand: a changed model shows


def format_measured(value, reported: str, kind: str = "") -> str:
    """Measured numbers carry two more decimals than the printed value, so rounding is visible;
    params and MACs carry six, so that `reproduce diff` sees any change in a model."""
    if isinstance(value, str) or kind == "setting":
        return f"{value:g}" if isinstance(value, float) else str(value)
    if kind in ("params", "macs"):
        return f"{value:.{EXACT_DECIMALS}f}"
    ref = parse_number(reported)
    decimals = (ref[1] if ref else 1) + 2
    return f"{value:.{decimals}f}"


def format_delta(delta: float | None, reported: str) -> str:
    if delta is None:
        return ""
    ref = parse_number(reported)
    return f"{delta:+.{(ref[1] if ref else 1) + 2}f}"


# ---------------------------------------------------------------------------------------------
# Writing


def cells_frame(cells: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(cells, columns=RESULT_COLUMNS, dtype=object).fillna("")
    bad = set(frame["status"]) - set(STATUSES)
    if bad:
        raise ValueError(f"unknown status(es) {sorted(bad)}")
    return frame


PREVIOUS_COLUMNS = [c for c in RESULT_COLUMNS if c not in ("low", "high")]  # the contract before ranges


def read_results(path: Path, text: str | None = None) -> pd.DataFrame:
    """A results CSV (or its `text`, e.g. a committed version); files of the previous contract,
    without the low/high columns, read with those columns empty."""
    frame = pd.read_csv(io.StringIO(text) if text is not None else path, dtype=str, keep_default_na=False)
    if list(frame.columns) == PREVIOUS_COLUMNS:
        frame = frame.reindex(columns=RESULT_COLUMNS, fill_value="")
    if list(frame.columns) != RESULT_COLUMNS:
        raise ValueError(f"{path}: header must be {','.join(RESULT_COLUMNS)}")
    return frame


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, frame.to_csv(index=False))


def table_layout(spec, frame: pd.DataFrame) -> tuple[list[str], list[tuple[str, str, list]]]:
    """The table as the paper lays it out: its header, then for each row that has cells, in the
    paper's order, (row id, printed label, one results line or None per column). Every report
    (Markdown here, the HTML site in reproduce/site.py) is drawn from this."""
    labels = dict(zip(spec.reference["row"], spec.reference["label"]))
    cells = {(r.row, r.column): r for r in frame.itertuples()}
    header = ["Model"] + [f"{c.id} ({c.unit})" if c.unit else c.id for c in spec.columns.values()]
    rows = []
    for row_id in spec.rows:
        if not any((row_id, c) in cells for c in spec.columns):
            continue
        rows.append((row_id, labels.get(row_id, row_id), [cells.get((row_id, c)) for c in spec.columns]))
    return header, rows


def cell_text(spec, cell) -> str:
    """'reported → measured (range) mark' of one cell, as every report prints it."""
    text = cell.reported or "–"
    if cell.measured:
        text += f" → {cell.measured}"
    if cell.low and spec.columns[cell.column].kind in ("gain", "ratio"):
        text += f" ({cell.low}…{cell.high})"
    return text + f" {STATUS_MARK[cell.status]}"


def render_markdown(spec, frame: pd.DataFrame, meta: dict) -> str:
    """The table as the paper lays it out: one line per row, 'reported → measured mark' per cell."""
    header, layout = table_layout(spec, frame)
    lines, notes = [], {}   # note text -> its number: a row's note is numbered once
    for _row_id, label, row_cells in layout:
        line = [label]
        for cell in row_cells:
            if cell is None:
                line.append("")
                continue
            text = cell_text(spec, cell)
            if cell.note:
                text += f" [{notes.setdefault(cell.note, len(notes) + 1)}]"
            line.append(text)
        lines.append(line)
    counts = frame["status"].value_counts()
    summary = ", ".join(f"{counts[s]} {s}" for s in STATUSES if s in counts)
    out = [f"# {spec.id}: {spec.title}", "",
           f"Paper: {spec.paper}, Table {spec.number}. Cells: {summary}.",
           "Each cell reads `reported → measured (range over timing rounds) mark`; marks: ✓ match at the "
           "printed precision, ≈ within tolerance, ✗ mismatch, ◇ declared (only the spec gives the value), "
           "… pending, cited.", ""]
    if meta:
        out += ["| run | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in meta.items()] + [""]
    out += [tabulate(lines, headers=header, tablefmt="github"), ""]
    if notes:
        out += ["## Notes", ""] + [f"{i}. {n}" for n, i in notes.items()] + [""]
    return "\n".join(out)


def read_markdown_meta(text: str) -> dict:
    """The run's `| run | value |` block of a Markdown report that render_markdown wrote."""
    meta, inside = {}, False
    for line in text.splitlines():
        if line == "| run | value |":
            inside = True
        elif inside and line.startswith("| ") and not line.startswith("|---"):
            key, _, value = line[2:].rstrip(" |").partition(" | ")
            meta[key] = value
        elif inside and not line.startswith("|"):
            break
    return meta
