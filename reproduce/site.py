"""`reproduce report --html DIR`: the committed results as one static site a person opens in a browser.

Read from results/<device>/: every table's CSV (laid out by reproduce.report.table_layout, the one
report writer's layout), its Markdown's run block (device, software), the figures' PNGs (inlined as
base64) and plan.csv (the cost of each pending cell). The statuses go to results/<device>/summary.json
first; the index is drawn from that file. No server, no network at view time: every asset is inline.
"""
from __future__ import annotations

import base64
import json
import re
from collections import Counter
from pathlib import Path

import jinja2
import pandas as pd

from reproduce import files, report
from reproduce.errors import SuiteError
from reproduce.registry import RegistryError, load_table

PAPER_TITLES = {"riformer": "RIFormer (CVPR 2023)", "repaformer": "RePaFormer", "sit": "SiT (ECCV 2022)"}
_COMMAND = re.compile(r"`([^`]+)`")


def results_folder(results_root: Path, device: str) -> Path:
    """results/<device tag>/ for a device tag (as committed) or a device (cpu, cuda:0) of this machine."""
    root = Path(results_root)
    if (root / device).is_dir():
        return root / device
    from reproduce.device import resolve
    try:
        folder = root / resolve(device).tag
    except Exception:  # noqa: BLE001 - any unresolvable name is the same bad input
        folder = None
    if folder is None or not folder.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "reference") if root.is_dir() else []
        raise SuiteError(f"no results for device {device!r} under {root}/; "
                         f"pass --device with one of: {', '.join(have) or '(none: run reproduce all-tables)'}")
    return folder


def table_csvs(folder: Path) -> list[Path]:
    from reproduce.registry import _sort_key
    found = [p for p in folder.glob("*.csv") if p.stem not in ("plan",) and not p.stem.startswith("figure-")]
    if not found:
        raise SuiteError(f"{folder}/ holds no table results; run `reproduce all-tables` first")
    return sorted(found, key=lambda p: _sort_key(p.stem))


def _counts(statuses) -> dict:
    counted = Counter(statuses)
    return {s: counted.get(s, 0) for s in report.STATUSES}


def summarize(folder: Path) -> dict:
    """Statuses per table and per paper of the results in `folder` (what summary.json holds)."""
    tables, papers = {}, {}
    for path in table_csvs(folder):
        try:
            spec = load_table(path.stem)
            frame = report.read_results(path)
        except (RegistryError, ValueError) as e:
            raise SuiteError(f"{path}: {e}") from None
        counts = _counts(frame["status"])
        tables[spec.id] = {"paper": spec.paper, "number": spec.number, "title": spec.title,
                           "cells": len(frame), "statuses": counts}
        paper = papers.setdefault(spec.paper, {"tables": [], "statuses": _counts([])})
        paper["tables"].append(spec.id)
        for status, n in counts.items():
            paper["statuses"][status] += n
    return {"device": folder.name, "statuses": list(report.STATUSES), "papers": papers, "tables": tables}


def write_summary(folder: Path) -> Path:
    path = folder / "summary.json"
    files.atomic_write_text(path, json.dumps(summarize(folder), indent=1) + "\n")
    return path


def _plan_costs(folder: Path) -> dict:
    path = folder / "plan.csv"
    if not path.exists():
        return {}
    plan = pd.read_csv(path, dtype=str, keep_default_na=False)
    costs = {}
    for r in plan.itertuples():
        text = f"≈{r.gpu_hours_estimate} {r.gpu.upper()} GPU-h ({r.wall_hours_estimate} h on {r.gpus})"
        low, high = getattr(r, "gpu_hours_low", ""), getattr(r, "gpu_hours_high", "")
        if low and high and low != high:   # the plan's range: FLOP estimate and calibrated (docs/training.md)
            text = f"≈{low}–{high} {r.gpu.upper()} GPU-h (FLOP estimate {r.gpu_hours_estimate}; {r.gpus} GPUs)"
        if r.shared_with:
            text += f"; run shared with {r.shared_with}"
        costs[(r.table, r.row, r.column)] = text
    return costs


def _figures(folder: Path) -> list[dict]:
    figures = []
    for png in sorted(folder.glob("figure-*.png")):
        caption = ""
        csv = png.with_suffix(".csv")
        if csv.exists():
            frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
            caption = "; ".join(f"{k}: {frame[k].iloc[0]}" for k in ("device", "software", "protocol")
                                if k in frame and len(frame))
        figures.append({"id": png.stem.removeprefix("figure-"), "caption": caption,
                        "src": "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()})
    return figures


def _table_view(path: Path, costs: dict) -> dict:
    spec = load_table(path.stem)
    frame = report.read_results(path)
    header, layout = report.table_layout(spec, frame)
    rows = []
    for row_id, label, row_cells in layout:
        cells = []
        for cell in row_cells:
            if cell is None:
                cells.append(None)
                continue
            cells.append({"status": cell.status, "text": report.cell_text(spec, cell), "note": cell.note,
                          "commands": _COMMAND.findall(cell.note), "id": f"{cell.row}.{cell.column}",
                          "cost": costs.get((spec.id, cell.row, cell.column)) if cell.status == "pending" else None})
        rows.append({"id": row_id, "label": label, "cells": cells})
    md = path.with_suffix(".md")
    meta = report.read_markdown_meta(md.read_text()) if md.exists() else {}
    return {"id": spec.id, "title": spec.title, "paper": spec.paper, "number": spec.number, "header": header,
            "rows": rows, "meta": meta}


def _environment():
    return jinja2.Environment(loader=jinja2.PackageLoader("reproduce", "templates"),
                              autoescape=jinja2.select_autoescape(["html", "j2"]),
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def write_site(folder: Path, out_dir: Path) -> Path:
    """summary.json in `folder`, then the site in `out_dir` (index.html and one page per table)."""
    summary_path = write_summary(folder)
    summary = json.loads(summary_path.read_text())
    costs = _plan_costs(folder)
    env = _environment()
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SuiteError(f"cannot write the report to {out_dir}/ ({e.strerror}); pass another --html") from None
    views = [_table_view(path, costs) for path in table_csvs(folder)]
    runs = {}
    for view in views:  # the device/software lines the tables were measured with, most frequent first
        key = tuple((k, v) for k, v in view["meta"].items() if k in ("device", "device tag", "software"))
        runs.setdefault(key, []).append(view["id"])
    page = env.get_template("table.html.j2")
    for view in views:
        files.atomic_write_text(out_dir / f"{view['id']}.html",
                                page.render(table=view, summary=summary, statuses=report.STATUSES,
                                            marks=report.STATUS_MARK))
    index = out_dir / "index.html"
    files.atomic_write_text(index, env.get_template("index.html.j2").render(
        summary=summary, statuses=report.STATUSES, marks=report.STATUS_MARK, paper_titles=PAPER_TITLES,
        runs=sorted(runs.items(), key=lambda kv: -len(kv[1])), figures=_figures(folder),
        pending_cost=sum(1 for k in costs)))
    return index
