"""`reproduce`: the command line of the suite.

    reproduce list                         every table and what the suite covers of it
    reproduce table riformer-6             measure a table, write results/<device>/riformer-6.{csv,md}
    reproduce diff riformer-6              results vs reference, declared deviations and committed results
    reproduce verify riformer-6            every filled accuracy cell derived again from its per-image evidence
    reproduce all-tables                   every table at this machine's scale
    reproduce bench riformer_s12 ...       ad-hoc throughput with the same harness
    reproduce plan --all                   what the pending accuracy cells cost to fill (estimates)
    reproduce report                       the results as a static site, results/<device>/site/index.html
    reproduce submit riformer-2 --cluster slurm   the pending cells as cluster jobs (docs/cluster.md)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

import riformer  # noqa: F401  (torchvision shim and model registration before anything else)
from reproduce import measure
from reproduce.errors import SuiteError, console
from reproduce.errors import device as _device
from reproduce.errors import table_id as _table_id
from reproduce.registry import RegistryError, load_table, table_ids

out = Console()

COLUMN_CHOICES = {"params", "macs", "throughput", "accuracy", "settings"}


def _spec(table_id: str):
    try:
        return load_table(_table_id(table_id))
    except RegistryError as e:
        raise SuiteError(str(e)) from None


def _kinds(columns: str | None) -> set[str] | None:
    if not columns:
        return None
    asked = {c.strip() for c in columns.split(",") if c.strip()}
    unknown = asked - COLUMN_CHOICES
    if unknown:
        raise SuiteError(f"unknown column(s) {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(sorted(COLUMN_CHOICES))}")
    return {"setting" if c == "settings" else c for c in asked}


def _writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise SuiteError(f"results folder {folder} is not writable ({e.strerror}); "
                         "fix its permissions or pass --results-dir") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reproduce")
def main():
    """Reproduce RIFormer, RePaFormer and SiT table by table, and say where each number stands."""


LIST_LEGEND = ("a/b: printed cells whose path works here / all printed cells of that kind. A cell counts when its "
               "model builds, its setting is read from a model or a recipe (not only declared in the spec), its "
               "recipe builds its student and teachers (or its released weights are known); absolute images/s "
               "count only on the paper's device. results: statuses of the last run on this device "
               "(✓ match, ≈ within tolerance, ✗ mismatch, ◇ declared, … pending, c cited).")


@main.command("list")
@click.option("--format", "fmt", type=click.Choice(["auto", "table", "md", "csv"]), default="auto", show_default=True,
              help="auto: a table on a terminal, Markdown when piped")
@click.option("--device", default="cpu", show_default=True, help="coverage and results of this device")
@click.option("--results-dir", type=click.Path(path_type=Path), help="results root (default: results/)")
def list_tables(fmt, device, results_dir):
    """Every table and how much of it the suite can fill here (the first call builds each model once)."""
    from rich.progress import Progress

    from reproduce.coverage import COVERAGE_KINDS, table_coverage

    device = _device(device)
    lines = []
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("coverage", total=len(table_ids()))
        for table_id in table_ids():
            progress.update(task, description=f"coverage · {table_id}")
            try:
                spec = load_table(table_id)
                lines.append((table_id, spec, table_coverage(spec, device, results_dir)))
            except RegistryError as e:
                lines.append((table_id, None, str(e)))
            progress.advance(task)
    if fmt == "auto":
        fmt = "table" if out.is_terminal else "md"
    headers = ["table", "static", "throughput", "accuracy", "settings", "results", "title"]

    def row(table_id, spec, cov):
        if spec is None:
            return [table_id, "", "", "", "", "error", cov]
        return [table_id, *(cov.text(k) for k in COVERAGE_KINDS), cov.results_text(), spec.title]

    if fmt == "csv":
        import csv

        from reproduce import report

        writer = csv.writer(sys.stdout)
        writer.writerow(["table", "paper", "number", "title", *(f"{k}{end}" for k in COVERAGE_KINDS
                                                                for end in ("_covered", "_total")),
                         *report.STATUSES])
        for table_id, spec, cov in lines:
            if spec is None:
                writer.writerow([table_id, "", "", cov])
                continue
            writer.writerow([table_id, spec.paper, spec.number, spec.title,
                             *(n for k in COVERAGE_KINDS for n in (cov.can[k], cov.total[k])),
                             *((cov.statuses or {}).get(s, 0) for s in report.STATUSES)])
        return
    if fmt == "md":
        from tabulate import tabulate

        click.echo(tabulate([row(*line) for line in lines], headers=headers, tablefmt="github"))
        click.echo("\n" + LIST_LEGEND)
        return
    from rich import box

    wide = out.width >= 120
    grid = Table(*(headers if wide else headers[:-1]), box=box.SIMPLE_HEAD, pad_edge=False, caption=LIST_LEGEND,
                 caption_justify="left")
    if wide:
        grid.columns[-1].overflow, grid.columns[-1].no_wrap = "ellipsis", True
    for line in lines:
        cells = row(*line)
        grid.add_row(*(cells if wide else cells[:-1]))
    out.print(grid)


def _rows(spec, rows: str | None) -> set[str] | None:
    if not rows:
        return None
    asked = {r.strip() for r in rows.split(",") if r.strip()}
    unknown = sorted(asked - set(spec.rows))
    if unknown:
        raise SuiteError(f"{spec.id} has no row(s) {', '.join(unknown)}; its rows: {', '.join(spec.rows)}")
    return asked


def _run_one(table_id, columns, device, results_dir, no_cache, quiet, rows=None, timing=None):
    from reproduce.runner import MeasurementCache, results_paths, run_table

    spec = _spec(table_id)
    kinds = _kinds(columns)
    csv_path, _ = results_paths(spec.id, device, results_dir)
    _writable(csv_path.parent)
    try:
        frame, csv_path, md_path = run_table(spec, device, kinds, results_dir,
                                             MeasurementCache(enabled=not no_cache), show_progress=not quiet,
                                             rows=_rows(spec, rows), protocol_overrides=timing)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted:[/] nothing written for {spec.id}; finished measurements are "
                      "cached, so running the command again resumes")
        sys.exit(130)
    counts = frame["status"].value_counts().to_dict()
    console.print(f"{spec.id}: wrote {csv_path} and {md_path.name} — " +
                  ", ".join(f"{v} {k}" for k, v in counts.items()), highlight=False)
    return md_path


@main.command()
@click.argument("table_id")
@click.option("--columns", help="comma-separated: params,macs,throughput,accuracy,settings (default: all)")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N]")
@click.option("--results-dir", type=click.Path(path_type=Path), help="results root (default: results/)")
@click.option("--no-cache", is_flag=True, help="measure again instead of reusing cached measurements")
@click.option("--quiet", is_flag=True, help="no progress bars, no table printout")
@click.option("--rows", help="comma-separated row ids: measure only these (the other rows' results are kept)")
@click.option("--runs", type=click.IntRange(min=1), help="timed passes (or seconds) per repeat instead of the protocol's")
@click.option("--repeats", type=click.IntRange(min=1), help="timings per model instead of the protocol's")
@click.option("--warmup", type=click.IntRange(min=0), help="warm-up passes (or seconds) instead of the protocol's")
@click.option("--weights", "weights_dir", type=click.Path(path_type=Path), default=None,
              help="folder of released weights (recipes/weights.yaml): evaluate the rows whose file is there first")
@click.option("--data", default=None, help="ImageNet-1k root (validation/ folder), with --weights")
def table(table_id, columns, device, results_dir, no_cache, quiet, rows, runs, repeats, warmup, weights_dir, data):
    """Measure TABLE_ID (e.g. riformer-6) and print it beside the paper."""
    device = _device(device)
    if weights_dir:
        _evaluate_released(table_id, weights_dir, data)
    md_path = _run_one(table_id, columns, device, results_dir, no_cache, quiet, rows,
                       dict(runs=runs, repeats=repeats, warmup=warmup))
    if not quiet:
        out.print(Markdown(md_path.read_text()))


@main.command("all-tables")
@click.option("--columns", help="comma-separated column kinds (default: all)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--results-dir", type=click.Path(path_type=Path))
@click.option("--no-cache", is_flag=True)
def all_tables(columns, device, results_dir, no_cache):
    """Every registered table at this machine's scale (a second run reuses cached measurements)."""
    device = _device(device)
    for table_id in table_ids():
        _run_one(table_id, columns, device, results_dir, no_cache, quiet=False)


def _evaluate_released(table_id, weights_dir, data):
    from reproduce import weights
    from reproduce.engine import EngineError, cells

    if not data:
        raise SuiteError("--weights needs --data /path/to/imagenet (the validation set to evaluate on)")
    if not Path(weights_dir).is_dir():
        raise SuiteError(f"weights folder {weights_dir} does not exist")
    spec = _spec(table_id)
    try:
        done = cells.evaluate_table(spec, weights_dir, data, echo=lambda line: console.print(line, highlight=False))
    except (weights.WeightsError, EngineError) as err:
        raise SuiteError(str(err)) from None
    console.print(f"{spec.id}: evaluated {len(done)} row(s) from released weights in {weights_dir}", highlight=False)


def _echo_needed_files(spec) -> list:
    """The teacher and initial-weight files the table's recipes load in a real run (not the released
    files above: these sit where each recipe names them), with where each comes from. Returns the
    missing ones the manifest has a release of, as (release, folder the recipes read it from)."""
    from reproduce import weights
    from reproduce.engine.dryrun import how_to_get, needed_files
    from reproduce.engine.recipe import load_recipe
    from reproduce.registry import RECIPES

    needed: dict[str, list[str]] = {}
    recipes = {r for row in spec.rows.values() for r in [row.recipe, *row.recipes.values()] if r}
    for recipe in sorted(r for r in recipes if (RECIPES / r).is_file()):
        for _, path in needed_files(load_recipe(RECIPES / recipe)):
            needed.setdefault(path, []).append(recipe)
    if not needed:
        return []
    click.echo(f"{spec.id}: teacher/init files its recipes load in a real run")
    fetch = []
    for path, users in sorted(needed.items()):
        used = f"{path} ({len(users)} recipe{'s' if len(users) > 1 else ''})"
        release = next((r for r in weights.releases().values() if r.local_name == Path(path).name), None)
        if Path(path).is_file():
            click.echo("\n".join(weights.wrap(f"{used}: ✓", "  ")))
        elif release is not None:
            fetch.append((release, Path(path).parent))
            click.echo("\n".join(weights.release_block(f"{used}, {release.project}", release, "missing",
                                                        get=how_to_get(path, spec.id))))
        else:
            click.echo("\n".join(weights.wrap(f"{used}: missing: {how_to_get(path, spec.id)}", "  ")))
    click.echo("")
    return fetch


@main.command("weights")
@click.argument("table_ids", nargs=-1)
@click.option("--weights", "weights_dir", type=click.Path(path_type=Path), default=Path("weights"), show_default=True,
              help="the folder that holds (or will hold) the released files")
@click.option("--download", is_flag=True, help="fetch the missing files (needs a network); teacher/init files "
                                               "into the folder their recipes read them from")
def weights_command(table_ids, weights_dir, download):
    """What released weights each table needs (recipes/weights.yaml) and what the folder holds: per file its
    URL, size, published top-1 and eval transform, then the teacher/init files the table's recipes load."""
    from reproduce import weights

    ids = [_table_id(t) for t in table_ids] or weights.tables()
    if not weights_dir.is_dir():
        click.echo("\n".join(weights.wrap(
            f"weights folder {weights_dir} does not exist: every file below is missing "
            f"({'--download creates it' if download else 'create it, or pass --weights DIR'})", "")))
    missing, held = [], 0
    for table_id in ids:
        click.echo("\n".join(weights.wrap(f"{table_id}: released weights (recipes/weights.yaml), folder {weights_dir}",
                                           "")))
        for row in weights.accuracy_rows(_spec(table_id)):
            entries = weights.column_releases(table_id, row) or {None: weights.release_of(table_id, row)}
            why = weights.why_none(table_id, row)
            for column, release in entries.items():
                if release is None:
                    continue
                try:
                    state = "✓" if weights.find(release, weights_dir) else "missing"
                except weights.WeightsError as err:
                    state = str(err)
                missing += [(release, weights_dir)] if state == "missing" else []
                held += state == "✓"
                head = f"{row}/{column}" if column else row
                click.echo("\n".join(weights.release_block(f"{head}: {release.local_name} ({release.project})",
                                                            release, state)))
            if why or not any(entries.values()):
                click.echo("\n".join(weights.wrap(f"{row}: " + (f"none: {why}" if why else "not in recipes/weights.yaml"),
                                                   "  ")))
        click.echo("")
    for table_id in ids:
        missing += _echo_needed_files(_spec(table_id))
    to_fetch = list({(r.name, str(folder)): (r, folder) for r, folder in missing}.values())
    by_browser = [(r, folder) for r, folder in to_fetch if weights.needs_browser(r)]
    if missing or held:
        click.echo("\n".join(weights.wrap(
            f"{held} file(s) in {weights_dir}, {len(to_fetch)} missing" + ("" if download else
            f" (--download fetches the {len(to_fetch) - len(by_browser)} direct links where there is a network)"), "")))
    if by_browser:
        click.echo("\n".join(weights.wrap(
            f"{len(by_browser)} file(s) need a browser (Google Drive share pages; --download cannot fetch them): "
            "open each link, save the file under the name shown:", "")))
        for release, folder in by_browser:
            click.echo(f"  {folder / release.local_name}\n      {release.url}")
    if download:
        failed = 0
        for release, folder in to_fetch:
            if weights.needs_browser(release):
                continue
            try:  # every file is tried; each failure is one line
                folder.mkdir(parents=True, exist_ok=True)
                weights.download(release, folder)
                console.print(f"downloaded {folder / release.local_name}", highlight=False)
            except (weights.WeightsError, OSError) as err:
                failed += 1
                click.echo(f"failed: {err}")
        if failed:
            raise SuiteError(f"{failed} of {len(to_fetch) - len(by_browser)} download(s) failed (one line each above)")


def _results_files(table_ids, all_results: bool, results_dir) -> list[Path]:
    """The results CSVs TABLE_IDS (or --all) name, for diff and verify; one line if there are none."""
    from reproduce.checks import results_files

    if not table_ids and not all_results:
        raise SuiteError("name a table id (e.g. riformer-6) or pass --all")
    ids = [_table_id(t) for t in table_ids] or None
    files = results_files(ids, results_dir)
    if not files:
        raise SuiteError(f"no results for {', '.join(ids or ['any table'])}; run `reproduce table "
                         f"{(ids or ['<id>'])[0]}` first")
    return files


@main.command()
@click.argument("table_ids", nargs=-1)
@click.option("--all", "all_results", is_flag=True, help="every table with results, every device")
@click.option("--results-dir", type=click.Path(path_type=Path))
@click.option("--remeasure", is_flag=True,
              help="also measure params and MACs again and time each table's guard gains again (CI)")
@click.option("--update", is_flag=True,
              help="accept the cells that moved as the new baseline (with --remeasure: write the new "
                   "measurement into the results file); commit the file to record it")
@click.option("--against", default="auto", show_default=True,
              help="git revision whose committed results are the baseline; auto: HEAD if the file differs "
                   "from it, else HEAD~1 (the previous state, what CI compares with)")
def diff(table_ids, all_results, results_dir, remeasure, update, against):
    """Check results against the reference, the spec's accepted deviations and the committed results;
    exit 1 on an undeclared mismatch, a moved number, a missing result."""
    from reproduce.checks import check_results

    files = _results_files(table_ids, all_results, results_dir)
    failed = False
    for path in files:
        name = f"{path.parent.name}/{path.name}"
        found = check_results(path, remeasure=remeasure, against=against, update=update,
                              show_progress=console.is_terminal)
        for w in found.warnings:
            console.print(f"[yellow]warning[/] {name}: {w}", highlight=False)
        for m in found.moved:
            console.print(f"[cyan]moved[/] {name}: {m}", highlight=False)
        for a in found.accepted:
            console.print(f"[cyan]accepted[/] {name}: {a}", highlight=False)
        for p in found.problems:
            console.print(f"[red]FAIL[/] {name}: {p}", highlight=False)
        if not found.problems:
            console.print(f"[green]ok[/] {name} (reference, declared deviations; {found.baseline})", highlight=False)
        if found.accepted:
            console.print(f"[cyan]accepted[/] {name}: commit it to make it the baseline", highlight=False)
        failed |= bool(found.problems)
    sys.exit(1 if failed else 0)


@main.command()
@click.argument("table_ids", nargs=-1)
@click.option("--all", "all_results", is_flag=True, help="every table with results, every device")
@click.option("--results-dir", type=click.Path(path_type=Path))
@click.option("--data", default=None, help="ImageNet-1k root: also run each cell's checkpoint again on a sample")
@click.option("--sample", type=click.IntRange(min=1), default=256, show_default=True,
              help="images per cell re-run with --data (a seeded choice among its evidence's)")
@click.option("--seed", default=0, show_default=True, help="seed of the --data sample")
def verify(table_ids, all_results, results_dir, data, sample, seed):
    """Derive every filled accuracy cell of the results again from its per-image evidence (and with
    --data, run its checkpoint again on a sample of images); exit 1 on any cell refused or disagreeing."""
    from reproduce.verify import verify_results

    files = _results_files(table_ids, all_results, results_dir)
    cells = failed = 0
    for path in files:
        verdicts = verify_results(path, data=data, sample=sample, seed=seed)
        for v in verdicts:
            console.print(f"[green]ok[/] {v.cell}: {v.line}" if v.ok else f"[red]FAIL[/] {v.cell}: {v.line}",
                          highlight=False)
        if not verdicts:
            console.print(f"{path.parent.name}/{path.stem}: no filled accuracy cell to verify", highlight=False)
        cells, failed = cells + len(verdicts), failed + sum(not v.ok for v in verdicts)
    console.print(f"{cells} filled accuracy cell(s): {cells - failed} verified, {failed} failed", highlight=False)
    sys.exit(1 if failed else 0)


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--img-size", default=224, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--form", type=click.Choice(measure.FORMS), default="train", show_default=True,
              help="deploy+fold also folds RIFormer's layer scales (beyond the paper)")
@click.option("--batch-size", default=None, type=int, help="default: the protocol's (CPU-scaled) batch")
@click.option("--runs", default=None, type=int)
@click.option("--repeats", default=None, type=int)
@click.option("--protocol", default="riformer", show_default=True, help="recipes/protocols/<name>.yaml")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None)
@click.option("--channels-last", is_flag=True)
@click.option("--compile", "use_compile", is_flag=True)
def bench(models, img_size, device, form, batch_size, runs, repeats, protocol, dtype, channels_last, use_compile):
    """Throughput of MODELS (timm names) with the suite's harness."""
    from dataclasses import replace

    from reproduce.registry import load_protocol

    device = _device(device)
    try:
        proto = measure.Protocol.for_device(load_protocol(protocol), device, img_size)
    except RegistryError as e:
        raise SuiteError(str(e)) from None
    overrides = {k: v for k, v in dict(batch_size=batch_size, runs=runs, repeats=repeats, dtype=dtype).items() if v}
    proto = replace(proto, **overrides, channels_last=channels_last or proto.channels_last,
                    compile=use_compile or proto.compile)
    if proto.batch_size < 1:
        raise SuiteError("--batch-size must be at least 1")
    from rich.table import Column

    # a model name is never wrapped or cut (the numbers' headers wrap instead at 80 columns)
    grid = Table(Column("model", no_wrap=True), "form", "img/s (median)", "range", "batch", "params (M)")
    for name in models:
        try:
            model = measure.build_model(name, form=form)
        except (measure.ModelNotImplemented, measure.MeasureError) as e:
            raise SuiteError(str(e)) from None
        params = measure.count_params(model)
        try:
            result = measure.measure_throughput(model, img_size, proto, device)
        except measure.MeasureError as e:
            raise SuiteError(f"{name}: {e}") from None
        grid.add_row(name, form, f"{result['img_per_s']:.1f}", f"{result['min']:.1f}–{result['max']:.1f}",
                     str(result["batch_size"]), f"{params:.2f}")
    out.print(grid)
    env = measure.environment(device)
    console.print(f"{env['device']} · torch {env['torch']} · timm {env['timm']} · {proto.describe()}"
                  + ("" if proto.threads else f", {env['threads']} threads"), highlight=False)


@main.command("report")
@click.option("--device", default="cpu", show_default=True,
              help="a results/ folder name (cpu-amd-epyc-2c) or a device of this machine")
@click.option("--results-dir", type=click.Path(path_type=Path), help="results root (default: results/)")
@click.option("--html", "html_dir", type=click.Path(path_type=Path),
              help="where the site goes (default: results/<device>/site/)")
def report_command(device, results_dir, html_dir):
    """The results as a static site (open its index.html) and results/<device>/summary.json."""
    from reproduce import site
    from reproduce.runner import RESULTS_DIR

    folder = site.results_folder(results_dir or RESULTS_DIR, device)
    index = site.write_site(folder, html_dir or folder / "site")
    console.print(f"wrote {folder / 'summary.json'} and {index}", highlight=False)


@main.command("submit")
@click.argument("table_id")
@click.argument("rows", nargs=-1)
@click.option("--column", default=None, help="only the pending cells of this accuracy column")
@click.option("--cluster", type=click.Choice(["slurm", "local"]), required=True,
              help="slurm: sbatch through submitit; local: processes on this machine")
@click.option("--nodes", default=1, show_default=True, type=int, help="nodes per job")
@click.option("--gpus-per-node", default=0, show_default=True, type=int, help="GPUs per node (one process each)")
@click.option("--tasks-per-node", default=None, type=int, help="processes per node (default: one per GPU, one on CPU)")
@click.option("--cpus-per-task", default=None, type=int, help="CPUs per process (data loading workers + 1)")
@click.option("--partition", default=None, help="SLURM partition (default: the cluster's)")
@click.option("--time", "hours", default=24.0, show_default=True, type=float,
              help="hours per job; a job that reaches it is requeued and resumes from its checkpoint")
@click.option("--scale", type=click.Choice(["full", "smoke"]), default="full", show_default=True,
              help="smoke: the engine's few-step run on generated data (it never fills a cell)")
@click.option("--data", default=None, help="ImageNet root (train/ and validation/), as every node sees it")
@click.option("--include-released", is_flag=True, help="also train cells that released weights fill by evaluation")
@click.option("--dry-run", is_flag=True, help="print each job's script (the sbatch text) and submit nothing")
def submit_command(table_id, rows, column, cluster, nodes, gpus_per_node, tasks_per_node, cpus_per_task, partition,
                   hours, scale, data, include_released, dry_run):
    """One cluster job per distinct run of TABLE's pending accuracy cells (of ROWS): docs/cluster.md."""
    from reproduce import submit

    res = submit.Resources(nodes=nodes, gpus_per_node=gpus_per_node, tasks_per_node=tasks_per_node,
                           cpus_per_task=cpus_per_task, partition=partition, hours=hours)
    submit.submit(_table_id(table_id), rows, column, cluster, res, scale, data, dry_run, include_released,
                  echo=lambda line: click.echo(line))


@main.command("jobs")
@click.argument("table_id", required=False)
@click.option("--tail", default=2, show_default=True, type=click.IntRange(min=0), help="log lines per job")
def jobs_command(table_id, tail):
    """The runs `reproduce submit` sent: job, state, the cells each fills (and what provenance says), log tail."""
    from reproduce import submit

    jobs = submit.jobs_report(_table_id(table_id) if table_id else None, tail)
    if not jobs:
        click.echo(f"no submitted jobs{f' of {table_id}' if table_id else ''} in {submit.registry_path()}")
        return
    for job in jobs:
        click.echo(f"{job['table']}/{job['run']}  {job['cluster']} job {job['job_id']}  {job['state']}  "
                   f"({job['scale']}, {job['nodes']}x{job['tasks_per_node']} processes, submitted {job['submitted']})")
        for verdict in job["verdicts"]:
            click.echo(f"  {verdict}")
        for line in job["log"]:
            click.echo(f"  | {line}")


# Commands that live with their subsystem.
from reproduce.engine.cli import dry_run_command, eval_command, train_command  # noqa: E402
from reproduce.figures import figure_command  # noqa: E402
from reproduce.plan import plan_command  # noqa: E402

main.add_command(train_command, "train")
main.add_command(eval_command, "eval")
main.add_command(dry_run_command, "dry-run")
main.add_command(figure_command, "figure")
main.add_command(plan_command, "plan")

if __name__ == "__main__":
    main()
