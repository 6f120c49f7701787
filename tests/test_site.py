"""`reproduce report`: summary.json, and the static site opened in a real headless Chromium.

The browser checks load every page of the site in iframes of one harness page (one Chromium run per
width: the iframe's width is the page's viewport, exactly 390 or 1280 px, where headless Chromium's
window would not go below 500 px), read each page's DOM and compare it with the results CSVs. Planted
faults (a table page missing, a mismatch's note removed, a script error, a page wider than the phone)
must each be reported by the same checks.
"""
from __future__ import annotations

import html
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from reproduce import report, site
from reproduce.cli import main
from reproduce.runner import RESULTS_DIR

DEVICE = "cpu-amd-epyc-2c"  # the committed results
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not installed (/usr/bin/chromium): `apt-get install -y chromium`")

HARNESS = """<!doctype html><html><body>
{frames}
<script>
window.addEventListener("load", function () {{
  var out = {{}};
  document.querySelectorAll("iframe").forEach(function (f) {{
    var r = {{rendered: false}};
    try {{
      var d = f.contentDocument, b = d && d.body;
      if (b && b.dataset.ready === "1") {{
        r.rendered = true;
        r.overflow = b.dataset.overflow;
        r.width = Number(b.dataset.width);
        r.errors = d.getElementById("page-errors").textContent;
        var t = d.querySelector("table#cells");
        r.table = t ? t.dataset.table : null;
        r.cells = Array.from(d.querySelectorAll("td[data-cell]")).map(function (td) {{
          var n = td.querySelector(".note-text");
          return [td.dataset.cell, td.dataset.status, n ? n.textContent : ""]; }});
        r.index_tables = Array.from(d.querySelectorAll("#tables tr[data-table]"))
          .map(function (tr) {{ return tr.dataset.table; }});
        r.images = Array.from(d.querySelectorAll("img.figure"))
          .filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
      }}
    }} catch (e) {{ r.error = String(e); }}
    out[f.dataset.name] = r;
  }});
  var pre = document.createElement("pre"); pre.id = "result";
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
}});
</script></body></html>"""


def chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"  # a fresh profile each run
    return subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


def render(site_dir: Path, width: int, tmp: Path) -> tuple[dict, str]:
    """Every page of the site at `width` px: {page: what its DOM holds}, and Chromium's stderr."""
    pages = ["index"] + [p.stem for p in site_dir.glob("*.html") if p.stem != "index"]
    pages += [t for t in json.loads((site_dir.parent / "summary.json").read_text())["tables"]
              if t not in pages] if (site_dir.parent / "summary.json").exists() else []
    frames = "\n".join(f'<iframe data-name="{p}" src="{(site_dir / f"{p}.html").as_uri()}" width="{width}" '
                       f'height="800"></iframe>' for p in sorted(set(pages)))
    harness = tmp / f"harness-{width}.html"
    harness.write_text(HARNESS.format(frames=frames))
    done = chromium(["--allow-file-access-from-files", "--enable-logging=stderr", "--v=0",
                     "--dump-dom", harness.as_uri()], tmp)
    found = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the harness did not finish: {done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1))), done.stderr


def site_problems(folder: Path, site_dir: Path, width: int, tmp: Path) -> list[str]:
    """What is wrong with the site of results `folder` at `width` px, checked against its CSVs."""
    pages, stderr = render(site_dir, width, tmp)
    problems = [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    summary = json.loads((folder / "summary.json").read_text())
    index = pages.get("index", {})
    if not index.get("rendered"):
        return problems + ["index.html did not render"]
    if index["index_tables"] != list(summary["tables"]):
        problems.append(f"index lists {index['index_tables']}, summary.json {list(summary['tables'])}")
    if index["images"] != len(list(folder.glob("figure-*.png"))):
        problems.append(f"index shows {index['images']} figures of {len(list(folder.glob('figure-*.png')))}")
    for csv in site.table_csvs(folder):
        page = pages.get(csv.stem, {})
        if not page.get("rendered") or page.get("table") != csv.stem:
            problems.append(f"{csv.stem}: its page did not render ({page.get('error', 'no table#cells')})")
            continue
        shown = {cell: (status, note) for cell, status, note in page["cells"]}
        for r in report.read_results(csv).itertuples():
            got = shown.get(f"{r.row}.{r.column}")
            if got is None:
                problems.append(f"{csv.stem}: cell {r.row}.{r.column} missing")
            elif got[0] != r.status:
                problems.append(f"{csv.stem}: cell {r.row}.{r.column} shows {got[0]}, the CSV {r.status}")
            elif r.status == "mismatch" and (not got[1] or got[1] != r.note):
                problems.append(f"{csv.stem}: mismatch {r.row}.{r.column} does not show its note")
    for name, page in pages.items():
        if page.get("rendered") and page["errors"]:
            problems.append(f"{name}: script error {page['errors'].strip()}")
        if page.get("rendered") and (page["overflow"] != "0" or page["width"] > width):
            problems.append(f"{name}: wider than {width} px (the page scrolls sideways)")
    return problems


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The committed results copied aside (summary.json is written there), and their site."""
    tmp = tmp_path_factory.mktemp("site")
    folder = tmp / "results" / DEVICE
    shutil.copytree(RESULTS_DIR / DEVICE, folder, ignore=shutil.ignore_patterns("site", "cache"))
    result = CliRunner().invoke(main, ["report", "--results-dir", str(tmp / "results"), "--device", DEVICE])
    assert result.exit_code == 0, result.output
    return folder, folder / "site"


def planted(built, tmp_path) -> tuple[Path, Path]:
    folder, site_dir = built
    copy = tmp_path / "results" / DEVICE
    shutil.copytree(folder, copy)
    return copy, copy / "site"


def test_summary_counts_every_cell(built):
    folder, _ = built
    summary = json.loads((folder / "summary.json").read_text())
    csvs = site.table_csvs(folder)
    assert list(summary["tables"]) == [p.stem for p in csvs]
    total = {s: 0 for s in report.STATUSES}
    for path in csvs:
        counts = report.read_results(path)["status"].value_counts().to_dict()
        assert summary["tables"][path.stem]["statuses"] == {s: counts.get(s, 0) for s in report.STATUSES}
        for s, n in counts.items():
            total[s] += n
    by_paper = {s: sum(p["statuses"][s] for p in summary["papers"].values()) for s in report.STATUSES}
    assert by_paper == total
    assert set(summary["papers"]) == {"riformer", "repaformer", "sit"}


def test_committed_summary_is_current(built):
    folder, _ = built
    committed = RESULTS_DIR / DEVICE / "summary.json"
    assert committed.exists() and committed.read_text() == (folder / "summary.json").read_text(), \
        f"{committed} is stale: run `reproduce report --device {DEVICE}`"


def test_pages_carry_layout_notes_costs_and_figures(built):
    folder, site_dir = built
    page = (site_dir / "riformer-1.html").read_text()
    frame = report.read_results(folder / "riformer-1.csv")
    spec = site.load_table("riformer-1")
    for r in frame.itertuples():
        assert html.escape(report.cell_text(spec, r), quote=False) in page   # the Markdown's cell text
    assert "reproduce train riformer-1 pooling_ce_loss" in page            # the command, from the note
    assert re.search(r'class="cost">plan: ≈[\d.]+(–[\d.]+)? A100 GPU-h', page)          # plan.csv's estimate
    index = (site_dir / "index.html").read_text()
    assert index.count('src="data:image/png;base64,') == len(list(folder.glob("figure-*.png")))
    assert "torch 2.13.0+cpu" in index                                     # the run's software
    assert not re.search(r'(src|href)="(https?:)?//', index + page)        # nothing fetched at view time


def test_bad_input_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["report", "--results-dir", str(RESULTS_DIR), "--device", "nosuch"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    empty = tmp_path / "results" / "cpu-x"
    empty.mkdir(parents=True)
    result = CliRunner().invoke(main, ["report", "--results-dir", str(tmp_path / "results"), "--device", "cpu-x"])
    assert result.exit_code == 2 and "reproduce all-tables" in result.output


def test_templates_ship_as_package_data():
    import tomllib
    pattern = tomllib.loads((RESULTS_DIR.parent / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["reproduce"]
    templates = sorted(p.relative_to(Path(site.__file__).parent) for p in
                       (Path(site.__file__).parent / "templates").iterdir())
    assert templates and all(any(t.match(p) for p in pattern) for t in templates)


@needs_chromium
@pytest.mark.parametrize("width", [1280, 390])
def test_site_in_chromium(built, tmp_path, width):
    folder, site_dir = built
    assert site_problems(folder, site_dir, width, tmp_path) == []
    shot = tmp_path / f"index-{width}.png"
    done = chromium([f"--window-size={width},900", f"--screenshot={shot}", (site_dir / "index.html").as_uri()],
                    tmp_path)
    assert shot.exists(), done.stderr[-2000:]
    assert struct.unpack(">II", shot.read_bytes()[16:24])[0] == width   # PNG IHDR: the width asked for


@needs_chromium
def test_planted_missing_table_is_caught(built, tmp_path):
    folder, site_dir = planted(built, tmp_path)
    (site_dir / "riformer-6.html").unlink()
    index = site_dir / "index.html"
    index.write_text(re.sub(r'<tr data-table="sit-3">.*?</tr>', "", index.read_text(), flags=re.S))
    problems = site_problems(folder, site_dir, 1280, tmp_path)
    assert any(p.startswith("riformer-6: its page did not render") for p in problems), problems
    assert any(p.startswith("index lists") for p in problems), problems


@needs_chromium
def test_planted_missing_note_is_caught(built, tmp_path):
    folder, site_dir = planted(built, tmp_path)
    frame = report.read_results(folder / "repaformer-1.csv")
    assert (frame["status"] == "mismatch").any(), "repaformer-1 has no mismatch to plant on: pick another"
    page = site_dir / "repaformer-1.html"
    text = page.read_text()
    cell = frame[frame["status"] == "mismatch"].iloc[0]
    start = text.index(f'data-cell="{cell.row}.{cell.column}"')
    note = re.compile(r'<span class="note-text">.*?</span>', re.S)
    found = note.search(text, start)
    page.write_text(text[:found.start()] + text[found.end():])
    problems = site_problems(folder, site_dir, 1280, tmp_path)
    assert problems == [f"repaformer-1: mismatch {cell.row}.{cell.column} does not show its note"], problems


@needs_chromium
def test_planted_script_error_and_overflow_are_caught(built, tmp_path):
    folder, site_dir = planted(built, tmp_path)
    page = site_dir / "sit-2.html"
    page.write_text(page.read_text().replace("</body>", "<script>undefinedFunction()</script></body>"))
    page = site_dir / "riformer-6.html"   # its table no longer scrolls in its own box
    page.write_text(page.read_text().replace(".scroll { overflow-x: auto;", ".scroll {"))
    problems = site_problems(folder, site_dir, 390, tmp_path)
    assert any(p.startswith("sit-2: script error") and "undefinedFunction" in p for p in problems), problems
    assert any(p == "riformer-6: wider than 390 px (the page scrolls sideways)" for p in problems), problems
